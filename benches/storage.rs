//! Hot-path micro-benchmarks that need the runtime: consume-index lookup,
//! commit-log append through to the O_DIRECT write, and the cross-shard
//! hand-off (a request and its reply over the mesh between two pinned
//! executors). `cargo bench --bench storage`.
//!
//! Each runtime benchmark runs on its own glommio executor thread; criterion
//! asks it for `iters` operations over a std channel and gets back the time
//! they took, measured on the executor.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutorBuilder;
use keelmq::batch::{validate_produced, BatchBuilder, Record};
use keelmq::ids::QueueId;
use keelmq::protocol::Durability;
use keelmq::shard::mesh::{build_mesh, Mesh, MeshMsg};
use keelmq::storage::consume_index::{ConsumeIndex, IndexEntry};
use keelmq::storage::{LogConfig, QueueStore, StoreConfig, UringIo};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// glommio io memory per benchmark executor (fits `ulimit -l` of 8 MiB).
const IO_MEMORY_BYTES: usize = 1 << 20;

fn index_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("index");
    for &entries in &[1_000u64, 1_000_000] {
        let mut idx = ConsumeIndex::default();
        for i in 0..entries {
            idx.push(IndexEntry {
                base_offset: i * 10,
                position: i * 4096,
                len: 4096,
                count: 10,
                tags: 0,
                view_len: 0,
            });
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        g.bench_function(BenchmarkId::new("find", entries), |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                black_box(idx.find(x % (entries * 10)))
            })
        });
    }
    g.finish();
}

/// A glommio executor thread that runs `iters` operations on request.
struct Driver {
    tx: mpsc::Sender<u64>,
    rx: mpsc::Receiver<Duration>,
}

impl Driver {
    fn measure(&self, iters: u64) -> Duration {
        self.tx.send(iters).unwrap();
        self.rx.recv().unwrap()
    }
}

fn produced(records: usize, size: usize) -> (Bytes, keelmq::batch::BatchHeader) {
    let mut b = BatchBuilder::new();
    for _ in 0..records {
        b.push(&Record::new(vec![b'x'; size]));
    }
    let bytes = b.finish();
    let h = validate_produced(&bytes, 64 << 20).unwrap();
    (bytes, h)
}

