//! The operator commands: `status`, `trace` and `dead-letters` talk to a running
//! instance's admin API over HTTP; `outbox inspect` reads a stopped
//! instance's data dir, offline and read-only.
//!
//! Output is an aligned table, or JSON with `--json`. Failures print one
//! `error:` line on stderr and exit with a code a script can branch on
//! ([`CliError::exit_code`]).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hookbridge::outbox::inspect::InspectError;
use hookbridge::Config;

mod client;
mod dead_letters;
mod outbox;
mod status;
mod table;
mod trace;

pub use dead_letters::DeadLetters;
pub use outbox::OutboxCommand;

/// The operator subcommands of `hookbridge`.
#[derive(Subcommand)]
pub enum Command {
    /// Show a running instance's status (outbox, polling) from its admin API.
    Status(Remote),
    /// List, show, export, requeue or bury a running instance's dead letters.
    DeadLetters(DeadLetters),
    /// Show what became of one task's callbacks and where its events landed.
    Trace {
        /// The task id.
        task_id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Look into a stopped instance's data dir.
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

/// How to reach the admin API, and how to print.
#[derive(Args, Clone)]
pub struct Remote {
    /// The admin API's base URL (e.g. `http://127.0.0.1:9091`). Default:
    /// `http://` + the configuration's `[admin] listen`. The token is
    /// `HOOKBRIDGE_ADMIN__TOKEN` or `admin.token`.
    #[arg(long, global = true, value_name = "URL")]
    pub admin: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a command failed; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin API at {url}: {detail} (is hookbridge running there? set --admin URL or [admin] listen)")]
    Unreachable { url: String, detail: String },
    #[error("the admin API refused the credentials (401): set HOOKBRIDGE_ADMIN__TOKEN or admin.token to the instance's admin token")]
    Unauthorized,
    #[error("the admin API refused the request (403): {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("the admin API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("{0}")]
    Local(String),
}

impl CliError {
    /// 3: unreachable; 4: credentials refused; 5: not found; 6: the data
    /// dir is in use; 1: anything else (2 is a usage error, from clap).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. } => 3,
            Self::Unauthorized | Self::Forbidden(_) => 4,
            Self::NotFound(_) => 5,
            Self::Inspect(InspectError::Locked(_)) => 6,
            _ => 1,
        }
    }
}

/// Runs an operator command; prints the error, if any, on stderr.
pub async fn run(command: Command, config: &Config) -> ExitCode {
    let done = match command {
        Command::Status(remote) => status::run(&remote, config).await,
        Command::DeadLetters(command) => command.run(config).await,
        Command::Outbox(command) => command.run(config).await,
        Command::Trace { task_id, remote } => trace::run(&task_id, &remote, config).await,
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints `value` as indented JSON.
fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Local(e.to_string()))?;
    println!("{text}");
    Ok(())
}
