//! `hookbridge`: parse the command line, load the configuration, run until
//! SIGINT or SIGTERM (or run one operator command, see `cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hookbridge::{App, Config};

mod cli;

/// glibc's malloc took a fifth of the CPU under load, much of it waiting on
/// its arena locks. jemalloc's thread caches avoid that; it measured ahead of
/// mimalloc here and kept a smaller peak RSS (see the README's benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Reliable Kinovi webhook callbacks on Kafka or NATS JetStream"
)]
struct Cli {
    /// TOML configuration file; `HOOKBRIDGE_<SECTION>__<KEY>` variables override it.
    /// Accepted before or after the subcommand.
    #[arg(long, short, env = "HOOKBRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve callbacks (the default).
    Run,
    /// Validate the configuration and print it as TOML that `--config`
    /// reads again (secrets masked as "***"); exit status 1 when invalid.
    Check,
    #[command(flatten)]
    Operator(cli::Command),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Run) {
        // Operator commands print their own errors; logs would only clutter.
        Command::Operator(command) => return Ok(cli::run(command, &config).await),
        Command::Check => {
            hookbridge::telemetry::init(&config.log);
            let printed = config
                .to_masked_toml()
                .context("cannot print the configuration")?;
            println!(
                "# The effective configuration: defaults, then the file, then HOOKBRIDGE_* variables.\n\
                 # Secrets are masked as \"***\"; read back, a masked value is refused unless its\n\
                 # HOOKBRIDGE_* variable supplies the real one.\n\n{printed}"
            );
        }
        Command::Run => {
            let telemetry =
                hookbridge::telemetry::init_with_traces(&config.log, &config.telemetry)?;
            let ran = match App::build(config).await {
                Ok(app) => app.run(hookbridge::shutdown_signal()).await,
                Err(e) => Err(e),
            };
            // After the relay's last batch: its spans are in the queue.
            tokio::task::spawn_blocking(move || telemetry.shutdown())
                .await
                .context("flushing the last spans panicked")?;
            ran?
        }
    }
    Ok(ExitCode::SUCCESS)
}
