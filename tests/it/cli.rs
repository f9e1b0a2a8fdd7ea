//! The operator CLI, run as the real binary: `dead-letters` and `status`
//! against a running instance's admin API (dead letters made by the relay,
//! requeued ones checked on a real JetStream stream), and `outbox inspect`
//! on a stopped data dir and on one still in use.

use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hookbridge::config::{PublisherConfig, Secret};
use hookbridge::publish::{EncodeError, Encoded, Outgoing};
use hyper::StatusCode;
use serde_json::Value;

use crate::nats::jetstream_publisher;
use crate::support::app::{config, free_port, temp_dir, ChildApp, TestApp};
use crate::support::faults::{Faults, Faulty};
use crate::support::{brokers, callbacks, eventually, ms, nats, secs, unique};

const TOKEN: &str = "an-operator-token-for-the-cli";

/// In front of the real publisher: it cannot encode the events of the
/// tasks in `refused`, so the relay dead-letters those, as it would an event
/// the broker can never take.
struct Refusing {
    refused: Mutex<Vec<String>>,
}

impl Refusing {
    async fn wrap(config: &PublisherConfig, refused: &[String]) -> Arc<Faulty<Self>> {
        let refusing = Self {
            refused: Mutex::new(refused.to_vec()),
        };
        crate::support::faults::wrap(config, refusing).await
    }

    fn accept_all(&self) {
        self.refused.lock().unwrap().clear();
    }
}

impl Faults for Refusing {
    fn encode(&self, message: &Outgoing) -> Option<Result<Encoded, EncodeError>> {
        self.refused
            .lock()
            .unwrap()
            .contains(&message.meta.task_id)
            .then_some(Err(EncodeError::Header {
                name: "test",
                problem: "refused by the test",
            }))
    }
}

