//! `GET /metrics`: scraped over HTTP from a running app, parsed with a
//! Prometheus text-format parser, and checked against the traffic sent;
//! and every metric the Grafana dashboard and the alert rules in `deploy/`
//! use exists in a real scrape; `promtool` checks the rules and the scrape.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hyper::StatusCode;
use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::kafka::kafka_publisher;
use crate::support::app::{config, file_config, temp_dir, Http, TestApp};
use crate::support::{callbacks, eventually, kafka, unique};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// One scrape, parsed.
struct Scraped(Vec<Sample>);

impl Scraped {
    async fn from(admin: &Http) -> Self {
        let answer = admin.try_request("GET", "/metrics", "").await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json);
        assert_eq!(
            answer.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = answer.json.as_str().expect("a text body").to_string();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("not the Prometheus text format: {e}\n{text}"));
        Self(scrape.samples)
    }

    /// The value of the one series `name{labels}`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "one series {name}{labels:?}: {found:?}");
        match &found[0].value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        }
    }

    /// A histogram's `_count` (from its `+Inf` bucket) and `_sum`.
    fn histogram(&self, name: &str) -> (f64, f64) {
        let buckets = self
            .0
            .iter()
            .find_map(|s| match &s.value {
                Metric::Histogram(b) if s.metric == name => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}"));
        let count = buckets
            .iter()
            .find(|b| b.less_than == f64::INFINITY)
            .expect("a +Inf bucket")
            .count;
        assert_eq!(count, self.value(&format!("{name}_count"), &[]));
        (count, self.value(&format!("{name}_sum"), &[]))
    }

    /// Every metric family name: histogram series map to their base name.
    fn names(&self) -> BTreeSet<String> {
        self.0
            .iter()
            .map(|s| {
                let base = ["_count", "_sum"]
                    .iter()
                    .find_map(|suffix| s.metric.strip_suffix(suffix))
                    .filter(|base| self.0.iter().any(|h| h.metric == *base));
                base.unwrap_or(&s.metric).to_string()
            })
            .collect()
    }
}

