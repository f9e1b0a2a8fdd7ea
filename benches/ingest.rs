//! hookbridge's ingest benchmark: a load generator and the measurements of
//! issues 3 and 4 (speed), run by `scripts/bench.sh`.
//!
//! ```text
//! ingest baseline     [--duration S] [--connections N]      trivial axum 200 handler, in process
//! ingest full-speed   --url URL [--duration S] [--connections N]   closed loop
//! ingest fixed-rate   --url URL --rate R [--duration S]     open loop, latency from the schedule
//! ingest drain        --url URL --count N                   post with the broker down, then time the drain
//! ingest dedup-size   --dir DIR [--count N]                 the outbox alone: size of 1M dedup records
//! ingest outbox-rate  --dir DIR --rate R [--duration S]     the outbox alone at a fixed rate: append latency
//! ingest parse       [--duration S]                        event::parse alone: ns per body
//! ingest recovery     --dir DIR [--count N] [--concurrency C]   the outbox alone: open time with N pending
//! ingest prefill      --dir DIR [--count N]                 the outbox alone: N tracked (acknowledged) tasks
//! ingest soak         --url URL --rate R [--duration S] [--window S] [--server-pid P]
//!                                                       open loop of new tasks, figures per window
//! ingest evict-cache --dir DIR                             drop DIR's files from the page cache
//! ingest wait-http    --url URL                             wait until GET URL answers 200
//! ingest wait-drained --url URL                             wait until the outbox is empty
//! ingest edge         --url URL --attack quiet|burst|junk|slow|churn|forged|loris
//!                                                       good callbacks from 127.0.0.1, attack from 127.0.0.2+
//! ingest large-pending --url URL [--count N] [--size B]     large callbacks held pending (publishes failing)
//! ingest otlp-sink    --listen ADDR [--duration S]          an OTLP/HTTP receiver that drops what it gets
//! ```
//!
//! `URL` is the server's base, e.g. `http://127.0.0.1:8080`; callbacks go to
//! `--path` (default `/webhooks/kinovi`), the outbox depth is read from
//! `/admin/status` on `--admin-url` (default: `URL`). Only loopback addresses are accepted: this is a load
//! generator. Every callback carries a distinct taskId (a run-unique prefix
//! and a counter), so deduplication never suppresses one and every 200 is a
//! durable write. The bodies are the provider's documented success and
//! failure examples.
//!
//! Latency figures come from every request, sorted (no histogram buckets).
//! Closed loop: N keep-alive HTTP/1 connections, each sending its next
//! request as soon as the answer arrived; the first `--warmup` seconds are
//! not counted. Open loop: requests are due on a fixed timeline and latency
//! runs from the due time, so a slow answer delays and counts against the
//! requests behind it (no coordinated omission).

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

// A bench target is a crate root: its modules are found relative to benches/.
#[path = "ingest/dedup_size.rs"]
mod dedup_size;
#[path = "ingest/edge.rs"]
mod edge;
#[path = "ingest/large.rs"]
mod large;
#[path = "ingest/load.rs"]
mod load;
#[path = "ingest/outbox_rate.rs"]
mod outbox_rate;
#[path = "ingest/parse.rs"]
mod parse;
#[path = "ingest/recovery.rs"]
mod recovery;
#[path = "ingest/report.rs"]
mod report;
#[path = "ingest/server.rs"]
mod server;
#[path = "ingest/soak.rs"]
mod soak;

use load::{Stop, Target};