/// A store on real DMA files; each request appends `iters` batches of
/// `records` × 100 B and waits until the last one is written.
fn log_driver(records: usize, wait_each: bool) -> Driver {
    let (tx, jobs) = mpsc::channel::<u64>();
    let (done, rx) = mpsc::channel::<Duration>();
    std::thread::spawn(move || {
        LocalExecutorBuilder::default()
            .io_memory(IO_MEMORY_BYTES)
            .spawn(move || async move {
                let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
                std::fs::create_dir_all(base).unwrap();
                let dir = tempfile::tempdir_in(base).unwrap();
                keelmq::runtime::probe_direct_io(dir.path()).await.unwrap();
                let cfg = StoreConfig {
                    log: LogConfig {
                        dir: dir.path().to_owned(),
                        shard: 0,
                        segment_bytes: 256 << 20,
                        segment_bytes_min: 1 << 20,
                        disk_shards: 1,
                        write_bytes_max: 1 << 20,
                        unawaited_write_delay: Duration::from_millis(1),
                        pending_bytes_max: 64 << 20,
                        unsynced_bytes_max: 32 << 20,
                    },
                    tail_cache_bytes_max: 64 << 20,
                    checkpoint_interval: Duration::from_secs(1),
                    zero_ahead: true,
                    reserve_offsets_min: keelmq::storage::store::RESERVE_OFFSETS_MIN,
                };
                let tq = glommio::executor().current_task_queue();
                let io = UringIo::new(keelmq::runtime::TaskQueues {
                    data: tq,
                    background: tq,
                });
                let (store, _) = QueueStore::open(io, cfg).await.unwrap();
                store.start();
                store.ensure_queue(QueueId(1));
                let (batch, header) = produced(records, 100);
                while let Ok(iters) = jobs.recv() {
                    let t = Instant::now();
                    let mut last = None;
                    for _ in 0..iters {
                        store
                            .wait_appendable(batch.len() as u64, Duration::from_secs(10))
                            .await
                            .unwrap();
                        let r = store
                            .append(
                                QueueId(1),
                                &batch,
                                &header,
                                keelmq::batch::Summary::NONE,
                                Durability::Written,
                            )
                            .unwrap();
                        if wait_each {
                            store.wait_durable(&r, Durability::Written).await.unwrap();
                        }
                        last = Some(r);
                    }
                    if let Some(r) = last {
                        store.wait_durable(&r, Durability::Written).await.unwrap();
                    }
                    if done.send(t.elapsed()).is_err() {
                        break;
                    }
                }
                store.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    });
    Driver { tx, rx }
}

fn log_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("log");
    // Every sample writes to disk: keep the runs (and the bytes) short.
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &(records, wait_each) in &[(1usize, true), (1, false), (1000, false)] {
        let d = log_driver(records, wait_each);
        g.throughput(Throughput::Elements(records as u64));
        let name = if wait_each {
            "append_then_written_each"
        } else {
            "append_pipelined_written"
        };
        g.bench_function(BenchmarkId::new(name, format!("{records}x100B")), |b| {
            b.iter_custom(|iters| d.measure(iters))
        });
    }
    g.finish();
}

/// Two pinned executors joined by the broker's mesh; shard 1 answers every
/// request; each request to shard 0's driver does `iters` round trips.
fn mesh_driver() -> Driver {
    let (tx, jobs) = mpsc::channel::<u64>();
    let (done, rx) = mpsc::channel::<Duration>();
    let mut ends = build_mesh(2).into_iter();
    let (end0, end1) = (ends.next().unwrap(), ends.next().unwrap());
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let placement = |i: usize| match cores.get(i % cores.len().max(1)) {
        Some(c) if cores.len() > 1 => glommio::Placement::Fixed(c.id),
        _ => glommio::Placement::Unbound,
    };
    LocalExecutorBuilder::new(placement(1))
        .io_memory(IO_MEMORY_BYTES)
        .spin_before_park(Duration::from_millis(10))
        .spawn(move || async move {
            let (mesh, mut rxs) = Mesh::connect(1, end1).await;
            let (_, rx) = rxs.pop().unwrap();
            while let Some(msg) = rx.recv().await {
                if let MeshMsg::Request { from, id, body, .. } = msg {
                    if mesh.reply(from, id, 0, vec![body]).await.is_err() {
                        break;
                    }
                }
            }
        })
        .unwrap();
    LocalExecutorBuilder::new(placement(0))
        .io_memory(IO_MEMORY_BYTES)
        .spin_before_park(Duration::from_millis(10))
        .spawn(move || async move {
            let (mesh, mut rxs) = Mesh::connect(0, end0).await;
            let mesh = std::rc::Rc::new(mesh);
            let (_, rx) = rxs.pop().unwrap();
            let m = mesh.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    if let MeshMsg::Reply { id, code, body } = msg {
                        m.complete(id, code, body);
                    }
                }
            })
            .detach();
            let body = Bytes::from(vec![7u8; 100]);
            while let Ok(iters) = jobs.recv() {
                let t = Instant::now();
                for _ in 0..iters {
                    let reply = mesh.request(1, 0, None, body.clone()).await.unwrap();
                    black_box(reply.await.unwrap());
                }
                if done.send(t.elapsed()).is_err() {
                    break;
                }
            }
            mesh.close();
        })
        .unwrap();
    Driver { tx, rx }
}

fn cross_shard(c: &mut Criterion) {
    let d = mesh_driver();
    let mut g = c.benchmark_group("mesh");
    g.bench_function("request_reply_round_trip", |b| {
        b.iter_custom(|iters| d.measure(iters))
    });
    g.finish();
}

criterion_group!(benches, index_lookup, log_append, cross_shard);
criterion_main!(benches);
