//! `hookbridge dead-letters list|show|export|requeue|bury`, through the admin
//! API's `/admin/dead-letters` routes.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use hookbridge::Config;
use serde_json::{json, Value};

use super::client::AdminClient;
use super::table::{cell, cut, pairs, render, utc};
use super::{print_json, CliError, Remote};

/// The most the admin API gives in one page (`?limit=`).
const PAGE: usize = 1000;

#[derive(Args)]
pub struct DeadLetters {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// List dead letters, oldest first: seq, time, task, state, reason.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter whole, with its event.
    Show {
        /// Its `seq` (first column of `list`).
        seq: u64,
    },
    /// Write every dead letter to FILE, one JSON object a line (`-`: stdout).
    Export {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Move dead letters back to the pending queue, to be published again.
    #[command(group = clap::ArgGroup::new("which").required(true))]
    Requeue {
        /// Every dead letter.
        #[arg(long, group = "which")]
        all: bool,
        /// These dead letters, by `seq`.
        #[arg(group = "which")]
        seqs: Vec<u64>,
    },
    /// Delete dead letters for good (ones nobody will requeue).
    Bury {
        /// These dead letters, by `seq`.
        #[arg(required = true)]
        seqs: Vec<u64>,
    },
}

impl DeadLetters {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        let client = AdminClient::new(&self.remote, config)?;
        let json = self.remote.json;
        match self.action {
            Action::List { limit } => {
                let letters = fetch(&client, limit).await?;
                if json {
                    return print_json(&letters);
                }
                println!("{}", list(&letters));
            }
            Action::Show { seq } => {
                let letter = client
                    .get(&format!("/admin/dead-letters/{seq}"))
                    .await
                    .map_err(|e| match e {
                        CliError::NotFound(_) => {
                            CliError::NotFound(format!("no dead letter {seq}"))
                        }
                        other => other,
                    })?;
                if json {
                    return print_json(&letter);
                }
                println!("{}", show(&letter));
            }
            Action::Export { file } => export(&client, &file).await?,
            Action::Requeue { all, seqs } => requeue(&client, all, seqs, json).await?,
            Action::Bury { seqs } => bury(&client, seqs, json).await?,
        }
        Ok(())
    }
}

/// Up to `limit` dead letters, oldest first.
async fn fetch(client: &AdminClient, limit: usize) -> Result<Vec<Value>, CliError> {
    let mut out = Vec::new();
    pages(client, limit, |page| {
        out.extend_from_slice(page);
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Fetches up to `limit` dead letters a page at a time, handing each page
/// to `each`, so an export never holds them all.
async fn pages(
    client: &AdminClient,
    limit: usize,
    mut each: impl FnMut(&[Value]) -> Result<(), CliError>,
) -> Result<usize, CliError> {
    let (mut seen, mut after) = (0, None);
    while seen < limit {
        let page = PAGE.min(limit - seen);
        let query = match after {
            Some(seq) => format!("?limit={page}&after={seq}"),
            None => format!("?limit={page}"),
        };
        let answer = client.get(&format!("/admin/dead-letters{query}")).await?;
        let letters = answer["deadLetters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        each(&letters)?;
        seen += letters.len();
        after = letters.last().and_then(|l| l["seq"].as_u64());
        if letters.len() < page || after.is_none() {
            break;
        }
    }
    Ok(seen)
}

fn list(letters: &[Value]) -> String {
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                cell(&l["seq"]),
                l["failedAt"].as_i64().map_or("-".into(), utc),
                cell(&l["event"]["taskId"]),
                cell(&l["event"]["state"]),
                cut(&cell(&l["reason"]), 80),
            ]
        })
        .collect();
    render(&["SEQ", "FAILED AT", "TASK", "STATE", "REASON"], &rows)
}

fn show(letter: &Value) -> String {
    let mut rows = vec![
        ("seq", cell(&letter["seq"])),
        (
            "failed at",
            letter["failedAt"].as_i64().map_or("-".into(), utc),
        ),
        ("reason", cell(&letter["reason"])),
        ("task", cell(&letter["event"]["taskId"])),
        ("state", cell(&letter["event"]["state"])),
    ];
    if let Some(raw) = letter["rawHex"].as_str() {
        rows.push(("raw bytes (hex)", raw.to_string()));
    }
    let event = serde_json::to_string_pretty(&letter["event"]).unwrap_or_default();
    format!("{}\nevent:\n{event}", pairs(&rows))
}

/// Writes to `<file>.partial` first, renamed when complete, so a failed
/// export never leaves a file that looks whole.
async fn export(client: &AdminClient, file: &Path) -> Result<(), CliError> {
    let to_stdout = file.as_os_str() == "-";
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let failed =
        |e: std::io::Error| CliError::Local(format!("cannot write {}: {e}", file.display()));
    let sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&partial).map_err(failed)?)
    };
    let mut out = std::io::BufWriter::new(sink);
    let written = pages(client, usize::MAX, |page| {
        for letter in page {
            serde_json::to_writer(&mut out, letter)
                .map_err(|e| CliError::Local(format!("cannot write {}: {e}", file.display())))?;
            out.write_all(b"\n").map_err(failed)?;
        }
        Ok(())
    })
    .await;
    let flushed = out.flush().map_err(failed);
    drop(out);
    let count = match written.and_then(|n| flushed.map(|()| n)) {
        Ok(count) => count,
        Err(e) => {
            if !to_stdout {
                if let Err(left) = std::fs::remove_file(&partial) {
                    eprintln!(
                        "cannot remove the partial file {}: {left}",
                        partial.display()
                    );
                }
            }
            return Err(e);
        }
    };
    if !to_stdout {
        std::fs::rename(&partial, file).map_err(failed)?;
    }
    eprintln!("exported {count} dead letters");
    Ok(())
}

async fn requeue(
    client: &AdminClient,
    all: bool,
    seqs: Vec<u64>,
    json: bool,
) -> Result<(), CliError> {
    let body = if all {
        json!({})
    } else {
        json!({ "seqs": seqs })
    };
    let answer = client.post("/admin/dead-letters/requeue", &body).await?;
    if json {
        print_json(&answer)?;
    } else {
        println!("requeued {}", cell(&answer["requeued"]));
    }
    match answer["notRequeued"].as_array() {
        Some(not) if !not.is_empty() => {
            let not: Vec<String> = not.iter().map(cell).collect();
            Err(CliError::NotFound(format!(
                "not requeued (no such dead letter, or no readable event): {}",
                not.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

async fn bury(client: &AdminClient, seqs: Vec<u64>, json: bool) -> Result<(), CliError> {
    let answer = client
        .post("/admin/dead-letters/bury", &json!({ "seqs": seqs }))
        .await?;
    if json {
        print_json(&answer)?;
    } else {
        println!("buried {}", cell(&answer["buried"]));
    }
    match answer["notBuried"].as_array() {
        Some(not) if !not.is_empty() => {
            let not: Vec<String> = not.iter().map(cell).collect();
            Err(CliError::NotFound(format!(
                "not buried (no such dead letter): {}",
                not.join(", ")
            )))
        }
        _ => Ok(()),
    }
}
