//! Where the real brokers are.
//!
//! Each broker comes from the first of these that is there, and the first use
//! says on stderr which one ran (never a silent skip):
//! 1. the environment: `HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP` / `HOOKBRIDGE_TEST_NATS_URL`
//!    for the shared brokers, `HOOKBRIDGE_TEST_BROKERS_SCRIPT` (`scripts/brokers.sh`)
//!    for private ones;
//! 2. testcontainers, when a Docker engine answers, with the images named by
//!    `HOOKBRIDGE_TEST_KAFKA_IMAGE` (default `apache/kafka:4.1.1`) and
//!    `HOOKBRIDGE_TEST_NATS_IMAGE` (default `nats:2.15.3-alpine`); `scripts/docker.sh` builds
//!    local stand-ins for them where no registry answers;
//! 3. else a loud failure naming the variables.
//!
//! Private brokers belong to one test, which stops and restarts them as an
//! outage would: a process it SIGKILLs, or a container it kills and starts
//! again (same ports, same data).
//!
//! Kafka advertises the address clients use, so its container publishes the
//! port on the same host port number, picked free beforehand. A published
//! port accepts connections before the broker serves, so readiness is a log
//! line at first start and a protocol answer after a restart.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

use super::app::free_port;

const KAFKA_VAR: &str = "HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP";
const NATS_VAR: &str = "HOOKBRIDGE_TEST_NATS_URL";
const SCRIPT_VAR: &str = "HOOKBRIDGE_TEST_BROKERS_SCRIPT";

/// How long a broker may take to serve after a (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

static KAFKA: OnceCell<String> = OnceCell::const_new();
static NATS: OnceCell<String> = OnceCell::const_new();
static DOCKER: OnceCell<bool> = OnceCell::const_new();

/// Says which broker source a test binary uses. Straight to stderr, not through
/// `eprintln!`, which the test harness captures.
fn announce(what: &str) {
    let _ = writeln!(std::io::stderr(), "brokers: {what}");
}

/// `bootstrap.servers` of the shared Kafka.
pub async fn kafka() -> String {
    KAFKA
        .get_or_init(|| async {
            if let Ok(addr) = std::env::var(KAFKA_VAR) {
                announce(&format!("shared Kafka {addr} from {KAFKA_VAR}"));
                return addr;
            }
            if docker_answers().await {
                let addr = containers::shared_kafka().await;
                announce(&format!(
                    "shared Kafka {addr} in a container ({})",
                    containers::kafka_image()
                ));
                return addr;
            }
            panic!(
                "no Kafka for the integration tests: set {KAFKA_VAR}=host:port (scripts/test.sh starts one and sets it), \
                 or run a Docker engine for testcontainers (scripts/docker.sh engine)"
            )
        })
        .await
        .clone()
}

/// URL of the shared NATS server (JetStream enabled).
pub async fn nats() -> String {
    NATS.get_or_init(|| async {
        if let Ok(url) = std::env::var(NATS_VAR) {
            announce(&format!("shared NATS {url} from {NATS_VAR}"));
            return url;
        }
        if docker_answers().await {
            let url = containers::shared_nats().await;
            announce(&format!(
                "shared NATS {url} in a container ({})",
                containers::nats_image()
            ));
            return url;
        }
        panic!(
            "no NATS for the integration tests: set {NATS_VAR}=nats://host:port (scripts/test.sh starts one and sets it), \
             or run a Docker engine for testcontainers (scripts/docker.sh engine)"
        )
    })
    .await
    .clone()
}

