//! The on-disk cost of deduplication: COUNT distinct tasks appended through
//! the outbox (no HTTP, no relay), once with dedup on and once off.
//!
//! Each run appends from many concurrent tasks so that group commit batches
//! them as in the server, then deletes every pending entry (as the relay
//! would after the broker's ack), closes the outbox and looks at the task
//! store's file with redb directly: per-table stats, then the file size before and after
//! compaction. What dedup adds is what remains in the task tables; the file
//! size difference (on minus off, compacted) is the same figure as the disk
//! sees it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hookbridge::config::OutboxConfig;
use hookbridge::event::{self, Source, TaskEvent};
use hookbridge::outbox::{Appended, Outbox};
use redb::{ReadableDatabase, ReadableTableMetadata, TableHandle};

use super::load::run_prefix;

pub const TEMPLATE: &str = r#"{"code":200,"message":"success","data":{"taskId":"task_x","orderId":"order_clxxxxxx","model":"seedance-20","state":"success","creditsUsed":200,"output":[{"url":"https://static.kinovi.ai/generated/video.mp4","width":1280,"height":720}],"error":null,"createTime":1735599634000,"completeTime":1735599754000,"updateTime":1735599754000}}"#;

/// What one run left on disk.
struct Run {
    append_secs: f64,
    file_full: u64,
    file_drained: u64,
    file_compacted: u64,
    /// (table, entries, stored bytes, allocated bytes)
    tables: Vec<(String, u64, u64, u64)>,
}

pub async fn run(dir: &Path, count: u64, concurrency: usize) -> anyhow::Result<()> {
    println!(
        "== dedup-size: {count} distinct tasks, {concurrency} concurrent appenders, in {}",
        dir.display()
    );
    let on = one(&dir.join("dedup-on"), true, count, concurrency).await?;
    let off = one(&dir.join("dedup-off"), false, count, concurrency).await?;
    for (name, r) in [("dedup on", &on), ("dedup off", &off)] {
        println!("-- {name}");
        println!(
            "append                : {:.1} s, {:.0} appends/s, {:.2} us/append (amortized)",
            r.append_secs,
            count as f64 / r.append_secs,
            r.append_secs * 1e6 / count as f64
        );
        println!(
            "file MiB: with {count} pending {:.1}, drained {:.1}, compacted {:.1}",
            mib(r.file_full),
            mib(r.file_drained),
            mib(r.file_compacted)
        );
        for (table, len, stored, allocated) in &r.tables {
            println!(
                "  table {table:<12} entries {len:>8}  stored {:>7.1} MiB  pages {:>7.1} MiB",
                mib(*stored),
                mib(*allocated)
            );
        }
    }
    let dedup_tables = |r: &Run| -> (u64, u64) {
        r.tables
            .iter()
            .filter(|(t, ..)| t.starts_with("task"))
            .fold((0, 0), |(s, a), (_, _, stored, allocated)| {
                (s + stored, a + allocated)
            })
    };
    let (stored, allocated) = dedup_tables(&on);
    let diff = on.file_compacted.saturating_sub(off.file_compacted);
    let per = |bytes: u64| bytes as f64 / count as f64;
    println!("-- dedup records for {count} tasks");
    println!(
        "task tables           : {:.1} MiB in pages ({:.0} B/task), {:.1} MiB of keys+values ({:.0} B/task)",
        mib(allocated),
        per(allocated),
        mib(stored),
        per(stored)
    );
    println!(
        "file size on - off    : {:.1} MiB compacted ({:.0} B/task)",
        mib(diff),
        per(diff)
    );
    let slowdown = on.append_secs / off.append_secs;
    println!("append time on / off  : {slowdown:.2}x");
    println!(
        "RESULT dedup_mib={:.1} dedup_bytes_per_task={:.0} file_diff_mib={:.1} append_on_us={:.2} append_off_us={:.2}",
        mib(allocated),
        per(allocated),
        mib(diff),
        on.append_secs * 1e6 / count as f64,
        off.append_secs * 1e6 / count as f64
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn one(dir: &Path, dedup: bool, count: u64, concurrency: usize) -> anyhow::Result<Run> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        dedup,
        // The writer compares these as i64: u64::MAX would read as -1, "full".
        max_pending: i64::MAX as u64,
        max_pending_bytes: i64::MAX as u64,
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(&config)?;
    let (seqs, append_secs) = append_distinct(&outbox, count, concurrency).await?;
    let file = dir.join("outbox.redb");
    let file_full = std::fs::metadata(&file)?.len();
    for chunk in seqs.chunks(100_000) {
        outbox.complete(chunk.to_vec(), vec![]).await?;
    }
    let file_drained = std::fs::metadata(&file)?.len();
    // Closing writes the last checkpoint of the dedup records.
    outbox.close().await;
    let (tables, file_compacted) = tokio::task::spawn_blocking(move || inspect(&file)).await??;
    Ok(Run {
        append_secs,
        file_full,
        file_drained,
        file_compacted,
        tables,
    })
}

/// Appends COUNT distinct tasks (the template's event under new task ids)
/// from CONCURRENCY tasks at once, so that group commit batches them as in
/// the server; returns their sequence numbers and the seconds it took.
pub async fn append_distinct(
    outbox: &Outbox,
    count: u64,
    concurrency: usize,
) -> anyhow::Result<(Vec<u64>, f64)> {
    let template = Arc::new(event::parse(TEMPLATE.as_bytes(), Source::Webhook, 0)?);
    let prefix = Arc::new(format!("task_{}", run_prefix()));
    let tickets = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let appenders: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (outbox, template, prefix, tickets) = (
                outbox.clone(),
                template.clone(),
                prefix.clone(),
                tickets.clone(),
            );
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                loop {
                    let n = tickets.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return Ok::<_, anyhow::Error>(seqs);
                    }
                    match outbox.append(task(&template, &prefix, n)).await? {
                        Appended::New { seq } => seqs.push(seq),
                        other => anyhow::bail!("task {n} not stored: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut seqs = Vec::with_capacity(count as usize);
    for appender in appenders {
        seqs.extend(appender.await??);
    }
    Ok((seqs, start.elapsed().as_secs_f64()))
}

pub fn task(template: &TaskEvent, prefix: &str, n: u64) -> TaskEvent {
    let mut event = template.clone();
    // 30 characters, like the provider's "task_cl..." ids.
    event.task_id = format!("{prefix}{n:015}");
    event.event_id = event::event_id(&event.task_id, event.state);
    event
}

type Tables = Vec<(String, u64, u64, u64)>;

/// Per-table stats, then compaction; returns the compacted file size.
fn inspect(file: &Path) -> anyhow::Result<(Tables, u64)> {
    // The writer thread lets go of the database once the last handle is gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut db = loop {
        match redb::Database::open(file) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("cannot reopen the outbox file"),
        }
    };
    let page = {
        let txn = db.begin_write()?;
        let size = txn.stats()?.page_size() as u64;
        txn.abort()?;
        size
    };
    let mut tables = Vec::new();
    {
        let txn = db.begin_read()?;
        for handle in txn.list_tables()? {
            let name = handle.name().to_string();
            let table = txn.open_untyped_table(handle)?;
            let stats = table.stats()?;
            let pages = stats.leaf_pages() + stats.branch_pages();
            tables.push((name, table.len()?, stats.stored_bytes(), pages * page));
        }
    }
    while db.compact()? {}
    drop(db);
    Ok((tables, std::fs::metadata(file)?.len()))
}
