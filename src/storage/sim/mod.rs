//! The deterministic storage simulation: the real commit log, checkpoint,
//! index snapshots, recovery and queue store, driven through the I/O seam
//! by a seeded simulator (`executor`, `disk`), with faults and crashes at
//! any instant and invariants checked after every restart (`vopr`).

pub mod disk;
pub mod executor;
mod vopr;

use std::cell::RefCell;
use std::future::Future;
use std::path::Path;
use std::rc::Rc;

pub use disk::{CrashKind, Faults, SimDisk, SimIo};
pub use executor::{Rng, Sim};

/// Virtual time 0 of every simulation, in Unix milliseconds.
pub const SIM_EPOCH_MS: i64 = 1_750_000_000_000;

/// A simulated environment: executor, disk, the `Io` over them.
pub fn sim_io(seed: u64, capacity: u64) -> SimIo {
    SimIo {
        sim: Sim::new(seed, 0),
        disk: SimDisk::new(capacity),
        epoch_ms: SIM_EPOCH_MS,
    }
}

/// Runs `f` on `io`'s executor to completion and returns its output.
pub fn block_on<T: 'static, F: Future<Output = T> + 'static>(io: &SimIo, f: F) -> T {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    io.sim.spawn(async move {
        *o.borrow_mut() = Some(f.await);
    });
    let outcome = io.sim.run_until(|| out.borrow().is_some(), 50_000_000);
    let v = out.borrow_mut().take();
    v.unwrap_or_else(|| panic!("simulated task did not finish: {outcome:?}"))
}

impl SimDisk {
    /// Puts a file with `bytes` on the disk, durable (test setup).
    pub fn put(&self, path: &Path, bytes: Vec<u8>) {
        let io = SimIo {
            sim: Sim::new(0, 0),
            disk: self.clone(),
            epoch_ms: SIM_EPOCH_MS,
        };
        block_on(&io, {
            let io = io.clone();
            let path = path.to_owned();
            async move {
                use crate::storage::io::{Io, IoBuffer, IoFile};
                let f = io.create(&path).await.unwrap();
                let mut padded = bytes;
                padded.resize(crate::storage::align_up(padded.len() as u64) as usize, 0);
                let mut buf = io.buffer(padded.len());
                buf.bytes_mut().copy_from_slice(&padded);
                f.write_at(buf, 0).await.unwrap();
                f.sync().await.unwrap();
                io.sync_dir(path.parent().unwrap()).await.unwrap();
            }
        });
    }
}
