//! A simulated disk and the [`Io`] over it, for the storage simulation.
//!
//! Each file keeps what reads see (`data`) and what a power cut leaves
//! (`durable`). A write applies at its completion, after a random virtual
//! latency, so calls complete out of order; until a sync that *started*
//! after it covers it, it stays pending. At a crash:
//! - process crash: completed writes stay; a write in flight is lost
//!   whole, lands whole, or is torn at 512-byte sector granularity (each
//!   sector applied or not);
//! - power cut: every pending or in-flight write is torn the same way into
//!   the durable image, everything else is lost; a file's size and the
//!   namespace (creates, renames, removes) keep only what was synced, plus
//!   a random prefix of later namespace operations (a journaled filesystem
//!   commits metadata in order).
//!
//! Faults, at rates the scenario sets: EIO on any call; a failed sync
//! leaves each sector it covered either persisted or lost, and a lost one
//! reads back as it was before (direct I/O: reads show the medium, there is
//! no page cache to keep the new bytes), so a log that retried the sync
//! and acknowledged would lose what it acknowledged; ENOSPC when
//! allocations exceed the capacity; transient misdirected and bit-flipped
//! reads.

use bytes::Bytes;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use super::executor::Sim;
use crate::storage::io::{Io, IoBuffer, IoFailure, IoFile, IoKind, IoResult, TaskClass};

/// Size of the unit a crash tears writes at.
pub const SECTOR_BYTES: usize = 512;

/// Fault rates in per-mille of calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub write_eio: u32,
    /// A write fails with ENOSPC, writing nothing (space taken meanwhile by
    /// another file of the filesystem).
    pub write_nospace: u32,
    pub sync_eio: u32,
    pub read_eio: u32,
    /// A read returns the bytes of another page.
    pub read_misdirect: u32,
    /// A read returns one flipped bit.
    pub read_flip: u32,
    pub meta_eio: u32,
}

#[derive(Clone, Debug)]
struct PendingWrite {
    seq: u64,
    pos: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Completed writes not yet covered by a completed sync.
    pending: Vec<PendingWrite>,
    /// Writes issued, not completed.
    in_flight: BTreeMap<u64, PendingWrite>,
}

#[derive(Clone, Debug)]
enum NameOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

/// The simulated disk: inodes and a namespace.
#[derive(Default)]
pub struct DiskState {
    inodes: BTreeMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// Namespace operations since the last directory sync.
    name_log: Vec<NameOp>,
    next_inode: u64,
    next_seq: u64,
    /// Bytes all files may take together.
    pub capacity: u64,
    pub faults: Faults,
    /// Calls that failed, by kind (for the report).
    pub failed_calls: u64,
    /// Power cuts so far: the simulated kernel's boot id.
    pub boots: u64,
    /// Failed syncs that lost sectors of completed writes.
    pub lossy_syncs: u64,
    /// fdatasync calls, by file (for tests of who syncs how often).
    pub syncs: BTreeMap<PathBuf, u64>,
}

impl DiskState {
    fn used(&self) -> u64 {
        let live: std::collections::BTreeSet<u64> = self.names.values().copied().collect();
        live.iter()
            .map(|i| self.inodes.get(i).map_or(0, |n| n.data.len() as u64))
            .sum()
    }

    fn apply_name_op(names: &mut BTreeMap<PathBuf, u64>, op: &NameOp) {
        match op {
            NameOp::Link(p, i) => {
                names.insert(p.clone(), *i);
            }
            NameOp::Unlink(p) => {
                names.remove(p);
            }
            NameOp::Rename(a, b) => {
                if let Some(i) = names.remove(a) {
                    names.insert(b.clone(), i);
                }
            }
        }
    }
}

/// What kind of stop to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    Process,
    Power,
}

/// A shared simulated disk.
#[derive(Clone)]
pub struct SimDisk(pub Rc<RefCell<DiskState>>);