#[derive(Parser)]
#[command(about = "hookbridge ingest benchmark (load generator and measurements)")]
struct Cli {
    /// Without one (as under `cargo test --all-targets`) the usage is printed.
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Full-speed load against an in-process axum handler that only answers 200.
    Baseline {
        #[command(flatten)]
        load: Closed,
        /// Server runtime worker threads (hookbridge's default runtime uses one per core).
        #[arg(long, default_value_t = 2)]
        server_threads: usize,
    },
    /// Closed-loop load at full speed against a running server.
    FullSpeed {
        #[command(flatten)]
        target: Url,
        #[command(flatten)]
        load: Closed,
    },
    /// Open-loop load at a fixed rate; latency counted from each request's due time.
    FixedRate {
        #[command(flatten)]
        target: Url,
        /// Requests per second.
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 15.0)]
        duration: f64,
        /// Seconds at the start that are sent but not counted.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Connection pool size (each carries one request at a time).
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    /// Post COUNT callbacks (the broker should be down), print `drain: posted`,
    /// then poll the outbox until it is empty and report the drain rate.
    Drain {
        #[command(flatten)]
        target: Url,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        #[arg(long, default_value_t = 128)]
        connections: usize,
        /// Longest wait for the drain, in seconds.
        #[arg(long, default_value_t = 180.0)]
        timeout: f64,
    },
    /// Append COUNT distinct tasks through the outbox (no HTTP, no relay),
    /// dedup on and off, and report the size of the dedup records.
    DedupSize {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Concurrent appenders, so that group commit works as in the server.
        #[arg(long, default_value_t = 2048)]
        concurrency: usize,
    },
    /// The callback parser alone (no HTTP, no storage): nanoseconds per body.
    Parse {
        /// Seconds spent on each body.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
    },
    /// Append at a fixed rate through the outbox alone (no HTTP, no broker;
    /// a stand-in relay deletes what was appended): storage latency only.
    OutboxRate {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
    },
    /// Fill the outbox with COUNT pending events (no HTTP, no relay), close
    /// it, then time its reopening and report its peak memory.
    Recovery {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Concurrent appenders while filling, so that group commit works as in the server.
        #[arg(long, default_value_t = 2048)]
        concurrency: usize,
        /// Reopen DIR as it is instead of filling it first (e.g. after dropping the page cache).
        #[arg(long)]
        skip_fill: bool,
    },
    /// Fill DIR's outbox with COUNT tracked tasks, all acknowledged (their
    /// dedup records in the task store, nothing pending), as a bridge that
    /// ran for days leaves it.
    Prefill {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2_000_000)]
        count: u64,
        /// Concurrent appenders, so that group commit works as in the server.
        #[arg(long, default_value_t = 2048)]
        concurrency: usize,
    },
    /// Open-loop load of new tasks at a fixed rate, with the latency from
    /// the due time, hookbridge's own histograms (answer, fsync,
    /// checkpoint), its RSS and the load average per window.
    Soak {
        #[command(flatten)]
        target: Url,
        #[arg(long, default_value_t = 4000)]
        rate: u64,
        /// Measured seconds.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
        /// Seconds per printed window.
        #[arg(long, default_value_t = 60.0)]
        window: f64,
        /// Seconds at the start that are sent but not counted.
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// hookbridge's process id: its VmRSS per window.
        #[arg(long)]
        server_pid: Option<u32>,
        /// What a window is called in the table's header.
        #[arg(long, default_value = "minute")]
        label: String,
    },
    /// Drop DIR's files from the page cache (as after a reboot).
    EvictCache {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// An OTLP/HTTP receiver on ADDR (loopback) that answers every
    /// `POST /v1/traces` 200 and drops it: what hookbridge exports to when
    /// its traces' cost is measured (HOOKBRIDGE_TELEMETRY__OTLP_ENDPOINT).
    OtlpSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Seconds it runs at most.
        #[arg(long, default_value_t = 3600.0)]
        duration: f64,
    },
    /// Wait until GET URL answers 200.
    WaitHttp {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Good callbacks from 127.0.0.1 at a fixed rate while the edge is
    /// attacked from 127.0.0.2 and up (see benches/ingest/edge.rs).
    Edge {
        #[command(flatten)]
        target: Url,
        #[arg(long, value_enum, default_value = "quiet")]
        attack: edge::Attack,
        /// Good callbacks per second on the keep-alive pool.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Good callbacks per second each on a fresh connection.
        #[arg(long, default_value_t = 5.0)]
        fresh_rate: f64,
        /// The good sender's keep-alive connections.
        #[arg(long, default_value_t = 16)]
        pool: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds the attack runs before the good callbacks start.
        #[arg(long, default_value_t = 1.0)]
        ramp: f64,
        /// Longest wait for a good callback's answer (then it counts as lost).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// hookbridge's process id: its CPU time per refused request.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The quiet phase's good p99 in ms, for the ratio.
        #[arg(long)]
        quiet_p99_ms: Option<f64>,
        /// Attacker addresses: 127.0.0.2 ..= 127.0.0.(1 + N).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=250))]
        attackers: u8,
        /// Burst phase: callbacks, and the keep-alive connections they go on.
        #[arg(long, default_value_t = 3000)]
        burst: u64,
        #[arg(long, default_value_t = 16)]
        burst_connections: usize,
        /// Junk flood: connections, and bodies per second in all (0: as fast as answered).
        #[arg(long, default_value_t = 16)]
        junk_connections: usize,
        #[arg(long, default_value_t = 0)]
        junk_rate: u64,
        /// Slow bodies: connections, declared Content-Length, seconds between bytes.
        #[arg(long, default_value_t = 700)]
        slow_connections: usize,
        #[arg(long, default_value_t = 100_000)]
        slow_content_length: u64,
        #[arg(long, default_value_t = 5.0)]
        slow_byte_every: f64,
        /// Churn: new connections per second, and seconds each stays open after its answer.
        #[arg(long, default_value_t = 500)]
        churn_rate: u64,
        #[arg(long, default_value_t = 2.0)]
        churn_hold: f64,
        /// Forged flood: connections, and callbacks per second in all (0: as fast as answered).
        #[arg(long, default_value_t = 8)]
        forged_connections: usize,
        #[arg(long, default_value_t = 1000)]
        forged_rate: u64,
        /// Slow-loris: connections sending half a request head.
        #[arg(long, default_value_t = 2000)]
        loris: usize,
    },
    /// Post COUNT valid callbacks of about SIZE bytes while publishes fail,
    /// then keep them pending for HOLD seconds (bench.sh reads the peak RSS).
    LargePending {
        #[command(flatten)]
        target: Url,
        #[arg(long, default_value_t = 400)]
        count: u64,
        #[arg(long, default_value_t = 1_000_000)]
        size: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Seconds the events stay pending after the last answer.
        #[arg(long, default_value_t = 20.0)]
        hold: f64,
    },
    /// Wait until the server's outbox has nothing pending.
    WaitDrained {
        #[command(flatten)]
        target: Url,
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
}

#[derive(Args)]
struct Url {
    /// Server base URL (loopback only), e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Path callbacks are posted to.
    #[arg(long, default_value = "/webhooks/kinovi")]
    path: String,
    /// The admin listener's base URL (for `/admin/status`); default: --url.
    #[arg(long)]
    admin_url: Option<String>,
}

impl Url {
    fn target(&self) -> anyhow::Result<Target> {
        Target::parse(&self.url, &self.path)
    }

    fn admin(&self) -> anyhow::Result<Target> {
        Target::parse(self.admin_url.as_deref().unwrap_or(&self.url), "/")
    }
}

#[derive(Args)]
struct Closed {
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the start that are sent but not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Keep-alive connections, one request in flight on each.
    #[arg(long, default_value_t = 128)]
    connections: usize,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Closed-loop load for the configured time, then its report.
async fn timed_closed_loop(target: load::Target, load: &Closed) -> anyhow::Result<()> {
    let stop = Stop::Time {
        warmup: secs(load.warmup),
        measure: secs(load.duration),
    };
    let report = load::closed_loop(target, load.connections, stop).await?;
    report.print_closed(load.connections);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` appends `--bench`; it means nothing here.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let Some(mode) = cli.mode else {
        use clap::CommandFactory;
        Cli::command().print_help()?;
        return Ok(());
    };
    // The load generator's own threads (default 1) count against the same
    // two cores as the server; BENCH_CLIENT_THREADS changes that.
    let threads = std::env::var("BENCH_CLIENT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(mode))
}

async fn run(mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Baseline {
            load,
            server_threads,
        } => {
            let (server, target) = server::trivial_server(server_threads)?;
            println!(
                "== baseline: trivial axum handler (200, no work), {server_threads} server threads"
            );
            timed_closed_loop(target, &load).await?;
            server.shutdown_background();
        }
        Mode::FullSpeed { target, load } => {
            let target = target.target()?;
            println!(
                "== full-speed: {} connections against {}",
                load.connections, target
            );
            timed_closed_loop(target, &load).await?;
        }
        Mode::FixedRate {
            target,
            rate,
            duration,
            warmup,
            connections,
        } => {
            let target = target.target()?;
            println!(
                "== fixed-rate: {rate}/s for {duration} s (+{warmup} s warm-up) against {target}"
            );
            let report =
                load::open_loop(target, rate, secs(warmup), secs(duration), connections).await?;
            report.print_open(rate);
        }
        Mode::Drain {
            target,
            count,
            connections,
            timeout,
        } => {
            let admin = target.admin()?;
            let target = target.target()?;
            println!("== drain: posting {count} callbacks to {target} (broker down)");
            let report = load::closed_loop(target, connections, Stop::Count(count)).await?;
            report.print_closed(connections);
            server::drain(&admin, secs(timeout)).await?;
        }
        Mode::LargePending {
            target,
            count,
            size,
            connections,
            hold,
        } => {
            let admin = target.admin()?;
            large::run(
                target.target()?,
                admin,
                count,
                size,
                connections,
                secs(hold),
            )
            .await?
        }
        Mode::DedupSize {
            dir,
            count,
            concurrency,
        } => dedup_size::run(&dir, count, concurrency).await?,
        Mode::OutboxRate {
            dir,
            rate,
            duration,
        } => outbox_rate::run(&dir, rate, secs(duration)).await?,
        Mode::Parse { duration } => parse::run(secs(duration))?,
        Mode::Recovery {
            dir,
            count,
            concurrency,
            skip_fill,
        } => recovery::run(&dir, count, concurrency, skip_fill).await?,
        Mode::Prefill {
            dir,
            count,
            concurrency,
        } => soak::prefill(&dir, count, concurrency).await?,
        Mode::Soak {
            target,
            rate,
            duration,
            window,
            warmup,
            connections,
            server_pid,
            label,
        } => {
            let admin = target.admin()?;
            let settings = soak::Settings {
                rate,
                warmup: secs(warmup),
                duration: secs(duration),
                window: secs(window.max(1.0)),
                connections,
                server_pid,
                label,
            };
            soak::run(target.target()?, admin, settings).await?;
        }
        Mode::EvictCache { dir } => soak::evict_cache(&dir)?,
        Mode::OtlpSink { listen, duration } => {
            server::otlp_sink(listen, secs(duration)).await?;
        }
        Mode::WaitHttp { url, timeout } => {
            let target = Target::parse(&url, "")?;
            server::wait_http(&target, secs(timeout)).await?;
        }
        Mode::Edge {
            target,
            attack,
            rate,
            fresh_rate,
            pool,
            duration,
            warmup,
            ramp,
            timeout,
            server_pid,
            quiet_p99_ms,
            attackers,
            burst,
            burst_connections,
            junk_connections,
            junk_rate,
            slow_connections,
            slow_content_length,
            slow_byte_every,
            churn_rate,
            churn_hold,
            forged_connections,
            forged_rate,
            loris,
        } => {
            let settings = edge::Settings {
                attack,
                load: edge::Load {
                    rate,
                    fresh_rate,
                    pool,
                    warmup: secs(warmup),
                    duration: secs(duration),
                    timeout: secs(timeout),
                },
                sizes: edge::Sizes {
                    attackers,
                    junk_connections,
                    junk_rate,
                    slow_connections,
                    slow_content_length,
                    slow_byte_every: secs(slow_byte_every),
                    churn_rate,
                    churn_hold: secs(churn_hold),
                    forged_connections,
                    forged_rate,
                    loris_connections: loris,
                },
                burst,
                burst_connections,
                ramp: secs(ramp),
                server_pid,
                quiet_p99_ms,
            };
            edge::run(target.target()?, settings).await?;
        }
        Mode::WaitDrained { target, timeout } => {
            let target = target.admin()?;
            let (start, took) = server::wait_drained(&target, secs(timeout)).await?;
            println!(
                "outbox drained: {start} pending at start, empty after {:.2} s",
                took.as_secs_f64()
            );
        }
    }
    Ok(())
}
