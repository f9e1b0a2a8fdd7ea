//! A Kinovi provider simulator: `createTask` and `recordInfo` as
//! `kinovi-api.md` describes them, tasks that move through
//! `waiting -> generating -> success|fail` on a configurable clock, and
//! callbacks delivered with configurable faults. The tests start it in
//! process; `kinovi-sim` (src/bin) runs it for people trying hookbridge
//! without a provider account.
//!
//! Per task, a prompt (`inputs.prompt`) containing `[fail]` makes it fail
//! (error 2038) and one containing `[stuck]` keeps it generating forever;
//! otherwise every `fail_every`-th task fails (0: none do).
//!
//! Callbacks go to the task's `callBackUrl` once (never retried, like the
//! real provider), only for the terminal state unless `progress_callbacks`.
//! [`Faults`] can drop, duplicate, delay or reorder them and choose the
//! payload dialect ([`Variant`]); [`Simulator::fail_next`] makes the next N
//! API requests answer 429, 500, 401, ... The faults can be changed while
//! the simulator runs.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

use crate::poll::client::{http_client, HttpClient};
use crate::sync::lock;

mod deliver;
mod server;

/// The payload dialects of `kinovi-api.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Variant {
    /// The webhook page: `{code, message, data: {..., state}}`.
    #[default]
    Envelope,
    /// A flat record with `status`, no `orderId`/`updateTime`, fractional credits.
    Bare,
    /// An envelope whose `data` uses `status`.
    Status,
    /// The older flat body whose `error` is a plain string.
    ErrorString,
}

/// How callbacks are mistreated. Rates are probabilities in `0.0..=1.0`.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Callbacks that are never sent.
    pub drop_rate: f64,
    /// Callbacks that are sent twice.
    pub duplicate_rate: f64,
    /// Wait before each callback, in milliseconds.
    pub delay_ms: u64,
    /// Hold a task's callbacks until its last one, then send them newest
    /// first (needs `progress_callbacks` or duplicates to show).
    pub reorder: bool,
    /// The payload dialect of callbacks.
    pub variant: Variant,
}

/// The simulator's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The only API key accepted (`Authorization: Bearer ...`).
    pub api_key: String,
    /// How long a task is `waiting`, in milliseconds.
    pub waiting_ms: u64,
    /// How long a task is `generating`, in milliseconds.
    pub generating_ms: u64,
    /// Every n-th task fails; 0: only `[fail]` prompts do.
    pub fail_every: u64,
    /// Also send callbacks for `waiting` and `generating`.
    pub progress_callbacks: bool,
    /// The dialect of `recordInfo` answers.
    pub record_variant: Variant,
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: "sim-api-key".into(),
            waiting_ms: 2_000,
            generating_ms: 5_000,
            fail_every: 0,
            progress_callbacks: false,
            record_variant: Variant::Envelope,
            faults: Faults::default(),
        }
    }
}

/// How a task ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Fail,
    /// Generates forever.
    Stuck,
}

/// One API request as the simulator answered it.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub at: Instant,
    /// `createTask`, `recordInfo` or `control`.
    pub endpoint: &'static str,
    pub task_id: Option<String>,
    pub status: u16,
}

/// One callback, sent or not.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub at: Instant,
    pub task_id: String,
    pub state: &'static str,
    pub result: DeliveryResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// Answered with this HTTP status.
    Sent(u16),
    /// Dropped by the `drop_rate` fault.
    Dropped,
    /// Network error or timeout.
    Failed(String),
}

#[derive(Debug, Clone)]
struct SimTask {
    id: String,
    model: String,
    created: Instant,
    created_ms: i64,
    outcome: Outcome,
    callback_url: Option<String>,
}

struct Shared {
    config: SimConfig,
    tasks: Mutex<HashMap<String, SimTask>>,
    fail_next: Mutex<VecDeque<u16>>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<RequestLog>>,
    deliveries: Mutex<Vec<Delivery>>,
    created: AtomicU64,
    deliverers: Mutex<Vec<AbortHandle>>,
    http: HttpClient,
}

impl Shared {
    fn task(&self, id: &str) -> Option<SimTask> {
        lock(&self.tasks).get(id).cloned()
    }

    /// The state of `task` now, as the provider's word.
    fn state_now(&self, task: &SimTask) -> &'static str {
        let elapsed = task.created.elapsed().as_millis() as u64;
        let c = &self.config;
        if elapsed < c.waiting_ms {
            "waiting"
        } else if elapsed < c.waiting_ms + c.generating_ms {
            "generating"
        } else {
            match task.outcome {
                Outcome::Success => "success",
                Outcome::Fail => "fail",
                Outcome::Stuck => "generating",
            }
        }
    }
}

