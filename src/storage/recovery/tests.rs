//! Recovery over simulated disks holding hand-built logs: torn tails,
//! damage inside and outside the unsynced window (with and without a
//! checkpoint), zeros where batches should be, roll padding, forged batches
//! in payloads, tearing at every 512-byte boundary, index snapshots.

use super::*;
use crate::batch::{stamp, BatchBuilder, Record};
use crate::storage::checkpoint::CHECKPOINT_FILE;
use crate::storage::index_snapshot::encode_block;
use crate::storage::sim::{block_on, sim_io, SimDisk, SimIo};
use std::path::PathBuf;

const CAP: u64 = 64 * 1024;

fn dir() -> PathBuf {
    PathBuf::from("/sim/shard-0")
}

fn key(base: u64) -> SegmentKey {
    SegmentKey([(base / CAP) as u8 ^ 0x5a; 16])
}

fn produced(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for p in payloads {
        b.push(&Record {
            payload: Bytes::from(p.clone()),
            ..Record::default()
        });
    }
    b.finish().to_vec()
}

/// A log being built: segments of `CAP` bytes, batches alternating over
/// two queues, three records each.
struct LogImage {
    segments: Vec<(u64, Vec<u8>)>,
    batches: Vec<BatchEntry>,
    next: [u64; 2],
    at: u64,
}

impl LogImage {
    fn new() -> Self {
        let mut img = LogImage {
            segments: Vec::new(),
            batches: Vec::new(),
            next: [0; 2],
            at: 0,
        };
        img.roll();
        img
    }

    fn base(&self) -> u64 {
        self.segments.last().unwrap().0
    }

    fn roll(&mut self) {
        let base = self.segments.last().map_or(0, |(b, _)| b + CAP);
        let prev_end = if self.segments.is_empty() {
            base
        } else {
            self.at
        };
        let mut bytes = SegmentHeader {
            shard: 0,
            base,
            prev_end,
            key: key(base),
            created_ms: 0,
            unsynced_bytes_max: 8192,
        }
        .encode_page();
        bytes.resize(CAP as usize, 0);
        self.segments.push((base, bytes));
        self.at = base + SEGMENT_HEADER_BYTES;
    }

    /// Appends a batch with these payloads to queue `q`.
    fn push(&mut self, q: usize, payloads: &[Vec<u8>]) -> BatchEntry {
        let mut b = produced(payloads);
        if self.at + b.len() as u64 > self.base() + CAP {
            self.roll();
        }
        let base = self.base();
        stamp(
            &mut b,
            q as u32,
            self.next[q],
            1000 + self.batches.len() as i64,
            self.at,
            &key(base),
        );
        let e = BatchEntry {
            position: self.at,
            len: b.len() as u32,
            queue_id: q as u32,
            base_offset: self.next[q],
            count: payloads.len() as u32,
            append_time_ms: 1000 + self.batches.len() as i64,
            tags: crate::batch::tag_summary(&b),
            attributes: 0,
            view_len: 0,
            max_priority: 0,
        };
        let seg = &mut self.segments.last_mut().unwrap().1;
        let rel = (self.at - base) as usize;
        seg[rel..rel + b.len()].copy_from_slice(&b);
        self.next[q] += payloads.len() as u64;
        self.at += b.len() as u64;
        self.batches.push(e);
        e
    }

    fn push_n(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.batches.len();
            let payloads: Vec<Vec<u8>> = (0..3)
                .map(|j| format!("batch {i} record {j} {}", "x".repeat(i % 7)).into_bytes())
                .collect();
            self.push(i % 2, &payloads);
        }
    }

    /// The byte at absolute position `pos`.
    fn byte(&mut self, pos: u64) -> &mut u8 {
        let (base, seg) = self
            .segments
            .iter_mut()
            .rev()
            .find(|(b, _)| *b <= pos)
            .unwrap();
        &mut seg[(pos - *base) as usize]
    }

    fn zero(&mut self, from: u64, to: u64) {
        for p in from..to {
            *self.byte(p) = 0;
        }
    }

    fn disk(&self) -> SimDisk {
        let disk = SimDisk::new(1 << 30);
        for (base, bytes) in &self.segments {
            disk.put(&segment_path(&dir(), *base), bytes.clone());
        }
        disk
    }
}