/// Known traffic in, exact counts out: accepted, duplicates, stale,
/// conflicts, rejected by reason, published by broker, one dead letter
/// (the topic refuses it as too large), the answer and end-to-end
/// histograms, and the gauges once the backlog drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_follows_the_traffic() {
    let (bootstrap, topic) = kafka::new_topic("metrics", 1).await;
    let dir = temp_dir();
    let mut config = config(dir.path(), kafka_publisher(&bootstrap, &topic));
    config.server.body_limit_bytes = 32 * 1024;
    let app = TestApp::start(config).await;
    // Lowered after the start, which refuses a topic smaller than the body limit.
    kafka::limit_message_bytes(&bootstrap, &topic, 2000).await;

    let before = Scraped::from(&app.admin).await;
    assert_eq!(before.value("hookbridge_events_accepted_total", &[]), 0.0);
    assert_eq!(
        before
            .histogram("hookbridge_webhook_answer_duration_seconds")
            .0,
        0.0
    );

    let run = unique("task");
    let task = |n: usize| format!("{run}_{n}");
    let mut answered = 0;
    let mut send = |body: Value| {
        answered += 1;
        let http = app.http.clone();
        async move { http.callback(&body).await }
    };
    for n in 0..5 {
        assert_eq!(send(callbacks::success(&task(n))).await, StatusCode::OK);
    }
    // Two repeats, a late `running` after success, a failure after success.
    for _ in 0..2 {
        assert_eq!(send(callbacks::success(&task(0))).await, StatusCode::OK);
    }
    let late = callbacks::progress(&task(1), "running", 1_735_599_700_000);
    assert_eq!(send(late).await, StatusCode::OK);
    assert_eq!(send(callbacks::failure(&task(2))).await, StatusCode::OK);
    // Over the topic's max.message.bytes: a permanent refusal.
    let mut big = callbacks::success(&task(9));
    big["data"]["output"][0]["url"] = json!(format!("https://x.example/{}", "a".repeat(8192)));
    assert_eq!(send(big).await, StatusCode::OK);
    for body in [
        json!({"nothing": "here"}),
        json!([1, 2]),
        json!({"data": {"taskId": ""}}),
    ] {
        assert_eq!(send(body).await, StatusCode::BAD_REQUEST);
    }
    let answered = answered;
    // Refused by the body limit before any handler: counted, not timed.
    let (status, _) = app
        .http
        .request("POST", "/webhooks/kinovi", vec![b' '; 40 * 1024])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    app.drained(Duration::from_secs(60)).await;
    // The relay counts a step's dead letters and stamps its progress just
    // after the outbox took the step, which is what ends the drain wait.
    let admin = app.admin.clone();
    let after = eventually(Duration::from_secs(30), "the relay's last step", || {
        let admin = admin.clone();
        async move {
            let scraped = Scraped::from(&admin).await;
            let counted = scraped.value(
                "hookbridge_events_dead_lettered_total",
                &[("class", "refused")],
            ) >= 1.0
                && scraped.value("hookbridge_relay_last_progress_timestamp_seconds", &[]) > 0.0;
            counted.then_some(scraped)
        }
    })
    .await;
    let counter = |name: &str, labels: &[(&str, &str)]| after.value(name, labels);
    // 5 tasks + the big one; the conflict is stored and published too.
    assert_eq!(counter("hookbridge_events_accepted_total", &[]), 7.0);
    assert_eq!(counter("hookbridge_events_duplicate_total", &[]), 2.0);
    assert_eq!(counter("hookbridge_events_stale_total", &[]), 1.0);
    assert_eq!(counter("hookbridge_events_conflict_total", &[]), 1.0);
    let rejected = |reason| counter("hookbridge_events_rejected_total", &[("reason", reason)]);
    assert_eq!(rejected("invalid"), 3.0);
    assert_eq!(rejected("too_large"), 1.0);
    assert_eq!(rejected("bad_token"), 0.0);
    let refused = |reason| counter("hookbridge_requests_refused_total", &[("reason", reason)]);
    assert_eq!((refused("full"), refused("rate_limited")), (0.0, 0.0));
    let published = counter("hookbridge_events_published_total", &[("broker", "kafka")]);
    assert_eq!(published, 6.0);
    let dead = |class| counter("hookbridge_events_dead_lettered_total", &[("class", class)]);
    assert_eq!(dead("refused"), 1.0);
    for class in [
        "undecodable",
        "unencodable",
        "stuck",
        "unknown_task",
        "unconfirmed",
    ] {
        assert_eq!(dead(class), 0.0, "{class}");
    }

    let (answers, _) = after.histogram("hookbridge_webhook_answer_duration_seconds");
    assert_eq!(
        answers, answered as f64,
        "every request that reached the handler"
    );
    let (ages, age_sum) = after.histogram("hookbridge_event_age_at_publish_seconds");
    assert_eq!(ages, published, "one age per acknowledged event");
    assert!(age_sum >= 0.0);
    assert!(after.histogram("hookbridge_publish_duration_seconds").0 >= 1.0);
    let (commits, requests) = after.histogram("hookbridge_outbox_group_commit_size");
    assert_eq!(
        after
            .histogram("hookbridge_outbox_fsync_duration_seconds")
            .0,
        commits
    );
    // 7 stored appends, shared among synced commits (repeats and stale
    // states are decided without a write; acks ride on the next sync).
    assert!(
        requests >= 7.0 && commits >= 1.0 && commits <= requests,
        "{commits} {requests}"
    );

    let gauge = |name: &str| after.value(name, &[]);
    assert_eq!(gauge("hookbridge_outbox_pending_events"), 0.0);
    assert_eq!(gauge("hookbridge_outbox_pending_bytes"), 0.0);
    assert_eq!(gauge("hookbridge_outbox_oldest_pending_age_seconds"), 0.0);
    assert_eq!(gauge("hookbridge_outbox_dead_letters"), 1.0);
    assert_eq!(gauge("hookbridge_outbox_tracked_tasks"), 6.0);
    assert_eq!(gauge("hookbridge_ready"), 1.0);
    assert_eq!(gauge("hookbridge_poll_halted"), 0.0);
    assert!(gauge("hookbridge_relay_last_progress_timestamp_seconds") > 1.7e9);

    // Operator data: on the admin listener only, behind its Host guard.
    let (status, _) = app.http.get("/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not on the public listener");
    let (status, _) = Http::new(app.admin_addr).get("/metrics").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "on loopback without a token, reads are open"
    );
    app.stop().await;
}

/// With `admin.token`, a scrape needs `Authorization: Bearer <token>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_a_scrape_needs_it() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.admin.token = Some(hookbridge::config::Secret::new("a-long-enough-admin-token"));
    let app = TestApp::start(config).await;
    assert_eq!(
        Http::new(app.admin_addr).get("/metrics").await.0,
        StatusCode::UNAUTHORIZED
    );
    Scraped::from(&app.admin).await;
    app.stop().await;
}

/// Every `hookbridge_*` name in a PromQL expression, histogram suffixes
/// mapped to the base name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hookbridge_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(base.to_string());
    }
    out
}

/// Whether the expression's brackets and quotes pair up (a cheap syntax
/// check: `promtool` is too heavy to build for the tests).
fn balanced(expr: &str) -> bool {
    let mut open = Vec::new();
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '{' | '[' => open.push(c),
            ')' | '}' | ']' => {
                let wanted = match c {
                    ')' => '(',
                    '}' => '{',
                    _ => '[',
                };
                if open.pop() != Some(wanted) {
                    return false;
                }
            }
            _ => {}
        }
    }
    open.is_empty() && !quoted
}

