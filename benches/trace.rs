//! What the per-task trace costs per event: one callback entry and one
//! publication entry noted for a new task each time, on a store kept at
//! its byte cap (so every note also pushes the oldest task out), from one
//! thread and from two at once. Prints CPU time per event, to compare with
//! the CPU per answered callback that `scripts/bench.sh` prints.
//!
//!     cargo bench --bench trace            # or: scripts/bench.sh (phase trace)

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use hookbridge::event::State;
use hookbridge::publish::Receipt;
use hookbridge::trace::{CallbackEntry, Decision, Origin, Publication, TraceConfig, Traces};

/// CPU time of this process (user + system), in seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn note(traces: &Traces, topic: &Arc<str>, n: u64) {
    let task = format!("task-{n:012}");
    traces.callback(
        &task,
        CallbackEntry {
            received_at: 1_765_000_000_000 + n as i64,
            origin: Origin::Webhook,
            client: Some(IpAddr::from([10, 0, 0, 5])),
            state: Some(State::Success),
            decision: Decision::Accepted,
            reason: None,
            status: None,
            event_id: None,
            trace_id: None,
        },
    );
    traces.published(
        &task,
        Publication {
            event_id: String::new(),
            state: State::Success,
            at: 1_765_000_000_050 + n as i64,
            broker: "kafka",
            topic: topic.clone(),
            receipt: Receipt {
                partition: Some((n % 12) as i32),
                offset: Some(n as i64),
                ..Receipt::default()
            },
            trace_id: None,
        },
    );
}

/// CPU seconds and wall seconds of `events` notes from `threads` threads.
fn run(traces: &Traces, topic: &Arc<str>, from: u64, events: u64, threads: u64) -> (f64, f64) {
    let (start, cpu) = (Instant::now(), cpu_secs());
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..events / threads {
                    note(traces, topic, from + t * events + i);
                }
            });
        }
    });
    (cpu_secs() - cpu, start.elapsed().as_secs_f64())
}

fn main() {
    let events: u64 = std::env::var("BENCH_TRACE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let topic: Arc<str> = Arc::from("kinovi.tasks");
    let traces = Traces::new(&TraceConfig::default(), 7 * 86_400);
    // Fill to the cap first: the steady state of a long-running bridge.
    let mut n = 0;
    while traces.dropped() == 0 {
        note(&traces, &topic, n);
        n += 1;
    }
    let (tasks, bytes) = traces.usage();
    println!("trace: filled to {tasks} tasks, {} MiB", bytes >> 20);
    // The same loop with the trace off: what making the inputs costs.
    let off = Traces::default();
    for threads in [1u64, 2] {
        let (base, _) = run(&off, &topic, n, events, threads);
        let (cpu, wall) = run(&traces, &topic, n, events, threads);
        n += threads * events;
        println!(
            "RESULT trace threads={threads} events={events} cpu_us_per_event={:.3} events_per_sec={:.0}",
            (cpu - base).max(0.0) * 1e6 / events as f64,
            events as f64 / wall
        );
    }
    let (tasks, bytes) = traces.usage();
    println!(
        "trace: {tasks} tasks, {} MiB (cap {} MiB), {} dropped",
        bytes >> 20,
        TraceConfig::default().max_bytes >> 20,
        traces.dropped()
    );
}
