//! `hookbridge outbox inspect`: what a stopped instance left in its data
//! dir, read offline and read-only.

use std::path::PathBuf;

use clap::Subcommand;
use hookbridge::outbox::inspect::{self, Inspection};
use hookbridge::Config;

use super::table::{age, pairs};
use super::{print_json, CliError};

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Count what a stopped instance's data dir holds (read-only; refused
    /// while a running hookbridge holds the files).
    Inspect {
        /// The data dir. Default: the configuration's `outbox.data_dir`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl OutboxCommand {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        let Self::Inspect { data_dir, json } = self;
        let dir = data_dir.unwrap_or_else(|| config.outbox.data_dir.clone());
        let found = tokio::task::spawn_blocking(move || inspect::inspect(&dir))
            .await
            .map_err(|e| CliError::Local(e.to_string()))??;
        if json {
            return print_json(&found);
        }
        println!("{}", render(&found));
        Ok(())
    }
}

fn render(i: &Inspection) -> String {
    let o = &i.outbox;
    let mut rows = vec![
        ("pending", o.pending.to_string()),
        ("pending bytes", o.pending_bytes.to_string()),
        (
            "oldest pending",
            o.oldest_pending_age_ms
                .map_or("-".into(), |ms| format!("{} ago", age(ms))),
        ),
        ("dead letters", o.dead_letters.to_string()),
        ("tasks tracked", o.tasks_tracked.to_string()),
    ];
    if let Some(r) = &i.registry {
        rows.push(("registered tasks", r.registered_tasks.to_string()));
        rows.push(("held callbacks", r.held_callbacks.to_string()));
    }
    let mut out = pairs(&rows).trim_end().to_string();
    // Damage is listed in full, one line each, after the counts.
    for line in &o.damage {
        out.push_str(&format!("\ndamage: {line}"));
    }
    out
}
