//! The records' codec: framing, checksums, and the bodies of appends,
//! acks and carried-over dedup records.

use super::*;

/// The longest text (task id, event id, model) a record's head holds.
pub(super) const MAX_HEAD_TEXT: usize = u16::MAX as usize;

/// The first bytes of every segment file.
pub(in crate::outbox) const MAGIC: &[u8; 8] = b"hbpend1\n";

/// Bytes of a record's frame before its body.
pub(super) const FRAME: usize = 8;

/// A body longer than this is damage, not a record (events are far smaller).
pub(super) const MAX_BODY: u32 = 256 * 1024 * 1024;

/// The largest event JSON a record takes, with room for its head (the
/// configuration keeps callbacks far below: `config::MAX_BODY_LIMIT`).
pub(in crate::outbox) const MAX_EVENT: usize = MAX_BODY as usize - (1 << 20);

pub(super) const APPEND: u8 = b'A';

pub(super) const ACK: u8 = b'K';

pub(super) const RECORDS: u8 = b'R';

/// Most dedup records in one `R` record.
pub(super) const RECORDS_PER_FRAME: usize = 1024;

/// Bytes of an append body before its head (task id and meta).
pub(super) const APPEND_FIXED: usize = 1 + 8 + 8 + 1 + 49;

/// One record read back from the log.
#[derive(Debug, PartialEq)]
pub(in crate::outbox) enum Record<'a> {
    Append {
        seq: u64,
        received_at: i64,
        task_id: &'a str,
        /// The task's dedup record after this event was accepted; `None`
        /// with dedup off, or for an event moved here without one.
        record: Option<TaskRecord>,
        payload: &'a [u8],
    },
    Ack(Vec<u64>),
    /// Dedup records carried over from a segment that was emptied before
    /// the task store had them; `seq` is above every append they came from.
    Records {
        seq: u64,
        records: Vec<(&'a str, TaskRecord)>,
    },
}

/// The meta flag of a head: no meta, the meta, the meta and a
/// `traceparent` (telemetry on). A head without a traceparent is written
/// exactly as before it existed, and a record written before reads as one
/// without.
const NO_META: u8 = 0;
const META: u8 = 1;
const META_TRACED: u8 = 2;

/// An append's task id and the event's [`EventMeta`] (`None` for an event
/// moved here from an older version's store: its JSON says it all).
pub(super) fn encode_head(buf: &mut Vec<u8>, task_id: &str, meta: Option<&EventMeta>) {
    /// Writes `text` with its length, cut to the longest head text at a
    /// character boundary, so that what is written always reads back.
    pub(super) fn text(buf: &mut Vec<u8>, text: &str) {
        let mut end = text.len().min(MAX_HEAD_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        buf.extend_from_slice(&(end as u16).to_le_bytes());
        buf.extend_from_slice(&text.as_bytes()[..end]);
    }
    // Task ids are at most `event::MAX_TASK_ID_BYTES`: never cut.
    text(buf, task_id);
    // A text the head cannot hold whole (a callback's model can be long)
    // leaves the meta out: the relay then reads it from the event's JSON.
    let whole = |m: &&EventMeta| {
        m.event_id.len() <= MAX_HEAD_TEXT
            && m.model.as_ref().is_none_or(|m| m.len() <= MAX_HEAD_TEXT)
    };
    let Some(meta) = meta.filter(whole) else {
        buf.push(NO_META);
        return;
    };
    // Only ever one hookbridge wrote: anything else is left out.
    let traceparent = meta
        .traceparent
        .as_deref()
        .filter(|t| crate::telemetry::is_traceparent(t));
    buf.push(if traceparent.is_some() {
        META_TRACED
    } else {
        META
    });
    text(buf, &meta.event_id);
    buf.push(state_slot(meta.state) as u8);
    match &meta.model {
        Some(model) => {
            buf.push(1);
            text(buf, model);
        }
        None => buf.push(0),
    }
    match meta.update_time {
        Some(at) => {
            buf.push(1);
            buf.extend_from_slice(&at.to_le_bytes());
        }
        None => buf.push(0),
    }
    if let Some(traceparent) = traceparent {
        text(buf, traceparent);
    }
}

/// Reads what [`encode_head`] wrote: the task id, the meta (if stored),
/// and the head's length. `None` when it does not decode.
pub(in crate::outbox) fn decode_head(
    head: &[u8],
    received_at: i64,
) -> Option<(&str, Option<EventMeta>, usize)> {
    struct Cursor<'a>(&'a [u8], usize);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let bytes = self.0.get(self.1..self.1 + n)?;
            self.1 += n;
            Some(bytes)
        }
        fn byte(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }
        fn text(&mut self) -> Option<&'a str> {
            let len = self.take(2)?;
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            std::str::from_utf8(self.take(len)?).ok()
        }
    }
    let mut c = Cursor(head, 0);
    let task_id = c.text()?;
    let flag = c.byte()?;
    if flag == NO_META {
        return Some((task_id, None, c.1));
    }
    let event_id = c.text()?.to_string();
    let state = *STATES.get(c.byte()? as usize)?;
    let model = match c.byte()? {
        0 => None,
        _ => Some(c.text()?.to_string()),
    };
    let update_time = match c.byte()? {
        0 => None,
        _ => Some(i64::from_le_bytes(c.take(8)?.try_into().ok()?)),
    };
    let traceparent = match flag {
        META_TRACED => Some(c.text()?.to_string()),
        _ => None,
    };
    let meta = EventMeta {
        event_id,
        task_id: task_id.to_string(),
        model,
        state,
        update_time,
        received_at,
        traceparent,
    };
    Some((task_id, Some(meta), c.1))
}

