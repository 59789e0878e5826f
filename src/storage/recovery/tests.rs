//! Recovery under injected faults: torn last batch, zeroed tail, bad CRC in
//! the middle (inside and outside the durable part), stale bytes after a cut.

use super::*;
use crate::batch::{stamp, BatchBuilder, Record};
use crate::storage::checkpoint::Checkpoint;
use crate::storage::segment::segment_path;
use bytes::Bytes;

const CAP: u64 = 64 * 1024;

/// Builds a segment image holding `n` batches alternating over two queues,
/// each batch of 3 records. Returns the image and each batch's position.
fn image(n: usize) -> (Vec<u8>, Vec<u64>) {
    let mut img = vec![0u8; CAP as usize];
    let mut at = 0usize;
    let mut next = [0u64; 2];
    let mut positions = vec![];
    for i in 0..n {
        let q = i % 2;
        let mut b = BatchBuilder::new();
        for j in 0..3 {
            b.push(&Record {
                payload: Bytes::from(format!("batch {i} record {j}")),
                ..Record::default()
            });
        }
        let mut batch = b.finish().to_vec();
        stamp(&mut batch, q as u32, next[q], 1000 + i as i64, at as u64);
        next[q] += 3;
        img[at..at + batch.len()].copy_from_slice(&batch);
        positions.push(at as u64);
        at += batch.len();
    }
    (img, positions)
}

fn scan(img: &[u8], durable_end: u64, is_last: bool) -> (SegmentScan, Vec<RecoveredBatch>, u64) {
    let mut found = vec![];
    let mut offsets = OffsetTracker::default();
    let s = scan_segment(img, 0, CAP, durable_end, is_last, &mut offsets, &mut |b| {
        found.push(b)
    })
    .unwrap();
    (s, found, offsets.gaps)
}

#[test]
fn clean_segment_keeps_every_batch() {
    let (img, pos) = image(10);
    let (s, found, gaps) = scan(&img, 0, true);
    assert_eq!(found.len(), 10);
    assert!(s.torn.is_none());
    assert!(s.corrupt.is_empty());
    assert_eq!(gaps, 0);
    assert_eq!(found[9].position, pos[9]);
    assert_eq!(s.used, pos[9] + u64::from(found[9].len));
    assert_eq!(found[9].base_offset, 12);
    assert_eq!(s.max_append_time_ms, 1009);
}

#[test]
fn torn_last_batch_is_cut() {
    let (mut img, pos) = image(10);
    let end = pos[9] as usize + 40;
    img[end..end + 30].fill(0); // half the last batch never reached the disk
    let (s, found, _) = scan(&img, 0, true);
    assert_eq!(found.len(), 9);
    assert_eq!(s.used, pos[9]);
    let torn = s.torn.expect("torn tail reported");
    assert_eq!(torn.position, pos[9]);
    assert!(torn.reason.contains("CRC"), "{}", torn.reason);
}

#[test]
fn zeroed_tail_ends_the_log_cleanly() {
    let (mut img, pos) = image(10);
    img[pos[7] as usize..].fill(0);
    let (s, found, _) = scan(&img, 0, true);
    assert_eq!(found.len(), 7);
    assert_eq!(s.used, pos[7]);
    assert!(
        s.torn.is_none(),
        "zeros past the durable point are a normal end"
    );
}

#[test]
fn bad_crc_in_the_middle_of_the_durable_log_is_skipped_and_reported() {
    let (mut img, pos) = image(10);
    img[pos[4] as usize + 100] ^= 0xff; // bit rot inside batch 4's body
    let (s, found, gaps) = scan(&img, pos[9] + 1, true);
    assert_eq!(found.len(), 9, "every other batch survives");
    assert!(found.iter().all(|b| b.position != pos[4]));
    assert_eq!(s.corrupt.len(), 1);
    assert_eq!(s.corrupt[0].start, pos[4]);
    assert_eq!(s.corrupt[0].end, pos[5]);
    assert_eq!(gaps, 3, "batch 4's three records are reported lost");
    assert!(s.torn.is_none());
}

#[test]
fn bad_header_in_the_middle_resyncs_on_the_next_batch() {
    let (mut img, pos) = image(10);
    img[pos[4] as usize + 5] ^= 0xff; // the length field itself is damaged
    let (s, found, _) = scan(&img, CAP, true);
    assert_eq!(found.len(), 9);
    assert_eq!(s.corrupt[0].end, pos[5]);
}