fn recover_disk(disk: &SimDisk, u: u64) -> (Recovered<SimIo>, SimIo) {
    let io = SimIo {
        disk: disk.clone(),
        ..sim_io(9, 0)
    };
    let cfg = RecoveryConfig {
        dir: dir(),
        shard: 0,
        unsynced_bytes_max: u,
    };
    let i = io.clone();
    let r = block_on(&io, async move { recover(&i, &cfg).await.unwrap() });
    (r, io)
}

#[test]
fn clean_log_keeps_every_batch() {
    let mut img = LogImage::new();
    img.push_n(10);
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert_eq!(r.batches, img.batches);
    assert!(r.report.torn.is_none());
    assert!(r.report.corrupt.is_empty());
    assert_eq!(r.end_position, img.at);
    assert_eq!(r.segments[0].info.data_end(), img.at);
    assert_eq!(r.report.checkpoint, Some(CheckpointState::Missing));
}

#[test]
fn torn_last_batch_is_cut_and_its_bytes_zeroed() {
    let mut img = LogImage::new();
    img.push_n(10);
    let last = img.batches[9];
    img.zero(last.position + 40, last.position + 70);
    let disk = img.disk();
    let (r, _) = recover_disk(&disk, 8192);
    assert_eq!(r.batches, img.batches[..9]);
    let torn = r.report.torn.clone().expect("torn tail reported");
    assert_eq!(torn.position, last.position);
    assert_eq!(r.end_position, last.position);
    let after = disk.contents(&segment_path(&dir(), 0)).unwrap();
    assert!(after[last.position as usize..].iter().all(|&b| b == 0));
    assert_eq!(after.len(), CAP as usize, "segment keeps its capacity");
    // Recovering again finds a clean tail.
    let (again, _) = recover_disk(&disk, 8192);
    assert_eq!(again.batches, r.batches);
    assert!(again.report.torn.is_none());
}

#[test]
fn zeroed_tail_ends_the_log_cleanly() {
    let mut img = LogImage::new();
    img.push_n(10);
    let cut = img.batches[7].position;
    img.zero(cut, CAP);
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert_eq!(r.batches, img.batches[..7]);
    assert!(r.report.torn.is_none(), "{}", r.report);
}

#[test]
fn damage_older_than_the_window_costs_only_that_batch_without_a_checkpoint() {
    for checkpoint in ["missing", "damaged"] {
        let mut img = LogImage::new();
        img.push_n(250);
        let hit = img.batches[20];
        *img.byte(hit.position + 100) ^= 0xff;
        let disk = img.disk();
        if checkpoint == "damaged" {
            disk.put(&dir().join(CHECKPOINT_FILE), vec![0xAB; 8192]);
        }
        // The window (8 KiB) is far smaller than the log: batch 20 is older.
        let (r, _) = recover_disk(&disk, 8192);
        let expected: Vec<BatchEntry> = img.batches.iter().copied().filter(|b| *b != hit).collect();
        assert_eq!(r.batches, expected, "checkpoint {checkpoint}: {}", r.report);
        assert_eq!(
            r.report.corrupt,
            vec![CorruptRange {
                start: hit.position,
                end: hit.end(),
                reason: r.report.corrupt[0].reason.clone(),
            }]
        );
        assert_eq!(r.report.offset_gaps, 3, "batch 20's three records are lost");
        assert!(r.report.torn.is_none());
        let line = r.report.to_string();
        assert!(line.contains("SKIPPED CORRUPT bytes"), "{line}");
    }
}

#[test]
fn damage_in_the_unsynced_window_is_a_torn_tail() {
    let mut img = LogImage::new();
    img.push_n(250);
    let hit = img.batches[245];
    *img.byte(hit.position + 90) ^= 0x01;
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert_eq!(r.batches, img.batches[..245], "{}", r.report);
    assert_eq!(r.report.torn.as_ref().unwrap().position, hit.position);
    assert_eq!(
        r.report.discarded_batches, 4,
        "valid batches after the cut go"
    );
    assert!(r.report.corrupt.is_empty());
}

#[test]
fn the_checkpoint_raises_the_durable_bound() {
    // The same damage inside the window, but the checkpoint says it was
    // synced: corruption, not a tail.
    let mut img = LogImage::new();
    img.push_n(250);
    let hit = img.batches[245];
    *img.byte(hit.position + 90) ^= 0x01;
    let disk = img.disk();
    let cp = Checkpoint {
        synced_position: img.at,
        clean_end: None,
        boot_id: [0; 16],
        storage_failed: false,
        queues: Default::default(),
    };
    let mut file = cp.encode_slot(1, 4096);
    file.extend(cp.encode_slot(2, 4096));
    disk.put(&dir().join(CHECKPOINT_FILE), file);
    let (r, _) = recover_disk(&disk, 8192);
    assert_eq!(r.batches.len(), 249);
    assert_eq!(r.report.corrupt.len(), 1);
    assert!(r.report.torn.is_none());
}

