//! The store on a real glommio executor with real DMA files and tiny
//! segments: appends cross segment rolls, every durability level resolves,
//! reads come from the tail cache and from disk, and recovery rebuilds
//! exactly what was written.

use super::*;
use crate::batch::{BatchBuilder, Record, RecordIter};
use crate::ids::{LogPosition, QueueId, QueueOffset};
use crate::storage::recovery::{recover, RecoveryConfig};
use crate::storage::UringIo;
use glommio::LocalExecutorBuilder;

const SEGMENT: u64 = 64 * 1024;

fn produced(tag: &str, n: usize, size: usize) -> (Bytes, BatchHeader) {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(&Record::new(format!("{tag}-{i}-{}", "p".repeat(size))));
    }
    let bytes = b.finish();
    let h = batch::validate_produced(&bytes, 1 << 20).unwrap();
    (bytes, h)
}

/// A temp dir on the disk the project lives on (direct I/O needs a real
/// filesystem).
fn tempdir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

fn cfg(dir: &std::path::Path, tail_cache_bytes_max: u64) -> StoreConfig {
    StoreConfig {
        log: LogConfig {
            dir: dir.to_owned(),
            shard: 0,
            segment_bytes: SEGMENT,
            segment_bytes_min: 64 * 1024,
            disk_shards: 1,
            write_bytes_max: 16 * 1024,
            unawaited_write_delay: std::time::Duration::from_millis(1),
            pending_bytes_max: 1 << 20,
            unsynced_bytes_max: 128 * 1024,
        },
        tail_cache_bytes_max,
        checkpoint_interval: std::time::Duration::from_millis(20),
        zero_ahead: true,
        reserve_offsets_min: crate::storage::store::RESERVE_OFFSETS_MIN,
    }
}

fn io() -> UringIo {
    let tq = glommio::executor().current_task_queue();
    UringIo::new(crate::runtime::TaskQueues {
        data: tq,
        background: tq,
    })
}

/// Opens the store in `path` (after the direct-I/O probe) and starts it.
async fn open_started(
    path: &std::path::Path,
    tail_cache_bytes_max: u64,
) -> (Rc<QueueStore<UringIo>>, RecoveryReport) {
    crate::runtime::probe_direct_io(path).await.unwrap();
    let (store, report) = QueueStore::open(io(), cfg(path, tail_cache_bytes_max))
        .await
        .unwrap();
    store.start();
    (store, report)
}

/// Waits until the store takes the batch, then appends it.
async fn append_now(
    store: &QueueStore<UringIo>,
    queue: u32,
    b: &Bytes,
    h: &BatchHeader,
    level: Durability,
) -> AppendReceipt {
    store
        .wait_appendable(b.len() as u64, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    store
        .append(QueueId(queue), b, h, batch::summary(b), level)
        .unwrap()
}

/// Recovers `path` again (the store closed) on a fresh executor.
fn recover_again(
    path: &std::path::Path,
) -> (Vec<crate::storage::BatchEntry>, RecoveryReport, Checkpoint) {
    let p = path.to_owned();
    let out = std::sync::Arc::new(std::sync::Mutex::new(None));
    let o = out.clone();
    run(move || async move {
        let r = recover(
            &io(),
            &RecoveryConfig {
                dir: p,
                shard: 0,
                unsynced_bytes_max: 128 * 1024,
            },
        )
        .await
        .unwrap();
        *o.lock().unwrap() = Some((r.batches, r.report, r.checkpoint));
    });
    let v = out.lock().unwrap().take().unwrap();
    v
}

#[test]
fn appends_roll_segments_and_recover_exactly() {
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, report) = open_started(&path, 8 * 1024).await;
        assert_eq!(report.batches, 0);
        store.ensure_queue(QueueId(1));
        store.ensure_queue(QueueId(2));
        let mut last = None;
        for i in 0..120 {
            let q = 1 + (i % 2);
            let (b, h) = produced(&format!("b{i}"), 3, 300);
            let level =
                [Durability::Memory, Durability::Written, Durability::Fsync][i as usize % 3];
            store
                .wait_appendable(b.len() as u64, std::time::Duration::from_secs(5))
                .await
                .unwrap();
            let r = store
                .append(QueueId(q), &b, &h, batch::summary(&b), level)
                .unwrap();
            assert_eq!(r.base_offset, QueueOffset((i / 2) as u64 * 3));
            store.wait_durable(&r, level).await.unwrap();
            store.publish(&r);
            last = Some(r);
        }
        let last = last.unwrap();
        store.wait_durable(&last, Durability::Fsync).await.unwrap();
        let segments = store.log().segments();
        assert!(segments.len() >= 2, "tiny segments must roll: {segments:?}");
        assert!(
            segments
                .windows(2)
                .all(|w| w[1].base == w[0].base + SEGMENT),
            "{segments:?}"
        );
        assert!(segments.iter().all(|s| s.capacity == SEGMENT));
        assert_eq!(
            store.offsets(QueueId(1)).unwrap(),
            QueueOffsets {
                earliest: 0,
                latest: 180
            }
        );

        // Old batches come back from disk (the 8 KiB tail cache holds few).
        let (_, batches) = store
            .read(QueueId(1), QueueOffset(0), 1 << 20)
            .await
            .unwrap();
        let total: u64 = batches
            .iter()
            .map(|b| u64::from(BatchHeader::parse(b).unwrap().record_count))
            .sum();
        assert_eq!(total, 180);
        let first = RecordIter::new(&batches[0]).next().unwrap().unwrap();
        assert!(first.payload.starts_with(b"b0-0-"));
        let h = BatchHeader::parse(&batches[1]).unwrap();
        let again = store.batch_at(LogPosition(h.log_position)).await.unwrap();
        assert_eq!(again, batches[1]);
        assert!(
            store
                .batch_at(LogPosition(h.log_position + 1))
                .await
                .is_err(),
            "a position inside a batch is no message"
        );
        assert!(matches!(
            store.read(QueueId(1), QueueOffset(181), 100).await,
            Err(StoreError::OffsetOutOfRange { .. })
        ));
        store.close().await.unwrap();
    });
    let (batches, report, checkpoint) = recover_again(dir.path());
    assert_eq!(batches.len(), 120);
    assert!(report.torn.is_none());
    assert!(report.corrupt.is_empty());
    assert!(
        report.snapshot_batches > 0,
        "sealed segments come from snapshots: {report}"
    );
    assert_eq!(checkpoint.queues.get(&2).map(|q| q.next_offset), Some(180));
    assert_eq!(checkpoint.clean_end, Some(batches.last().unwrap().end()));
    // Every batch sits where its header says.
    assert!(batches.windows(2).all(|w| w[0].end() <= w[1].position));
}