async fn docker_answers() -> bool {
    *DOCKER
        .get_or_init(|| async {
            let probe = Command::new("docker")
                .args(["info", "--format", "{{.ServerVersion}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            matches!(
                tokio::time::timeout(Duration::from_secs(20), probe).await,
                Ok(Ok(status)) if status.success()
            )
        })
        .await
}

mod containers {
    use std::time::Duration;

    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, ImageExt};

    const KAFKA_IMAGE_VAR: &str = "HOOKBRIDGE_TEST_KAFKA_IMAGE";
    const NATS_IMAGE_VAR: &str = "HOOKBRIDGE_TEST_NATS_IMAGE";
    /// Every container a test binary starts carries this label with the
    /// binary's pid; the next run removes those whose process is gone.
    const LABEL: &str = "org.hookbridge.test-pid";
    const NATS_PORT: u16 = 4222;

    pub fn kafka_image() -> String {
        std::env::var(KAFKA_IMAGE_VAR).unwrap_or_else(|_| "apache/kafka:4.1.1".into())
    }

    pub fn nats_image() -> String {
        std::env::var(NATS_IMAGE_VAR).unwrap_or_else(|_| "nats:2.15.3-alpine".into())
    }

    /// `repo/name:tag` split at the tag's colon (a registry may have a port).
    fn generic(image: &str) -> GenericImage {
        let slash = image.rfind('/').map_or(0, |i| i + 1);
        match image[slash..].rfind(':') {
            Some(i) => GenericImage::new(&image[..slash + i], &image[slash + i + 1..]),
            None => GenericImage::new(image, "latest"),
        }
    }

    /// Single-node KRaft, published and advertised on host port `port`. Settings
    /// match `scripts/brokers.sh`: small, few threads, quick to restart. The same
    /// variables drive the official image and the local one.
    pub fn kafka(port: u16) -> ContainerRequest<GenericImage> {
        let env = [
            ("KAFKA_NODE_ID", "1".to_string()),
            ("KAFKA_PROCESS_ROLES", "broker,controller".into()),
            ("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093".into()),
            (
                "KAFKA_LISTENERS",
                format!("PLAINTEXT://:{port},CONTROLLER://:9093"),
            ),
            (
                "KAFKA_ADVERTISED_LISTENERS",
                format!("PLAINTEXT://127.0.0.1:{port}"),
            ),
            ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".into()),
            (
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".into(),
            ),
            ("KAFKA_LOG_DIRS", "/var/lib/kafka/data".into()),
            ("KAFKA_NUM_PARTITIONS", "3".into()),
            ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true".into()),
            ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1".into()),
            ("KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS", "3".into()),
            ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1".into()),
            ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1".into()),
            ("KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS", "3".into()),
            (
                "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
                "1".into(),
            ),
            ("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1".into()),
            ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".into()),
            // A killed broker registers again once its old session expires.
            ("KAFKA_BROKER_SESSION_TIMEOUT_MS", "4000".into()),
            ("KAFKA_BROKER_HEARTBEAT_INTERVAL_MS", "1000".into()),
            ("KAFKA_NUM_NETWORK_THREADS", "2".into()),
            ("KAFKA_NUM_IO_THREADS", "2".into()),
            ("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m".into()),
            (
                "KAFKA_JVM_PERFORMANCE_OPTS",
                "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData".into(),
            ),
        ];
        let mut request = generic(&kafka_image())
            .with_wait_for(WaitFor::message_on_either_std("Kafka Server started"))
            .with_mapped_port(port, port.tcp())
            .with_label(LABEL, std::process::id().to_string())
            .with_startup_timeout(super::READY_TIMEOUT);
        for (key, value) in env {
            request = request.with_env_var(key, value);
        }
        request
    }

    /// JetStream with its store in the container, published on host port `port`.
    /// A fixed server name: JetStream keys state by it, and a restarted server
    /// must be the same one.
    pub fn nats(port: u16) -> ContainerRequest<GenericImage> {
        generic(&nats_image())
            .with_wait_for(WaitFor::message_on_either_std("Server is ready"))
            .with_mapped_port(port, NATS_PORT.tcp())
            .with_cmd(["-js", "-sd", "/data", "--server_name", "hookbridge-test"])
            .with_label(LABEL, std::process::id().to_string())
            .with_startup_timeout(super::READY_TIMEOUT)
    }

    pub async fn start(
        what: &str,
        request: ContainerRequest<GenericImage>,
    ) -> ContainerAsync<GenericImage> {
        remove_orphans().await;
        match request.start().await {
            Ok(container) => container,
            Err(e) => panic!("{what} container did not start: {e}"),
        }
    }

    // Shared containers live for the whole test binary: statics are never
    // dropped, so the next run (or scripts/test.sh) removes them by label.
    pub async fn shared_kafka() -> String {
        let port = super::free_port();
        let node = start("Kafka", kafka(port)).await;
        Box::leak(Box::new(node));
        format!("127.0.0.1:{port}")
    }

    pub async fn shared_nats() -> String {
        let port = super::free_port();
        let node = start("NATS", nats(port)).await;
        Box::leak(Box::new(node));
        format!("nats://127.0.0.1:{port}")
    }

    /// Removes containers left by test binaries that are no longer running.
    async fn remove_orphans() {
        static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        DONE.get_or_init(|| async {
            let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}");
            let listed = tokio::process::Command::new("docker")
                .args(["ps", "-a", "--filter", &format!("label={LABEL}")])
                .args(["--format", &format])
                .output();
            let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(20), listed).await else {
                return;
            };
            let stale: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.split_once(' '))
                .filter(|(_, pid)| !std::path::Path::new(&format!("/proc/{pid}")).exists())
                .map(|(id, _)| id.to_string())
                .collect();
            if !stale.is_empty() {
                let rm = tokio::process::Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&stale)
                    .output();
                let _ = tokio::time::timeout(Duration::from_secs(60), rm).await;
            }
        })
        .await;
    }
}