#[test]
fn a_damaged_length_field_resyncs_on_the_next_batch() {
    let mut img = LogImage::new();
    img.push_n(250);
    let hit = img.batches[30];
    *img.byte(hit.position + 5) ^= 0xff; // the length field itself
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert_eq!(r.batches.len(), 249);
    assert_eq!(r.report.corrupt[0].start, hit.position);
    assert_eq!(r.report.corrupt[0].end, hit.end());
}

#[test]
fn zeros_where_batches_should_be_in_an_older_segment_are_corruption() {
    let mut img = LogImage::new();
    img.push_n(900); // several segments
    assert!(img.segments.len() >= 3, "{}", img.segments.len());
    // A lost write in the first segment: 10 batches of zeros, and its end.
    let seg1 = img.segments[1].0;
    let in_first: Vec<BatchEntry> = img
        .batches
        .iter()
        .copied()
        .filter(|b| b.position < seg1)
        .collect();
    let lost = &in_first[in_first.len() - 10..];
    img.zero(lost[0].position, lost[9].end());
    let (r, _) = recover_disk(&img.disk(), 8192);
    let expected: Vec<BatchEntry> = img
        .batches
        .iter()
        .copied()
        .filter(|b| !lost.contains(b))
        .collect();
    assert_eq!(r.batches, expected, "{}", r.report);
    assert_eq!(r.report.corrupt.len(), 1);
    assert_eq!(r.report.corrupt[0].start, lost[0].position);
    assert!(
        r.report.corrupt[0].reason.contains("zeros"),
        "{:?}",
        r.report.corrupt
    );
    assert!(r.report.torn.is_none());
    assert_eq!(r.segments.len(), img.segments.len());
}

#[test]
fn roll_padding_is_not_reported() {
    let mut img = LogImage::new();
    img.push_n(900);
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert_eq!(r.batches, img.batches);
    assert!(r.report.corrupt.is_empty(), "{}", r.report);
}

#[test]
fn a_perfect_fake_batch_in_a_payload_is_never_taken() {
    let mut img = LogImage::new();
    img.push_n(100);
    // The payload of the next batch holds a whole batch stamped for the
    // very position it will lie at, for queue 0's next offset, under a key
    // the producer chose (it cannot know the segment's).
    let fake_records = produced(&[b"INVENTED".to_vec()]);
    let real_len = produced(&[vec![0u8; fake_records.len()]]).len();
    let real_at = img.at;
    let fake_at = real_at + real_len as u64 - fake_records.len() as u64;
    let mut fake = fake_records.clone();
    stamp(&mut fake, 0, img.next[0], 5, fake_at, &SegmentKey([1; 16]));
    let holder = img.push(1, &[fake.clone()]);
    assert_eq!(
        holder.end(),
        fake_at + fake.len() as u64,
        "fake sits at the payload's end"
    );
    img.push_n(100);
    // Damage the holder's header: the scan looks for the next batch and
    // passes the fake's magic on the way.
    *img.byte(holder.position + 20) ^= 0xff;
    let (r, _) = recover_disk(&img.disk(), 8192);
    assert!(
        r.batches.iter().all(|b| b.position != fake_at),
        "fake taken"
    );
    assert_eq!(r.batches.len(), 200, "{}", r.report);
    assert_eq!(r.report.corrupt[0].start, holder.position);
    assert_eq!(r.report.corrupt[0].end, holder.end());
}

