//! The bridge under test: in-process (`TestApp`) or as the real binary in a
//! child process (`ChildApp`, for crash tests), plus a small HTTP client.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hookbridge::config::{Config, FileConfig, PublisherConfig};
use hookbridge::outbox::Outbox;
use hookbridge::publish::Publisher;
use hookbridge::App;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A configuration for tests: port 0, the given data dir and publisher,
/// quick retries.
pub fn config(data_dir: &Path, publisher: PublisherConfig) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    // Tests send bad input and good callbacks from one address; the edge
    // tests (tests/it/edge.rs, tests/it/fairness.rs) set the limits.
    config.server.rate_limit.refusals_per_sec = 0;
    config.outbox.data_dir = data_dir.to_path_buf();
    config.outbox.retry_initial_ms = 50;
    config.outbox.retry_max_ms = 1000;
    config.outbox.shutdown_grace_ms = 5000;
    config.publisher = publisher;
    config
}

/// [`config`] with the file publisher writing `dir/events.jsonl` (no
/// fsync), the outbox in `dir`.
pub fn file_config(dir: &Path) -> Config {
    config(
        dir,
        PublisherConfig::File(FileConfig {
            path: dir.join("events.jsonl").display().to_string(),
            fsync: false,
        }),
    )
}

/// A tiny keep-alive HTTP/1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// Sent as `Authorization` with every request (the admin listener's).
    authorization: Option<String>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            // A pooled connection idle for half a second is not reused: the
            // server closes idle keep-alive connections at its header
            // timeout (1 s in some tests), and a request sent on one just as
            // it closes fails on the client's side.
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_millis(500))
                .build_http(),
            base: format!("http://{addr}"),
            authorization: None,
        }
    }

    /// A client whose connections leave from `local` (another loopback
    /// address than the default 127.0.0.1), keeping idle connections for
    /// `idle` (a pooled sender).
    pub fn from_address(addr: SocketAddr, local: std::net::IpAddr, idle: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(local));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .build(connector),
            base: format!("http://{addr}"),
            authorization: None,
        }
    }

    /// A client for the admin listener: the token when one is set, else
    /// any `Authorization` (what POSTs on loopback need).
    pub fn admin(addr: SocketAddr, token: Option<&str>) -> Self {
        Self {
            authorization: Some(format!("Bearer {}", token.unwrap_or("local"))),
            ..Self::new(addr)
        }
    }

    /// Sends a request and panics if no answer comes.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        let answer = self
            .try_request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (answer.status, answer.json)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.request("POST", path, serde_json::to_vec(body).unwrap())
            .await
    }

    /// Posts a callback and returns the status code.
    pub async fn callback(&self, body: &Value) -> StatusCode {
        self.post_json("/webhooks/kinovi", body).await.0
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request("GET", path, Bytes::new()).await
    }

    /// Like [`Http::request`], but keeps the headers and returns an error
    /// instead of panicking when no answer comes (connection refused or
    /// reset, 30 s timeout): for tests that kill the service mid-request.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Answer, String> {
        self.try_request_with(method, path, body, &[]).await
    }

    /// [`Http::try_request`] with extra headers.
    pub async fn try_request_with(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("answer cut off: {e}"))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            json,
        })
    }

    /// Posts a callback through [`Http::try_request`].
    pub async fn try_callback(&self, body: &Value) -> Result<Answer, String> {
        self.try_request(
            "POST",
            "/webhooks/kinovi",
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    /// Fails if the service stopped answering.
    pub async fn assert_healthy(&self) {
        let (status, _) = self.get("/healthz").await;
        assert_eq!(status, StatusCode::OK, "service must stay healthy");
    }
}

/// A whole answer: status, headers and the body as JSON (or as a string).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub json: Value,
}

fn admin_token(config: &Config) -> Option<String> {
    config.admin.token.as_ref().map(|t| t.expose().to_string())
}

