//! `kinovi-sim`: a local stand-in for the Kinovi task API, to try hookbridge
//! (and its fallback polling and verify mode) without a provider account.

use std::net::SocketAddr;

use clap::Parser;
use hookbridge::sim::{Faults, SimConfig, Simulator, Variant};

#[derive(Parser)]
#[command(
    version,
    about = "Simulates the Kinovi task API: createTask, recordInfo and (faulty) callbacks",
    after_help = "\
Endpoints:
  POST /api/v1/jobs/createTask        {model, inputs:{prompt,...}, callBackUrl?} -> {\"taskId\": ...}
  GET  /api/v1/jobs/recordInfo?taskId=ID
  POST /_sim/fail-next?status=429&count=5   the next COUNT API requests answer STATUS
  GET  /_sim/tasks                          every task and its state now
Both API endpoints want `Authorization: Bearer <api key>`.

Per task: a prompt containing [fail] fails (error 2038), one containing [stuck] never finishes.

Try it with hookbridge:
  kinovi-sim --api-key sim-key &
  HOOKBRIDGE_PROVIDER__BASE_URL=http://127.0.0.1:9400 HOOKBRIDGE_PROVIDER__API_KEY=sim-key \\
  HOOKBRIDGE_PROVIDER__PUBLIC_URL=http://127.0.0.1:8080 \\
  HOOKBRIDGE_PROVIDER__TASKS_TOKEN=local-tasks-token-123 HOOKBRIDGE_RECONCILE__FIRST_POLL_AFTER_SECS=5 hookbridge
  curl -H 'Authorization: Bearer local-tasks-token-123' -d '{\"model\":\"seedance-20\",\"inputs\":{\"prompt\":\"a cat\"}}' \\
       http://127.0.0.1:8080/tasks"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9400")]
    listen: SocketAddr,
    /// The API key the simulator accepts.
    #[arg(
        long,
        env = "KINOVI_SIM_API_KEY",
        default_value = "sim-api-key",
        hide_env_values = true
    )]
    api_key: String,
    /// How long a task stays `waiting`, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    waiting_ms: u64,
    /// How long a task stays `generating`, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    generating_ms: u64,
    /// Every N-th task fails (0: only [fail] prompts).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Also send callbacks for `waiting` and `generating`, not only the final state.
    #[arg(long)]
    progress_callbacks: bool,
    /// Share of callbacks never sent (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    drop_rate: f64,
    /// Share of callbacks sent twice (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    duplicate_rate: f64,
    /// Delay before each callback, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Send a task's callbacks newest first, after its last one (with --progress-callbacks).
    #[arg(long)]
    reorder: bool,
    /// Payload dialect of callbacks.
    #[arg(long, value_enum, default_value_t = Variant::Envelope)]
    variant: Variant,
    /// Payload dialect of recordInfo answers.
    #[arg(long, value_enum, default_value_t = Variant::Envelope)]
    record_variant: Variant,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number between 0.0 and 1.0")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    hookbridge::telemetry::init(&hookbridge::config::LogConfig::default());
    let config = SimConfig {
        api_key: cli.api_key,
        waiting_ms: cli.waiting_ms,
        generating_ms: cli.generating_ms,
        fail_every: cli.fail_every,
        progress_callbacks: cli.progress_callbacks,
        record_variant: cli.record_variant,
        faults: Faults {
            drop_rate: cli.drop_rate,
            duplicate_rate: cli.duplicate_rate,
            delay_ms: cli.delay_ms,
            reorder: cli.reorder,
            variant: cli.variant,
        },
    };
    let sim = Simulator::start(cli.listen, config).await?;
    tracing::info!(addr = %sim.addr(), "kinovi-sim listening");
    hookbridge::shutdown_signal().await;
    sim.stop().await;
    Ok(())
}
