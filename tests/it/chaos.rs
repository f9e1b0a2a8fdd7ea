//! The chaos test: cluster mode on broker clusters under load and faults.
//!
//! `scripts/cluster.sh up` starts 3 Kafka brokers (RF 3, min.insync 2), 3
//! NATS nodes (R3 stream, R3 bucket), 3 replicas in Kafka cluster mode and 3
//! in JetStream cluster mode, and HAProxy in front of each trio checking
//! `/readyz`. Every callback goes to both trios through HAProxy; 20% are
//! sent again (round robin sends the copy to another replica) and some
//! tasks get a stale state after their terminal one. During the load: one
//! replica of each trio is SIGKILLed and restarted, the Kafka broker leading
//! a busy partition is SIGKILLed and restarted, one NATS node likewise, and
//! all replicas get a rolling restart.
//!
//! Checked on each broker: every (taskId, state) at most once, each task's
//! states in order, every accepted terminal state exactly once; no callback
//! refused during the rolling restart. Counts and the end-to-end p99 (200
//! answer to broker timestamp) are printed.
//!
//! `HOOKBRIDGE_CHAOS_FAULTS=0` runs the same load without faults (the
//! baseline latency). CI runs a reduced scale. The full scale:
//! `HOOKBRIDGE_CHAOS_TASKS=2000 HOOKBRIDGE_CHAOS_RATE=500 HOOKBRIDGE_CHAOS_SECS=60 \
//!  cargo test --test it chaos -- --ignored --nocapture`

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hyper::StatusCode;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::Value;

use crate::support::app::Http;
use crate::support::{callbacks, unique};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn rank(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "waiting" => 1,
        "generating" => 2,
        _ => 3,
    }
}

/// The test bed; `down` on drop, whatever happened.
struct Bed {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh")
}

fn cluster_sh(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("bash")
        .arg(script())
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .env("HOOKBRIDGE_BIN", env!("CARGO_BIN_EXE_hookbridge"))
        .status()
        .expect("scripts/cluster.sh runs");
    assert!(status.success(), "cluster.sh {args:?} failed");
}

impl Bed {
    fn up() -> Self {
        let dir = tempfile::tempdir().unwrap();
        cluster_sh(dir.path(), &["up"]);
        let text = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let env = text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { dir, env }
    }

    fn get(&self, key: &str) -> &str {
        &self.env[key]
    }

    /// Runs a cluster.sh subcommand off the runtime.
    async fn run(&self, args: &[&str]) {
        let dir = self.dir.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster_sh(&dir, &args)
        })
        .await
        .unwrap();
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::env::var_os("HOOKBRIDGE_CHAOS_KEEP").is_some() {
            eprintln!("chaos: bed kept in {}", self.dir.path().display());
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
        }
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

/// One callback as sent: to which bridge, what, when, and the answer.
#[derive(Debug, Clone)]
struct Sent {
    bridge: &'static str,
    task: String,
    state: &'static str,
    at_ms: i64,
    status: Option<StatusCode>,
}

