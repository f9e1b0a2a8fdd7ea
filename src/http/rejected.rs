//! The in-memory keep of rejected request bodies (`/admin/rejected`):
//! bounded in entries (`outbox.keep_rejected`) and so in bytes (each body
//! cut to [`KEEP`], each reason to [`KEEP_REASON`]). It belongs to the
//! HTTP side ([`super::Shared::rejected`]): in memory and apart from the
//! outbox's writer, so a flood of junk never queues in front of a good
//! callback's commit.
//!
//! Each entry belongs to a share (why it was rejected: `invalid`,
//! `bad_token`, ...). When the keep is full, the oldest entry of the
//! largest share goes: a flood of one kind pushes out its own entries, not
//! the few of every other kind an operator is looking for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::clock::now_ms;
use crate::metrics::Reject;
use crate::outbox::Stats;
use crate::sync::lock;

/// A request body that failed validation, kept for inspection.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    pub received_at: i64,
    pub reason: String,
    pub body: String,
    pub body_truncated: bool,
}

/// The rejected bodies of one app, fair across kinds, and their counters.
pub struct RejectedBodies {
    ring: Mutex<Ring>,
    /// `outbox.keep_rejected`.
    cap: usize,
    /// Where rejections are counted (`rejected`, `rejectedDropped`, and
    /// `hookbridge_events_rejected_total`).
    stats: Arc<Stats>,
}

impl RejectedBodies {
    pub fn new(keep: u64, stats: Arc<Stats>) -> Self {
        Self {
            ring: Mutex::default(),
            cap: usize::try_from(keep).unwrap_or(usize::MAX),
            stats,
        }
    }

    /// Counts a body rejected for `why`, and keeps it cut to 4 KiB in the
    /// share `share` (a kind of rejection, e.g. `bad_token`): when the keep
    /// is full, the oldest of the largest share is dropped first, and
    /// counted.
    pub fn keep(&self, why: Reject, share: &'static str, body: &[u8], reason: &str) {
        self.stats.metrics.rejected(why);
        Stats::add(&self.stats.rejected, 1);
        let dropped = lock(&self.ring).push(share, body, reason, now_ms(), self.cap);
        Stats::add(&self.stats.rejected_dropped, dropped);
    }

    /// The newest `limit` rejected bodies, newest first.
    pub fn newest(&self, limit: usize) -> Vec<Rejected> {
        lock(&self.ring).newest(limit)
    }
}

/// Most bytes of a body kept.
pub(super) const KEEP: usize = 4 * 1024;
/// Most characters of a reason kept.
const KEEP_REASON: usize = 512;

#[derive(Default)]
struct Ring {
    entries: VecDeque<(&'static str, Rejected)>,
    shares: HashMap<&'static str, usize>,
}

fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => text[..at].to_string(),
        None => text.to_string(),
    }
}

impl Ring {
    /// Keeps a cut copy of `body`; returns how many entries were pushed out.
    fn push(&mut self, share: &'static str, body: &[u8], reason: &str, at: i64, cap: usize) -> u64 {
        let rejected = Rejected {
            received_at: at,
            reason: cut(reason, KEEP_REASON),
            body: cut(
                &String::from_utf8_lossy(&body[..body.len().min(KEEP)]),
                KEEP,
            ),
            body_truncated: body.len() > KEEP,
        };
        self.entries.push_back((share, rejected));
        *self.shares.entry(share).or_default() += 1;
        let mut dropped = 0;
        while self.entries.len() > cap.max(1) {
            let largest = self
                .shares
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(s, _)| *s)
                .unwrap_or(share);
            let at = self
                .entries
                .iter()
                .position(|(s, _)| *s == largest)
                .unwrap_or(0);
            if let Some((gone, _)) = self.entries.remove(at) {
                if let Some(n) = self.shares.get_mut(gone) {
                    *n -= 1;
                    if *n == 0 {
                        self.shares.remove(gone);
                    }
                }
            }
            dropped += 1;
        }
        dropped
    }

    /// The newest `limit`, newest first.
    fn newest(&self, limit: usize) -> Vec<Rejected> {
        self.entries
            .iter()
            .rev()
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 7,000 wrong-token callbacks leave the few invalid bodies in place.
    #[test]
    fn a_flood_of_one_kind_pushes_out_only_its_own() {
        let mut ring = Ring::default();
        for i in 0..5 {
            ring.push(
                "invalid",
                format!("junk {i}").as_bytes(),
                "bad json",
                i,
                100,
            );
        }
        let mut dropped = 0;
        for i in 0..7000 {
            dropped += ring.push("bad_token", &[b'x'; 10_000], "wrong token", 10 + i, 100);
        }
        assert_eq!(dropped, 6905);
        let kept = ring.newest(1000);
        assert_eq!(kept.len(), 100);
        let invalid = kept.iter().filter(|r| r.reason == "bad json").count();
        assert_eq!(invalid, 5, "every invalid body is still there");
        assert!(kept.iter().all(|r| r.body.len() <= KEEP));
        assert!(kept[0].body_truncated && kept[0].received_at == 7009);
    }
}