/// Runs `hookbridge ARGS` with `env`, without the harness's own variables.
async fn hookbridge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = crate::support::bin::hookbridge_async(args);
    cmd.envs(env.iter().copied());
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("hookbridge {args:?} did not finish within 60 s"))
        .expect("hookbridge runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
async fn ok(args: &[&str]) -> String {
    let out = hookbridge(args, &[("HOOKBRIDGE_ADMIN__TOKEN", TOKEN)]).await;
    assert!(
        out.status.success(),
        "hookbridge {args:?}: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn dead_letters_are(app: &TestApp, n: u64) {
    let outbox = app.outbox.clone();
    eventually(Duration::from_secs(30), "the dead letters", || {
        let outbox = outbox.clone();
        async move { (outbox.status().unwrap().dead_letters == n).then_some(()) }
    })
    .await
}

/// `dead-letters bury` deletes the named dead letters for good, counted,
/// and names the unknown ones with exit code 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_buried_for_good() {
    let dir = temp_dir();
    let mut cfg = crate::support::app::file_config(dir.path());
    cfg.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(cfg).await;
    let mut seqs = Vec::new();
    for task in ["bury_a", "bury_b"] {
        let body = format!(r#"{{"taskId":"{task}","state":"fail"}}"#);
        let event =
            hookbridge::event::parse(body.as_bytes(), hookbridge::event::Source::Webhook, 1)
                .unwrap();
        seqs.push(
            app.outbox
                .bury(event, "refused".into())
                .await
                .unwrap()
                .to_string(),
        );
    }
    let admin = format!("http://{}", app.admin_addr);
    let out = ok(&["dead-letters", "bury", &seqs[0], "--admin", &admin]).await;
    assert_eq!(out.trim(), "buried 1");
    let out = hookbridge(
        &[
            "dead-letters",
            "bury",
            &seqs[0],
            &seqs[1],
            "--admin",
            &admin,
        ],
        &[("HOOKBRIDGE_ADMIN__TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("not buried (no such dead letter): {}", seqs[0])));
    assert_eq!(stdout(&out).trim(), "buried 1");
    let status = app.outbox.status().unwrap();
    assert_eq!(status.dead_letters, 0);
    assert_eq!(status.pending, 0, "buried, not requeued");
    assert_eq!(status.counters["deadBuried"], 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_exported_and_requeued_to_the_broker() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("cli"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let run = unique("task");
    let tasks: Vec<String> = (0..3).map(|n| format!("{run}_{n}")).collect();
    let publisher = jetstream_publisher(&url, &subject, None);
    let refusing = Refusing::wrap(&publisher, &tasks).await;
    let dir = temp_dir();
    let mut cfg = config(dir.path(), publisher);
    cfg.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start_with(cfg, refusing.clone()).await;
    for task in &tasks {
        assert_eq!(
            app.callback(&callbacks::success(task)).await,
            StatusCode::OK
        );
    }
    dead_letters_are(&app, 3).await;
    let admin = format!("http://{}", app.admin_addr);
    let admin = admin.as_str();

    // Without the token: 401, said plainly, exit code 4.
    let out = hookbridge(&["dead-letters", "list", "--admin", admin], &[]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HOOKBRIDGE_ADMIN__TOKEN"),
        "{}",
        stderr(&out)
    );

    let table = ok(&["dead-letters", "list", "--admin", admin]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three rows:\n{table}");
    assert!(
        lines[0].starts_with("SEQ") && lines[0].contains("REASON"),
        "{table}"
    );
    for (line, task) in lines[1..].iter().zip(&tasks) {
        assert!(
            line.contains(task.as_str()) && line.contains("success"),
            "{table}"
        );
    }
    let listed = json(&ok(&["dead-letters", "list", "--json", "--admin", admin]).await);
    let listed = listed.as_array().unwrap().clone();
    let seqs: Vec<String> = listed.iter().map(|l| l["seq"].to_string()).collect();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["event"]["taskId"], tasks[0].as_str());
    let limited = ok(&["dead-letters", "list", "--limit", "1", "--admin", admin]).await;
    assert_eq!(limited.lines().count(), 2, "{limited}");

    let shown = ok(&["dead-letters", "show", &seqs[1], "--admin", admin]).await;
    assert!(
        shown.contains(tasks[1].as_str()) && shown.contains("refused by the test"),
        "{shown}"
    );
    let shown = json(&ok(&["dead-letters", "show", &seqs[1], "--json", "--admin", admin]).await);
    assert_eq!(shown, listed[1]);
    let out = hookbridge(
        &["dead-letters", "show", "987654", "--admin", admin],
        &[("HOOKBRIDGE_ADMIN__TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no dead letter 987654"),
        "{}",
        stderr(&out)
    );

    let file = dir.path().join("dead.jsonl");
    ok(&[
        "dead-letters",
        "export",
        file.to_str().unwrap(),
        "--admin",
        admin,
    ])
    .await;
    let exported: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert_eq!(exported, listed, "one JSON line a dead letter");
    assert!(!dir.path().join("dead.jsonl.partial").exists());
    let to_stdout = ok(&["dead-letters", "export", "-", "--admin", admin]).await;
    assert_eq!(to_stdout.lines().map(json).collect::<Vec<_>>(), listed);

    // Requeued, the events reach the broker: one chosen, then the rest.
    refusing.faults.accept_all();
    let out = ok(&["dead-letters", "requeue", &seqs[0], "--admin", admin]).await;
    assert_eq!(out.trim(), "requeued 1");
    let stored = nats::read_stream(&url, &stream, 1, secs(30), Duration::ZERO).await;
    assert_eq!(stored[0].value["taskId"], tasks[0].as_str());
    let out = hookbridge(
        &["dead-letters", "requeue", "987654", "--admin", admin],
        &[("HOOKBRIDGE_ADMIN__TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let answer = json(
        &ok(&[
            "dead-letters",
            "requeue",
            "--all",
            "--json",
            "--admin",
            admin,
        ])
        .await,
    );
    assert_eq!(answer["requeued"], 2);
    let stored = nats::read_stream(&url, &stream, 3, secs(30), ms(500)).await;
    let mut arrived: Vec<String> = stored
        .iter()
        .map(|s| s.value["taskId"].as_str().unwrap().to_string())
        .collect();
    arrived.sort();
    assert_eq!(arrived, tasks, "each requeued event once");
    let left = ok(&["dead-letters", "list", "--admin", admin]).await;
    assert_eq!(left.lines().count(), 1, "only the header:\n{left}");

    let status = ok(&["status", "--admin", admin]).await;
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["dead", "letters", "0"])),
        "{status}"
    );
    let status = json(&ok(&["status", "--json", "--admin", admin]).await);
    assert_eq!(status["outbox"]["deadLetters"], 0);
    assert_eq!(status["publisher"], "jetstream");

    // The address from the configuration when --admin is not given.
    let listen = app.admin_addr.to_string();
    let from_config = hookbridge(
        &["status", "--json"],
        &[
            ("HOOKBRIDGE_ADMIN__TOKEN", TOKEN),
            ("HOOKBRIDGE_ADMIN__LISTEN", &listen),
        ],
    )
    .await;
    assert!(from_config.status.success(), "{}", stderr(&from_config));
    app.stop().await;

    let gone = hookbridge(&["status", "--admin", admin], &[]).await;
    assert_eq!(gone.status.code(), Some(3), "{}", stderr(&gone));
    assert!(
        stderr(&gone).contains("cannot reach the admin API"),
        "{}",
        stderr(&gone)
    );
}

/// `outbox inspect` on `dir`, as JSON.
async fn inspect(dir: &Path) -> Output {
    hookbridge(
        &[
            "outbox",
            "inspect",
            "--json",
            "--data-dir",
            dir.to_str().unwrap(),
        ],
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_inspect_reads_a_stopped_data_dir_and_refuses_a_running_one() {
    // Nothing listens there: events stay pending, retried.
    let publisher = jetstream_publisher(
        &format!("nats://127.0.0.1:{}", free_port()),
        "t.{state}",
        None,
    );
    let run = unique("task");
    let dead = format!("{run}_dead");
    let dir = temp_dir();
    let app = TestApp::start_with(
        config(dir.path(), publisher.clone()),
        Refusing::wrap(&publisher, std::slice::from_ref(&dead)).await,
    )
    .await;
    for task in [format!("{run}_a"), format!("{run}_b"), dead.clone()] {
        assert_eq!(
            app.callback(&callbacks::success(&task)).await,
            StatusCode::OK
        );
    }
    dead_letters_are(&app, 1).await;

    let out = inspect(dir.path()).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // The refused look changed nothing for the running instance.
    assert_eq!(
        app.callback(&callbacks::success(&format!("{run}_c"))).await,
        StatusCode::OK
    );
    app.stop().await;

    let found = json(&stdout(&inspect(dir.path()).await));
    let outbox = &found["outbox"];
    assert_eq!(outbox["pending"], 3, "{found}");
    assert_eq!(outbox["deadLetters"], 1, "{found}");
    assert_eq!(outbox["tasksTracked"], 4, "{found}");
    assert!(outbox["pendingBytes"].as_u64().unwrap() > 0, "{found}");
    assert!(outbox["oldestPendingAgeMs"].as_i64().is_some(), "{found}");
    assert_eq!(found["registry"]["registeredTasks"], 0, "{found}");
    let table = ok(&[
        "outbox",
        "inspect",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["pending", "3"])),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["dead", "letters", "1"])),
        "{table}"
    );

    // Read-only: the instance starts again on it with everything there.
    let app = TestApp::start_with(
        config(dir.path(), publisher.clone()),
        Refusing::wrap(&publisher, &[]).await,
    )
    .await;
    let status = app.outbox.status().unwrap();
    assert_eq!((status.pending, status.dead_letters), (3, 1));
    app.stop().await;

    let out = inspect(&dir.path().join("nothing-here")).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no hookbridge outbox"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_inspect_refuses_a_crashed_data_dir_until_hookbridge_recovers_it() {
    let dir = temp_dir();
    let child = ChildApp::start(dir.path(), free_port(), &[]).await;
    let task = unique("task");
    assert_eq!(
        child.http.callback(&callbacks::success(&task)).await,
        StatusCode::OK
    );
    child.kill().await;

    let out = inspect(dir.path()).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not shut down cleanly"),
        "{}",
        stderr(&out)
    );

    // One start and a clean stop recover it; then it reads.
    let child = ChildApp::start(dir.path(), free_port(), &[]).await;
    assert!(child.terminate(Duration::from_secs(30)).await.success());
    let found = json(&stdout(&inspect(dir.path()).await));
    assert_eq!(found["outbox"]["tasksTracked"], 1, "{found}");
}

/// Damage in a stopped data dir is listed: a damaged record of the log,
/// and a database file that cannot be read (the log is counted anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_inspect_lists_damage() {
    use hookbridge::event::{parse, Source};
    let dir = temp_dir();
    let mut outbox_config = config(dir.path(), PublisherConfig::default()).outbox;
    outbox_config.segment_bytes = 4096;
    let outbox = hookbridge::outbox::Outbox::open(&outbox_config).unwrap();
    for i in 0..20 {
        let body = format!(r#"{{"taskId":"seen_{i:02}","state":"generating"}}"#);
        let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
        assert!(outbox.append(event).await.unwrap().is_stored());
    }
    outbox.close().await;
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("pending"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let first = &segments[0];
    let mut bytes = std::fs::read(first).unwrap();
    let at = bytes.windows(9).position(|w| w == b"\"seen_03\"").unwrap();
    bytes[at + 3] ^= 0xff;
    std::fs::write(first, bytes).unwrap();
    std::fs::write(dir.path().join("tasks.redb"), vec![0x42; 8192]).unwrap();

    let found = json(&stdout(&inspect(dir.path()).await));
    assert_eq!(found["outbox"]["pending"], 19, "{found}");
    let damage: Vec<String> = serde_json::from_value(found["outbox"]["damage"].clone()).unwrap();
    assert_eq!(damage.len(), 2, "{damage:?}");
    assert!(damage[0].starts_with("pending log damaged: pending/00000000000000000001.log: "));
    assert!(
        damage[1].starts_with("tasks.redb cannot be read"),
        "{damage:?}"
    );
    let table = ok(&[
        "outbox",
        "inspect",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        table.lines().filter(|l| l.starts_with("damage: ")).count(),
        2,
        "{table}"
    );
}