/// hookbridge running inside the test process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub outbox: Outbox,
    pub http: Http,
    /// The admin listener, with the configured token.
    pub admin: Http,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn start(config: Config) -> Self {
        let token = admin_token(&config);
        let app = App::build(config)
            .await
            .unwrap_or_else(|e| panic!("app builds: {e:#}"));
        Self::run(app, token)
    }

    /// With a publisher made by the test (a wrapper that injects faults).
    pub async fn start_with(config: Config, publisher: Arc<dyn Publisher>) -> Self {
        let token = admin_token(&config);
        let app = App::with_publisher(config, publisher)
            .await
            .unwrap_or_else(|e| panic!("app builds: {e:#}"));
        Self::run(app, token)
    }

    fn run(app: App, admin_token: Option<String>) -> Self {
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let outbox = app.outbox().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin_addr,
            outbox,
            http: Http::new(addr),
            admin: Http::admin(admin_addr, admin_token.as_deref()),
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Graceful shutdown, as on SIGTERM; waits until the app has stopped.
    pub async fn stop(mut self) {
        self.stop.take().map(|s| s.send(()));
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("app stops within 30 s")
            .unwrap()
            .unwrap();
        // The app closed the outbox before returning: the data dir is free.
        self.handle = None;
    }

    pub async fn callback(&self, body: &Value) -> StatusCode {
        self.http.callback(body).await
    }

    /// Waits until the relay has emptied the outbox.
    pub async fn drained(&self, limit: Duration) {
        let outbox = self.outbox.clone();
        super::eventually(limit, "the outbox to drain", || {
            let outbox = outbox.clone();
            async move {
                let status = outbox.status().unwrap();
                (status.pending == 0).then_some(())
            }
        })
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A free port for a listener that something binds later: a child process,
/// a broker container, a broker restarted on the same port after an outage.
///
/// Not a port-0 pick released again: the kernel may give such a port to the
/// next port-0 listener or outgoing connection of any test running
/// meanwhile, and the later bind fails. These come from outside the
/// kernel's ephemeral range, where neither ever lands; this process never
/// hands one out twice, and each is free on every address when picked.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let (low, high) = ephemeral_ports();
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(10_000..=u16::MAX);
        if !(low..=high).contains(&port)
            && given.insert(port)
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port outside the ephemeral range {low}-{high} (net.ipv4.ip_local_port_range)");
}

/// The kernel's ephemeral port range (`ip_local_port_range`).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|b| b.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The real `hookbridge` binary in a child process, configured through
/// `HOOKBRIDGE_*` variables only.
pub struct ChildApp {
    pub addr: SocketAddr,
    pub http: Http,
    pub admin: Http,
    child: tokio::process::Child,
}

impl ChildApp {
    pub async fn start(data_dir: &Path, port: u16, env: &[(&str, String)]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // Only its own variables: not the harness's HOOKBRIDGE_TEST_*.
        let mut cmd = super::bin::hookbridge_async(&[]);
        cmd.env("HOOKBRIDGE_SERVER__LISTEN", addr.to_string())
            .env("HOOKBRIDGE_ADMIN__LISTEN", admin_addr.to_string())
            .env("HOOKBRIDGE_SERVER__RATE_LIMIT__REFUSALS_PER_SEC", "0")
            .env("HOOKBRIDGE_OUTBOX__DATA_DIR", data_dir)
            .env("HOOKBRIDGE_OUTBOX__RETRY_INITIAL_MS", "50")
            .env("HOOKBRIDGE_OUTBOX__RETRY_MAX_MS", "1000")
            .env("HOOKBRIDGE_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("hookbridge binary starts");
        let http = Http::new(addr);
        // Both listeners: the admin one is bound just after the public one,
        // and tests talk to it as soon as this returns.
        super::eventually(
            Duration::from_secs(30),
            "the child hookbridge to listen",
            || async {
                let public = tokio::net::TcpStream::connect(addr).await.ok()?;
                let admin = tokio::net::TcpStream::connect(admin_addr).await.ok()?;
                drop((public, admin));
                Some(())
            },
        )
        .await;
        Self {
            addr,
            http,
            admin: Http::admin(admin_addr, None),
            child,
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns
    /// its exit status.
    pub async fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("child is running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "SIGTERM delivered");
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("hookbridge did not exit within {limit:?} of SIGTERM"))
            .unwrap()
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
        let _ = self.child.wait().await;
    }
}

/// A temp dir that lives as long as the test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
