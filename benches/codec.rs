//! Hot-path micro-benchmarks with no I/O: batch encode, produce-side
//! validation, stamping and stored-batch checks, CRC per KiB, frame decode.
//! `cargo bench --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keelmq::batch::{check_stored, stamp, validate_produced, BatchBuilder, Record, SegmentKey};
use keelmq::protocol::frame::{encode_frame, FrameDecoder};

fn batch_of(n: usize, size: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(&Record {
            payload: Bytes::from(vec![i as u8; size]),
            timestamp_ms: 1,
            ..Record::default()
        });
    }
    b.finish()
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    for &(n, size) in &[(1usize, 100usize), (100, 100), (1000, 100), (10, 1024)] {
        let batch = batch_of(n, size);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("encode", format!("{n}x{size}B")),
            &(n, size),
            |b, &(n, size)| {
                let r = Record {
                    payload: Bytes::from(vec![7u8; size]),
                    ..Record::default()
                };
                b.iter(|| {
                    let mut bb = BatchBuilder::new();
                    for _ in 0..n {
                        bb.push(&r);
                    }
                    black_box(bb.finish())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("validate_produced", format!("{n}x{size}B")),
            &batch,
            |b, batch| b.iter(|| black_box(validate_produced(batch, usize::MAX).unwrap())),
        );
        g.bench_with_input(
            BenchmarkId::new("stamp_copy", format!("{n}x{size}B")),
            &batch,
            |b, batch| {
                b.iter(|| {
                    let mut m = BytesMut::from(&batch[..]);
                    stamp(&mut m, 1, 2, 3, 4, &SegmentKey([7; 16]));
                    black_box(m.freeze())
                })
            },
        );
        let mut stored = batch.to_vec();
        stamp(&mut stored, 1, 2, 3, 4, &SegmentKey([7; 16]));
        g.bench_with_input(
            BenchmarkId::new("check_stored", format!("{n}x{size}B")),
            &stored,
            |b, s| b.iter(|| black_box(check_stored(s, &SegmentKey([7; 16])).unwrap())),
        );
    }
    g.finish();

    let kib = vec![0xa5u8; 1024];
    let mut g = c.benchmark_group("crc32");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("1KiB", |b| {
        b.iter(|| black_box(crc32fast::hash(black_box(&kib))))
    });
    g.finish();

    let mut wire = BytesMut::new();
    for i in 0..64 {
        encode_frame(&mut wire, 6, 1, i, &[0u8; 200]);
    }
    let wire = wire.freeze();
    let d = FrameDecoder::new(1 << 20);
    c.bench_function("frame_decode_64x200B", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Some(f) = d.decode(&mut buf).unwrap() {
                n += f.1.len();
            }
            black_box(n)
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