/// The Grafana dashboard's queries (`targets[].expr` of every panel, rows
/// included).
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/hookbridge.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_i64().expect("a panel id")),
            "{title}: duplicate id"
        );
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            exprs.push(expr.to_string());
        }
    }
    exprs
}

/// The alert rules, checked for the shape Prometheus loads: groups with a
/// name and rules, each rule an `alert` with an `expr`, a duration, a
/// severity and a summary.
fn alert_exprs() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/prometheus/alerts.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("alerts.yml is YAML");
    let groups = docs[0]["groups"].as_vec().expect("a groups list");
    let mut out = BTreeMap::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "every group has a name");
        for rule in group["rules"].as_vec().expect("a rules list") {
            let alert = rule["alert"]
                .as_str()
                .expect("every rule is an alert")
                .to_string();
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: no expr"));
            let duration = rule["for"].as_str().unwrap_or("0s");
            assert!(
                humantime::parse_duration(duration).is_ok(),
                "{alert}: for = {duration}"
            );
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "{alert}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{alert}: summary"
            );
            if let Yaml::Hash(keys) = rule {
                for key in keys.keys() {
                    let key = key.as_str().unwrap_or_default();
                    assert!(
                        ["alert", "expr", "for", "labels", "annotations"].contains(&key),
                        "{alert}: unknown key {key}"
                    );
                }
            }
            assert!(
                out.insert(alert.clone(), expr.to_string()).is_none(),
                "{alert} twice"
            );
        }
    }
    out
}

/// Every metric the dashboard and the alert rules use exists in a real
/// scrape, and the alerts cover what an operator must hear about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_only_metrics_a_scrape_has() {
    let dir = temp_dir();
    let app = TestApp::start(file_config(dir.path())).await;
    let scraped = Scraped::from(&app.admin).await.names();
    app.stop().await;

    let alerts = alert_exprs();
    for wanted in [
        "HookbridgeBacklogOld",
        "HookbridgeDeadLetters",
        "HookbridgeRelayNotProgressing",
        "HookbridgePollingHalted",
        "HookbridgeNotReady",
    ] {
        assert!(alerts.contains_key(wanted), "alert {wanted}");
    }
    let exprs = dashboard_exprs().into_iter().chain(alerts.into_values());
    let mut used = BTreeSet::new();
    for expr in exprs {
        assert!(balanced(&expr), "unbalanced brackets: {expr}");
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "uses no hookbridge metric: {expr}");
        used.extend(names);
    }
    let missing: Vec<&String> = used.difference(&scraped).collect();
    assert!(
        missing.is_empty(),
        "not in a scrape: {missing:?}\nscraped: {scraped:?}"
    );
}

/// `promtool`: `HOOKBRIDGE_TEST_PROMTOOL`, on PATH, or taken once from
/// Debian's `prometheus` package (`apt-get download`, unpacked into
/// `target/tools`, nothing installed or started).
fn promtool() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("HOOKBRIDGE_TEST_PROMTOOL") {
        return path.into();
    }
    if let Ok(found) = crate::deploy::which("promtool") {
        return found;
    }
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/prometheus");
    let bin = tools.join("usr/bin/promtool");
    if bin.is_file() {
        return bin;
    }
    let download = tools.join("download");
    std::fs::create_dir_all(&download).unwrap();
    let fetch = || {
        std::process::Command::new("apt-get")
            .args(["download", "-qq", "prometheus"])
            .current_dir(&download)
            .status()
            .is_ok_and(|s| s.success())
    };
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let fetched = fetch()
        || (root
            && std::process::Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok_and(|s| s.success())
            && fetch());
    assert!(
        fetched,
        "promtool is needed to check the alert rules: put it on PATH, set \
         HOOKBRIDGE_TEST_PROMTOOL, or allow `apt-get download prometheus`"
    );
    let deb = std::fs::read_dir(&download)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded package");
    let unpacked = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tools)
        .status()
        .unwrap();
    assert!(unpacked.success(), "dpkg-deb -x {}", deb.display());
    bin
}

/// Runs `promtool` with `args`, `stdin` on its input; its output on failure.
fn run_promtool(args: &[&str], stdin: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// Prometheus's own tool accepts the alert rules, and finds nothing to
/// object to in a real scrape's names, types, units and help texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_alert_rules_and_a_real_scrape() {
    let rules = format!("{DEPLOY}/prometheus/alerts.yml");
    run_promtool(&["check", "rules", &rules], "").unwrap_or_else(|e| panic!("{rules}: {e}"));

    let dir = temp_dir();
    let app = TestApp::start(file_config(dir.path())).await;
    let answer = app.admin.try_request("GET", "/metrics", "").await.unwrap();
    app.stop().await;
    let text = answer.json.as_str().expect("a text body").to_string();
    run_promtool(&["check", "metrics"], &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}
