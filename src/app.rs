//! Wiring: config -> outbox + publisher + relay + router (+ the task
//! registry, reconciler and verifier), every worker under one
//! [`Supervisor`], and the ordered shutdown (stop accepting, finish the
//! batch in flight, flush, join the workers and the outbox writer, exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Config, HealthConfig, ReconcileConfig};
use crate::http::{AppState, Edge};
use crate::outbox::{Outbox, Relay};
use crate::poll::{Job, PollWorker, Reconcile, Tasks, Verify};
use crate::publish::{self, Publisher};
use crate::supervise::{Health, Supervisor};

/// How often expired dedup records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often the supervisor checks that the outbox writer thread is there.
const WATCH_WRITER_EVERY: Duration = Duration::from_millis(500);

/// A built, bound, not yet running hookbridge.
pub struct App {
    listener: TcpListener,
    /// The admin listener and the public listener's limits.
    edge: Edge,
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    state: AppState,
    /// Set when a reconciler runs; each (re)start builds a fresh one.
    reconcile: Option<(ReconcileConfig, usize)>,
    /// Set in verify mode.
    verify: Option<(ReconcileConfig, usize)>,
    registry_retention_ms: i64,
    health: HealthConfig,
    /// Set in cluster mode.
    cluster: Option<crate::cluster::Cluster>,
}

