//! A process killed (SIGKILL) in the middle of a burst of appends: every
//! append that was answered as stored is found again, exactly once, when the
//! outbox is reopened, and the reopened outbox works (dedup records, new
//! appends, status).
//!
//! The test re-runs its own binary as the child: `child_appends_until_killed`
//! does nothing unless `HOOKBRIDGE_CRASH_CHILD_DIR` names a data dir; then it
//! appends from 64 tasks as fast as it can and prints one `ok` line per
//! stored append, after `append` returned. The parent kills it at a random
//! moment and checks what it had printed against what the data dir holds.
//! Only the public `Outbox` API is used, so the test holds for any storage
//! behind it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookbridge::config::OutboxConfig;
use hookbridge::event::{self, Source, State, TaskEvent};
use hookbridge::outbox::{Appended, Outbox};
use serde_json::json;

use crate::support::app::temp_dir;
use crate::support::unique;

/// Set in the child's environment: the data dir it appends to.
const CHILD_DIR: &str = "HOOKBRIDGE_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "crash_storage::child_appends_until_killed";
const ROUNDS: usize = 5;
const APPENDERS: u64 = 64;
/// The child stops by itself after this, should the parent never kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);

fn outbox_config(dir: &Path) -> OutboxConfig {
    OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    }
}

/// The states task number `n` goes through: one, two or three of them, so
/// that the state guard sees tasks move forward.
fn states(n: u64) -> &'static [State] {
    match n % 3 {
        0 => &[State::Success],
        1 => &[State::Generating, State::Success],
        _ => &[State::Waiting, State::Generating, State::Success],
    }
}

fn event(task_id: &str, state: State) -> TaskEvent {
    let mut body = json!({"taskId": task_id, "state": state.as_str(), "model": "seedance-20"});
    if state == State::Success {
        body["output"] =
            json!([{"url": format!("https://static.kinovi.ai/generated/{task_id}.mp4")}]);
    }
    event::parse(body.to_string().as_bytes(), Source::Webhook, 0).expect("a valid callback")
}

/// The child: appends until it is killed. Passes at once in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_appends_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let outbox = Outbox::open(&outbox_config(Path::new(&dir))).expect("open the outbox");
    let prefix = Arc::new(unique("crash"));
    // The leading newline ends the test harness's own "test ... " line.
    say(&format!("\nready {prefix}\n")).expect("write to the parent");
    let next = Arc::new(AtomicU64::new(0));
    let until = tokio::time::Instant::now() + CHILD_LIFETIME;
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|_| {
            let (outbox, prefix, next) = (outbox.clone(), prefix.clone(), next.clone());
            tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let task = format!("{prefix}_{n}");
                    for &state in states(n) {
                        let seq = match outbox.append(event(&task, state)).await {
                            Ok(Appended::New { seq } | Appended::Conflict { seq, .. }) => seq,
                            other => panic!("{task} {state}: not stored: {other:?}"),
                        };
                        if say(&format!("ok {task} {state} {seq}\n")).is_err() {
                            return; // The parent is gone.
                        }
                    }
                }
            })
        })
        .collect();
    for appender in appenders {
        appender.await.expect("appender panicked");
    }
    outbox.close().await;
}

/// One whole line straight to the pipe (not through the test harness's
/// capture), flushed before the next append starts.
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// An append the child reported as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    task: String,
    state: State,
    seq: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut words = line.split_whitespace();
    let (Some("ok"), Some(task), Some(state), Some(seq), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return None;
    };
    Some(Ack {
        task: task.to_string(),
        state: State::known(state)?,
        seq: seq.parse().ok()?,
    })
}

/// Runs the child on `dir`, kills it 100-600 ms after it is ready, and
/// returns every `ok` line it wrote in full.
fn run_child_and_kill(dir: &Path) -> Vec<Ack> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                // A last line cut by the kill was never fully written: not an ack.
                Ok(_) if line.ends_with('\n') => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });

    let ready_by = Instant::now() + Duration::from_secs(20);
    loop {
        let left = ready_by.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.starts_with("ready ") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child did not open the outbox within 20 s ({e:?})");
            }
        }
    }
    let kill_at = Instant::now() + Duration::from_millis(rand::random_range(100..=600));
    let mut acks = Vec::new();
    loop {
        let left = kill_at.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => acks.extend(parse_ack(&line)),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert_eq!(
        status.signal(),
        Some(9),
        "the child ended by itself ({status}) instead of being killed"
    );
    // Whatever was already in the pipe was written after its append returned.
    reader.join().expect("the reader thread");
    acks.extend(lines.try_iter().filter_map(|line| parse_ack(&line)));
    acks
}