#[test]
fn visibility_waits_for_the_durability_level() {
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, _) = open_started(&path, 1 << 20).await;
        store.ensure_queue(QueueId(7));
        let (b, h) = produced("v", 2, 10);
        store
            .wait_appendable(b.len() as u64, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let r = store
            .append(QueueId(7), &b, &h, batch::summary(&b), Durability::Fsync)
            .unwrap();
        // Appended but not published: consumers see nothing yet.
        assert_eq!(store.offsets(QueueId(7)).unwrap().latest, 0);
        let (_, none) = store
            .read(QueueId(7), QueueOffset(0), 1 << 20)
            .await
            .unwrap();
        assert!(none.is_empty());
        store.wait_durable(&r, Durability::Fsync).await.unwrap();
        assert!(store.log().synced_position() >= r.end_position.0);
        store.publish(&r);
        assert_eq!(store.offsets(QueueId(7)).unwrap().latest, 2);
        // A long poll at the tail wakes on the next publish.
        let s = store.clone();
        let waiter = glommio::spawn_local(async move {
            s.wait_visible(
                QueueId(7),
                QueueOffset(2),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
            s.offsets(QueueId(7)).unwrap().latest
        });
        let (b, h) = produced("w", 1, 10);
        let r = store
            .append(QueueId(7), &b, &h, batch::summary(&b), Durability::Fsync)
            .unwrap();
        store.wait_durable(&r, Durability::Fsync).await.unwrap();
        store.publish(&r);
        assert_eq!(waiter.await, 3);
        assert_eq!(
            store.offset_for_time(QueueId(7), 0).unwrap(),
            QueueOffset(0)
        );
        assert_eq!(
            store.offset_for_time(QueueId(7), i64::MAX).unwrap(),
            QueueOffset(3)
        );
        store.close().await.unwrap();
        assert!(
            store
                .append(QueueId(7), &b, &h, batch::summary(&b), Durability::Fsync)
                .is_err(),
            "a closed store takes no appends"
        );
    });
}

#[test]
fn retention_removes_segments_and_trims_indexes() {
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, _) = open_started(&path, 4096).await;
        store.ensure_queue(QueueId(1));
        let mut last = None;
        for i in 0..200 {
            let (b, h) = produced(&format!("r{i}"), 2, 400);
            store
                .wait_appendable(b.len() as u64, std::time::Duration::from_secs(5))
                .await
                .unwrap();
            let r = store
                .append(QueueId(1), &b, &h, batch::summary(&b), Durability::Written)
                .unwrap();
            store.wait_durable(&r, Durability::Written).await.unwrap();
            store.publish(&r);
            last = Some(r);
        }
        let last = last.unwrap();
        let before = store.log().segments().len();
        let policy = RetentionPolicy {
            retention_ms: 0,
            retention_bytes: 2 * SEGMENT,
        };
        let deleted = store
            .apply_retention(policy, LogPosition(u64::MAX))
            .await
            .unwrap();
        assert_eq!(deleted, before - 2);
        assert_eq!(store.log().segments().len(), 2);
        let o = store.offsets(QueueId(1)).unwrap();
        assert!(o.earliest > 0);
        assert_eq!(o.latest, 400);
        assert!(matches!(
            store.read(QueueId(1), QueueOffset(0), 100).await,
            Err(StoreError::OffsetOutOfRange { .. })
        ));
        let (_, batches) = store
            .read(QueueId(1), QueueOffset(o.earliest), 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            BatchHeader::parse(&batches[0]).unwrap().base_offset,
            o.earliest
        );
        // Nothing was ever synced (written level), yet no handle may keep a
        // deleted segment open: its space must come back to the disk (an
        // index snapshot write in flight may hold one until it completes).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            let held: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
                .map(|p| p.display().to_string())
                .filter(|p| p.starts_with(&*path.to_string_lossy()) && p.ends_with("(deleted)"))
                .collect();
            if held.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "deleted segments still open: {held:?}"
            );
        }
        store.close().await.unwrap();
        let _ = last;
    });
    let (batches, report, _) = recover_again(dir.path());
    assert_eq!(report.segments, 2);
    assert_eq!(batches.last().unwrap().base_offset + 2, 400);
}

