//! Where the real brokers are.
//!
//! Shared brokers: an explicit address from the environment first
//! (`HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP`, `HOOKBRIDGE_TEST_NATS_URL`, which
//! `scripts/test.sh` sets), then testcontainers when a Docker engine answers,
//! else a loud failure naming the variable. Never a silent skip.
//!
//! Private brokers (tests that stop and restart a broker) are run from
//! `scripts/brokers.sh`, found through `HOOKBRIDGE_TEST_BROKERS_SCRIPT`.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

use super::app::free_port;

const KAFKA_VAR: &str = "HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP";
const NATS_VAR: &str = "HOOKBRIDGE_TEST_NATS_URL";
const SCRIPT_VAR: &str = "HOOKBRIDGE_TEST_BROKERS_SCRIPT";

static KAFKA: OnceCell<String> = OnceCell::const_new();
static NATS: OnceCell<String> = OnceCell::const_new();

/// `bootstrap.servers` of the shared Kafka.
pub async fn kafka() -> String {
    KAFKA
        .get_or_init(|| async {
            if let Ok(addr) = std::env::var(KAFKA_VAR) {
                return addr;
            }
            if docker_answers().await {
                return containers::kafka().await;
            }
            panic!(
                "no Kafka for the integration tests: set {KAFKA_VAR}=host:port (scripts/test.sh starts one and sets it), \
                 or run a Docker engine for testcontainers"
            )
        })
        .await
        .clone()
}

/// URL of the shared NATS server (JetStream enabled).
pub async fn nats() -> String {
    NATS.get_or_init(|| async {
        if let Ok(url) = std::env::var(NATS_VAR) {
            return url;
        }
        if docker_answers().await {
            return containers::nats().await;
        }
        panic!(
            "no NATS for the integration tests: set {NATS_VAR}=nats://host:port (scripts/test.sh starts one and sets it), \
             or run a Docker engine for testcontainers"
        )
    })
    .await
    .clone()
}

async fn docker_answers() -> bool {
    let probe = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(10), probe).await,
        Ok(Ok(status)) if status.success()
    )
}

mod containers {
    use testcontainers_modules::kafka::apache;
    use testcontainers_modules::nats::{Nats, NatsServerCmd};
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::ImageExt;

    // Containers live for the whole test binary: leaked on purpose, reaped
    // by testcontainers when the process exits.
    pub async fn kafka() -> String {
        let node = apache::Kafka::default()
            .start()
            .await
            .expect("Kafka container starts");
        let port = node.get_host_port_ipv4(apache::KAFKA_PORT).await.unwrap();
        Box::leak(Box::new(node));
        format!("127.0.0.1:{port}")
    }

    pub async fn nats() -> String {
        let cmd = NatsServerCmd::default().with_jetstream();
        let node = Nats::default()
            .with_cmd(&cmd)
            .with_tag("2.10")
            .start()
            .await
            .expect("NATS container starts");
        let port = node.get_host_port_ipv4(4222).await.unwrap();
        Box::leak(Box::new(node));
        format!("nats://127.0.0.1:{port}")
    }
}

fn script() -> PathBuf {
    std::env::var(SCRIPT_VAR).map(PathBuf::from).unwrap_or_else(|_| {
        panic!(
            "this test stops and restarts its own broker: set {SCRIPT_VAR} to the path of scripts/brokers.sh \
             (scripts/test.sh sets it)"
        )
    })
}

/// A broker owned by one test, which may kill and restart it on the same
/// ports and data dir (as an outage would).
pub struct PrivateBroker {
    kind: &'static str,
    pub port: u16,
    controller_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Ports and a data dir, not started yet: clients may be pointed at it
    /// while it is down.
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
        Self {
            kind,
            port,
            controller_port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
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
        assert!(self.child.is_none(), "already running");
        let script = script();
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(self.kind)
            .arg(self.dir.path())
            .arg(self.port.to_string());
        if self.kind == "kafka" {
            cmd.arg(self.controller_port.to_string());
        }
        let child = cmd
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("broker starts");
        let pid = child.id().unwrap_or(0).to_string();
        self.child = Some(child);
        let waited = Command::new("bash")
            .arg(&script)
            .arg(format!("wait-{}", self.kind))
            .arg(self.port.to_string())
            .arg("120")
            .arg(pid)
            .status()
            .await
            .unwrap();
        assert!(
            waited.success(),
            "private {} on port {} did not come up",
            self.kind,
            self.port
        );
    }

    /// SIGKILL, as a crash or a pulled cable would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `bash brokers.sh` execs the broker, so this is the broker itself.
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}