/// The callbacks of the run, in sending order: each task's states, the
/// tasks interleaved; copies of 20% of them a little later; a stale
/// `generating` after the terminal state for every tenth task.
fn schedule(prefix: &str, tasks: usize) -> Vec<(String, &'static str, i64)> {
    let mut out = Vec::new();
    let steps: [&'static str; 3] = ["waiting", "generating", "success"];
    let mut copies = Vec::new();
    for (n, step) in steps.into_iter().enumerate() {
        for t in 0..tasks {
            let task = format!("{prefix}-{t}");
            let state = if n == 2 && t % 7 == 0 { "fail" } else { step };
            let time = 1_735_599_000_000 + n as i64 * 1000;
            out.push((task.clone(), state, time));
            if (t + n) % 5 == 0 {
                copies.push((out.len() + 7, (task, state, time)));
            }
        }
    }
    for t in (0..tasks).step_by(10) {
        out.push((format!("{prefix}-{t}"), "generating", 1_735_599_001_000));
    }
    for (i, (at, copy)) in copies.into_iter().enumerate() {
        out.insert((at + i).min(out.len()), copy);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "starts 3 Kafka brokers, 3 NATS nodes and 6 replicas: scripts/test.sh runs it alone"]
async fn cluster_mode_keeps_exactly_once_and_order_through_faults() {
    let tasks = setting("HOOKBRIDGE_CHAOS_TASKS", 200) as usize;
    let rate = setting("HOOKBRIDGE_CHAOS_RATE", 100);
    let secs = setting("HOOKBRIDGE_CHAOS_SECS", 15);
    let bed = Arc::new(tokio::task::spawn_blocking(Bed::up).await.unwrap());
    let bridges: [(&'static str, Http); 2] = [
        (
            "kafka",
            Http::new(
                format!("127.0.0.1:{}", bed.get("HAPROXY_k"))
                    .parse()
                    .unwrap(),
            ),
        ),
        (
            "jetstream",
            Http::new(
                format!("127.0.0.1:{}", bed.get("HAPROXY_n"))
                    .parse()
                    .unwrap(),
            ),
        ),
    ];
    let plan = schedule(&unique("chaos"), tasks);
    // Pace: the plan spread over `secs`, at most `rate` per second.
    let interval = Duration::from_secs(secs)
        .checked_div(plan.len() as u32)
        .unwrap_or_default()
        .max(Duration::from_secs(1) / rate.max(1) as u32);
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let rolling: Arc<Mutex<Option<(i64, i64)>>> = Arc::default();
    // When each fault began, for the time to recover from it.
    let struck: Arc<Mutex<Vec<(&'static str, i64)>>> = Arc::default();
    let started = Instant::now();

    // The faults, on their own task, relative to the load's length.
    let faults = {
        let (bed, rolling, struck) = (bed.clone(), rolling.clone(), struck.clone());
        let span = Duration::from_secs(secs);
        tokio::spawn(async move {
            let at = |f: f64| started + span.mul_f64(f);
            let strike = |what: &'static str| struck.lock().unwrap().push((what, now_ms()));
            let mut recovered = Vec::new();
            if setting("HOOKBRIDGE_CHAOS_FAULTS", 1) == 0 {
                // The baseline: the same load, no faults.
                tokio::time::sleep_until(at(1.0).into()).await;
                *rolling.lock().unwrap() = Some((0, 0));
                return ("none".to_string(), recovered);
            }
            tokio::time::sleep_until(at(0.15).into()).await;
            strike("kill -9 of one replica per broker");
            bed.run(&["replica", "k1", "kill"]).await;
            bed.run(&["replica", "n1", "kill"]).await;
            tokio::time::sleep_until(at(0.30).into()).await;
            bed.run(&["replica", "k1", "start"]).await;
            bed.run(&["replica", "n1", "start"]).await;
            tokio::time::sleep_until(at(0.35).into()).await;
            let leader = tokio::task::spawn_blocking({
                let bootstrap = bed.get("KAFKA_BOOTSTRAP").to_string();
                move || partition_leader(&bootstrap, "hookbridge.internal")
            })
            .await
            .unwrap();
            let leader = leader.to_string();
            strike("kill of the internal topic's partition-0 Kafka leader");
            bed.run(&["kafka", &leader, "kill"]).await;
            tokio::time::sleep_until(at(0.45).into()).await;
            let nats_leader = stream_leader(bed.get("NATS_URL"), bed.get("NATS_STREAM")).await;
            strike("kill of the stream's NATS leader");
            bed.run(&["nats", &nats_leader, "kill"]).await;
            tokio::time::sleep_until(at(0.50).into()).await;
            bed.run(&["kafka", &leader, "start"]).await;
            tokio::time::sleep_until(at(0.60).into()).await;
            bed.run(&["nats", &nats_leader, "start"]).await;
            tokio::time::sleep_until(at(0.65).into()).await;
            let from = now_ms();
            let t = Instant::now();
            strike("rolling restart");
            bed.run(&["rolling"]).await;
            *rolling.lock().unwrap() = Some((from, now_ms()));
            recovered.push(("rolling restart of 6 replicas", t.elapsed()));
            (leader, recovered)
        })
    };

    // The load: the plan, then copies of it until the faults are over.
    let mut sends = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    let mut i = 0usize;
    while i < plan.len() || !faults.is_finished() {
        ticker.tick().await;
        let (task, state, time) = plan[i % plan.len()].clone();
        i += 1;
        for (bridge, http) in &bridges {
            let (http, log, task) = (http.clone(), log.clone(), task.clone());
            let bridge = *bridge;
            sends.push(tokio::spawn(async move {
                let body = callbacks::progress(&task, state, time);
                let at_ms = now_ms();
                let status = http.try_callback(&body).await.ok().map(|a| a.status);
                log.lock().unwrap().push(Sent {
                    bridge,
                    task,
                    state,
                    at_ms,
                    status,
                });
            }));
        }
    }
    for s in sends {
        s.await.unwrap();
    }
    let (leader, recovered) = faults.await.unwrap();
    let sent = log.lock().unwrap().clone();
    let load_secs = started.elapsed().as_secs_f64();
    let (roll_from, roll_to) = rolling.lock().unwrap().unwrap();

    // What each bridge accepted: the first 200 per (task, state).
    let mut report = Vec::new();
    let mut violations = Vec::new();
    for bridge in ["kafka", "jetstream"] {
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.bridge == bridge).collect();
        let refused: Vec<&&Sent> = mine
            .iter()
            .filter(|s| s.status != Some(StatusCode::OK))
            .collect();
        let refused_rolling = refused
            .iter()
            .filter(|s| s.at_ms >= roll_from && s.at_ms <= roll_to)
            .count();
        let mut accepted: HashMap<(String, &str), i64> = HashMap::new();
        for s in mine.iter().filter(|s| s.status == Some(StatusCode::OK)) {
            let at = accepted.entry((s.task.clone(), s.state)).or_insert(s.at_ms);
            *at = (*at).min(s.at_ms);
        }
        let terminal = accepted.keys().filter(|(_, s)| rank(s) == 3).count();
        let published = match bridge {
            "kafka" => read_kafka(bed.get("KAFKA_BOOTSTRAP"), "chaos.task-events", terminal).await,
            _ => read_jetstream(bed.get("NATS_URL"), bed.get("NATS_STREAM"), "", terminal).await,
        };
        // Exactly once, in order, every accepted terminal state there.
        let mut by_task: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut latencies = Vec::new();
        for (task, state, at) in &published {
            by_task.entry(task).or_default().push(state);
            if let Some(sent_at) = accepted.get(&(task.clone(), state.as_str())) {
                latencies.push(at - sent_at);
            }
        }
        // Checked after the report is printed, so a failing run shows its figures.
        let mut wrong = Vec::new();
        for (task, states) in &by_task {
            if !states.windows(2).all(|w| rank(w[0]) < rank(w[1])) {
                wrong.push(format!(
                    "{task} published {states:?}: a state twice or out of order"
                ));
            }
        }
        for ((task, state), _) in accepted.iter().filter(|((_, s), _)| rank(s) == 3) {
            if by_task.get(task.as_str()).and_then(|s| s.last()) != Some(state) {
                wrong.push(format!(
                    "accepted {task}/{state} is not the task's last published event"
                ));
            }
        }
        violations.push((bridge, wrong));
        // Time to recover from a fault: until everything accepted in the
        // 2 s after it began was on the broker.
        let at_broker: HashMap<(&str, &str), i64> = published
            .iter()
            .map(|(task, state, at)| ((task.as_str(), state.as_str()), *at))
            .collect();
        for (what, t) in struck.lock().unwrap().iter() {
            let after: Vec<i64> = accepted
                .iter()
                .filter(|(_, sent_at)| (*t..t + 2_000).contains(*sent_at))
                .filter_map(|((task, state), _)| at_broker.get(&(task.as_str(), *state)))
                .copied()
                .collect();
            let recovered = after.iter().max().map_or(-1, |last| last - t);
            report.push(format!(
                "chaos {bridge}: {what}: recovered in {recovered} ms (the last of {} events accepted in the next 2 s on the broker)",
                after.len()
            ));
        }
        latencies.sort_unstable();
        let p = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(-1)
        };
        report.push(format!(
            "chaos {bridge}: sent {} ({} refused, {refused_rolling} during the rolling restart), accepted {} distinct (task,state), published {} ({} tasks), suppressed {} (stale or behind a later state), e2e p50 {} ms p90 {} ms p99 {} ms max {} ms",
            mine.len(), refused.len(), accepted.len(), published.len(), by_task.len(),
            accepted.len().saturating_sub(published.len()), p(0.5), p(0.9), p(0.99), latencies.last().copied().unwrap_or(-1),
        ));
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        for s in &refused {
            *answers.entry(format!("{:?}", s.status)).or_default() += 1;
        }
        eprintln!(
            "{}; refusals by answer: {answers:?}",
            report.last().unwrap()
        );
        assert_eq!(
            refused_rolling, 0,
            "{bridge}: callbacks refused during the rolling restart"
        );
    }
    // Two replicas racing states of the same tasks while the stream's
    // leader, found at run time, is killed: repeated.
    let rounds = setting("HOOKBRIDGE_CHAOS_LEADER_ROUNDS", 5) as usize;
    let mut race_wrong = Vec::new();
    for round in 0..rounds {
        let (line, wrong) = leader_race(&bed, round).await;
        eprintln!("{line}");
        report.push(line);
        race_wrong.extend(wrong);
    }
    violations.push(("jetstream leader races", race_wrong));
    let mut out = std::io::stderr().lock();
    use std::io::Write;
    let _ = writeln!(out, "chaos: {tasks} tasks, {} callbacks per bridge in {load_secs:.1} s, Kafka broker {leader} killed", sent.len() / 2);
    for line in report {
        let _ = writeln!(out, "{line}");
    }
    for (what, took) in recovered {
        let _ = writeln!(out, "chaos: {what}: {took:.1?}");
    }
    for (bridge, wrong) in &violations {
        let _ = writeln!(out, "chaos {bridge}: {} violations", wrong.len());
    }
    for (bridge, wrong) in violations {
        assert!(
            wrong.is_empty(),
            "{bridge}: {:#?}",
            &wrong[..wrong.len().min(20)]
        );
    }
}

/// Tasks of one leader race.
const RACE_TASKS: usize = 30;

/// One round: each state of [`RACE_TASKS`] tasks goes to one of two
/// JetStream replicas and half of them a copy to the other, the states a
/// second apart; the stream's leader is killed while the second state is
/// on its way and started again after the last. Returns the report line
/// and the violations (order, twice, terminal not last).
async fn leader_race(bed: &Bed, round: usize) -> (String, Vec<String>) {
    let prefix = unique(&format!("race{round}"));
    let replicas = ["PORT_n1", "PORT_n2"]
        .map(|port| Http::new(format!("127.0.0.1:{}", bed.get(port)).parse().unwrap()));
    let (url, stream) = (bed.get("NATS_URL"), bed.get("NATS_STREAM"));
    let leader = stream_leader(url, stream).await;
    let started = Instant::now();
    let mut sends = Vec::new();
    let mut killed = false;
    for (n, state) in ["waiting", "generating", "success"].into_iter().enumerate() {
        for t in 0..RACE_TASKS {
            if n == 1 && t == RACE_TASKS / 3 && !killed {
                bed.run(&["nats", &leader, "kill"]).await;
                killed = true;
            }
            let task = format!("{prefix}-{t}");
            let body = callbacks::progress(&task, state, 1_735_599_000_000 + n as i64 * 1000);
            let first = (t + n) % 2;
            let targets = if t % 2 == 0 {
                vec![first, 1 - first]
            } else {
                vec![first]
            };
            for r in targets {
                let (http, body) = (replicas[r].clone(), body.clone());
                sends.push(tokio::spawn(async move {
                    http.try_callback(&body).await.ok().map(|a| a.status)
                }));
            }
            tokio::time::sleep(Duration::from_millis(1000 / RACE_TASKS as u64)).await;
        }
    }
    let mut refused = 0;
    for s in sends {
        if s.await.unwrap() != Some(StatusCode::OK) {
            refused += 1;
        }
    }
    bed.run(&["nats", &leader, "start"]).await;
    wait_for_replicas(url, stream).await;
    let published = read_jetstream(url, stream, &prefix, RACE_TASKS).await;
    let mut by_task: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (task, state, _) in &published {
        by_task.entry(task).or_default().push(state);
    }
    let mut wrong = Vec::new();
    for t in 0..RACE_TASKS {
        let task = format!("{prefix}-{t}");
        let states = by_task.get(task.as_str()).cloned().unwrap_or_default();
        if !states.windows(2).all(|w| rank(w[0]) < rank(w[1])) || states.last() != Some(&"success")
        {
            wrong.push(format!("race round {round}: {task} published {states:?}"));
        }
    }
    let line = format!(
        "chaos jetstream leader race {round}: NATS node {leader} (the stream's leader) killed; {} of {} (task,state) published, {refused} refused, {} violations, {:.1?}",
        published.len(),
        RACE_TASKS * 3,
        wrong.len(),
        started.elapsed()
    );
    (line, wrong)
}

/// The NATS node (1-3) leading `stream` now.
async fn stream_leader(url: &str, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(leader) = stream_cluster(url, stream).await.and_then(|c| c.leader) {
            if let Some(n) = leader.strip_prefix("chaos-n") {
                return n.to_string();
            }
        }
        assert!(Instant::now() < deadline, "no leader for stream {stream}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Until `stream` has a leader and both other replicas are current again.
async fn wait_for_replicas(url: &str, stream: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(c) = stream_cluster(url, stream).await {
            if c.leader.is_some() && c.replicas.len() == 2 && c.replicas.iter().all(|r| r.current) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} did not recover its replicas"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn stream_cluster(
    url: &str,
    stream: &str,
) -> Option<async_nats::jetstream::stream::ClusterInfo> {
    let urls: Vec<&str> = url.split(',').collect();
    let client = async_nats::connect(urls.as_slice()).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.ok()?;
    stream.info().await.ok()?.cluster.clone()
}

/// The broker leading partition 0 of `topic` (created on first publish).
fn partition_leader(bootstrap: &str, topic: &str) -> i32 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if let Some(p) = m.topics().first().and_then(|t| t.partitions().first()) {
                if p.leader() > 0 {
                    return p.leader();
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for {topic}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (task, state, broker timestamp ms) of every committed record, in
/// partition order; reads until `terminal` terminal states are there and
/// nothing new came for a while.
async fn read_kafka(bootstrap: &str, topic: &str, terminal: usize) -> Vec<(String, String, i64)> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("chaos-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut records: Vec<(i32, i64, String, String, i64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last_new = Instant::now();
        loop {
            let done = records.iter().filter(|r| rank(&r.3) == 3).count() >= terminal;
            if (done && last_new.elapsed() > Duration::from_secs(5)) || Instant::now() > deadline {
                break;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let v: Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
                records.push((
                    m.partition(),
                    m.offset(),
                    v["taskId"].as_str().unwrap_or_default().to_string(),
                    v["state"].as_str().unwrap_or_default().to_string(),
                    m.timestamp().to_millis().unwrap_or_default(),
                ));
                last_new = Instant::now();
            }
        }
        records.sort_by_key(|r| (r.0, r.1));
        records.into_iter().map(|r| (r.2, r.3, r.4)).collect()
    })
    .await
    .unwrap()
}

/// Like [`read_kafka`], from the stream in sequence order, the tasks whose
/// id starts with `prefix` only.
async fn read_jetstream(
    url: &str,
    stream: &str,
    prefix: &str,
    terminal: usize,
) -> Vec<(String, String, i64)> {
    let urls: Vec<&str> = url.split(',').collect();
    let client = async_nats::connect(urls.as_slice())
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    // Right after a node restart the stream may still be electing a leader.
    let ready = Instant::now() + Duration::from_secs(60);
    let consumer = loop {
        let created = async {
            js.get_stream(stream)
                .await
                .map_err(|e| e.to_string())?
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())
        };
        match created.await {
            Ok(consumer) => break consumer,
            Err(e) => assert!(Instant::now() < ready, "no consumer on {stream}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = out
            .iter()
            .filter(|r: &&(String, String, i64)| rank(&r.1) == 3)
            .count()
            >= terminal;
        let wait = if done {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if !v["taskId"].as_str().unwrap_or_default().starts_with(prefix) {
                    continue;
                }
                let at = m
                    .info()
                    .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64)
                    .unwrap_or_default();
                out.push((
                    v["taskId"].as_str().unwrap_or_default().to_string(),
                    v["state"].as_str().unwrap_or_default().to_string(),
                    at,
                ));
            }
            _ if done || Instant::now() > deadline => break,
            _ => {}
        }
    }
    out
}
