//! Wiring: config -> outbox + publisher + relay + router (+ the task
//! registry, reconciler and verifier), and the ordered shutdown (stop
//! accepting, finish the batch in flight, flush, exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::{AppState, Edge};
use crate::outbox::{Outbox, Relay};
use crate::poll::{Reconciler, Tasks, Verifier};
use crate::publish::{self, Publisher};

/// How often expired dedup records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A built, bound, not yet running hookbridge.
pub struct App {
    listener: TcpListener,
    /// The admin listener and the public listener's limits.
    edge: Edge,
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    state: AppState,
    reconciler: Option<Reconciler>,
    verifier: Option<Verifier>,
    registry_retention_ms: i64,
}

impl App {
    /// Opens the outbox, creates the publisher (without waiting for the
    /// broker) and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let outbox = Outbox::open(&config.outbox).context("cannot open the outbox")?;
        let tasks = Tasks::open(&config).context("cannot open the task registry")?;
        let publisher: Arc<dyn Publisher> = Arc::from(
            publish::build(&config.publisher)
                .await
                .context("cannot create the publisher")?,
        );
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| {
                format!("cannot listen on server.listen = {}", config.server.listen)
            })?;
        let edge = Edge::bind(&config).await?;
        let state = AppState {
            outbox: outbox.clone(),
            publisher_name: publisher.name(),
            body_limit: config.server.body_limit_bytes,
            admin_on_loopback: config.admin.listen.ip().is_loopback(),
            admin_token: config.admin.token.clone(),
            tasks: tasks.clone(),
        };
        let in_flight = config.provider.max_in_flight;
        let reconciler = config
            .reconcile
            .enabled
            .then(|| {
                Reconciler::new(
                    tasks.clone(),
                    outbox.clone(),
                    config.reconcile.clone(),
                    in_flight,
                )
            })
            .flatten();
        let verifier = config
            .provider
            .verify
            .then(|| Verifier::new(tasks, outbox.clone(), config.reconcile.clone(), in_flight))
            .flatten();
        Ok(Self {
            listener,
            edge,
            outbox,
            publisher,
            state,
            reconciler,
            verifier,
            registry_retention_ms: (config.outbox.dedup_window_secs as i64).saturating_mul(1000),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.edge.admin_addr()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_addr().port()
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Serves until `shutdown` resolves, then stops in order.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let addr = self.local_addr();
        let relay = Relay::new(self.outbox.clone(), self.publisher.clone());
        let relay = tokio::spawn(relay.run(stopped(stop_rx.clone())));
        let pruner = tokio::spawn(prune_periodically(
            self.outbox.clone(),
            self.state.tasks.registry.clone(),
            self.registry_retention_ms,
            stopped(stop_rx.clone()),
        ));
        let reconciler = self
            .reconciler
            .map(|r| tokio::spawn(r.run(stopped(stop_rx.clone()))));
        let verifier = self.verifier.map(|v| tokio::spawn(v.run(stopped(stop_rx))));

        tracing::info!(%addr, publisher = self.publisher.name(), "hookbridge listening");
        let served = self.edge.serve(self.listener, self.state, shutdown).await;
        tracing::info!("stopped accepting; draining the relay");
        let _ = stop_tx.send(true);
        for worker in [reconciler, verifier].into_iter().flatten() {
            let _ = worker.await;
        }
        let _ = relay.await;
        let _ = pruner.await;
        served.context("http server failed")
    }
}

async fn prune_periodically(
    outbox: Outbox,
    registry: crate::poll::Registry,
    retention_ms: i64,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {
                if let Err(e) = outbox.prune().await {
                    tracing::warn!(error = %e, "pruning dedup records failed");
                }
                // Registrations live as long as the dedup records: a late
                // callback's token is still checked while it could matter.
                let before = crate::outbox::now_ms() - retention_ms;
                if let Err(e) = registry.blocking(move |r| r.prune(before, 10_000)).await {
                    tracing::warn!(error = %e, "pruning task registrations failed");
                }
            }
        }
    }
}