#[test]
fn bad_crc_past_the_durable_point_cuts_the_tail() {
    let (mut img, pos) = image(10);
    img[pos[4] as usize + 100] ^= 0xff;
    let (s, found, _) = scan(&img, pos[2], true);
    assert_eq!(found.len(), 4, "nothing after an undurable hole is kept");
    assert_eq!(s.torn.unwrap().position, pos[4]);
}

#[test]
fn an_offset_gap_past_the_durable_point_is_a_torn_tail() {
    // Batches 0..10, but batch 2 (queue 0, offsets 3..6) is missing: its bytes
    // are replaced by a valid copy of batch 4 (queue 0, offsets 6..9)... so
    // queue 0 would skip from 3 to 6. Simulated by re-stamping batch 2.
    let (mut img, pos) = image(10);
    let range = pos[2] as usize..pos[3] as usize;
    let mut b = img[range.clone()].to_vec();
    stamp(&mut b, 0, 30, 1002, pos[2]);
    img[range].copy_from_slice(&b);
    let (s, found, _) = scan(&img, 0, true);
    assert_eq!(found.len(), 2);
    assert!(s.torn.unwrap().reason.contains("skips"));
}

#[test]
fn padding_after_a_roll_ends_a_non_last_segment() {
    let (img, pos) = image(3);
    let (s, found, _) = scan(&img, CAP * 4, false);
    assert_eq!(found.len(), 3);
    assert!(s.torn.is_none());
    assert!(s.corrupt.is_empty());
    assert_eq!(s.used, pos[2] + u64::from(found[2].len));
}

#[test]
fn recover_dir_cuts_zeroes_and_removes_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut img, pos) = image(10);
    let stale = img[pos[8] as usize..pos[9] as usize].to_vec();
    img[pos[6] as usize + 90] ^= 0x55; // torn: batch 6 damaged, 7..9 intact
    std::fs::write(segment_path(dir.path(), 0), &img).unwrap();
    // A later segment that cannot hold acknowledged data once 0 is torn.
    std::fs::write(segment_path(dir.path(), CAP), vec![0u8; CAP as usize]).unwrap();

    let r = recover_dir(dir.path()).unwrap();
    assert_eq!(r.batches.len(), 6);
    assert_eq!(r.end_position, pos[6]);
    assert_eq!(r.report.removed_segments, vec![CAP]);
    assert!(!segment_path(dir.path(), CAP).exists());
    let line = r.report.to_string();
    assert!(line.contains("cut torn tail at position"), "{line}");

    let after = std::fs::read(segment_path(dir.path(), 0)).unwrap();
    assert_eq!(after.len(), CAP as usize, "segment keeps its capacity");
    assert_eq!(&after[..pos[6] as usize], &img[..pos[6] as usize]);
    assert!(
        after[pos[6] as usize..].iter().all(|&b| b == 0),
        "tail not zeroed"
    );
    assert_eq!(r.tail_page, img[(pos[6] & !4095) as usize..pos[6] as usize]);
    // The stale valid batches 7..9 are gone, so a shorter rewrite at the cut
    // can never be followed by them on the next recovery.
    assert!(!after.windows(stale.len()).any(|w| w == stale));

    // Recovering again is a no-op with a clean tail.
    let again = recover_dir(dir.path()).unwrap();
    assert_eq!(again.batches, r.batches);
    assert!(again.report.torn.is_none());
}

#[test]
fn recover_dir_uses_the_checkpoint_to_skip_durable_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (mut img, pos) = image(10);
    img[pos[3] as usize + 80] ^= 0x01;
    std::fs::write(segment_path(dir.path(), 0), &img).unwrap();
    Checkpoint {
        synced_position: pos[9] + 10,
        next_offsets: Default::default(),
    }
    .store(dir.path())
    .unwrap();
    let r = recover_dir(dir.path()).unwrap();
    assert_eq!(r.batches.len(), 9);
    assert_eq!(r.report.corrupt.len(), 1);
    assert!(r.report.to_string().contains("SKIPPED CORRUPT"));
    assert_eq!(r.report.offset_gaps, 3);
}

#[test]
fn empty_directory_recovers_to_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let r = recover_dir(dir.path()).unwrap();
    assert!(r.segments.is_empty());
    assert_eq!(r.end_position, 0);
    assert!(r.report.torn.is_none());
}
