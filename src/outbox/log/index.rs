//! The queue in memory: where each pending event is in the log, never its
//! bytes.

use super::*;

/// Where one pending event is: its head (task id, meta) at `offset`, then
/// its JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::outbox) struct Slot {
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

/// The pending events in sequence order (shared by the writer, which adds
/// and removes, and the relay, which reads).
#[derive(Debug, Default)]
pub(in crate::outbox) struct Index {
    slots: VecDeque<Slot>,
    live: u64,
}

impl Index {
    /// Adds the newest pending event; refuses (`false`) a sequence number
    /// that is not above every one before it.
    pub(in crate::outbox) fn push(&mut self, slot: Slot) -> bool {
        if self.slots.back().is_some_and(|last| last.seq >= slot.seq) {
            return false;
        }
        self.live += 1;
        self.slots.push_back(slot);
        true
    }

    /// Marks `seq` as gone; returns its slot if it was pending.
    pub(in crate::outbox) fn remove(&mut self, seq: u64) -> Option<Slot> {
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

    pub(in crate::outbox) fn get(&self, seq: u64) -> Option<Slot> {
        let at = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        Some(self.slots[at]).filter(|s| !s.done)
    }

    /// The first `n` pending slots, oldest first.
    pub(in crate::outbox) fn oldest(&self, n: usize) -> Vec<Slot> {
        self.slots
            .iter()
            .filter(|s| !s.done)
            .take(n)
            .copied()
            .collect()
    }

    pub(in crate::outbox) fn len(&self) -> u64 {
        self.live
    }

    /// Bytes of JSON pending.
    pub(in crate::outbox) fn bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| !s.done)
            .map(|s| s.len as u64)
            .sum()
    }

    /// The segment of the oldest pending event.
    pub(in crate::outbox) fn first_segment(&self) -> Option<u64> {
        self.slots.front().map(|s| s.segment)
    }

    pub(in crate::outbox) fn first(&self) -> Option<Slot> {
        self.slots.front().copied()
    }
}