/// The valid record framed at `at`, and the bytes its frame spans.
pub(super) fn frame_at(bytes: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
    let end = declared_end(bytes, at)?;
    let body = &bytes[at + FRAME..end];
    // Cheap checks before the checksum: a resync tries every offset.
    let plausible = match body[0] {
        APPEND => body.len() >= APPEND_FIXED && body[17] <= 1,
        ACK => (body.len() - 1).is_multiple_of(8),
        RECORDS => body.len() >= 9,
        _ => false,
    };
    let crc = u32::from_le_bytes(bytes[at + 4..at + FRAME].try_into().ok()?);
    if !plausible || crc32fast::hash(body) != crc {
        return None;
    }
    Some((decode(body)?, end - at))
}

/// Where the frame at `at` ends by its length field, if that length is
/// one a record can have and the bytes are there.
pub(super) fn declared_end(bytes: &[u8], at: usize) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    if len == 0 || len > MAX_BODY {
        return None;
    }
    let end = at.checked_add(FRAME + len as usize)?;
    (end <= bytes.len()).then_some(end)
}

/// The first offset from `from` where a valid record starts.
pub(super) fn next_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(FRAME - 1)).find(|&at| frame_at(bytes, at).is_some())
}

pub(super) fn decode(body: &[u8]) -> Option<Record<'_>> {
    let u64_at = |i: usize| {
        body.get(i..i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    match *body.first()? {
        APPEND => {
            if body.len() < APPEND_FIXED {
                return None;
            }
            let seq = u64_at(1)?;
            let received_at = u64_at(9)? as i64;
            let record = (body[17] == 1).then(|| TaskRecord::decode(&body[18..67]));
            let (task_id, _, head) = decode_head(&body[APPEND_FIXED..], received_at)?;
            Some(Record::Append {
                seq,
                received_at,
                task_id,
                record,
                payload: &body[APPEND_FIXED + head..],
            })
        }
        ACK => {
            let seqs = &body[1..];
            if !seqs.len().is_multiple_of(8) {
                return None;
            }
            Some(Record::Ack(
                seqs.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
            ))
        }
        RECORDS => {
            let seq = u64_at(1)?;
            let mut records = Vec::new();
            let mut at = 9;
            while at < body.len() {
                let len = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
                let task = std::str::from_utf8(body.get(at + 2..at + 2 + len)?).ok()?;
                let record = body.get(at + 2 + len..at + 2 + len + 49)?;
                records.push((task, TaskRecord::decode(record)));
                at += 2 + len + 49;
            }
            Some(Record::Records { seq, records })
        }
        _ => None,
    }
}