#[test]
fn a_torn_write_at_every_512_byte_boundary_keeps_exactly_the_whole_batches() {
    let mut img = LogImage::new();
    img.push_n(60);
    let write_start = align_down(img.batches[40].position);
    let end = img.at;
    let mut b = write_start;
    while b < end {
        // Sectors after `b` never reached the disk.
        let mut torn = LogImage {
            segments: img.segments.clone(),
            batches: Vec::new(),
            next: img.next,
            at: img.at,
        };
        torn.zero(b, CAP);
        let (r, _) = recover_disk(&torn.disk(), 8192);
        let expected: Vec<BatchEntry> = img
            .batches
            .iter()
            .copied()
            .filter(|e| e.end() <= b)
            .collect();
        assert_eq!(r.batches, expected, "tear at {b}: {}", r.report);
        assert_eq!(r.end_position, expected.last().unwrap().end());
        // And only sector `b` lost (a torn multi-sector write).
        let mut hole = LogImage {
            segments: img.segments.clone(),
            batches: Vec::new(),
            next: img.next,
            at: img.at,
        };
        hole.zero(b, (b + 512).min(end));
        let (r, _) = recover_disk(&hole.disk(), 1 << 20);
        let expected: Vec<BatchEntry> = img
            .batches
            .iter()
            .copied()
            .take_while(|e| e.end() <= b)
            .collect();
        assert_eq!(r.batches, expected, "sector at {b}: {}", r.report);
        b += 512;
    }
}

#[test]
fn index_snapshots_spare_the_scan_and_a_mismatched_one_is_distrusted() {
    let mut img = LogImage::new();
    img.push_n(200);
    let disk = img.disk();
    let (full, _) = recover_disk(&disk, 8192);
    let full_scan = full.report.scanned_bytes;
    let covered = img.batches[149].end();
    let block = encode_block(&img.batches[..150], SEGMENT_HEADER_BYTES, covered, false);
    disk.put(&index_path(&dir(), 0), block);
    let (r, _) = recover_disk(&disk, 8192);
    assert_eq!(r.batches, img.batches);
    assert_eq!(r.report.snapshot_batches, 150);
    assert!(
        r.report.scanned_bytes < full_scan,
        "{} of {full_scan}",
        r.report.scanned_bytes
    );
    // A snapshot that lists a batch the log does not hold is not trusted.
    let mut wrong = img.batches[..150].to_vec();
    wrong[149].base_offset += 1;
    disk.put(
        &index_path(&dir(), 0),
        encode_block(&wrong, SEGMENT_HEADER_BYTES, covered, false),
    );
    let (r, _) = recover_disk(&disk, 8192);
    assert_eq!(r.batches, img.batches);
    assert_eq!(r.report.snapshots_distrusted, vec![0]);
    assert_eq!(r.report.snapshot_batches, 0);
}

#[test]
fn a_never_written_last_segment_is_removed() {
    let mut img = LogImage::new();
    img.push_n(10);
    let disk = img.disk();
    disk.put(&segment_path(&dir(), CAP), vec![0u8; CAP as usize]);
    let (r, _) = recover_disk(&disk, 8192);
    assert_eq!(r.segments.len(), 1);
    assert_eq!(
        r.report.removed_segments,
        vec![(CAP, "prepared, never written")]
    );
    assert!(!disk.names().contains(&segment_path(&dir(), CAP)));
    assert_eq!(r.batches, img.batches);
}

#[test]
fn an_empty_directory_recovers_to_an_empty_log() {
    let disk = SimDisk::new(1 << 20);
    let (r, _) = recover_disk(&disk, 8192);
    assert!(r.segments.is_empty());
    assert_eq!(r.end_position, 0);
    assert!(r.report.torn.is_none());
}

#[test]
fn a_recovery_that_fails_marks_the_storage_failure() {
    // A torn tail followed by a segment to remove; removing files fails.
    let mut img = LogImage::new();
    img.push_n(250);
    let hit = img.batches[245];
    *img.byte(hit.position + 90) ^= 0x01;
    let disk = img.disk();
    disk.put(&segment_path(&dir(), img.base() + CAP), {
        let mut b = SegmentHeader {
            shard: 0,
            base: img.base() + CAP,
            prev_end: img.at,
            key: key(img.base() + CAP),
            created_ms: 0,
            unsynced_bytes_max: 8192,
        }
        .encode_page();
        b.resize(CAP as usize, 0);
        b[SEGMENT_HEADER_BYTES as usize] = 1;
        b
    });
    let cp = Checkpoint {
        synced_position: img.batches[100].position,
        clean_end: None,
        boot_id: [0; 16],
        storage_failed: false,
        queues: Default::default(),
    };
    let mut file = cp.encode_slot(1, 4096);
    file.extend(cp.encode_slot(2, 4096));
    disk.put(&dir().join(CHECKPOINT_FILE), file);
    disk.0.borrow_mut().faults.meta_eio = 1000;
    let io = SimIo {
        disk: disk.clone(),
        ..sim_io(9, 0)
    };
    let cfg = RecoveryConfig {
        dir: dir(),
        shard: 0,
        unsynced_bytes_max: 8192,
    };
    let i = io.clone();
    let failed = block_on(&io, async move { recover(&i, &cfg).await.err() });
    assert!(failed.is_some(), "removing a segment failed");
    let (_, marked, _) = crate::storage::checkpoint::decode_file(
        &disk.contents(&dir().join(CHECKPOINT_FILE)).unwrap(),
    )
    .0
    .unwrap();
    assert!(marked.storage_failed, "the failure is marked");
    assert_eq!(marked.synced_position, cp.synced_position);
    // The next recovery says so.
    disk.0.borrow_mut().faults.meta_eio = 0;
    let (r, _) = recover_disk(&disk, 8192);
    assert!(r.report.storage_failed);
    assert!(r.report.to_string().contains("STORAGE FAILED"));
}

