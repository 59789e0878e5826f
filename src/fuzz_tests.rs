//! Property-based fuzzing of everything that reads bytes a client or a disk
//! hands over: the frame decoder, every operation decoder, batch
//! validation, and the recovery scan. CI runs proptest's default case count;
//! longer runs: `PROPTEST_CASES=200000 cargo test --lib fuzz_tests`.
//!
//! Properties: nothing panics on any input; a decoder either fails or
//! round-trips; a mutated batch is refused unless its CRC was made to
//! match; recovery over any bytes returns only genuine batches (each one
//! checks against the image) and finds every genuine batch of an intact log.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::batch::{check_stored, stamp, validate_produced, BatchBuilder, Record, SegmentKey};
use crate::protocol::frame::{encode_frame, FrameDecoder};
use crate::protocol::*;

fn bytes_strategy(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    #[test]
    fn frames_split_anywhere_decode_the_same(
        bodies in proptest::collection::vec(bytes_strategy(300), 1..8),
        cuts in proptest::collection::vec(1usize..64, 1..40),
    ) {
        let mut wire = BytesMut::new();
        for (i, b) in bodies.iter().enumerate() {
            encode_frame(&mut wire, i as u16, 1, i as u64, b);
        }
        let d = FrameDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        let mut c = 0;
        while at < wire.len() {
            let n = cuts[c % cuts.len()].min(wire.len() - at);
            c += 1;
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got.len(), bodies.len());
        for (i, ((a, _, id), body)) in got.iter().enumerate() {
            prop_assert_eq!((*a as usize, *id as usize), (i, i));
            prop_assert_eq!(&body[..], &bodies[i][..]);
        }
    }

    #[test]
    fn the_frame_decoder_survives_any_bytes(data in bytes_strategy(2000), max in 12u32..5000) {
        let d = FrameDecoder::new(max);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    #[test]
    fn every_operation_decoder_survives_any_bytes(data in bytes_strategy(600)) {
        let b = Bytes::from(data);
        let _ = HandshakeRequest::decode(b.clone());
        let _ = HandshakeResponse::decode(b.clone());
        let _ = MetadataRequest::decode(b.clone());
        let _ = MetadataResponse::decode(b.clone());
        let _ = CreateTopicRequest::decode(b.clone());
        let _ = TopicRequest::decode(b.clone());
        let _ = TopicInfo::decode(b.clone());
        let _ = DescribeTopicResponse::decode(b.clone());
        let _ = ProduceRequest::decode(b.clone());
        let _ = ProduceResponse::decode(b.clone());
        let _ = FetchRequest::decode(b.clone());
        let _ = FetchResponse::decode(b.clone());
        let _ = FetchManyRequest::decode(b.clone());
        let _ = FetchManyRequest::decode_route(b.clone());
        let _ = FetchManyResponse::decode(b.clone());
        let _ = ListOffsetsRequest::decode(b.clone());
        let _ = GroupOffsetRequest::decode(b.clone(), true);
        let _ = GroupOffsetRequest::decode(b.clone(), false);
        let _ = GetMessageResponse::decode(b.clone());
        let _ = CreateGroupRequest::decode(b.clone());
        let _ = GroupRequest::decode(b.clone());
        let _ = ReceiveRequest::decode(b.clone());
        let _ = ReceiveResponse::decode(b.clone());
        let _ = SettleRequest::decode(b.clone(), true);
        let _ = SettleRequest::decode(b.clone(), false);
        let _ = SettleRequest::shard_of(&b, true);
        let _ = ChangeInvisibleRequest::decode(b.clone());
        let _ = decode_codes(b.clone());
        let _ = crate::group::entry::Entry::decode(&b);
        let _ = decode_message_id(b.clone());
        let _ = decode_u64(b.clone());
        let _ = decode_opt_u64(b.clone());
        let _ = decode_error(b);
    }

    #[test]
    fn mutated_request_bodies_fail_or_round_trip(
        topic in "[a-z]{1,12}",
        queue in any::<u32>(),
        offset in any::<u64>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let mut b = BytesMut::new();
        FetchRequest { topic, queue, offset, max_bytes: 7, wait_ms: 9, filter: None }.encode(&mut b);
        let mut v = b.to_vec();
        for (i, x) in flips {
            let n = v.len();
            v[i % n] ^= x;
        }
        v.truncate(cut % (v.len() + 1) + usize::from(cut % 2 == 0) * v.len());
        if let Ok(r) = FetchRequest::decode(Bytes::from(v.clone())) {
            let mut again = BytesMut::new();
            r.encode(&mut again);
            prop_assert_eq!(&again[..], &v[..], "a decode that succeeds round-trips");
        }
    }

    #[test]
    fn a_mutated_batch_is_refused_unless_its_crc_matches(
        payloads in proptest::collection::vec(bytes_strategy(100), 1..6),
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
    ) {
        let mut bb = BatchBuilder::new();
        for p in &payloads {
            bb.push(&Record::new(Bytes::from(p.clone())).with_tag("t"));
        }
        let good = bb.finish().to_vec();
        prop_assert!(validate_produced(&good, 1 << 20).is_ok());
        let mut bad = good.clone();
        for (i, x) in &flips {
            // Bytes 48..52 are the CRC itself, 0..48 the broker's fields.
            let at = 52 + i % (bad.len() - 52);
            bad[at] ^= x;
        }
        if bad != good {
            prop_assert!(validate_produced(&bad, 1 << 20).is_err(), "a mutated body passed");
        }
        // Stamped and then mutated anywhere: the stored check refuses it.
        let key = SegmentKey([3; 16]);
        let mut stored = good.clone();
        stamp(&mut stored, 1, 0, 5, 4096, &key);
        let mut bad = stored.clone();
        for (i, x) in &flips {
            let n = bad.len();
            bad[i % n] ^= x;
        }
        if bad != stored {
            prop_assert!(check_stored(&bad, &key).is_err());
        }
    }
}

mod recovery_scan {
    use super::*;
    use crate::storage::recovery::{recover, RecoveryConfig};
    use crate::storage::segment::{segment_path, SegmentHeader, SEGMENT_HEADER_BYTES};
    use crate::storage::sim::{block_on, sim_io, SimDisk, SimIo};
    use crate::storage::BatchEntry;
    use std::path::PathBuf;

    const CAP: usize = 64 * 1024;

    fn dir() -> PathBuf {
        PathBuf::from("/sim/fuzz")
    }

    /// A segment image: the header page, genuine batches, then whatever
    /// `noise` writes over it.
    fn image(n: usize, sizes: &[usize]) -> (Vec<u8>, Vec<BatchEntry>, SegmentKey) {
        let key = SegmentKey([0x42; 16]);
        let mut img = SegmentHeader {
            shard: 0,
            base: 0,
            prev_end: 0,
            key,
            created_ms: 0,
            unsynced_bytes_max: 8192,
        }
        .encode_page();
        img.resize(CAP, 0);
        let mut at = SEGMENT_HEADER_BYTES as usize;
        let mut batches = Vec::new();
        for i in 0..n {
            let mut bb = BatchBuilder::new();
            bb.push(&Record::new(vec![
                b'a' + (i % 26) as u8;
                sizes[i % sizes.len()]
            ]));
            let mut b = bb.finish().to_vec();
            if at + b.len() > CAP {
                break;
            }
            stamp(&mut b, 1, i as u64, 1, at as u64, &key);
            img[at..at + b.len()].copy_from_slice(&b);
            batches.push(BatchEntry {
                position: at as u64,
                len: b.len() as u32,
                queue_id: 1,
                base_offset: i as u64,
                count: 1,
                append_time_ms: 1,
                tags: crate::batch::tag_summary(&b),
                attributes: 0,
                view_len: 0,
                max_priority: 0,
            });
            at += b.len();
        }
        (img, batches, key)
    }

    fn run(img: Vec<u8>) -> Vec<BatchEntry> {
        let disk = SimDisk::new(1 << 24);
        disk.put(&segment_path(&dir(), 0), img);
        let io = SimIo {
            disk,
            ..sim_io(1, 0)
        };
        let i = io.clone();
        block_on(&io, async move {
            let cfg = RecoveryConfig {
                dir: dir(),
                shard: 0,
                unsynced_bytes_max: 8192,
            };
            recover(&i, &cfg)
                .await
                .map(|r| r.batches)
                .unwrap_or_default()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn recovery_keeps_every_genuine_batch_of_an_intact_log(
            n in 1usize..80,
            sizes in proptest::collection::vec(0usize..700, 1..5),
        ) {
            let (img, batches, _) = image(n, &sizes);
            prop_assert_eq!(run(img), batches);
        }

        #[test]
        fn recovery_over_any_damage_returns_only_genuine_batches(
            n in 1usize..80,
            sizes in proptest::collection::vec(0usize..700, 1..5),
            noise in proptest::collection::vec((4096usize..CAP, any::<u8>(), 1usize..600), 1..6),
        ) {
            let (mut img, batches, key) = image(n, &sizes);
            let pristine = img.clone();
            for (at, byte, len) in noise {
                let end = (at + len).min(CAP);
                for b in &mut img[at..end] {
                    *b = byte;
                }
            }
            let got = run(img);
            for e in &got {
                // Each one is a batch of the original log, intact there.
                prop_assert!(batches.contains(e), "invented {e:?}");
                let b = &pristine[e.position as usize..e.end() as usize];
                prop_assert!(check_stored(b, &key).is_ok());
            }
            prop_assert!(got.windows(2).all(|w| w[0].end() <= w[1].position));
        }
    }
}
