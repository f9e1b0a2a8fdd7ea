//! `hookbridge outbox inspect`: what a stopped instance left in its data
//! dir, read offline and read-only.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use hookbridge::outbox::inspect::{self, InspectError, Inspection, RegistrySizes};
use hookbridge::poll::registry;
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
        let found = tokio::task::spawn_blocking(move || look(&dir))
            .await
            .map_err(|e| CliError::Local(e.to_string()))??;
        if json {
            return print_json(&found);
        }
        println!("{}", render(&found));
        Ok(())
    }
}

/// The outbox's files, then the task registry's `tasks.redb` if there is
/// one; a file that cannot be read is listed as damage.
fn look(dir: &Path) -> Result<Inspection, InspectError> {
    let mut found = inspect::inspect(dir)?;
    let path = dir.join("tasks.redb");
    if !path.is_file() {
        return Ok(found);
    }
    match hookbridge::db::readable(&path)? {
        Ok(db) => {
            let (registered_tasks, held_callbacks) =
                registry::sizes(&db).map_err(|source| InspectError::Db {
                    path: path.display().to_string(),
                    source,
                })?;
            found.registry = Some(RegistrySizes {
                registered_tasks,
                held_callbacks,
            });
        }
        Err(cause) => found.outbox.damage.push(format!(
            "tasks.redb cannot be read ({cause}): set aside at the next start (its registrations and held callbacks out of use)"
        )),
    }
    Ok(found)
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