fn tear(rng: &mut super::executor::Rng, target: &mut Vec<u8>, w: &PendingWrite) {
    if target.len() < w.pos + w.data.len() {
        target.resize(w.pos + w.data.len(), 0);
    }
    // Lost whole (it never left the device's cache), landed whole, or torn
    // sector by sector, a third of the time each.
    let p_sector = match rng.below(3) {
        0 => 0,
        1 => 1000,
        _ => 500,
    };
    for (i, sector) in w.data.chunks(SECTOR_BYTES).enumerate() {
        if rng.chance(p_sector) {
            let at = w.pos + i * SECTOR_BYTES;
            target[at..at + sector.len()].copy_from_slice(sector);
        }
    }
}

impl SimDisk {
    /// An empty disk of `capacity` bytes.
    pub fn new(capacity: u64) -> SimDisk {
        SimDisk(Rc::new(RefCell::new(DiskState {
            capacity,
            next_inode: 1,
            ..DiskState::default()
        })))
    }

    /// Applies a crash of `kind` (call after [`Sim::crash`] dropped every
    /// task): what survives per the module docs.
    pub fn crash(&self, kind: CrashKind, rng: &mut super::executor::Rng) {
        let mut d = self.0.borrow_mut();
        let d = &mut *d;
        for inode in d.inodes.values_mut() {
            let in_flight: Vec<PendingWrite> =
                std::mem::take(&mut inode.in_flight).into_values().collect();
            match kind {
                CrashKind::Process => {
                    // In-flight writes land torn; everything stays pending.
                    for w in in_flight {
                        let before = inode.data.clone();
                        tear(rng, &mut inode.data, &w);
                        // What landed is a (partial) write that is pending.
                        let landed = w.pos..w.pos + w.data.len();
                        let mut applied = w.clone();
                        applied.data = inode.data[landed.clone()].to_vec();
                        if applied.data != before.get(landed).unwrap_or(&[]) {
                            inode.pending.push(applied);
                        }
                    }
                }
                CrashKind::Power => {
                    let mut all = std::mem::take(&mut inode.pending);
                    all.extend(in_flight);
                    all.sort_by_key(|w| w.seq);
                    let mut image = inode.durable.clone();
                    for w in &all {
                        tear(rng, &mut image, w);
                    }
                    // A file keeps its allocated size (fallocate was synced
                    // with its data, or the file is short: see `allocate`).
                    image.resize(inode.durable.len().max(image.len()), 0);
                    inode.data = image.clone();
                    inode.durable = image;
                }
            }
        }
        if kind == CrashKind::Power {
            d.boots += 1;
            let keep = if d.name_log.is_empty() {
                0
            } else {
                rng.below(d.name_log.len() as u64 + 1) as usize
            };
            let mut names = d.durable_names.clone();
            for op in &d.name_log[..keep] {
                DiskState::apply_name_op(&mut names, op);
            }
            d.names = names.clone();
            d.durable_names = names;
            d.name_log.clear();
        }
    }

    /// The bytes of `path` as reads see them (tests, bit rot).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let d = self.0.borrow();
        let i = d.names.get(path)?;
        Some(d.inodes[i].data.clone())
    }

    /// Flips a bit of `path` at `at` on the medium (durable and visible):
    /// damage at rest.
    pub fn rot(&self, path: &Path, at: usize, bit: u8) -> bool {
        let mut d = self.0.borrow_mut();
        let Some(&i) = d.names.get(path) else {
            return false;
        };
        let inode = d.inodes.get_mut(&i).unwrap();
        if at >= inode.data.len() || at >= inode.durable.len() {
            return false;
        }
        inode.data[at] ^= 1 << bit;
        inode.durable[at] ^= 1 << bit;
        for w in &mut inode.pending {
            if (w.pos..w.pos + w.data.len()).contains(&at) {
                w.data[at - w.pos] ^= 1 << bit;
            }
        }
        true
    }

    /// Debug view: each name's inode and how many of its bytes are
    /// non-zero now and durably.
    pub fn debug_names(&self) -> Vec<(PathBuf, u64, usize, usize, usize)> {
        let d = self.0.borrow();
        d.names
            .iter()
            .map(|(p, i)| {
                let n = &d.inodes[i];
                (
                    p.clone(),
                    *i,
                    n.data.iter().filter(|&&b| b != 0).count(),
                    n.durable.iter().filter(|&&b| b != 0).count(),
                    n.pending.len(),
                )
            })
            .collect()
    }

    /// Names in the namespace now.
    pub fn names(&self) -> Vec<PathBuf> {
        self.0.borrow().names.keys().cloned().collect()
    }
}

