//! The pending log: events waiting for the broker, appended once and
//! synced once per group.
//!
//! The log is a sequence of segment files `NNNNNNNNNNNNNNNNNNNN.log` in
//! `<data_dir>/pending/`, each starting with [`MAGIC`]. A segment holds
//! records, each framed as
//!
//! ```text
//! [body length: u32 LE][CRC-32 of the body: u32 LE][body]
//! ```
//!
//! and a body is either an append (`A`: sequence number, receive time, the
//! task's dedup record after the decision, the task id, what the publishers
//! need of the event ([`EventMeta`], so the relay never parses the JSON
//! again), the event's JSON), an ack (`K`:
//! the sequence numbers that left the queue: published, or kept as dead
//! letters elsewhere), or dedup records carried over (`R`: a number above
//! the appends they came from, then task ids and records; see
//! [`Log::empty_active`]). A group of records is written with one `write` and
//! made durable with one `fdatasync`; an ack may ride along unsynced, since
//! losing one only republishes its events.
//!
//! On open, every segment is read in order. A range that holds no valid
//! record (its length or checksum does not match, or the segment's header
//! is wrong) is skipped up to the next offset where a whole frame with a
//! matching checksum starts, so damage costs only the records it touches;
//! the range is reported ([`Damage`]) and kept, bounded, as a dead letter
//! (see `writer.rs`). Nothing written whole is ever cut: only the end of
//! the last segment may be, when its first record there is not whole (a
//! torn final write: the group being written when the process stopped,
//! never answered 2xx). A whole record there that fails its checksum is
//! damage, kept, and writing goes on after it. The queue in memory
//! ([`Index`]) holds only where each pending event is, never its bytes.
//!
//! The segment being written is reserved ahead of its writes, in steps of
//! [`RESERVE_STEP`] (`fallocate`): a group then writes into blocks the file
//! already has, and its `fdatasync` does not have to commit a new file size
//! and a block allocation to the file system's journal every time. The
//! reserved tail reads as zeros: in the last segment a zero tail is that
//! reservation, cut on open and not reported as torn; a segment is cut to
//! its records (and synced) before the next one is created, so an earlier
//! segment never has one, and there zeros are damage like any other.
//!
//! A segment is deleted once it is not the one being written, none of its
//! events is pending any more, and every dedup record in it is in the task
//! store (see `writer.rs`). The segment being written is emptied in place
//! ([`Log::empty_active`]) on the same terms once nothing is pending at all,
//! so a drained queue gives its disk space back before the segment is full.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::store::{slot as state_slot, TaskRecord, STATES};
use crate::publish::EventMeta;
use crate::sync::lock;

/// The active segment is reserved ahead of its writes by this much at a
/// time. Measured on ext4 (a virtio disk): a write and `fdatasync` into
/// reserved blocks took about 130 µs against 185 µs when each one grew the
/// file, with a quarter less CPU.
const RESERVE_STEP: u64 = 4 * 1024 * 1024;

/// Reserves `len` bytes of `file` from `offset` (its length grows to cover
/// them, the new bytes read as zeros).
#[cfg(target_os = "linux")]
fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len)
        .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn reserve(_file: &File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The longest text (task id, event id, model) a record's head holds.
const MAX_HEAD_TEXT: usize = u16::MAX as usize;

/// The first bytes of every segment file.
pub(super) const MAGIC: &[u8; 8] = b"hbpend1\n";
/// Bytes of a record's frame before its body.
const FRAME: usize = 8;
/// A body longer than this is damage, not a record (events are far smaller).
const MAX_BODY: u32 = 256 * 1024 * 1024;
/// The largest event JSON a record takes, with room for its head (the
/// configuration keeps callbacks far below: `config::MAX_BODY_LIMIT`).
pub(super) const MAX_EVENT: usize = MAX_BODY as usize - (1 << 20);
const APPEND: u8 = b'A';
const ACK: u8 = b'K';
const RECORDS: u8 = b'R';
/// Most dedup records in one `R` record.
const RECORDS_PER_FRAME: usize = 1024;
/// Bytes of an append body before its head (task id and meta).
const APPEND_FIXED: usize = 1 + 8 + 8 + 1 + 49;

/// One record read back from the log.
#[derive(Debug, PartialEq)]
pub(super) enum Record<'a> {
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

/// An append's task id and the event's [`EventMeta`] (`None` for an event
/// moved here from an older version's store: its JSON says it all).
fn encode_head(buf: &mut Vec<u8>, task_id: &str, meta: Option<&EventMeta>) {
    /// Writes `text` with its length, cut to the longest head text at a
    /// character boundary, so that what is written always reads back.
    fn text(buf: &mut Vec<u8>, text: &str) {
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
        buf.push(0);
        return;
    };
    buf.push(1);
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
}

/// Reads what [`encode_head`] wrote: the task id, the meta (if stored),
/// and the head's length. `None` when it does not decode.
pub(super) fn decode_head(
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
    if c.byte()? == 0 {
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
    let meta = EventMeta {
        event_id,
        task_id: task_id.to_string(),
        model,
        state,
        update_time,
        received_at,
    };
    Some((task_id, Some(meta), c.1))
}

/// Where one pending event is: its head (task id, meta) at `offset`, then
/// its JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub seq: u64,
    pub segment: u64,
    pub offset: u64,
    /// Bytes of the head.
    pub head: u32,
    /// Bytes of the JSON.
    pub len: u32,
    pub received_at: i64,
    pub done: bool,
}

/// The longest copy of a damaged range that its dead letter keeps.
pub(super) const KEEP_DAMAGED: usize = 64 * 1024;

/// A byte range of a segment that holds no valid record (its length or
/// checksum does not match): reported, and kept (bounded) as a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Damage {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    /// The range's first bytes, at most [`KEEP_DAMAGED`].
    pub bytes: Vec<u8>,
}

