//! `ingest large-pending`: COUNT valid callbacks of about SIZE bytes each
//! (a long output URL) posted while every publish fails, then held pending
//! for HOLD seconds while the relay keeps retrying them. The bridge's peak
//! RSS over that time (read by `scripts/bench.sh`) is what the relay's byte
//! bound (`outbox.relay_batch_bytes`) is for: memory follows the batch's
//! bytes, not the number or size of pending events.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::load::{run_prefix, Conn, Target};

/// One valid success callback of about `size` bytes.
fn body(id: &str, size: usize) -> Bytes {
    let head = format!(
        r#"{{"taskId":"task_{id}","model":"seedance-20","state":"success","updateTime":1735599754000,"output":[{{"url":"https://static.kinovi.ai/generated/"#
    );
    let tail = r#".mp4"}]}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    Bytes::from(format!("{head}{}{tail}", "a".repeat(pad)))
}

/// Posts the callbacks on `connections` connections, then waits `hold`,
/// printing what stays pending.
pub async fn run(
    target: Target,
    admin: Target,
    count: u64,
    size: usize,
    connections: usize,
    hold: Duration,
) -> anyhow::Result<()> {
    println!(
        "== large-pending: {count} callbacks of {size} bytes to {target} (publishes failing), then {} s held",
        hold.as_secs()
    );
    let prefix = run_prefix();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..connections.max(1) as u64 {
        let (target, prefix) = (target.clone(), prefix.clone());
        let step = connections.max(1) as u64;
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&target).await?;
            let mut n = w;
            let mut ok = 0u64;
            while n < count {
                let (status, answer) = conn
                    .send(&target, "POST", body(&format!("{prefix}{n:09}"), size))
                    .await?;
                anyhow::ensure!(
                    status == 200,
                    "callback {n} answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                ok += 1;
                n += step;
            }
            anyhow::Ok(ok)
        }));
    }
    let mut accepted = 0;
    for w in workers {
        accepted += w.await??;
    }
    println!(
        "posted {accepted} callbacks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = admin.with_path("/admin/status");
    let deadline = Instant::now() + hold;
    let mut pending = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(mut conn) = Conn::open(&status).await {
            if let Ok((200, answer)) = conn.send(&status, "GET", Bytes::new()).await {
                let v: serde_json::Value = serde_json::from_slice(&answer)?;
                pending = v["outbox"]["pending"].as_u64();
            }
        }
    }
    let pending = pending.map_or("-".to_string(), |p| p.to_string());
    println!("still pending after {} s: {pending}", hold.as_secs());
    println!("RESULT large_accepted={accepted} large_pending={pending}");
    Ok(())
}
