//! The provider simulator in tests: a fast clock, hookbridge pointed at it,
//! and small helpers for the task endpoints and the file sink.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hookbridge::config::{Config, FileConfig, PublisherConfig, Secret};
use hookbridge::sim::{DeliveryResult, Faults, SimConfig, Simulator};
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use serde_json::{json, Value};

use super::app::{config, free_port, TestApp};
use super::eventually;

pub const KEY: &str = "sim-key-for-the-tests";
pub const TASKS_TOKEN: &str = "tasks-token-for-the-tests";
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn start_sim(faults: Faults) -> Simulator {
    let config = SimConfig {
        api_key: KEY.into(),
        waiting_ms: 100,
        generating_ms: 200,
        faults,
        ..SimConfig::default()
    };
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("simulator starts")
}

pub fn drop_all() -> Faults {
    Faults {
        drop_rate: 1.0,
        ..Faults::default()
    }
}

/// hookbridge pointed at `sim`, polling at once and on a fast clock.
pub fn poll_config(data_dir: &Path, sim: &Simulator, publisher: PublisherConfig) -> Config {
    let mut c = config(data_dir, publisher);
    let port = free_port();
    c.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
    c.provider.base_url = sim.base_url();
    c.provider.api_key = Some(Secret::new(KEY));
    c.provider.public_url = Some(format!("http://127.0.0.1:{port}"));
    c.provider.tasks_token = Some(Secret::new(TASKS_TOKEN));
    c.provider.requests_per_sec = 500;
    c.provider.retry_initial_ms = 50;
    c.provider.retry_max_ms = 200;
    c.reconcile.first_poll_after_secs = 0;
    c.reconcile.deadline_secs = 30;
    c.reconcile.poll_initial_ms = 100;
    c.reconcile.poll_max_ms = 300;
    c.reconcile.unknown_task_grace_secs = 0;
    c
}

pub fn file_publisher(dir: &Path) -> (PublisherConfig, PathBuf) {
    let out = dir.join("events.jsonl");
    let publisher = PublisherConfig::File(FileConfig {
        path: out.display().to_string(),
        fsync: true,
    });
    (publisher, out)
}

pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A request with an optional bearer token; returns the status and JSON body.
pub async fn send(
    app: &TestApp,
    path: &str,
    bearer: Option<&str>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut request = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", app.addr))
        .header("content-type", "application/json");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = tokio::time::timeout(WAIT, client.request(request))
        .await
        .expect("answer in time")
        .expect("request sent");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `POST /tasks` with a prompt; returns the new task id.
pub async fn create_task(app: &TestApp, prompt: &str) -> String {
    let body = json!({"model": "seedance-20", "inputs": {"prompt": prompt, "duration": "5"}});
    let (status, answer) = send(app, "/tasks", Some(TASKS_TOKEN), &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["taskId"]
        .as_str()
        .expect("the provider's taskId")
        .to_string()
}

pub async fn poll_status(app: &TestApp) -> Value {
    let (status, body) = app.admin.get("/admin/status").await;
    assert_eq!(status, StatusCode::OK);
    body["poll"].clone()
}

pub fn record_infos(sim: &Simulator, task_id: &str) -> Vec<u16> {
    sim.requests()
        .into_iter()
        .filter(|r| r.endpoint == "recordInfo" && r.task_id.as_deref() == Some(task_id))
        .map(|r| r.status)
        .collect()
}

pub async fn dropped(sim: &Simulator, task_id: &str) {
    eventually(WAIT, "the simulator to drop the callback", || async {
        sim.deliveries()
            .iter()
            .any(|d| d.task_id == task_id && d.result == DeliveryResult::Dropped)
            .then_some(())
    })
    .await
}

/// Creates a task straight at the simulator (as another service would).
pub async fn sim_create(sim: &Simulator) -> String {
    let stats = std::sync::Arc::new(hookbridge::poll::PollStats::default());
    let mut provider = hookbridge::config::ProviderConfig {
        base_url: sim.base_url(),
        ..Default::default()
    };
    provider.api_key = Some(Secret::new(KEY));
    let client = hookbridge::poll::ProviderClient::new(&provider, stats).unwrap();
    let (status, body) = client
        .create_task(&json!({"model": "seedance-20"}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    body["taskId"].as_str().unwrap().to_string()
}
