//! One core's world: its queues (through the [`QueueStore`]), its copy of
//! the metadata, its end of the mesh to the other shards, its metrics and
//! consumer-group state, and its background work. A `Shard` lives on one
//! executor and is shared there through `Rc`; nothing in it is `Send`.
//!
//! The shard knows nothing of connections or request handling: the broker
//! starts it ([`start`]), then runs its accept loop and mesh receivers on
//! it, and stops it ([`Shard::stop`]).

pub mod groups;
pub mod mesh;
pub mod metadata;
pub mod metrics;
pub mod timer;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::runtime::{self, Semaphore, TaskQueues};
use crate::storage::retention::RetentionPolicy;
use crate::storage::{LogConfig, QueueStore, StoreConfig, UringIo};
use groups::GroupEngine;
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
    pub groups: GroupEngine,
    /// Scheduled messages of the queues this shard owns.
    pub timer: timer::TimerEngine,
    /// Serialises metadata changes on shard 0 (persist + broadcast).
    pub meta_lock: Semaphore,
    /// Next queue for produce requests that name neither queue nor key.
    pub round_robin: Cell<u32>,
    pub stopping: Cell<bool>,
    /// Parsed group subscription filters, by (group, topic); at most
    /// `FILTER_CACHE_ENTRIES_MAX` (broker::handlers).
    #[allow(clippy::type_complexity)]
    pub filters: RefCell<
        std::collections::HashMap<
            (crate::ids::GroupId, String),
            Option<Rc<crate::filter::MessageFilter>>,
        >,
    >,
}

impl Shard {
    /// Replaces the metadata copy and creates or removes the queues this
    /// shard owns accordingly, and the consumer-group state with them.
    pub fn apply_metadata(&self, new: Metadata) {
        let owned = new.queues_of_shard(self.id);
        for &q in &owned {
            self.store.ensure_queue(q);
        }
        for q in self.store.queue_ids() {
            if q != crate::ids::GROUP_JOURNAL_QUEUE
                && q != crate::ids::TIMER_QUEUE
                && !owned.contains(&q)
            {
                self.store.remove_queue(q);
            }
        }
        let old = std::mem::replace(&mut *self.metadata.borrow_mut(), new);
        self.groups
            .sync_metadata(&self.store, Some(&old), &self.metadata.borrow(), self.id);
    }

    /// Retention and group-journal generations.
    pub async fn background(self: Rc<Self>) {
        let s = &self.config.storage;
        let tick = Duration::from_millis(s.checkpoint_interval_ms);
        let retention_every = Duration::from_millis(s.retention_check_interval_ms);
        let policy = RetentionPolicy {
            retention_ms: s.retention_ms,
            retention_bytes: s.retention_bytes,
        };
        let mut since_retention = Duration::ZERO;
        while !self.stopping.get() {
            runtime::sleep(tick).await;
            if self.stopping.get() {
                break;
            }
            if let Err(e) = self.groups.maybe_write_generation(&self.store).await {
                tracing::warn!(shard = self.id, "group journal generation failed: {e}");
            }
            if let Err(e) = self.timer.maybe_write_generation(&self.store).await {
                tracing::warn!(shard = self.id, "timer generation failed: {e}");
            }
            since_retention += tick;
            if since_retention >= retention_every {
                since_retention = Duration::ZERO;
                if let Err(e) = self.groups.refresh_pin(&self.store).await {
                    tracing::warn!(shard = self.id, "group journal generation failed: {e}");
                }
                let mut pin = self.groups.retention_pin();
                if let Some(cutoff) = self.store.retention_cutoff(policy) {
                    // Scheduled messages stored there are carried first;
                    // what the timer still needs stays.
                    match self.timer.prepare_retention(&self.store, cutoff).await {
                        Ok(Some(p)) => pin = pin.min(crate::ids::LogPosition(p)),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(shard = self.id, "timer: retention waits: {e}");
                            continue;
                        }
                    }
                }
                match self.store.apply_retention(policy, pin).await {
                    Ok(0) => {}
                    Ok(n) => {
                        if let Some(first) = self.store.log().segments().first() {
                            self.timer.removed_below(first.base);
                        }
                        tracing::info!(shard = self.id, "retention deleted {n} segments")
                    }
                    Err(e) => tracing::warn!(shard = self.id, "retention failed: {e}"),
                }
            }
        }
    }

    /// Stops: finishes the log's writes and closes the mesh.
    pub async fn stop(&self) {
        self.stopping.set(true);
        tracing::info!(shard = self.id, "stopping: finishing writes");
        if let Err(e) = self.store.close().await {
            tracing::error!(shard = self.id, "close failed: {e}");
        }
        self.mesh.close();
        tracing::info!(shard = self.id, "stopped");
    }
}

/// A started shard, for the broker to serve on.
pub struct Started {
    pub shard: Rc<Shard>,
    pub listener: runtime::TcpListener,
    pub receivers: Vec<(u16, runtime::ConnectedReceiver<MeshMsg>)>,
    pub ready: std::sync::mpsc::Sender<Result<String, String>>,
    pub recovery_line: String,
    pub shutdown: Arc<AtomicBool>,
}

/// Opens the shard's storage (recovery, then the group state) and its
/// listener; nothing is served yet.
pub async fn start(spec: ShardSpec, tq: TaskQueues) -> Result<Started, String> {
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
    store.start();
    for q in spec.metadata.queues_of_shard(id) {
        store.ensure_queue(q);
    }
    let (groups, group_report) = GroupEngine::recover(
        &store,
        &dir,
        &spec.metadata,
        id,
        cfg.limits.batch_bytes_max as usize,
    )
    .await
    .map_err(|e| format!("shard {id}: {e}"))?;
    let (timer, timer_report) = timer::TimerEngine::recover(
        &store,
        &spec.metadata,
        id,
        cfg.limits.batch_bytes_max as usize,
        cfg.limits.schedule_delay_ms_max,
        cfg.limits.scheduled_messages_max,
    )
    .await
    .map_err(|e| format!("shard {id}: {e}"))?;
    let recovery_line = format!("shard {id} recovery: {report}; {group_report}; {timer_report}");
    tracing::info!("{recovery_line}");
    let (mesh, receivers) = Mesh::connect(id, spec.mesh).await;
    tracing::debug!(shard = id, "startup: mesh connected");
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
        groups,
        timer,
        meta_lock: Semaphore::new(1),
        round_robin: Cell::new(id as u32),
        stopping: Cell::new(false),
        filters: Default::default(),
    });
    shard.apply_metadata(spec.metadata);
    let listener = runtime::bind_listener(spec.listen)
        .map_err(|e| format!("shard {id}: cannot listen on {}: {e}", spec.listen))?;
    Ok(Started {
        shard,
        listener,
        receivers,
        ready: spec.ready,
        recovery_line,
        shutdown: spec.shutdown,
    })
}