/// The [`Io`] of one simulated shard: the disk, the executor, its clock.
#[derive(Clone)]
pub struct SimIo {
    pub sim: Sim,
    pub disk: SimDisk,
    /// Virtual time 0 in Unix milliseconds.
    pub epoch_ms: i64,
}

/// A simulated aligned buffer.
pub struct SimBuffer(Vec<u8>);

impl IoBuffer for SimBuffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// An open simulated file.
pub struct SimFile {
    io: SimIo,
    inode: u64,
    path: PathBuf,
}

impl SimIo {
    async fn latency(&self) {
        let us = 1 + self.sim.rng().below(200);
        self.sim.sleep(Duration::from_micros(us)).await;
    }

    fn fault(&self, per_mille: u32) -> bool {
        per_mille > 0 && self.sim.rng().chance(per_mille)
    }

    fn eio(&self, op: &'static str, path: &Path) -> IoFailure {
        self.disk.0.borrow_mut().failed_calls += 1;
        IoFailure {
            op,
            path: path.display().to_string(),
            kind: IoKind::Device,
            errno: Some(libc::EIO),
            message: "Input/output error (simulated)".into(),
        }
    }

    fn nospace(&self, op: &'static str, path: &Path) -> IoFailure {
        self.disk.0.borrow_mut().failed_calls += 1;
        IoFailure {
            op,
            path: path.display().to_string(),
            kind: IoKind::NoSpace,
            errno: Some(libc::ENOSPC),
            message: "No space left on device (simulated)".into(),
        }
    }

    fn not_found(op: &'static str, path: &Path) -> IoFailure {
        IoFailure {
            op,
            path: path.display().to_string(),
            kind: IoKind::NotFound,
            errno: Some(libc::ENOENT),
            message: "No such file or directory (simulated)".into(),
        }
    }

    fn meta_faults(&self) -> u32 {
        self.disk.0.borrow().faults.meta_eio
    }

    fn log_name_op(&self, op: NameOp) {
        let mut d = self.disk.0.borrow_mut();
        DiskState::apply_name_op(&mut d.names, &op);
        d.name_log.push(op);
    }
}

impl IoFile for SimFile {
    type Buffer = SimBuffer;

    async fn write_at(&self, buf: SimBuffer, pos: u64) -> IoResult<usize> {
        assert_eq!(pos % 4096, 0, "unaligned write position");
        assert_eq!(buf.0.len() % 4096, 0, "unaligned write length");
        let (seq, eio, nospace) = {
            let mut d = self.io.disk.0.borrow_mut();
            let seq = d.next_seq;
            d.next_seq += 1;
            let (eio, nospace) = (d.faults.write_eio, d.faults.write_nospace);
            let inode = d.inodes.get_mut(&self.inode).expect("inode");
            inode.in_flight.insert(
                seq,
                PendingWrite {
                    seq,
                    pos: pos as usize,
                    data: buf.0.clone(),
                },
            );
            (seq, eio, nospace)
        };
        self.io.latency().await;
        if self.io.fault(nospace) {
            self.io
                .disk
                .0
                .borrow_mut()
                .inodes
                .get_mut(&self.inode)
                .expect("inode")
                .in_flight
                .remove(&seq);
            return Err(self.io.nospace("write", &self.path));
        }
        let failed = self.io.fault(eio);
        let mut d = self.io.disk.0.borrow_mut();
        let inode = d.inodes.get_mut(&self.inode).expect("inode");
        let mut w = inode.in_flight.remove(&seq).expect("write in flight");
        if failed {
            // A failed write may have written any of its sectors.
            let mut rng = self.io.sim.rng();
            tear(&mut rng, &mut inode.data, &w);
            w.data = inode.data[w.pos..w.pos + w.data.len()].to_vec();
            inode.pending.push(w);
            drop(d);
            return Err(self.io.eio("write", &self.path));
        }
        let end = w.pos + w.data.len();
        if inode.data.len() < end {
            inode.data.resize(end, 0);
        }
        inode.data[w.pos..end].copy_from_slice(&w.data);
        let n = w.data.len();
        inode.pending.push(w);
        Ok(n)
    }

