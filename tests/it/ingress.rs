//! The HTTP ingress on the embedded file sink (no broker needed): what the
//! provider sees, and that bad input never reaches the output.

use std::time::Duration;

use hookbridge::config::{FileConfig, PublisherConfig};
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::support::app::{config, temp_dir, Http, TestApp};
use crate::support::{assert_valid_event, callbacks, unique};

fn file_app_config(dir: &std::path::Path) -> (hookbridge::Config, std::path::PathBuf) {
    let out = dir.join("events.jsonl");
    let publisher = PublisherConfig::File(FileConfig {
        path: out.display().to_string(),
        fsync: true,
    });
    (config(&dir.join("data"), publisher), out)
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn answers_ok_and_writes_one_valid_event_per_callback() {
    let dir = temp_dir();
    let (config, out) = file_app_config(dir.path());
    let app = TestApp::start(config).await;
    let variants = callbacks::variants(&unique("task"));
    for (_, body, _) in &variants {
        let (status, answer) = app.http.post_json("/webhooks/kinovi", body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer, json!({"message": "ok"}));
    }
    app.drained(Duration::from_secs(10)).await;
    let events = lines(&out);
    assert_eq!(events.len(), variants.len());
    for event in &events {
        assert_valid_event(event);
        assert_eq!(event["source"], "webhook");
    }
    app.stop().await;
}

/// Each kind of bad input gets a 4xx JSON error that says what is wrong,
/// is kept for inspection, publishes nothing, and leaves the service up.
#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_publishes_nothing() {
    let dir = temp_dir();
    let (mut config, out) = file_app_config(dir.path());
    config.server.body_limit_bytes = 64 * 1024;
    let app = TestApp::start(config).await;
    let too_big = json!({"taskId": "t", "state": "success", "pad": "x".repeat(70 * 1024)});
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (
            b"this is not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (b"[1,2,3]".to_vec(), StatusCode::BAD_REQUEST, "object"),
        (
            br#"{"code":200,"data":{"state":"success"}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "taskId",
        ),
        (
            br#"{"taskId":"","state":"success"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "taskId",
        ),
        (
            br#"{"taskId":42,"state":"success"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "taskId",
        ),
        (
            br#"{"taskId":"t","state":7}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "state",
        ),
        (
            br#"{"taskId":"t","state":"success","output":"x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "output",
        ),
        (
            br#"{"taskId":"t","state":"fail","error":12}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "error",
        ),
        (
            br#"{"taskId":"t","state":"fail","createTime":"yesterday"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "createTime",
        ),
        (
            serde_json::to_vec(&too_big).unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
    ];
    for (body, expected, mentions) in &cases {
        let (status, answer) = app
            .http
            .request("POST", "/webhooks/kinovi", body.clone())
            .await;
        assert_eq!(
            status,
            *expected,
            "for body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(mentions),
            "message {message:?} should mention {mentions:?}"
        );
        assert!(
            answer["error"].is_string(),
            "machine-readable error code in {answer}"
        );
        app.http.assert_healthy().await;
    }
    // A good callback still goes through afterwards.
    assert_eq!(
        app.callback(&callbacks::success(&unique("task"))).await,
        StatusCode::OK
    );
    app.drained(Duration::from_secs(10)).await;
    assert_eq!(lines(&out).len(), 1, "only the good callback was published");

    // The rejected bodies are kept, newest first, for inspection.
    let (status, kept) = app.admin.get("/admin/rejected?limit=100").await;
    assert_eq!(status, StatusCode::OK);
    let kept = kept["rejected"].as_array().unwrap().clone();
    assert!(kept.len() >= cases.len() - 1, "kept {}", kept.len());
    assert!(kept.iter().any(|r| r["body"] == "this is not json"));
    assert_eq!(
        app.outbox.status().unwrap().counters["rejected"],
        cases.len() as u64
    );
    app.stop().await;
}

#[tokio::test]
async fn health_and_status_endpoints_answer() {
    let dir = temp_dir();
    let (config, _) = file_app_config(dir.path());
    let app = TestApp::start(config).await;
    let (status, body) = app.http.get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.admin.get("/admin/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["publisher"], "file");
    assert_eq!(body["outbox"]["pending"], 0);
    app.stop().await;
}

/// A configured admin token is required, and compared exactly.
#[tokio::test]
async fn admin_endpoints_require_the_token_when_set() {
    let dir = temp_dir();
    let (mut config, _) = file_app_config(dir.path());
    config.admin.token = Some(hookbridge::config::Secret::new("a-long-enough-admin-token"));
    let app = TestApp::start(config).await;
    let (status, _) = Http::new(app.admin_addr).get("/admin/status").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = Http::admin(app.admin_addr, Some("a-long-enough-admin-tokeN"))
        .get("/admin/status")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app.admin.get("/admin/status").await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

/// A data dir that cannot be used stops the start-up with a message that
/// names it, instead of failing on the first callback.
#[tokio::test]
async fn unusable_data_dir_fails_at_start_naming_it() {
    let dir = temp_dir();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"a file where the data dir should be").unwrap();
    let (mut config, _) = file_app_config(dir.path());
    config.outbox.data_dir = blocker.join("data");
    let err = match hookbridge::App::build(config).await {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("not-a-dir"), "error names the path: {err}");
}
