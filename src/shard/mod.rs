//! One core's world: its queues (through the [`QueueStore`]), its copy of
//! the metadata, its end of the mesh to the other shards, its metrics and
//! consumer-group offsets, and its background work. A `Shard` lives on one
//! executor and is shared there through `Rc`; nothing in it is `Send`.

pub mod group_offsets;
pub mod mesh;
pub mod metadata;
pub mod metrics;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::runtime::{self, Semaphore, TaskQueues};
use crate::storage::retention::RetentionPolicy;
use crate::storage::{LogConfig, QueueStore, StoreConfig, UringIo};
use group_offsets::{GroupOffsets, GROUP_OFFSETS_FILE};
use mesh::{Mesh, MeshEnds, MeshMsg};
use metadata::Metadata;
use metrics::ShardMetrics;

/// Everything a shard needs to start, moved into its thread.
pub struct ShardSpec {
    pub id: u16,
    pub shard_count: u16,
    pub config: Arc<Config>,
    pub listen: SocketAddr,
    pub metadata: Metadata,
    pub mesh: MeshEnds,
    /// Reports startup success (the recovery line) or failure.
    pub ready: std::sync::mpsc::Sender<Result<String, String>>,
    /// Set by the signal handler; every shard polls it.
    pub shutdown: Arc<AtomicBool>,
}

/// One shard's state, shared by its tasks.
pub struct Shard {
    pub id: u16,
    pub shard_count: u16,
    pub config: Arc<Config>,
    pub tq: TaskQueues,
    pub data_dir: PathBuf,
    pub dir: PathBuf,
    pub metadata: RefCell<Metadata>,
    pub store: Rc<QueueStore<UringIo>>,
    pub mesh: Mesh,
    pub metrics: RefCell<ShardMetrics>,
    pub groups: RefCell<GroupOffsets>,
    /// Serialises metadata changes on shard 0 (persist + broadcast).
    pub meta_lock: Semaphore,
    /// Next queue for produce requests that name neither queue nor key.
    pub round_robin: Cell<u32>,
    pub stopping: Cell<bool>,
}

impl Shard {
    /// Replaces the metadata copy and creates or removes the queues this
    /// shard owns accordingly.
    pub fn apply_metadata(&self, new: Metadata) {
        let owned = new.queues_of_shard(self.id);
        for &q in &owned {
            self.store.ensure_queue(q);
        }
        for q in self.store.queue_ids() {
            if !owned.contains(&q) {
                self.store.remove_queue(q);
                self.groups.borrow_mut().remove_queue(q);
            }
        }
        *self.metadata.borrow_mut() = new;
    }

    async fn flush_group_offsets(&self) {
        let Some(doc) = self.groups.borrow_mut().take_dirty_snapshot() else {
            return;
        };
        let dir = self.dir.clone();
        let res = runtime::blocking(move || {
            crate::storage::write_atomic(&dir, GROUP_OFFSETS_FILE, doc.as_bytes())
        })
        .await;
        if let Err(e) = res {
            tracing::warn!(shard = self.id, "cannot store group offsets: {e}");
            self.groups.borrow_mut().mark_dirty();
        }
    }

    /// Periodic group-offset flushes and retention (the store's own keeper
    /// stores checkpoints and index snapshots).
    async fn background(self: Rc<Self>) {
        let s = &self.config.storage;
        let flush_every = Duration::from_millis(s.checkpoint_interval_ms);
        let retention_every = Duration::from_millis(s.retention_check_interval_ms);
        let policy = RetentionPolicy {
            retention_ms: s.retention_ms,
            retention_bytes: s.retention_bytes,
        };
        let mut since_retention = Duration::ZERO;
        while !self.stopping.get() {
            runtime::sleep(flush_every).await;
            if self.stopping.get() {
                break;
            }
            self.flush_group_offsets().await;
            since_retention += flush_every;
            if since_retention >= retention_every {
                since_retention = Duration::ZERO;
                match self.store.apply_retention(policy).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(shard = self.id, "retention deleted {n} segments"),
                    Err(e) => tracing::warn!(shard = self.id, "retention failed: {e}"),
                }
            }
        }
    }
}

/// Runs one shard until shutdown. Called on the shard's executor.
pub async fn run(spec: ShardSpec, tq: TaskQueues) -> Result<(), String> {
    let ready = spec.ready.clone();
    match start(spec, tq).await {
        Ok((shard, shutdown)) => {
            serve_until_shutdown(shard, shutdown).await;
            Ok(())
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            Err(e)
        }
    }
}