/// What the reopened outbox holds, checked against what the child reported.
struct Recovered {
    held: usize,
    open: Duration,
}

async fn reopen_and_check(dir: &Path, acks: &[Ack]) -> Recovered {
    let started = Instant::now();
    let outbox = Outbox::open(&outbox_config(dir)).expect("reopen after the kill");
    let status = outbox.status().expect("status after the kill");
    let open = started.elapsed();

    // At most one entry per task comes back in a batch: take each batch out
    // (as the relay would after the broker's ack) to see the next states.
    let mut held: HashMap<(String, State), Vec<u64>> = HashMap::new();
    let mut count = 0usize;
    let mut max_seq = 0;
    loop {
        let batch = outbox.read_batch(100_000, 1_000_000).expect("read_batch");
        assert!(
            batch.unreadable.is_empty(),
            "entries that do not decode after the kill: {:?}",
            batch.unreadable
        );
        if batch.ready.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.ready.iter().map(|o| o.seq).collect();
        for o in batch.ready {
            max_seq = max_seq.max(o.seq);
            count += 1;
            held.entry((o.meta.task_id, o.meta.state))
                .or_default()
                .push(o.seq);
        }
        outbox.complete(seqs, vec![]).await.expect("complete");
    }
    assert_eq!(
        status.pending, count as u64,
        "status().pending after reopening differs from the entries read"
    );

    for ((task, state), seqs) in &held {
        assert_eq!(
            seqs.len(),
            1,
            "{task} {state} is held {} times: {seqs:?}",
            seqs.len()
        );
    }
    for ack in acks {
        let seqs = held.get(&(ack.task.clone(), ack.state));
        assert_eq!(
            seqs,
            Some(&vec![ack.seq]),
            "acknowledged {} {} (seq {}) is not held under that number",
            ack.task,
            ack.state,
            ack.seq
        );
    }
    let mut by_task: HashMap<&str, Vec<(State, u64)>> = HashMap::new();
    for ((task, state), seqs) in &held {
        by_task.entry(task).or_default().push((*state, seqs[0]));
    }
    for (task, mut entries) in by_task {
        entries.sort_by_key(|(state, _)| state.rank());
        assert!(
            entries.windows(2).all(|w| w[0].1 < w[1].1),
            "{task}: sequence numbers do not follow the states: {entries:?}"
        );
    }

    // The dedup records survived the kill with the events.
    let appenders: Vec<_> = acks
        .chunks(acks.len().div_ceil(64).max(1))
        .map(|chunk| {
            let (outbox, chunk) = (outbox.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for ack in chunk {
                    let again = outbox.append(event(&ack.task, ack.state)).await;
                    assert_eq!(
                        again,
                        Ok(Appended::Duplicate),
                        "{} {} again after the kill",
                        ack.task,
                        ack.state
                    );
                }
            })
        })
        .collect();
    for appender in appenders {
        appender.await.expect("re-append panicked");
    }

    // And the outbox takes new events, numbered after everything it held.
    let fresh = unique("crash_fresh");
    let seq = match outbox.append(event(&fresh, State::Success)).await {
        Ok(Appended::New { seq }) => seq,
        other => panic!("a new event after the kill was not stored: {other:?}"),
    };
    assert!(seq > max_seq, "new seq {seq} after held seq {max_seq}");
    outbox.complete(vec![seq], vec![]).await.expect("complete");
    assert_eq!(outbox.status().expect("status").pending, 0);
    outbox.close().await;
    Recovered { held: count, open }
}

#[test]
fn acknowledged_appends_survive_sigkill_exactly_once() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = temp_dir();
    let data = dir.path().join("data");
    let mut total = 0;
    for round in 1..=ROUNDS {
        let acks = run_child_and_kill(&data);
        let recovered = rt.block_on(reopen_and_check(&data, &acks));
        println!(
            "crash round {round}: {} acknowledged, {} recovered, open took {:.1} ms",
            acks.len(),
            recovered.held,
            recovered.open.as_secs_f64() * 1e3
        );
        total += acks.len();
    }
    assert!(total > 0, "the child never stored anything before the kill");
}