/// The task record in `state`, in the given dialect.
fn render(task: &SimTask, state: &str, variant: Variant, now_ms: i64) -> Value {
    let (done, success) = (matches!(state, "success" | "fail"), state == "success");
    let output = success.then(|| {
        json!([{"url": format!("https://static.kinovi.ai/generated/{}.mp4", task.id),
                "width": 1280, "height": 720}])
    });
    let (code, message) = (
        "2038",
        "Your input text violates platform rules. Please modify and try again.",
    );
    let error = (state == "fail").then(|| json!({"code": code, "message": message}));
    let credits = if success { 200.0 } else { 0.0 };
    let complete = success.then_some(now_ms);
    let mut record = json!({
        "taskId": task.id, "model": task.model, "createTime": task.created_ms,
        "output": output, "error": error, "creditsUsed": credits, "completeTime": complete,
    });
    let fields = record.as_object_mut().expect("an object");
    match variant {
        Variant::Envelope => {
            fields.insert("state".into(), json!(state));
            fields.insert("orderId".into(), json!(format!("order_{}", task.id)));
            fields.insert("updateTime".into(), json!(now_ms));
        }
        Variant::Bare | Variant::Status => {
            fields.insert("status".into(), json!(state));
            if success {
                fields.insert("creditsUsed".into(), json!(2.17));
            }
        }
        Variant::ErrorString => {
            fields.insert("state".into(), json!(state));
            let error = (done && !success).then_some(message);
            fields.insert("error".into(), json!(error));
        }
    }
    match variant {
        Variant::Envelope | Variant::Status => {
            json!({"code": 200, "message": "success", "data": record})
        }
        Variant::Bare | Variant::ErrorString => record,
    }
}

/// A running simulator. Dropping it stops the server.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Binds `listen` (port 0 picks one) and serves in the background.
    pub async fn start(listen: SocketAddr, config: SimConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(config.faults.clone()),
            config,
            tasks: Mutex::default(),
            fail_next: Mutex::default(),
            requests: Mutex::default(),
            deliveries: Mutex::default(),
            created: AtomicU64::new(0),
            deliverers: Mutex::default(),
            http: http_client(false)?,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let app = server::router(shared.clone());
        let server = tokio::spawn(async move {
            let shutdown = async move {
                // A dropped sender (the simulator dropped) stops it as well.
                if stopped.await.is_err() {
                    tracing::debug!("simulator dropped; stopping its server");
                }
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "simulator server failed");
            }
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What to put in `provider.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `count` API requests answer `status` (429, 500, 401, ...).
    pub fn fail_next(&self, status: u16, count: usize) {
        lock(&self.shared.fail_next).extend(std::iter::repeat_n(status, count));
    }

    /// Replaces the callback faults, for callbacks sent from now on.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Every API request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.shared.requests).clone()
    }

    /// Every callback decided so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared.deliveries).clone()
    }

    /// The `callBackUrl` a task was created with.
    pub fn callback_url(&self, task_id: &str) -> Option<String> {
        self.shared.task(task_id)?.callback_url
    }

    /// The task's state now, as the provider would report it.
    pub fn state(&self, task_id: &str) -> Option<&'static str> {
        let task = self.shared.task(task_id)?;
        Some(self.shared.state_now(&task))
    }

    /// The record of a task in a given state and dialect, e.g. to forge a callback.
    pub fn record(&self, task_id: &str, state: &str, variant: Variant) -> Option<Value> {
        let task = self.shared.task(task_id)?;
        Some(render(&task, state, variant, crate::clock::now_ms()))
    }

    /// Stops serving and cancels callbacks not yet sent.
    pub async fn stop(mut self) {
        self.shutdown();
        if let Some(server) = self.server.take() {
            if let Err(e) = server.await {
                match e.try_into_panic() {
                    Ok(panic) => tracing::error!(
                        panic = %crate::sync::panic_message(&*panic),
                        "the simulator's server panicked"
                    ),
                    Err(e) => tracing::error!(error = %e, "the simulator's server did not finish"),
                }
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            if stop.send(()).is_err() {
                tracing::debug!("the simulator's server had already stopped");
            }
        }
        for handle in lock(&self.shared.deliverers).drain(..) {
            handle.abort();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_value, Source, State};

    fn task() -> SimTask {
        SimTask {
            id: "task_x".into(),
            model: "seedance-20".into(),
            created: Instant::now(),
            created_ms: 1_735_599_634_000,
            outcome: Outcome::Success,
            callback_url: None,
        }
    }

    /// Every dialect the simulator sends is one the bridge's parser reads
    /// back to the same state.
    #[test]
    fn every_variant_parses_to_its_state() {
        for variant in [
            Variant::Envelope,
            Variant::Bare,
            Variant::Status,
            Variant::ErrorString,
        ] {
            for (word, state) in [
                ("waiting", State::Waiting),
                ("generating", State::Generating),
                ("success", State::Success),
                ("fail", State::Fail),
            ] {
                let body = render(&task(), word, variant, 1_735_599_754_000);
                let event = from_value(body.clone(), Source::Webhook, 0)
                    .unwrap_or_else(|e| panic!("{variant:?} {word}: {e}\n{body}"));
                assert_eq!(event.state, state, "{variant:?} {word}");
                assert_eq!(event.task_id, "task_x");
                assert!(
                    event.warnings.is_empty(),
                    "{variant:?} {word}: {:?}",
                    event.warnings
                );
                if state == State::Fail {
                    assert!(
                        event.error.is_some(),
                        "{variant:?}: a failure carries its error"
                    );
                }
            }
        }
        let bare = render(&task(), "fail", Variant::ErrorString, 0);
        assert!(bare["error"].is_string());
        let status = render(&task(), "success", Variant::Status, 0);
        assert_eq!(status["data"]["status"], "success");
        assert!(status["data"].get("state").is_none());
    }
}
