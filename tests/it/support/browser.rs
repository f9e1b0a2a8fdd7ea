//! A real browser for the console's tests: Debian's headless Chromium,
//! driven through its chromedriver (WebDriver) by `fantoccini`.
//!
//! The fixture starts `chromedriver --port=<free loopback port>` in a
//! process group of its own (Chromium joins it), opens a session, and on
//! [`Browser::close`] ends the session and kills that group by the
//! driver's PID. A test that panics first leaves no browser behind either:
//! drop kills the group. Without Chromium or chromedriver on `PATH`
//! ([`Browser::start`] returns `None`), a test prints one line and returns.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::json;
use tokio::process::{Child, Command};

use super::app::free_port;

pub struct Browser {
    pub client: Client,
    driver: Child,
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Where the tests' screenshots go: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

impl Browser {
    /// A headless Chromium session, or `None` (after one line saying why)
    /// when Chromium or chromedriver is not installed.
    pub async fn start(test: &str) -> Option<Self> {
        let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver"))
        else {
            println!(
                "{test}: skipped, chromium or chromedriver not found on PATH \
                 (scripts/brokers.sh install installs Debian's chromium and chromium-driver)"
            );
            return None;
        };
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"],
            },
        });
        let capabilities = match capabilities {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("an object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        // The driver listens within moments; a session takes Chromium's start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                // Connection refused while the driver starts.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver on {url}: {e}"),
            }
        };
        Some(Self { client, driver })
    }

    /// Saves a PNG of the page as `target/console-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        path
    }

    /// The page's visible text. A page that is still being replaced (a
    /// form just sent) has no body for a moment: that is waited out,
    /// within 10 s.
    pub async fn text(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let body = self.client.find(fantoccini::Locator::Css("body")).await;
            let text = match body {
                Ok(body) => body.text().await.ok(),
                Err(_) => None,
            };
            match text {
                Some(text) => return text,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => panic!("no page body within 10 s"),
            }
        }
    }

    /// Ends the session, then stops chromedriver and what is left of the
    /// browser.
    pub async fn close(mut self) {
        if let Err(e) = self.client.clone().close().await {
            eprintln!("closing the WebDriver session: {e}");
        }
        self.kill_group();
        if let Err(e) = self.driver.wait().await {
            eprintln!("waiting for chromedriver: {e}");
        }
    }

    /// SIGKILL to the driver's process group (its PID), while the driver
    /// is not yet reaped, so the group cannot be another's.
    fn kill_group(&mut self) {
        let Some(pid) = self.driver.id() else {
            return;
        };
        let group = format!("-{pid}");
        match std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("kill -KILL -- {group}: {status}"),
            Err(e) => eprintln!("kill -KILL -- {group}: {e}"),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill_group();
    }
}