async fn start(spec: ShardSpec, tq: TaskQueues) -> Result<(Rc<Shard>, Arc<AtomicBool>), String> {
    let id = spec.id;
    let cfg = spec.config.clone();
    let data_dir = cfg.broker.data_dir.clone();
    let dir = data_dir.join(format!("shard-{id}"));
    let store_cfg = StoreConfig {
        log: LogConfig {
            dir: dir.clone(),
            shard: id,
            segment_bytes: cfg.storage.segment_bytes_max,
            segment_bytes_min: cfg.segment_bytes_min(),
            disk_shards: spec.shard_count,
            write_bytes_max: u64::from(cfg.storage.write_bytes_max),
            unawaited_write_delay: Duration::from_micros(cfg.storage.memory_write_delay_us),
            pending_bytes_max: cfg.storage.memory_pending_bytes_max,
            unsynced_bytes_max: cfg.unsynced_bytes_max(),
        },
        tail_cache_bytes_max: cfg.storage.tail_cache_bytes_max,
        checkpoint_interval: Duration::from_millis(cfg.storage.checkpoint_interval_ms),
        zero_ahead: true,
        reserve_offsets_min: crate::storage::store::RESERVE_OFFSETS_MIN,
    };
    runtime::blocking({
        let d = dir.clone();
        move || std::fs::create_dir_all(d)
    })
    .await
    .map_err(|e| format!("shard {id}: cannot create {}: {e}", dir.display()))?;
    tracing::debug!(shard = id, "startup: directory ready");
    runtime::probe_direct_io(&dir).await.map_err(|e| {
        format!(
            "shard {id}: direct I/O does not work in {} ({e}); put the data directory on a local disk filesystem such as ext4 or xfs",
            dir.display()
        )
    })?;
    tracing::debug!(shard = id, "startup: direct I/O probed");
    let (store, report) = QueueStore::open(UringIo::new(tq), store_cfg)
        .await
        .map_err(|e| format!("shard {id}: {e}"))?;
    let recovery_line = format!("shard {id} recovery: {report}");
    tracing::info!("{recovery_line}");
    let d = dir.clone();
    let groups = runtime::blocking(move || GroupOffsets::load(&d))
        .await
        .map_err(|e| format!("shard {id}: {e}"))?;
    tracing::debug!(shard = id, "startup: group offsets loaded");
    let (mesh, receivers) = Mesh::connect(id, spec.mesh).await;
    tracing::debug!(shard = id, "startup: mesh connected");
    store.start();
    let shard = Rc::new(Shard {
        id,
        shard_count: spec.shard_count,
        config: cfg.clone(),
        tq,
        data_dir,
        dir,
        metadata: RefCell::new(Metadata::new(spec.shard_count)),
        store,
        mesh,
        metrics: RefCell::new(ShardMetrics::default()),
        groups: RefCell::new(groups),
        meta_lock: Semaphore::new(1),
        round_robin: Cell::new(id as u32),
        stopping: Cell::new(false),
    });
    shard.apply_metadata(spec.metadata);
    let listener = runtime::bind_listener(spec.listen)
        .map_err(|e| format!("shard {id}: cannot listen on {}: {e}", spec.listen))?;
    for (peer, rx) in receivers {
        let s = shard.clone();
        runtime::spawn_local_into(mesh_receive_loop(s, peer, rx), tq.data)
            .expect("data queue")
            .detach();
    }
    let s = shard.clone();
    runtime::spawn_local_into(crate::broker::connection::accept_loop(s, listener), tq.data)
        .expect("data queue")
        .detach();
    let s = shard.clone();
    runtime::spawn_local_into(s.background(), tq.background)
        .expect("background queue")
        .detach();
    let _ = spec.ready.send(Ok(recovery_line));
    Ok((shard, spec.shutdown))
}

async fn serve_until_shutdown(shard: Rc<Shard>, shutdown: Arc<AtomicBool>) {
    while !shutdown.load(Ordering::Relaxed) {
        runtime::sleep(Duration::from_millis(20)).await;
    }
    shard.stopping.set(true);
    tracing::info!(shard = shard.id, "stopping: finishing writes");
    if let Err(e) = shard.store.close().await {
        tracing::error!(shard = shard.id, "close failed: {e}");
    }
    shard.flush_group_offsets().await;
    shard.mesh.close();
    tracing::info!(shard = shard.id, "stopped");
}

async fn mesh_receive_loop(shard: Rc<Shard>, peer: u16, rx: runtime::ConnectedReceiver<MeshMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            MeshMsg::Reply { id, code, body } => shard.mesh.complete(id, code, body),
            MeshMsg::Adopt { fd, buffered } => {
                crate::broker::connection::adopt(&shard, fd, buffered)
            }
            MeshMsg::Request {
                from,
                id,
                op,
                queue,
                body,
            } => {
                debug_assert_eq!(from, peer);
                // The synchronous part (a produce's append) runs here, in
                // arrival order; only the wait and the reply are spawned.
                let pending =
                    crate::broker::handlers::execute_local(&shard, op, queue, body, true).await;
                let s = shard.clone();
                runtime::spawn_local_into(
                    async move {
                        let reply = pending.resolve().await;
                        let _ = s.mesh.reply(from, id, reply.code as u16, reply.body).await;
                    },
                    shard.tq.data,
                )
                .expect("data queue")
                .detach();
            }
        }
    }
}
