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
            let (task, stored, _) = decode_head(&whole[..s.head as usize], s.received_at).unwrap();
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
        traceparent: seq
            .is_multiple_of(5)
            .then(|| format!("00-{:032x}-{:016x}-01", seq + 1, seq + 1)),
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

/// Writes the events `seqs` (see [`frames`]), then changes the segment's
/// bytes with `damage`; returns the frames as written and the bytes as
/// damaged.
fn damaged(
    dir: &Path,
    seqs: std::ops::RangeInclusive<u64>,
    damage: impl FnOnce(&mut Vec<u8>, &[(u64, usize, usize)]),
) -> (Vec<(u64, usize, usize)>, Vec<u8>) {
    let frames = frames(dir, seqs);
    let file = segment_file(dir);
    let mut bytes = std::fs::read(&file).unwrap();
    damage(&mut bytes, &frames);
    std::fs::write(&file, &bytes).unwrap();
    (frames, bytes)
}

fn seqs(read: &Read) -> Vec<u64> {
    read.iter().map(|r| r.0).collect()
}

#[test]
fn a_damaged_record_costs_only_itself_and_is_never_read_as_an_event() {
    let dir = tempfile::tempdir().unwrap();
    // A flipped bit in the second event's bytes.
    let (frames, bytes) = damaged(dir.path(), 1..=3, |bytes, frames| {
        bytes[frames[1].2 - 5] ^= 0x10;
    });
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
    let (frames, _) = damaged(dir.path(), 1..=3, |bytes, frames| {
        let (_, start, end) = frames[2];
        bytes.truncate(end);
        bytes[start + FRAME + 20] ^= 0x01;
    });
    let (_, start, end) = frames[2];
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

#[test]
fn a_head_keeps_its_traceparent_and_an_older_head_reads_without_one() {
    let text = |buf: &mut Vec<u8>, s: &str| {
        buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    };
    // A head as written before traceparents were stored: task, meta flag 1,
    // event id, state, no model, no update time; then the event's JSON.
    let mut old = Vec::new();
    text(&mut old, "t1");
    old.push(1);
    text(&mut old, "e1");
    old.push(state_slot(State::Success) as u8);
    old.extend_from_slice(&[0, 0]);
    let json = br#"{"taskId":"t1"}"#;
    let record = [old.clone(), json.to_vec()].concat();
    let (task, stored, head) = decode_head(&record, 7).unwrap();
    let mut meta = EventMeta {
        event_id: "e1".into(),
        task_id: "t1".into(),
        model: None,
        state: State::Success,
        update_time: None,
        received_at: 7,
        traceparent: None,
    };
    assert_eq!((task, stored.as_ref()), ("t1", Some(&meta)));
    assert_eq!(&record[head..], json, "the payload starts where it did");

    // Without a traceparent (telemetry off) a head is written as before.
    let mut now = Vec::new();
    encode_head(&mut now, "t1", Some(&meta));
    assert_eq!(now, old);

    // With one, it reads back, and so does the payload after it.
    meta.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let mut traced = Vec::new();
    encode_head(&mut traced, "t1", Some(&meta));
    traced.extend_from_slice(json);
    let (_, stored, head) = decode_head(&traced, 7).unwrap();
    assert_eq!(stored.as_ref(), Some(&meta));
    assert_eq!(&traced[head..], json);

    // Anything that is not a traceparent hookbridge writes is left out.
    meta.traceparent = Some("00-x\r\nevil: 1".into());
    let mut bad = Vec::new();
    encode_head(&mut bad, "t1", Some(&meta));
    assert_eq!(bad, old);
}