impl Damage {
    fn of(segment: u64, bytes: &[u8], from: usize, to: usize) -> Self {
        Self {
            segment,
            offset: from as u64,
            len: (to - from) as u64,
            bytes: bytes[from..to.min(from + KEEP_DAMAGED)].to_vec(),
        }
    }

    /// Where it is, for the logs, the status and the dead letter.
    pub(super) fn place(&self) -> String {
        format!(
            "pending/{:020}.log: {} bytes at offset {}",
            self.segment, self.len, self.offset
        )
    }

    /// The event of the damaged record, if the range is one record whose
    /// frame is intact and only the checksum fails: its JSON as it reads
    /// now (unverified), for the operator to see what was lost.
    pub(super) fn readable_event(&self) -> Option<serde_json::Value> {
        let end = declared_end(&self.bytes, 0)?;
        if end as u64 != self.len {
            return None;
        }
        match decode(&self.bytes[FRAME..end])? {
            Record::Append { payload, .. } => serde_json::from_slice(payload).ok(),
            Record::Ack(_) | Record::Records { .. } => None,
        }
    }
}

/// The pending events in sequence order (shared by the writer, which adds
/// and removes, and the relay, which reads).
#[derive(Debug, Default)]
pub(super) struct Index {
    slots: VecDeque<Slot>,
    live: u64,
}

impl Index {
    /// Adds the newest pending event; refuses (`false`) a sequence number
    /// that is not above every one before it.
    pub(super) fn push(&mut self, slot: Slot) -> bool {
        if self.slots.back().is_some_and(|last| last.seq >= slot.seq) {
            return false;
        }
        self.live += 1;
        self.slots.push_back(slot);
        true
    }

    /// Marks `seq` as gone; returns its slot if it was pending.
    pub(super) fn remove(&mut self, seq: u64) -> Option<Slot> {
        let at = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        let slot = &mut self.slots[at];
        if slot.done {
            return None;
        }
        slot.done = true;
        self.live -= 1;
        let found = *slot;
        while self.slots.front().is_some_and(|s| s.done) {
            self.slots.pop_front();
        }
        Some(found)
    }

    pub(super) fn get(&self, seq: u64) -> Option<Slot> {
        let at = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        Some(self.slots[at]).filter(|s| !s.done)
    }

    /// The first `n` pending slots, oldest first.
    pub(super) fn oldest(&self, n: usize) -> Vec<Slot> {
        self.slots
            .iter()
            .filter(|s| !s.done)
            .take(n)
            .copied()
            .collect()
    }

    pub(super) fn len(&self) -> u64 {
        self.live
    }

    /// Bytes of JSON pending.
    pub(super) fn bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| !s.done)
            .map(|s| s.len as u64)
            .sum()
    }

    /// The segment of the oldest pending event.
    pub(super) fn first_segment(&self) -> Option<u64> {
        self.slots.front().map(|s| s.segment)
    }

    pub(super) fn first(&self) -> Option<Slot> {
        self.slots.front().copied()
    }
}

/// Read access to the segments, for the relay and the admin side: each
/// file opened once, kept until its segment is deleted.
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    open: Mutex<std::collections::HashMap<u64, Arc<File>>>,
}

impl Segments {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            open: Mutex::default(),
        }
    }

    /// The head and the JSON of `slot`, in one buffer.
    pub(super) fn read(&self, slot: &Slot) -> std::io::Result<Vec<u8>> {
        let file = {
            let mut open = lock(&self.open);
            match open.get(&slot.segment) {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(File::open(segment_path(&self.dir, slot.segment))?);
                    open.insert(slot.segment, file.clone());
                    file
                }
            }
        };
        let mut bytes = vec![0; (slot.head + slot.len) as usize];
        file.read_exact_at(&mut bytes, slot.offset)?;
        Ok(bytes)
    }

    /// Only the JSON of `slot`.
    pub(super) fn payload(&self, slot: &Slot) -> std::io::Result<Vec<u8>> {
        let mut bytes = self.read(slot)?;
        bytes.drain(..slot.head as usize);
        Ok(bytes)
    }

    fn forget(&self, segment: u64) {
        lock(&self.open).remove(&segment);
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// A segment that is not being written any more.
#[derive(Debug, Clone, Copy)]
struct Closed {
    id: u64,
    /// The highest sequence number appended in it (0: none).
    last_seq: u64,
}

/// What opening the log found, for the logs and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Opened {
    pub segments: usize,
    pub records: u64,
    /// Bytes cut from the end of the last segment (a torn final write); a
    /// tail of zeros only (the reservation ahead of the writes) is not
    /// counted.
    pub torn_bytes: u64,
    /// Ranges that hold no valid record, in every segment: written whole
    /// (not a torn final write), so possibly answered.
    pub damaged: Vec<Damage>,
}

/// The writing side, owned by the writer thread.
pub(super) struct Log {
    dir: PathBuf,
    closed: VecDeque<Closed>,
    active: File,
    active_id: u64,
    /// Bytes of whole records in the active segment (the next write's offset).
    active_len: u64,
    /// The active segment's length: `active_len` plus its reserved tail.
    reserved: u64,
    /// Whether to reserve ahead in the active segment (not after the file
    /// system refused once: it then grows with each write, as without).
    reserving: bool,
    active_last_seq: u64,
    /// `active_last_seq` of what is written (not of the group being built).
    written_last_seq: u64,
    segment_bytes: u64,
    /// The group being built.
    buf: Vec<u8>,
}