/// Ready when the broker lists itself in a Metadata v4 answer, which it does
/// only once unfenced (same probe as `scripts/brokers.sh wait-kafka`).
async fn kafka_serves(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let client = b"hookbridge-it";
        let mut request = Vec::new();
        request.extend_from_slice(&3i16.to_be_bytes()); // Metadata
        request.extend_from_slice(&4i16.to_be_bytes()); // version
        request.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        request.extend_from_slice(&(client.len() as i16).to_be_bytes());
        request.extend_from_slice(client);
        request.extend_from_slice(&0i32.to_be_bytes()); // no topics
        request.push(0); // allow_auto_topic_creation = false
        let mut frame = (request.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&request);
        stream.write_all(&frame).await.ok()?;
        // size, correlation id, throttle time, broker count
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await.ok()?;
        let field = |i: usize| i32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        Some(field(4) == 7 && field(12) > 0)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// Ready when nats-server greets with an INFO that says JetStream is on.
async fn nats_serves(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut buf = Vec::new();
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 || buf.len() > 64 * 1024 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = buf.split(|&b| b == b'\r').next()?;
        let info: serde_json::Value = serde_json::from_slice(line.strip_prefix(b"INFO ")?).ok()?;
        Some(info["jetstream"] == serde_json::Value::Bool(true))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

fn script() -> Option<PathBuf> {
    std::env::var_os(SCRIPT_VAR).map(PathBuf::from)
}

/// How a private broker runs (one per test: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Runner {
    /// `brokers.sh kafka|nats DIR PORT...` as a child process.
    Process {
        script: PathBuf,
        dir: tempfile::TempDir,
        child: Option<Child>,
    },
    /// A container, created at the first start and removed on drop.
    Container {
        container: Option<testcontainers::ContainerAsync<testcontainers::GenericImage>>,
        running: bool,
    },
}

/// A broker owned by one test, which may kill and restart it on the same
/// ports and data (as an outage would).
pub struct PrivateBroker {
    kind: &'static str,
    pub port: u16,
    controller_port: u16,
    runner: Runner,
}

impl PrivateBroker {
    /// Ports and data, not started yet: clients may be pointed at it while it
    /// is down.
    pub fn kafka() -> Self {
        Self::new("kafka")
    }

    pub fn nats() -> Self {
        Self::new("nats")
    }

    fn new(kind: &'static str) -> Self {
        let port = free_port();
        let controller_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let runner = match script() {
            Some(script) => {
                announce(&format!(
                    "private {kind} as a process ({SCRIPT_VAR}={})",
                    script.display()
                ));
                Runner::Process {
                    script,
                    dir: tempfile::tempdir().unwrap(),
                    child: None,
                }
            }
            None => Runner::Container {
                container: None,
                running: false,
            },
        };
        Self {
            kind,
            port,
            controller_port,
            runner,
        }
    }

    pub fn kafka_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the broker and waits until it serves.
    pub async fn start(&mut self) {
        let (kind, port, controller_port) = (self.kind, self.port, self.controller_port);
        match &mut self.runner {
            Runner::Process { script, dir, child } => {
                assert!(child.is_none(), "already running");
                let mut cmd = Command::new("bash");
                cmd.arg(&*script)
                    .arg(kind)
                    .arg(dir.path())
                    .arg(port.to_string());
                if kind == "kafka" {
                    cmd.arg(controller_port.to_string());
                }
                let spawned = cmd
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("broker starts");
                let pid = spawned.id().unwrap_or(0).to_string();
                *child = Some(spawned);
                let waited = Command::new("bash")
                    .arg(&*script)
                    .arg(format!("wait-{kind}"))
                    .arg(port.to_string())
                    .arg(READY_TIMEOUT.as_secs().to_string())
                    .arg(pid)
                    .status()
                    .await
                    .unwrap();
                assert!(
                    waited.success(),
                    "private {kind} on port {port} did not come up"
                );
            }
            Runner::Container { container, running } => {
                assert!(!*running, "already running");
                match container {
                    // First start: the request waits for the readiness log line.
                    None => {
                        if !docker_answers().await {
                            panic!(
                                "this test stops and restarts its own broker: set {SCRIPT_VAR} to the path of \
                                 scripts/brokers.sh, or run a Docker engine (scripts/docker.sh engine)"
                            );
                        }
                        let request = match kind {
                            "kafka" => containers::kafka(port),
                            _ => containers::nats(port),
                        };
                        let started = containers::start(kind, request).await;
                        announce(&format!("private {kind} in container {}", started.id()));
                        *container = Some(started);
                    }
                    // Restart: the log still holds the first start's line, so ask
                    // the broker itself.
                    Some(c) => {
                        // Docker's proxy of the stopped container may still
                        // hold the host port for a moment: retry, bounded.
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                        while let Err(e) = c.start().await {
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "container restarts: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
                        loop {
                            let ready = match kind {
                                "kafka" => kafka_serves(port).await,
                                _ => nats_serves(port).await,
                            };
                            if ready {
                                break;
                            }
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "private {kind} on port {port} did not come back within {READY_TIMEOUT:?}"
                            );
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                }
                *running = true;
            }
        }
    }

    /// SIGKILL, as a crash or a pulled cable would.
    pub async fn kill(&mut self) {
        match &mut self.runner {
            Runner::Process { child, .. } => {
                if let Some(mut child) = child.take() {
                    // `bash brokers.sh` execs the broker, so this is the broker itself.
                    let _ = child.kill().await;
                    let _ = child.wait().await;
                }
            }
            Runner::Container { container, running } => {
                if let (Some(c), true) = (container.as_ref(), *running) {
                    // A zero timeout: SIGKILL straight away, no graceful stop.
                    c.stop_with_timeout(Some(0)).await.expect("container stops");
                }
                *running = false;
            }
        }
    }
}