    async fn read_at(&self, pos: u64, len: usize) -> IoResult<Bytes> {
        self.io.latency().await;
        let faults = self.io.disk.0.borrow().faults;
        if self.io.fault(faults.read_eio) {
            return Err(self.io.eio("read", &self.path));
        }
        let d = self.io.disk.0.borrow();
        let data = &d.inodes[&self.inode].data;
        let at = (pos as usize).min(data.len());
        let end = (at + len).min(data.len());
        let mut out = data[at..end].to_vec();
        drop(d);
        if !out.is_empty() && self.io.fault(faults.read_misdirect) {
            // The bytes of a neighbouring page.
            let shift = 4096 * (1 + self.io.sim.rng().below(4) as usize);
            let d = self.io.disk.0.borrow();
            let data = &d.inodes[&self.inode].data;
            let from = at + shift;
            for (i, b) in out.iter_mut().enumerate() {
                *b = data.get(from + i).copied().unwrap_or(0);
            }
        }
        if !out.is_empty() && self.io.fault(faults.read_flip) {
            let i = self.io.sim.rng().below(out.len() as u64) as usize;
            out[i] ^= 1 << self.io.sim.rng().below(8);
        }
        Ok(Bytes::from(out))
    }

    async fn sync(&self) -> IoResult<()> {
        // What this sync covers: the writes completed before it started.
        let covered: Vec<u64> = {
            let mut d = self.io.disk.0.borrow_mut();
            *d.syncs.entry(self.path.clone()).or_default() += 1;
            d.inodes[&self.inode]
                .pending
                .iter()
                .map(|w| w.seq)
                .collect()
        };
        self.io.latency().await;
        let eio = self.io.disk.0.borrow().faults.sync_eio;
        let failed = self.io.fault(eio);
        let mut d = self.io.disk.0.borrow_mut();
        let inode = d.inodes.get_mut(&self.inode).expect("inode");
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut inode.pending)
            .into_iter()
            .partition(|w| covered.contains(&w.seq));
        inode.pending = rest;
        if inode.durable.len() < inode.data.len() {
            inode.durable.resize(inode.data.len(), 0);
        }
        if !failed {
            for w in done {
                inode.durable[w.pos..w.pos + w.data.len()].copy_from_slice(&w.data);
            }
            return Ok(());
        }
        // Each sector made it to the medium or did not; reads now show which.
        let mut rng = self.io.sim.rng();
        let lossy = !done.is_empty();
        for w in done {
            for (i, sector) in w.data.chunks(SECTOR_BYTES).enumerate() {
                let at = w.pos + i * SECTOR_BYTES;
                let range = at..at + sector.len();
                if rng.chance(500) {
                    inode.durable[range].copy_from_slice(sector);
                } else {
                    let old = inode.durable[range.clone()].to_vec();
                    inode.data[range].copy_from_slice(&old);
                }
            }
        }
        // Writes completed after the sync started still show.
        for w in &inode.pending {
            inode.data[w.pos..w.pos + w.data.len()].copy_from_slice(&w.data);
        }
        drop(rng);
        if lossy {
            d.lossy_syncs += 1;
        }
        drop(d);
        Err(self.io.eio("fdatasync", &self.path))
    }

    async fn allocate(&self, len: u64) -> IoResult<()> {
        self.io.latency().await;
        let mut d = self.io.disk.0.borrow_mut();
        let cur = d.inodes[&self.inode].data.len() as u64;
        if len > cur && d.used() + (len - cur) > d.capacity {
            drop(d);
            return Err(self.io.nospace("preallocate", &self.path));
        }
        let inode = d.inodes.get_mut(&self.inode).expect("inode");
        if (inode.data.len() as u64) < len {
            inode.data.resize(len as usize, 0);
        }
        Ok(())
    }

    async fn size(&self) -> IoResult<u64> {
        Ok(self.io.disk.0.borrow().inodes[&self.inode].data.len() as u64)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Io for SimIo {
    type Buffer = SimBuffer;
    type File = SimFile;

    fn buffer(&self, len: usize) -> SimBuffer {
        SimBuffer(vec![0; len])
    }

    fn buffer_to_fill(&self, len: usize) -> SimBuffer {
        // Garbage, so a caller that leaves bytes unwritten is caught.
        SimBuffer(vec![0xA5; len])
    }

    async fn create(&self, path: &Path) -> IoResult<SimFile> {
        self.latency().await;
        if self.fault(self.meta_faults()) {
            return Err(self.eio("create", path));
        }
        let inode = {
            let mut d = self.disk.0.borrow_mut();
            if d.used() + 4096 > d.capacity {
                drop(d);
                return Err(self.nospace("create", path));
            }
            let i = d.next_inode;
            d.next_inode += 1;
            d.inodes.insert(i, Inode::default());
            i
        };
        self.log_name_op(NameOp::Link(path.to_owned(), inode));
        Ok(SimFile {
            io: self.clone(),
            inode,
            path: path.to_owned(),
        })
    }

    async fn open(&self, path: &Path) -> IoResult<SimFile> {
        self.latency().await;
        let inode = self.disk.0.borrow().names.get(path).copied();
        match inode {
            Some(inode) => Ok(SimFile {
                io: self.clone(),
                inode,
                path: path.to_owned(),
            }),
            None => Err(Self::not_found("open", path)),
        }
    }

    async fn remove(&self, path: &Path) -> IoResult<()> {
        self.latency().await;
        if self.fault(self.meta_faults()) {
            return Err(self.eio("remove", path));
        }
        if !self.disk.0.borrow().names.contains_key(path) {
            return Err(Self::not_found("remove", path));
        }
        self.log_name_op(NameOp::Unlink(path.to_owned()));
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> IoResult<()> {
        self.latency().await;
        if self.fault(self.meta_faults()) {
            return Err(self.eio("rename", from));
        }
        if !self.disk.0.borrow().names.contains_key(from) {
            return Err(Self::not_found("rename", from));
        }
        self.log_name_op(NameOp::Rename(from.to_owned(), to.to_owned()));
        Ok(())
    }

    async fn sync_dir(&self, dir: &Path) -> IoResult<()> {
        self.latency().await;
        if self.fault(self.meta_faults()) {
            return Err(self.eio("sync directory", dir));
        }
        let mut d = self.disk.0.borrow_mut();
        let log = std::mem::take(&mut d.name_log);
        for op in &log {
            DiskState::apply_name_op(&mut d.durable_names, op);
        }
        Ok(())
    }

    async fn create_dir_all(&self, _dir: &Path) -> IoResult<()> {
        Ok(())
    }

    async fn list_dir(&self, dir: &Path) -> IoResult<Vec<String>> {
        self.latency().await;
        let d = self.disk.0.borrow();
        Ok(d.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    async fn free_bytes(&self, _dir: &Path) -> IoResult<u64> {
        let d = self.disk.0.borrow();
        Ok(d.capacity.saturating_sub(d.used()))
    }

    fn now_ms(&self) -> i64 {
        self.epoch_ms + (self.sim.now_us() / 1000) as i64
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + 'static {
        self.sim.sleep(d)
    }

    fn spawn(&self, _class: TaskClass, f: impl Future<Output = ()> + 'static) {
        self.sim.spawn(f);
    }

    fn boot_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.disk.0.borrow().boots.to_le_bytes());
        id
    }

    fn random_key(&self) -> [u8; 16] {
        let mut rng = self.sim.rng();
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        k[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        k
    }
}