impl Log {
    /// Opens the log in `dir` (created if missing), reads every record in
    /// order into `each`, and cuts a torn final write.
    pub(super) fn open(
        dir: &Path,
        segment_bytes: u64,
        mut each: impl FnMut(Record<'_>, Slot),
    ) -> std::io::Result<(Self, Opened)> {
        std::fs::create_dir_all(dir)?;
        let ids = segment_ids(dir)?;
        let mut opened = Opened {
            segments: ids.len(),
            ..Opened::default()
        };
        let mut closed = VecDeque::new();
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let path = segment_path(dir, id);
            bytes.clear();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let mut scan = scan(id, &bytes, &mut each);
            opened.records += scan.records;
            let last = i + 1 == ids.len();
            let tail = classify_tail(id, &bytes, scan.good as usize, last);
            opened.damaged.append(&mut scan.damaged);
            if last {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                // Where writing goes on: after the last valid record, or
                // after damage that is kept (never over it).
                let good = match tail {
                    Tail::Clean | Tail::Reserved => scan.good,
                    Tail::Torn { bytes: torn } => {
                        opened.torn_bytes = torn;
                        scan.good
                    }
                    Tail::Damaged(damage) => {
                        let end = damage.offset + damage.len;
                        opened.damaged.push(damage);
                        end
                    }
                };
                let good = if good < MAGIC.len() as u64 {
                    // Not even the header made it: start the file again.
                    file.set_len(0)?;
                    file.write_all_at(MAGIC, 0)?;
                    file.sync_all()?;
                    MAGIC.len() as u64
                } else {
                    good
                };
                if good < bytes.len() as u64 {
                    file.set_len(good)?;
                    file.sync_all()?;
                }
                let log = Self {
                    dir: dir.to_path_buf(),
                    closed,
                    active: file,
                    active_id: id,
                    active_len: good,
                    reserved: good,
                    reserving: true,
                    active_last_seq: scan.last_seq,
                    written_last_seq: scan.last_seq,
                    segment_bytes,
                    buf: Vec::new(),
                };
                return Ok((log, opened));
            }
            if let Tail::Damaged(damage) = tail {
                opened.damaged.push(damage);
            }
            closed.push_back(Closed {
                id,
                last_seq: scan.last_seq,
            });
        }
        let (active, active_id) = create_segment(dir, 1)?;
        let log = Self {
            dir: dir.to_path_buf(),
            closed,
            active,
            active_id,
            active_len: MAGIC.len() as u64,
            reserved: MAGIC.len() as u64,
            reserving: true,
            active_last_seq: 0,
            written_last_seq: 0,
            segment_bytes,
            buf: Vec::new(),
        };
        Ok((log, opened))
    }