#[test]
fn a_torn_header_of_a_segment_inside_the_window_cuts_the_log_there() {
    // Two segments; the second's header page never landed (zeros) while
    // a third segment's did: with a window wider than a segment, the
    // second is a torn tail, and the third goes with it.
    let mut img = LogImage::new();
    while img.segments.len() < 2 {
        img.push_n(1);
    }
    let second = img.segments[1].0;
    while img.segments.len() < 3 {
        img.push_n(1);
    }
    img.push_n(5);
    let third = img.segments[2].0;
    let first_end = img
        .batches
        .iter()
        .filter(|b| b.position < second)
        .map(|b| b.end())
        .max()
        .unwrap();
    img.zero(second, second + SEGMENT_HEADER_BYTES);
    let kept: Vec<BatchEntry> = img
        .batches
        .iter()
        .copied()
        .filter(|b| b.position < second)
        .collect();
    let (r, _) = recover_disk(&img.disk(), 4 * CAP);
    assert_eq!(r.batches, kept, "{}", r.report);
    let torn = r.report.torn.as_ref().expect("a cut");
    assert_eq!(torn.position, second, "{}", r.report);
    assert_eq!(r.end_position, first_end);
    assert_eq!(
        r.report.removed_segments,
        vec![
            (third, "after the torn tail"),
            (second, "after the torn tail")
        ]
    );
    // Outside the window the same header is damage: later segments stay.
    let mut img2 = LogImage::new();
    while img2.segments.len() < 4 {
        img2.push_n(1);
    }
    let second2 = img2.segments[1].0;
    img2.zero(second2, second2 + SEGMENT_HEADER_BYTES);
    let (r2, _) = recover_disk(&img2.disk(), 8192);
    assert!(r2.report.torn.is_none(), "{}", r2.report);
    assert_eq!(r2.report.unreadable_segments, vec![second2]);
    assert!(r2.batches.len() > kept.len());
}

#[test]
fn a_missing_segment_is_a_hole_never_skipped_silently() {
    let mut img = LogImage::new();
    while img.segments.len() < 4 {
        img.push_n(1);
    }
    img.push_n(5);
    let (second, third) = (img.segments[1].0, img.segments[2].0);
    let first_end = img
        .batches
        .iter()
        .filter(|b| b.position < second)
        .map(|b| b.end())
        .max()
        .unwrap();
    let without_second = || {
        let disk = SimDisk::new(1 << 30);
        for (base, bytes) in img.segments.iter().filter(|(b, _)| *b != second) {
            disk.put(&segment_path(&dir(), *base), bytes.clone());
        }
        disk
    };
    let disk = without_second();
    // Inside a wide window: the log ends where the first segment's data does.
    let (r, _) = recover_disk(&disk, 8 * CAP);
    assert_eq!(
        r.report.torn.as_ref().map(|t| t.position),
        Some(first_end),
        "{}",
        r.report
    );
    assert_eq!(r.end_position, first_end);
    assert!(r.batches.iter().all(|b| b.position < second));
    // Outside it: reported as corruption, the later segments kept.
    let (r, _) = recover_disk(&without_second(), 8192);
    assert!(r.report.torn.is_none(), "{}", r.report);
    assert!(
        r.report
            .corrupt
            .iter()
            .any(|c| c.start == first_end && c.end == third),
        "{}",
        r.report
    );
    assert!(r.batches.iter().any(|b| b.position >= third));
}