#[test]
fn unawaited_appends_are_written_without_anyone_asking() {
    // Memory-level appends wait for company before they are written, but
    // not forever: with no waiter, no close and no more appends, they still
    // reach the disk.
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, _) = open_started(&path, 1 << 20).await;
        store.ensure_queue(QueueId(1));
        let (b, h) = produced("m", 2, 50);
        store
            .wait_appendable(b.len() as u64, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let r = store
            .append(QueueId(1), &b, &h, batch::summary(&b), Durability::Memory)
            .unwrap();
        let t0 = std::time::Instant::now();
        while store.log().written_position() < r.end_position.0 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "an unawaited append was never written"
            );
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        // And a waiter gets its write without the delay's help.
        let r2 = store
            .append(QueueId(1), &b, &h, batch::summary(&b), Durability::Written)
            .unwrap();
        store.wait_durable(&r2, Durability::Written).await.unwrap();
        assert!(store.log().written_position() >= r2.end_position.0);
        store.close().await.unwrap();
    });
}

#[test]
fn producers_that_outrun_the_disk_wait_within_the_pending_bound() {
    // Memory-level appends nobody waits on, far faster than the disk: the
    // log never holds more than `pending_bytes_max` unwritten.
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, _) = open_started(&path, 64 * 1024).await;
        store.ensure_queue(QueueId(1));
        let (b, h) = produced("p", 20, 1000); // ~20 KiB
        let mut waited = 0;
        let mut max_pending = 0;
        for _ in 0..400 {
            if !matches!(
                store.log().admission(b.len() as u64),
                crate::storage::commit_log::Admission::Now
            ) {
                waited += 1;
            }
            store
                .wait_appendable(b.len() as u64, std::time::Duration::from_secs(10))
                .await
                .unwrap();
            store
                .append(QueueId(1), &b, &h, batch::summary(&b), Durability::Memory)
                .unwrap();
            max_pending = max_pending.max(store.log().pending_bytes());
        }
        assert!(
            max_pending <= 1 << 20,
            "pending {max_pending} over the bound"
        );
        assert!(waited > 0, "the producer never had to wait");
        assert!(store.tail_cache_bytes() <= (1 << 20) + 64 * 1024 + b.len() as u64);
        store.close().await.unwrap();
    });
}

#[test]
fn a_forged_position_is_refused_after_one_header_read() {
    // A payload holding a perfect-looking batch header that claims 512 MiB:
    // `batch_at` on its position reads the 80-byte header, fails the MAC,
    // and never reads (or allocates) the claimed length.
    let dir = tempdir();
    let path = dir.path().to_owned();
    run(move || async move {
        let (store, _) = open_started(&path, 4096).await;
        store.ensure_queue(QueueId(1));
        let mut fake = vec![0u8; 80];
        fake[4..8].copy_from_slice(&(512u32 << 20).to_le_bytes());
        fake[8..10].copy_from_slice(&crate::batch::BATCH_MAGIC.to_le_bytes());
        fake[10] = 1;
        let mut bb = BatchBuilder::new();
        bb.push(&Record::new(Bytes::from(fake)));
        let b = bb.finish();
        let h = batch::validate_produced(&b, 1 << 20).unwrap();
        let r = append_now(&store, 1, &b, &h, Durability::Fsync).await;
        store.wait_durable(&r, Durability::Fsync).await.unwrap();
        store.publish(&r);
        // Push the batch out of the 4 KiB tail cache.
        for i in 0..20 {
            let (b, h) = produced(&format!("f{i}"), 3, 300);
            let r = append_now(&store, 1, &b, &h, Durability::Fsync).await;
            store.wait_durable(&r, Durability::Fsync).await.unwrap();
            store.publish(&r);
        }
        let forged = LogPosition(r.end_position.0 - 80);
        let t0 = std::time::Instant::now();
        assert!(matches!(
            store.batch_at(forged).await,
            Err(StoreError::Log(LogError::NotFound(_)))
        ));
        assert!(t0.elapsed() < std::time::Duration::from_millis(100));
        assert_eq!(store.batch_at(r.position).await.unwrap().len(), b.len());
        store.close().await.unwrap();
    });
}
