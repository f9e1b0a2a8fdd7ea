//! Wiring: config -> outbox + publisher + relay + router, and the ordered
//! shutdown (stop accepting, finish the batch in flight, flush, exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::{router, AppState};
use crate::outbox::{Outbox, Relay};
use crate::publish::{self, Publisher};

/// How often expired dedup records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A built, bound, not yet running hookbridge.
pub struct App {
    listener: TcpListener,
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    state: AppState,
}

impl App {
    /// Opens the outbox, creates the publisher (without waiting for the
    /// broker) and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let outbox = Outbox::open(&config.outbox).context("cannot open the outbox")?;
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
        let state = AppState {
            outbox: outbox.clone(),
            publisher_name: publisher.name(),
            body_limit: config.server.body_limit_bytes,
            admin_on_loopback: config.server.listen.ip().is_loopback(),
            admin_token: config.server.admin_token.clone(),
        };
        Ok(Self {
            listener,
            outbox,
            publisher,
            state,
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
        let relay = Relay::new(self.outbox.clone(), self.publisher.clone());
        let relay = tokio::spawn(relay.run(stopped(stop_rx.clone())));
        let pruner = tokio::spawn(prune_periodically(self.outbox.clone(), stopped(stop_rx)));

        tracing::info!(addr = %self.local_addr(), publisher = self.publisher.name(), "hookbridge listening");
        let served = axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(shutdown)
            .await;
        tracing::info!("stopped accepting; draining the relay");
        let _ = stop_tx.send(true);
        let _ = relay.await;
        let _ = pruner.await;
        served.context("http server failed")
    }
}

async fn prune_periodically(outbox: Outbox, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {
                if let Err(e) = outbox.prune().await {
                    tracing::warn!(error = %e, "pruning dedup records failed");
                }
            }
        }
    }
}
