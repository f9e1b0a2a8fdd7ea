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
//! (see `writer/`). Nothing written whole is ever cut: only the end of
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
//! store (see `writer/`). The segment being written is emptied in place
//! ([`Log::empty_active`]) on the same terms once nothing is pending at all,
//! so a drained queue gives its disk space back before the segment is full.
//!
//! Here: [`Log`], the writing side. By job: `record` (the codec), `index`
//! (the queue in memory), `segments` (the files: reading, damage, creating
//! and reserving).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::store::{slot as state_slot, TaskRecord, STATES};
use crate::event::EventMeta;
use crate::sync::lock;

/// The active segment is reserved ahead of its writes by this much at a
/// time. Measured on ext4 (a virtio disk): a write and `fdatasync` into
/// reserved blocks took about 130 µs against 185 µs when each one grew the
/// file, with a quarter less CPU.
mod index;
mod record;
mod segments;
#[cfg(test)]
mod tests;

pub(super) use index::{Index, Slot};
use record::*;
pub(super) use record::{decode_head, Record, MAGIC, MAX_EVENT};
use segments::*;
pub(super) use segments::{read_only, Damage, Segments};

/// A segment that is not being written any more.
#[derive(Debug, Clone, Copy)]
struct Closed {
    id: u64,
    /// The highest sequence number appended in it (0: none).
    last_seq: u64,
}

/// What opening the log found, for the logs and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(in crate::outbox) struct Opened {
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

/// Opens the last segment (`len` bytes long, valid records up to `good`)
/// for writing: where writing goes on is after the last valid record, or
/// after damage that is kept (never over it). A torn final write is cut
/// (and counted in `opened`), and a file without even its header starts
/// again. Returns the file and its length.
fn resume(
    path: &Path,
    len: u64,
    good: u64,
    tail: Tail,
    opened: &mut Opened,
) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let good = match tail {
        Tail::Clean | Tail::Reserved => good,
        Tail::Torn { bytes: torn } => {
            opened.torn_bytes = torn;
            good
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
    if good < len {
        file.set_len(good)?;
        file.sync_all()?;
    }
    Ok((file, good))
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
                let (file, good) = resume(&path, bytes.len() as u64, scan.good, tail, &mut opened)?;
                let log =
                    Self::writing(dir, closed, (file, id, good), scan.last_seq, segment_bytes);
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
        let active = (active, active_id, MAGIC.len() as u64);
        let log = Self::writing(dir, closed, active, 0, segment_bytes);
        Ok((log, opened))
    }

    /// The log, writing on in `active` (the file, its id, the length of
    /// its records) after the segments `closed`.
    fn writing(
        dir: &Path,
        closed: VecDeque<Closed>,
        (active, active_id, len): (File, u64, u64),
        last_seq: u64,
        segment_bytes: u64,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            closed,
            active,
            active_id,
            active_len: len,
            reserved: len,
            reserving: true,
            active_last_seq: last_seq,
            written_last_seq: last_seq,
            segment_bytes,
            buf: Vec::new(),
        }
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