impl App {
    /// Opens the outbox, creates the publisher (without waiting for the
    /// broker) and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        if config.cluster.enabled {
            let (publisher, cluster) = crate::cluster::build(&config)
                .await
                .context("cannot start cluster mode")?;
            let mut app = Self::with_publisher(config, publisher).await?;
            app.cluster = Some(cluster);
            return Ok(app);
        }
        let publisher: Arc<dyn Publisher> = Arc::from(
            publish::build(&config.publisher, config.server.body_limit_bytes)
                .await
                .context("cannot create the publisher")?,
        );
        Self::with_publisher(config, publisher).await
    }

    /// Like [`App::build`], with a publisher made elsewhere (tests wrap the
    /// real one to inject faults).
    pub async fn with_publisher(
        config: Config,
        publisher: Arc<dyn Publisher>,
    ) -> anyhow::Result<Self> {
        let traces = crate::trace::Traces::new(&config.trace, config.outbox.dedup_window_secs);
        let outbox =
            Outbox::open_traced(&config.outbox, traces).context("cannot open the outbox")?;
        let tasks = Tasks::open(&config).context("cannot open the task registry")?;
        if let Some(aside) = tasks.registry.set_aside() {
            let stats = outbox.stats();
            crate::outbox::Stats::add(&stats.stores_set_aside, 1);
            stats.note_damage(format!(
                "tasks.redb damaged ({}); set aside as {}: its registrations and held callbacks are not in use",
                aside.cause,
                aside.moved_to.display()
            ));
        }
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| {
                format!("cannot listen on server.listen = {}", config.server.listen)
            })?;
        let edge = Edge::bind(&config).await?;
        let state = AppState::from(crate::http::Shared {
            outbox: outbox.clone(),
            traces: outbox.traces().clone(),
            publisher_name: publisher.name(),
            body_limit: config.server.body_limit_bytes,
            admin_on_loopback: config.admin.listen.ip().is_loopback(),
            admin_token: config.admin.token.clone(),
            tasks: tasks.clone(),
            health: Arc::new(Health::new(&config.health)),
            clients: Arc::new(crate::http::Clients::new(
                &config.server,
                outbox.stats().clone(),
            )),
            rejected: Arc::new(crate::http::RejectedBodies::new(
                config.outbox.keep_rejected,
                outbox.stats().clone(),
            )),
            console: Default::default(),
        });
        let settings = (config.reconcile.clone(), config.provider.max_in_flight);
        let has_client = tasks.client.is_some();
        Ok(Self {
            listener,
            edge,
            outbox,
            publisher,
            state,
            reconcile: (config.reconcile.enabled && has_client).then(|| settings.clone()),
            verify: (config.provider.verify && has_client).then_some(settings),
            registry_retention_ms: (config.outbox.dedup_window_secs as i64).saturating_mul(1000),
            health: config.health,
            cluster: None,
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

    /// Serves until `shutdown` resolves, then stops in order. Ends with an
    /// error, after the same ordered stop, when a worker cannot be kept
    /// alive.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        let mut supervisor = Supervisor::new(&self.health, self.state.health.clone());
        self.supervise(&mut supervisor);
        let gave_up = supervisor.gave_up();

        tracing::info!(%addr, publisher = self.publisher.name(), "hookbridge listening");
        // In cluster mode readiness fails first, so the load balancer stops
        // sending before the listener closes.
        let drain = self
            .cluster
            .as_ref()
            .map(|c| (c.drain, self.state.health.clone()));
        self.edge
            .serve(self.listener, self.state, async move {
                tokio::select! {
                    _ = shutdown => {
                        if let Some((drain, health)) = drain {
                            health.set_condition("server", Some("draining"));
                            tracing::info!(?drain, "draining: /readyz answers 503");
                            tokio::time::sleep(drain).await;
                        }
                    }
                    _ = gave_up.cancelled() => tracing::error!("a worker cannot be kept alive; stopping"),
                }
            })
            .await;
        tracing::info!("stopped accepting; draining the relay");
        let supervised = supervisor.shutdown().await;
        // Only now is the data dir free for the next start.
        self.outbox.close().await;
        supervised.context("hookbridge stopped")
    }

    /// Hands every background worker to `supervisor`; each start builds the
    /// worker afresh from cheap handles.
    fn supervise(&self, supervisor: &mut Supervisor) {
        let (outbox, publisher) = (self.outbox.clone(), self.publisher.clone());
        supervisor.spawn("relay", move |stop| {
            Relay::new(outbox.clone(), publisher.clone()).run(stop.cancelled_owned())
        });
        let outbox = self.outbox.clone();
        let registry = self.state.tasks.registry.clone();
        let retention_ms = self.registry_retention_ms;
        supervisor.spawn("pruner", move |stop| {
            prune_periodically(
                outbox.clone(),
                registry.clone(),
                retention_ms,
                stop.cancelled_owned(),
            )
        });
        self.spawn_poll_worker::<Reconcile>(supervisor, "reconciler", self.reconcile.clone());
        self.spawn_poll_worker::<Verify>(supervisor, "verifier", self.verify.clone());
        if let Some(cluster) = &self.cluster {
            cluster.supervise(supervisor, self.state.health.clone());
        }
        let (rates, stats) = (
            self.state.console.rates.clone(),
            self.outbox.stats().clone(),
        );
        supervisor.spawn("console-sampler", move |stop| {
            crate::http::console::sample_every(
                rates.clone(),
                stats.clone(),
                std::time::Duration::from_secs(1),
                stop.cancelled_owned(),
            )
        });
        // The writer thread restarts itself after a panic (see
        // `outbox::writer`); it is gone only if that failed.
        let outbox = self.outbox.clone();
        supervisor.watch("outbox-writer", WATCH_WRITER_EVERY, move || {
            outbox.writer_alive()
        });
    }

    /// Supervises the poll worker `J` when `settings` turn it on.
    fn spawn_poll_worker<J: Job + Send + Sync + 'static>(
        &self,
        supervisor: &mut Supervisor,
        name: &'static str,
        settings: Option<(ReconcileConfig, usize)>,
    ) {
        let Some((config, in_flight)) = settings else {
            return;
        };
        let (tasks, outbox) = (self.state.tasks.clone(), self.outbox.clone());
        supervisor.spawn(name, move |stop| {
            let worker =
                PollWorker::<J>::new(tasks.clone(), outbox.clone(), config.clone(), in_flight);
            async move {
                if let Some(worker) = worker {
                    worker.run(stop.cancelled_owned()).await;
                }
            }
        });
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
                let before = crate::clock::now_ms() - retention_ms;
                if let Err(e) = registry.blocking(move |r| r.prune(before, 10_000)).await {
                    tracing::warn!(error = %e, "pruning task registrations failed");
                }
            }
        }
    }
}