    /// Adds an append to the group being built; returns where its event
    /// bytes will be once the group is written.
    pub(super) fn append(
        &mut self,
        seq: u64,
        received_at: i64,
        task_id: &str,
        record: Option<&TaskRecord>,
        meta: Option<&EventMeta>,
        payload: &[u8],
    ) -> Slot {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; FRAME]);
        self.buf.push(APPEND);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&received_at.to_le_bytes());
        match record {
            Some(r) => {
                self.buf.push(1);
                self.buf.extend_from_slice(&r.encode());
            }
            None => {
                self.buf.push(0);
                self.buf.extend_from_slice(&[0; 49]);
            }
        }
        let head_at = self.buf.len();
        encode_head(&mut self.buf, task_id, meta);
        let payload_at = self.buf.len();
        self.buf.extend_from_slice(payload);
        self.seal(start);
        self.active_last_seq = self.active_last_seq.max(seq);
        Slot {
            seq,
            segment: self.active_id,
            offset: self.active_len + head_at as u64,
            head: (payload_at - head_at) as u32,
            len: payload.len() as u32,
            received_at,
            done: false,
        }
    }

    /// Adds an ack of `seqs` to the group being built.
    pub(super) fn ack(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; FRAME]);
        self.buf.push(ACK);
        for seq in seqs {
            self.buf.extend_from_slice(&seq.to_le_bytes());
        }
        self.seal(start);
    }

    fn seal(&mut self, start: usize) {
        let body = &self.buf[start + FRAME..];
        let len = body.len() as u32;
        let crc = crc32fast::hash(body);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
    }

    pub(super) fn has_group(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the group built since the last call and syncs it. On error
    /// nothing of the group counts: the file is cut back to its last whole
    /// record (so a later group never follows garbage) and the group is
    /// kept, to be retried or discarded ([`Log::discard`]); if even the cut
    /// fails, the group is dropped and the next one starts a new segment.
    pub(super) fn commit(&mut self, sync: bool) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.reserve_for(self.active_len + self.buf.len() as u64);
        let written = self
            .active
            .write_all_at(&self.buf, self.active_len)
            .and_then(|()| {
                if sync {
                    self.active.sync_data()
                } else {
                    Ok(())
                }
            });
        let len = self.buf.len() as u64;
        match written {
            Ok(()) => {
                self.buf.clear();
                self.active_len += len;
                self.written_last_seq = self.active_last_seq;
                Ok(())
            }
            Err(e) => {
                self.reserved = self.active_len;
                if self.active.set_len(self.active_len).is_err() {
                    // Cannot even cut it: leave the tail to the recovery of
                    // the next open, and write elsewhere. The group's
                    // places were in this segment: it cannot be retried.
                    self.buf.clear();
                    if let Err(roll) = self.roll() {
                        tracing::warn!(error = %roll, "cannot start a new log segment either");
                    }
                }
                Err(e)
            }
        }
    }

    /// Reserves the active segment up to at least `end`, a step at a time
    /// (never past the segment's size unless one group needs it). A refusal
    /// (a full disk, a file system without `fallocate`) only stops the
    /// reserving in this segment: the write that follows says whether there
    /// is room.
    fn reserve_for(&mut self, end: u64) {
        if !self.reserving || end <= self.reserved {
            return;
        }
        let to = end
            .div_ceil(RESERVE_STEP)
            .saturating_mul(RESERVE_STEP)
            .min(self.segment_bytes.max(end));
        match reserve(&self.active, self.reserved, to - self.reserved) {
            Ok(()) => self.reserved = to,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reserve the pending log ahead; writing without");
                self.reserving = false;
            }
        }
    }

    /// Empties the segment being written in place once nothing in it is
    /// needed: no earlier segment is left (their acks may be in this one)
    /// and nothing is pending (the caller checks). The dedup records the
    /// task store does not have yet (`carry`) are written back into it, as
    /// one `R` record per few thousand, numbered `seq` (above every append
    /// they came from): they take far less room than the appends that
    /// carried them, so this frees space even on a full disk, with no new
    /// file and without waiting for the task store. Returns how far the
    /// segment's end moved back (0: nothing done): a group being built
    /// moves back by as much.
    pub(super) fn empty_active(
        &mut self,
        carry: &[(String, TaskRecord)],
        seq: u64,
    ) -> std::io::Result<u64> {
        let header = MAGIC.len() as u64;
        if !self.closed.is_empty() || self.active_len <= header {
            return Ok(0);
        }
        let mut records = Vec::new();
        for chunk in carry.chunks(RECORDS_PER_FRAME) {
            let start = records.len();
            records.extend_from_slice(&[0; FRAME]);
            records.push(RECORDS);
            records.extend_from_slice(&seq.to_le_bytes());
            for (task, record) in chunk {
                let task = &task.as_bytes()[..task.len().min(MAX_HEAD_TEXT)];
                records.extend_from_slice(&(task.len() as u16).to_le_bytes());
                records.extend_from_slice(task);
                records.extend_from_slice(&record.encode());
            }
            let body = &records[start + FRAME..];
            let (len, crc) = (body.len() as u32, crc32fast::hash(body));
            records[start..start + 4].copy_from_slice(&len.to_le_bytes());
            records[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
        }
        if header + records.len() as u64 >= self.active_len {
            return Ok(0);
        }
        let old = self.active_len;
        self.active.set_len(header)?;
        self.active.sync_all()?;
        self.active_len = header;
        self.reserved = header;
        self.reserving = true;
        self.written_last_seq = 0;
        if self.buf.is_empty() {
            self.active_last_seq = 0;
        }
        if !records.is_empty() {
            let written = self
                .active
                .write_all_at(&records, header)
                .and_then(|()| self.active.sync_data());
            match written {
                Ok(()) => {
                    self.active_len += records.len() as u64;
                    self.active_last_seq = self.active_last_seq.max(seq);
                    self.written_last_seq = seq;
                }
                Err(e) => {
                    // They stay in memory until the next checkpoint.
                    tracing::warn!(error = %e, "cannot carry the unstored dedup records over");
                    self.active.set_len(header)?;
                }
            }
        }
        Ok(old - self.active_len)
    }

    /// Whether the segment being written is the only one.
    pub(super) fn only_active(&self) -> bool {
        self.closed.is_empty()
    }

    /// Bytes of records in the segment being written.
    pub(super) fn active_bytes(&self) -> u64 {
        self.active_len - MAGIC.len() as u64
    }

    /// The segment being written.
    pub(super) fn active_id(&self) -> u64 {
        self.active_id
    }

    /// Forgets the group being built (its commands failed before writing).
    pub(super) fn discard(&mut self) {
        self.buf.clear();
    }

    /// Starts a new segment when the active one is full.
    pub(super) fn roll_if_full(&mut self) -> std::io::Result<()> {
        if self.active_len >= self.segment_bytes {
            self.roll()?;
        }
        Ok(())
    }

    fn roll(&mut self) -> std::io::Result<()> {
        // Cut the reserved tail first, durably: only the last segment may
        // end in zeros.
        if self.reserved > self.active_len {
            self.active.set_len(self.active_len)?;
            self.active.sync_all()?;
            self.reserved = self.active_len;
        }
        let (file, id) = create_segment(&self.dir, self.active_id + 1)?;
        self.closed.push_back(Closed {
            id: self.active_id,
            last_seq: self.active_last_seq,
        });
        self.active = file;
        self.active_id = id;
        self.active_len = MAGIC.len() as u64;
        self.reserved = self.active_len;
        self.reserving = true;
        self.active_last_seq = 0;
        self.written_last_seq = 0;
        Ok(())
    }

    /// Deletes the closed segments that nothing needs any more: older than
    /// `first_pending` (the segment of the oldest pending event, `None` when
    /// nothing is pending), and whose dedup records are all in the task
    /// store (`last_seq <= stored_through`). Returns how many went.
    pub(super) fn recycle(
        &mut self,
        first_pending: Option<u64>,
        stored_through: u64,
        segments: &Segments,
    ) -> std::io::Result<usize> {
        let mut deleted = 0;
        while let Some(oldest) = self.closed.front().copied() {
            let needed = first_pending.is_some_and(|first| first <= oldest.id)
                || oldest.last_seq > stored_through;
            if needed {
                break;
            }
            std::fs::remove_file(segment_path(&self.dir, oldest.id))?;
            segments.forget(oldest.id);
            self.closed.pop_front();
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// The segments in `dir`, oldest first.
fn segment_ids(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads every record in `dir` in order without changing anything (for a
/// look at a stopped instance's data dir), and says what is damaged and
/// how many bytes a torn final write left. A missing dir holds nothing.
pub(super) fn read_only(
    dir: &Path,
    mut each: impl FnMut(Record<'_>, Slot),
) -> std::io::Result<(Vec<Damage>, u64)> {
    let mut damaged = Vec::new();
    let mut torn = 0;
    if !dir.is_dir() {
        return Ok((damaged, torn));
    }
    let mut bytes = Vec::new();
    let ids = segment_ids(dir)?;
    for (i, &id) in ids.iter().enumerate() {
        bytes.clear();
        File::open(segment_path(dir, id))?.read_to_end(&mut bytes)?;
        let mut scan = scan(id, &bytes, &mut each);
        damaged.append(&mut scan.damaged);
        match classify_tail(id, &bytes, scan.good as usize, i + 1 == ids.len()) {
            Tail::Damaged(damage) => damaged.push(damage),
            Tail::Torn { bytes } => torn = bytes,
            Tail::Clean | Tail::Reserved => {}
        }
    }
    Ok((damaged, torn))
}

fn create_segment(dir: &Path, id: u64) -> std::io::Result<(File, u64)> {
    let path = segment_path(dir, id);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok((file, id))
}

struct Scan {
    /// Where the last valid record ends (the header's end when there is
    /// none; 0 when not even a header is there).
    good: u64,
    records: u64,
    last_seq: u64,
    /// Ranges between valid records that hold none (a damaged header
    /// included). What follows the last valid record is the caller's to
    /// judge ([`classify_tail`]).
    damaged: Vec<Damage>,
}

/// Reads the records of one segment into `each`. A range that holds no
/// valid record is skipped up to the next offset where a whole frame with
/// a matching checksum starts, and reported: damage costs only the records
/// it touches.
fn scan(segment: u64, bytes: &[u8], each: &mut impl FnMut(Record<'_>, Slot)) -> Scan {
    let mut out = Scan {
        good: 0,
        records: 0,
        last_seq: 0,
        damaged: Vec::new(),
    };
    if bytes.len() < MAGIC.len() {
        return out;
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        out.damaged.push(Damage::of(segment, bytes, 0, MAGIC.len()));
    }
    let mut at = MAGIC.len();
    out.good = at as u64;
    let mut bad_from = None;
    while at < bytes.len() {
        let Some((record, span)) = frame_at(bytes, at) else {
            bad_from.get_or_insert(at);
            // The damaged frame's own length first: damage inside one
            // record's body leaves the next one where it was.
            let next = declared_end(bytes, at)
                .filter(|&end| frame_at(bytes, end).is_some())
                .or_else(|| next_frame(bytes, at + 1));
            match next {
                Some(next) => {
                    at = next;
                    continue;
                }
                None => break,
            }
        };
        if let Some(from) = bad_from.take() {
            out.damaged.push(Damage::of(segment, bytes, from, at));
        }
        let mut slot = Slot {
            seq: 0,
            segment,
            offset: 0,
            head: 0,
            len: 0,
            received_at: 0,
            done: false,
        };
        if let Record::Append {
            seq,
            received_at,
            payload,
            ..
        } = &record
        {
            let len = span - FRAME;
            slot.seq = *seq;
            slot.received_at = *received_at;
            slot.len = payload.len() as u32;
            slot.offset = (at + FRAME + APPEND_FIXED) as u64;
            slot.head = (len - APPEND_FIXED - payload.len()) as u32;
            out.last_seq = out.last_seq.max(*seq);
        }
        if let Record::Records { seq, .. } = &record {
            out.last_seq = out.last_seq.max(*seq);
        }
        each(record, slot);
        out.records += 1;
        at += span;
        out.good = at as u64;
    }
    out
}

/// The valid record framed at `at`, and the bytes its frame spans.
fn frame_at(bytes: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
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
fn declared_end(bytes: &[u8], at: usize) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    if len == 0 || len > MAX_BODY {
        return None;
    }
    let end = at.checked_add(FRAME + len as usize)?;
    (end <= bytes.len()).then_some(end)
}

/// The first offset from `from` where a valid record starts.
fn next_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(FRAME - 1)).find(|&at| frame_at(bytes, at).is_some())
}

/// What follows the last valid record of a segment.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    Clean,
    /// Zeros only: the reservation ahead of the writes (last segment).
    Reserved,
    /// A write that did not finish (last segment only): never answered,
    /// cut. `bytes` counts the zeros of the reservation after it too.
    Torn {
        bytes: u64,
    },
    /// Bytes that were written whole and hold no valid record: kept.
    Damaged(Damage),
}

/// Judges the bytes after the last valid record (`good`), after which no
/// valid record starts. In an earlier segment anything there is damage:
/// a segment is cut to its records and synced before the next exists. In
/// the last one it is a torn final write when the first record there is
/// not whole (its frame or its last bytes were never written, or it runs
/// past the file's end), since only the group being written when the
/// process stopped can look like that, and it was never answered; a
/// record that is whole but fails its checksum was written, maybe
/// answered, and is damage. (A damaged length field of the very last
/// record reads as torn: nothing tells them apart.)
fn classify_tail(segment: u64, bytes: &[u8], good: usize, last: bool) -> Tail {
    if good >= bytes.len() {
        return Tail::Clean;
    }
    if !last {
        return Tail::Damaged(Damage::of(segment, bytes, good, bytes.len()));
    }
    let written = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if written <= good {
        return Tail::Reserved;
    }
    if good < MAGIC.len() {
        // The segment's creation did not finish.
        return Tail::Torn {
            bytes: bytes.len() as u64,
        };
    }
    let unfinished = match declared_end(bytes, good) {
        None => true,
        Some(end) => bytes[(end - 8).max(good + FRAME)..end]
            .iter()
            .all(|b| *b == 0),
    };
    if unfinished {
        return Tail::Torn {
            bytes: (bytes.len() - good) as u64,
        };
    }
    let end = declared_end(bytes, good).map_or(written, |end| end.max(written));
    Tail::Damaged(Damage::of(segment, bytes, good, end))
}

fn decode(body: &[u8]) -> Option<Record<'_>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::State;

    type Read = Vec<(u64, String, Vec<u8>)>;

    /// Opens the log in `dir` and returns it with the pending events
    /// (seq, task, bytes) it holds, read back through the index.
    fn open(dir: &Path) -> (Log, Opened, Index, Read) {
        let mut index = Index::default();
        let mut tasks = std::collections::HashMap::new();
        let (log, opened) = Log::open(dir, 1 << 20, |record, slot| match record {
            Record::Append { seq, task_id, .. } => {
                tasks.insert(seq, task_id.to_string());
                assert!(index.push(slot));
            }
            Record::Ack(seqs) => {
                for seq in seqs {
                    index.remove(seq);
                }
            }
            Record::Records { .. } => {}
        })
        .unwrap();
        let segments = Segments::new(dir.to_path_buf());
        let read = index
            .oldest(usize::MAX)
            .iter()
            .map(|s| {
                // The head gives back what the publishers need, exactly.
                let whole = segments.read(s).unwrap();
                let (task, stored, _) =
                    decode_head(&whole[..s.head as usize], s.received_at).unwrap();
                assert_eq!((task, stored), (tasks[&s.seq].as_str(), Some(meta(s.seq))));
                (s.seq, tasks[&s.seq].clone(), segments.payload(s).unwrap())
            })
            .collect();
        (log, opened, index, read)
    }

    fn record(at: i64) -> TaskRecord {
        TaskRecord {
            furthest: Some(State::Generating),
            accepted_at: [0, 0, at, 0, 0],
            last_seen: at,
            trusted: false,
        }
    }

    fn meta(seq: u64) -> EventMeta {
        EventMeta {
            event_id: format!("e{seq}"),
            task_id: format!("t{seq}"),
            model: seq.is_multiple_of(2).then(|| "seedance-ü".to_string()),
            state: STATES[seq as usize % STATES.len()],
            update_time: seq.is_multiple_of(3).then_some(-(seq as i64)),
            received_at: seq as i64,
        }
    }

    fn event(seq: u64) -> Vec<u8> {
        format!(
            r#"{{"taskId":"t{seq}","n":"{}"}}"#,
            "x".repeat(seq as usize % 50)
        )
        .into_bytes()
    }

    /// Appends `seqs` as one synced group.
    fn group(log: &mut Log, seqs: std::ops::RangeInclusive<u64>) -> Vec<Slot> {
        let slots = seqs
            .map(|seq| {
                let r = record(seq as i64);
                let meta = meta(seq);
                log.append(
                    seq,
                    seq as i64,
                    &meta.task_id,
                    Some(&r),
                    Some(&meta),
                    &event(seq),
                )
            })
            .collect();
        log.commit(true).unwrap();
        slots
    }

    fn segment_file(dir: &Path) -> PathBuf {
        let ids = segment_ids(dir).unwrap();
        segment_path(dir, *ids.last().unwrap())
    }

    #[test]
    fn records_and_acks_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _, read) = open(dir.path());
        assert!(read.is_empty());
        group(&mut log, 1..=5);
        log.ack(&[2, 4]);
        log.commit(false).unwrap();
        group(&mut log, 6..=6);
        drop(log);

        let mut seen = Vec::new();
        Log::open(dir.path(), 1 << 20, |read, _| {
            if let Record::Append {
                seq,
                received_at,
                task_id,
                record: r,
                payload,
            } = read
            {
                assert_eq!(received_at, seq as i64);
                assert_eq!(task_id, format!("t{seq}"));
                assert_eq!(r, Some(record(seq as i64)));
                assert_eq!(payload, event(seq));
                seen.push(seq);
            }
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
        let (_, opened, index, read) = open(dir.path());
        assert_eq!(opened.torn_bytes, 0);
        let pending: Vec<u64> = read.iter().map(|r| r.0).collect();
        assert_eq!(pending, [1, 3, 5, 6]);
        assert_eq!(index.len(), 4);
        assert!(read.iter().all(|(seq, _, bytes)| *bytes == event(*seq)));
    }

    /// A crash during a group's write leaves any prefix of it on disk: every
    /// cut inside the last group loses that group only (it was never
    /// answered), the file is cut back to the last whole record, and the
    /// log goes on from there across another restart.
    #[test]
    fn a_torn_final_write_is_cut_back_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        group(&mut log, 1..=3);
        let synced = std::fs::metadata(segment_file(dir.path())).unwrap().len();
        group(&mut log, 4..=5);
        drop(log);
        let file = segment_file(dir.path());
        let whole = std::fs::read(&file).unwrap();
        for cut in synced as usize..whole.len() {
            std::fs::write(&file, &whole[..cut]).unwrap();
            let (mut log, opened, _, read) = open(dir.path());
            let seqs: Vec<u64> = read.iter().map(|r| r.0).collect();
            // Group 4..=5 is two records: a cut after the first keeps it.
            let first_of_group = synced as usize + FRAME + {
                let len = &whole[synced as usize..synced as usize + 4];
                u32::from_le_bytes(len.try_into().unwrap()) as usize
            };
            let expect: &[u64] = if cut >= first_of_group {
                &[1, 2, 3, 4]
            } else {
                &[1, 2, 3]
            };
            assert_eq!(seqs, expect, "cut at {cut}");
            let kept = std::fs::metadata(&file).unwrap().len();
            assert_eq!(opened.torn_bytes, cut as u64 - kept, "cut at {cut}");
            // Writing goes on after the last whole record, and survives.
            group(&mut log, 10..=10);
            drop(log);
            let (_, opened, _, read) = open(dir.path());
            assert_eq!(opened.torn_bytes, 0);
            assert_eq!(read.last().unwrap().0, 10, "cut at {cut}");
            assert_eq!(read.len(), expect.len() + 1);
        }
    }

    /// Appends `seqs` one group each, then drops the log; returns the
    /// frames' places (start, end) in the segment file, by sequence number.
    fn frames(dir: &Path, seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, usize, usize)> {
        let (mut log, ..) = open(dir);
        let mut out = Vec::new();
        for seq in seqs {
            let start = log.active_len as usize;
            group(&mut log, seq..=seq);
            out.push((seq, start, log.active_len as usize));
        }
        out
    }

    fn seqs(read: &Read) -> Vec<u64> {
        read.iter().map(|r| r.0).collect()
    }

    #[test]
    fn a_damaged_record_costs_only_itself_and_is_never_read_as_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let frames = frames(dir.path(), 1..=3);
        let file = segment_file(dir.path());
        // A flipped bit in the second event's bytes.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[frames[1].2 - 5] ^= 0x10;
        std::fs::write(&file, &bytes).unwrap();
        let (_, opened, _, read) = open(dir.path());
        assert_eq!(seqs(&read), [1, 3]);
        assert_eq!(opened.torn_bytes, 0);
        let (_, start, end) = frames[1];
        assert_eq!(opened.damaged.len(), 1, "{opened:?}");
        let damage = &opened.damaged[0];
        assert_eq!(
            (damage.offset, damage.len),
            (start as u64, (end - start) as u64)
        );
        assert_eq!(damage.bytes, bytes[start..end], "the raw bytes, exactly");
        assert_eq!(
            damage.readable_event(),
            None,
            "the flipped bit is in the JSON's quotes region: not valid JSON"
        );

        // Something other than zeros after the records, then zeros: a
        // frame that is not whole is a torn write.
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        group(&mut log, 1..=2);
        let len = log.active_len as usize;
        drop(log);
        let file = segment_file(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.truncate(len);
        bytes.extend_from_slice(&[7; 16]);
        bytes.resize(len + 4096, 0);
        std::fs::write(&file, &bytes).unwrap();
        let (_, opened, _, read) = open(dir.path());
        assert_eq!(read.len(), 2);
        assert_eq!(opened.torn_bytes, 4096);
        assert!(opened.damaged.is_empty());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len as u64);
    }

    /// Every single flipped byte, wherever it is, costs at most the one
    /// record it is in; in the segment's header it costs nothing. A flip
    /// that makes the last record's length reach past the file's end reads
    /// as a torn write (cut); anywhere else in a record it is damage, kept
    /// as raw bytes, never cut.
    #[test]
    fn any_flipped_byte_costs_only_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let frames = frames(dir.path(), 1..=6);
        let file = segment_file(dir.path());
        let whole = std::fs::read(&file).unwrap();
        let end = frames.last().unwrap().2;
        for at in 0..end {
            let mut bytes = whole[..end].to_vec();
            bytes[at] ^= 0x5a;
            std::fs::write(&file, &bytes).unwrap();
            let (_, opened, _, read) = open(dir.path());
            let hit = frames.iter().find(|(_, s, e)| (*s..*e).contains(&at));
            let expect: Vec<u64> = (1..=6)
                .filter(|seq| Some(*seq) != hit.map(|h| h.0))
                .collect();
            assert_eq!(seqs(&read), expect, "flip at {at}");
            match hit {
                None => {
                    assert_eq!(opened.damaged.len(), 1, "the header, at {at}");
                    assert_eq!((opened.damaged[0].offset, opened.damaged[0].len), (0, 8));
                }
                // The last record's length now reaches past the file's
                // end: a write that did not finish, as far as anyone can
                // tell.
                Some(&(6, start, _))
                    if at < start + 4 && {
                        let len = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap());
                        start + FRAME + len as usize > end
                    } =>
                {
                    assert!(opened.damaged.is_empty(), "flip at {at}: {opened:?}");
                    assert_eq!(opened.torn_bytes, (end - start) as u64, "flip at {at}");
                }
                Some(&(_, start, stop)) => {
                    assert_eq!(opened.torn_bytes, 0, "flip at {at}");
                    assert_eq!(opened.damaged.len(), 1, "flip at {at}: {opened:?}");
                    let d = &opened.damaged[0];
                    assert_eq!(
                        (d.offset, d.len),
                        (start as u64, (stop - start) as u64),
                        "flip at {at}"
                    );
                }
            }
            // Nothing written whole was cut: the file keeps its bytes
            // unless the last record read as torn.
            let kept = std::fs::read(&file).unwrap();
            if opened.torn_bytes == 0 {
                assert_eq!(kept, bytes, "flip at {at}");
            }
        }
    }

    /// A whole last record that fails its checksum is damage: kept in the
    /// file, and writing goes on after it; the next open finds the same
    /// range (same place: kept once as a dead letter) and the new records.
    #[test]
    fn writing_goes_on_after_damage_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let frames = frames(dir.path(), 1..=3);
        let file = segment_file(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        let (_, start, end) = frames[2];
        bytes.truncate(end);
        bytes[start + FRAME + 20] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let (mut log, opened, _, read) = open(dir.path());
        assert_eq!(seqs(&read), [1, 2]);
        assert_eq!(opened.torn_bytes, 0);
        assert_eq!(opened.damaged.len(), 1);
        let first = opened.damaged[0].clone();
        assert_eq!(
            (first.offset, first.len),
            (start as u64, (end - start) as u64)
        );
        assert!(
            first.readable_event().is_some(),
            "only the dedup record was hit: the event's JSON still reads"
        );
        group(&mut log, 4..=5);
        drop(log);
        let (_, opened, _, read) = open(dir.path());
        assert_eq!(seqs(&read), [1, 2, 4, 5]);
        assert_eq!(opened.damaged, [first]);
    }

    /// Damage at several places of several segments: each costs only the
    /// records it touches, and the read-only look reports the same.
    #[test]
    fn damage_in_several_segments_costs_only_what_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        let mut places = Vec::new();
        for seq in 1..=12 {
            let start = log.active_len as usize;
            group(&mut log, seq..=seq);
            places.push((seq, log.active_id, start, log.active_len as usize));
            if seq % 4 == 0 && seq < 12 {
                log.roll().unwrap();
            }
        }
        drop(log);
        let place = |seq: u64| places[seq as usize - 1];
        // Without the reservation, so the torn tail is just record 12.
        let last = segment_path(dir.path(), place(12).1);
        std::fs::write(&last, &std::fs::read(&last).unwrap()[..place(12).3]).unwrap();
        // Segment 1: record 2 hit in its body; segment 2: its header and
        // records 6 and 7 in one stroke; segment 3: record 12's length.
        let flip = |segment: u64, at: usize, n: usize| {
            let path = segment_path(dir.path(), segment);
            let mut bytes = std::fs::read(&path).unwrap();
            for b in &mut bytes[at..at + n] {
                *b ^= 0xa5;
            }
            std::fs::write(&path, bytes).unwrap();
        };
        flip(place(2).1, place(2).2 + 30, 4);
        flip(place(5).1, 2, 3);
        flip(place(6).1, place(6).3 - 3, 6);
        flip(place(12).1, place(12).2 + 1, 1);
        let mut look = Vec::new();
        let (damaged, torn) = read_only(dir.path(), |record, _| {
            if let Record::Append { seq, .. } = record {
                look.push(seq)
            }
        })
        .unwrap();
        let (_, opened, _, read) = open(dir.path());
        assert_eq!(seqs(&read), [1, 3, 4, 5, 8, 9, 10, 11]);
        assert_eq!(look, seqs(&read));
        let ranges: Vec<(u64, u64, u64)> = opened
            .damaged
            .iter()
            .map(|d| (d.segment, d.offset, d.len))
            .collect();
        let span = |a: u64, b: u64| (place(a).2 as u64, (place(b).3 - place(a).2) as u64);
        assert_eq!(
            ranges,
            [
                (place(2).1, span(2, 2).0, span(2, 2).1),
                (place(5).1, 0, 8),
                (place(6).1, span(6, 7).0, span(6, 7).1),
            ]
        );
        assert_eq!(damaged, opened.damaged, "inspect sees the same");
        assert_eq!(
            opened.torn_bytes,
            span(12, 12).1,
            "a flipped length at the end reads as torn"
        );
        assert_eq!(torn, opened.torn_bytes);
    }

    /// Whether this file system reserves (`fallocate`) at all.
    fn reserving_works(dir: &Path) -> bool {
        let probe = dir.join("probe");
        let file = File::create(&probe).unwrap();
        let works = reserve(&file, 0, 4096).is_ok();
        std::fs::remove_file(probe).unwrap();
        works
    }

    #[test]
    fn the_reserved_tail_is_cut_on_open_and_before_the_next_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        group(&mut log, 1..=2);
        let len = log.active_len;
        let file = segment_file(dir.path());
        // Reserved ahead: a step, capped at the segment size (1 MiB here),
        // where the file system can; else the file holds just the records.
        let reserved = if reserving_works(dir.path()) {
            1 << 20
        } else {
            len
        };
        assert_eq!(std::fs::metadata(&file).unwrap().len(), reserved);
        drop(log);
        // A crash with the reservation in place: zeros are no torn write.
        let (mut log, opened, _, read) = open(dir.path());
        assert_eq!(read.len(), 2);
        assert_eq!(opened.torn_bytes, 0);
        assert!(opened.damaged.is_empty());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len);
        // Writing goes on after the records, reserving again.
        group(&mut log, 3..=4);
        let len = log.active_len;
        assert_eq!(std::fs::metadata(&file).unwrap().len(), reserved.max(len));
        log.roll().unwrap();
        // The closed segment is cut to its records before the next exists.
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len);
        group(&mut log, 5..=5);
        drop(log);
        let (_, opened, _, read) = open(dir.path());
        assert_eq!(
            read.iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!((opened.segments, opened.torn_bytes), (2, 0));
        assert!(opened.damaged.is_empty());

        // Zeros at the end of an earlier segment are damage, reported.
        let (opened, read) = with_first_segment_changed(3..=3, |bytes| {
            bytes.resize(bytes.len() + 4096, 0);
        });
        assert_eq!(read.len(), 3);
        assert_eq!(opened.damaged.len(), 1, "{opened:?}");
    }

    /// Two segments (events 1 and 2, then `second`), the first one's bytes
    /// changed by `change`; what reopening them reads.
    fn with_first_segment_changed(
        second: std::ops::RangeInclusive<u64>,
        change: impl FnOnce(&mut Vec<u8>),
    ) -> (Opened, Read) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        group(&mut log, 1..=2);
        log.roll().unwrap();
        group(&mut log, second);
        drop(log);
        let first = segment_path(dir.path(), segment_ids(dir.path()).unwrap()[0]);
        let mut bytes = std::fs::read(&first).unwrap();
        change(&mut bytes);
        std::fs::write(&first, &bytes).unwrap();
        let (_, opened, _, read) = open(dir.path());
        (opened, read)
    }

    #[test]
    fn damage_in_an_earlier_segment_is_reported_and_later_ones_are_read() {
        let (opened, read) = with_first_segment_changed(3..=4, |bytes| {
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
        });
        assert_eq!(read.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(opened.damaged.len(), 1, "{opened:?}");
        assert_eq!(opened.torn_bytes, 0);
    }

    #[test]
    fn a_segment_goes_only_once_nothing_in_it_is_pending_or_unstored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ..) = open(dir.path());
        let segments = Segments::new(dir.path().to_path_buf());
        let mut index = Index::default();
        for s in group(&mut log, 1..=2) {
            index.push(s);
        }
        log.roll().unwrap();
        for s in group(&mut log, 3..=3) {
            index.push(s);
        }
        let count = || segment_ids(dir.path()).unwrap().len();
        assert_eq!(log.recycle(index.first_segment(), 3, &segments).unwrap(), 0);
        index.remove(1);
        assert_eq!(
            log.recycle(index.first_segment(), 3, &segments).unwrap(),
            0,
            "2 is pending"
        );
        index.remove(2);
        assert_eq!(
            log.recycle(index.first_segment(), 1, &segments).unwrap(),
            0,
            "the dedup record of 2 is not stored yet"
        );
        assert_eq!(count(), 2);
        assert_eq!(log.recycle(index.first_segment(), 2, &segments).unwrap(), 1);
        assert_eq!(count(), 1);
        // The segment being written stays, even when nothing is pending.
        index.remove(3);
        assert_eq!(log.recycle(None, 3, &segments).unwrap(), 0);
        drop(log);
        let (_, _, _, read) = open(dir.path());
        assert_eq!(
            read.iter().map(|r| r.0).collect::<Vec<_>>(),
            [3],
            "its ack was never written"
        );
    }
}
