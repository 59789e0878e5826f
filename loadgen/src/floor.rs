//! The machine's physical floor, measured the way the workload is: a
//! loopback TCP echo on a glommio executor (the broker's I/O stack, pinned
//! where the broker runs), driven open loop at the workload's rate by a
//! client in the run's mode (busy-polling, or parked threads); 4 KiB
//! O_DIRECT writes, with and without fdatasync, on the data directory's
//! disk; and the open-loop group-commit floor at the run's rate.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// p50, p99 and p99.9 of one floor measurement, µs (0 when it is empty).
#[derive(Debug, Default, Clone, Copy)]
pub struct Quantiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        let q = |q| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        Quantiles {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
        }
    }
}

/// Floor measurements.
#[derive(Debug, Default, Clone)]
pub struct Floor {
    /// Echo round trip, in the run's client mode ([`rtt`]).
    pub rtt: Quantiles,
    /// One closed-loop 4 KiB `O_DIRECT` write, then write + fdatasync.
    pub write: Quantiles,
    pub fsync: Quantiles,
    /// The open-loop group-commit floor ([`group_commit`]), with and
    /// without fdatasync.
    pub gc_fsync: Quantiles,
    pub gc_written: Quantiles,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds")
}

/// Runs an echo server on a pinned glommio executor; returns its address.
fn echo_server(cpu: Option<usize>) -> Result<std::net::SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spec = keelmq::runtime::ExecutorSpec {
        name: "floor-echo".into(),
        cpu,
        spin_before_park: Duration::from_micros(200),
        preempt_timer: Duration::from_micros(500),
        io_memory_bytes: 512 * 1024,
        ring_depth: 64,
    };
    spec.spawn(move |_| async move {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let listener =
            keelmq::runtime::bind_listener("127.0.0.1:0".parse().unwrap()).expect("bind echo");
        tx.send(listener.local_addr().expect("addr"))
            .expect("report addr");
        let mut stream = listener.accept().await.expect("accept");
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("echo server did not start")
}

/// Open-loop echo round trips of `size`-byte messages at `rate` per
/// second, driven in the run's client mode.
pub fn rtt(
    mode: crate::run::ClientMode,
    cpu_server: Option<usize>,
    cpu_client: Option<usize>,
    rate: f64,
    size: usize,
    secs: f64,
) -> Result<Histogram<u64>> {
    match mode {
        crate::run::ClientMode::BusyPoll => rtt_busy(cpu_server, cpu_client, rate, size, secs),
        crate::run::ClientMode::Blocking => rtt_blocking(cpu_server, cpu_client, rate, size, secs),
    }
}

/// The echo floor of `--client-mode busy-poll`: one thread spinning on a
/// non-blocking socket, sending what is due and reading what came back.
fn rtt_busy(
    cpu_server: Option<usize>,
    cpu_client: Option<usize>,
    rate: f64,
    size: usize,
    secs: f64,
) -> Result<Histogram<u64>> {
    let addr = echo_server(cpu_server)?;
    if let Some(id) = cpu_client {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    let size = size.max(8);
    let interval = 1e9 / rate;
    let total = (rate * secs) as u64;
    let warm = total / 10;
    let mut h = histogram();
    let mut msg = vec![0u8; size];
    let mut inbuf = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 64 * 1024];
    let t0 = Instant::now() + Duration::from_millis(100);
    let (mut next, mut done) = (0u64, 0u64);
    let mut out: Vec<u8> = Vec::new();
    while done < total {
        let now = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
        while next < total && (next as f64 * interval) as u64 <= now {
            msg[..8].copy_from_slice(&((next as f64 * interval) as u64).to_le_bytes());
            out.extend_from_slice(&msg);
            next += 1;
        }
        if !out.is_empty() {
            match s.write(&out) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => anyhow::bail!("echo server closed"),
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        done = record_echoes(&mut inbuf, size, t0, done, warm, &mut h);
    }
    Ok(h)
}

/// Takes every whole echoed message off `inbuf` and records its latency
/// (received now - the due time it carries) once `done` reaches `warm`.
/// Returns the new count of messages seen.
fn record_echoes(
    inbuf: &mut Vec<u8>,
    size: usize,
    t0: Instant,
    mut done: u64,
    warm: u64,
    h: &mut Histogram<u64>,
) -> u64 {
    let mut at = 0;
    while inbuf.len() - at >= size {
        let sched = u64::from_le_bytes(inbuf[at..at + 8].try_into().unwrap());
        let now = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
        if done >= warm {
            let _ = h.record((now.saturating_sub(sched) / 1000).max(1));
        }
        done += 1;
        at += size;
    }
    inbuf.drain(..at);
    done
}

/// The echo floor of `--client-mode blocking`: the same echo server,
/// driven the way a blocking client drives the broker. A sender thread
/// sleeps until each message is due (at most 1 ms at a time, as the
/// loadgen's blocking producer does) and writes it on a blocking socket; a
/// receiver thread parks in a blocking read. Both are pinned to
/// `cpu_client`. Latency: echo received - due time, µs, after the first
/// 10%. So the floor pays what any parked client pays: the sleep's
/// overshoot and a thread wake-up per reply.
fn rtt_blocking(
    cpu_server: Option<usize>,
    cpu_client: Option<usize>,
    rate: f64,
    size: usize,
    secs: f64,
) -> Result<Histogram<u64>> {
    let addr = echo_server(cpu_server)?;
    let pin = move || {
        crate::run::least_timer_slack();
        if let Some(id) = cpu_client {
            core_affinity::set_for_current(core_affinity::CoreId { id });
        }
    };
    let s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut rx = s.try_clone()?;
    let size = size.max(8);
    let interval = 1e9 / rate;
    let total = (rate * secs) as u64;
    let warm = total / 10;
    let t0 = Instant::now() + Duration::from_millis(100);
    let receiver = std::thread::spawn(move || -> Result<Histogram<u64>> {
        pin();
        let mut h = histogram();
        let mut inbuf = Vec::with_capacity(1 << 20);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        while done < total {
            let n = rx.read(&mut chunk)?;
            if n == 0 {
                anyhow::bail!("echo server closed");
            }
            inbuf.extend_from_slice(&chunk[..n]);
            done = record_echoes(&mut inbuf, size, t0, done, warm, &mut h);
        }
        Ok(h)
    });
    pin();
    let mut tx = s;
    // A receiver that failed stops reading: the sender must not block
    // forever on a full socket.
    tx.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut msg = vec![0u8; size];
    let mut out: Vec<u8> = Vec::new();
    let mut next = 0u64;
    while next < total {
        let now = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
        let due = (next as f64 * interval) as u64;
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now).min(Duration::from_millis(1)));
            continue;
        }
        while next < total && (next as f64 * interval) as u64 <= now {
            msg[..8].copy_from_slice(&((next as f64 * interval) as u64).to_le_bytes());
            out.extend_from_slice(&msg);
            next += 1;
        }
        tx.write_all(&out)?;
        out.clear();
    }
    receiver.join().expect("floor receiver panicked")
}

struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(size: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(size, 4096).expect("layout");
        // SAFETY: non-zero size, valid alignment; freed in Drop.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A new `O_DIRECT` file of `span` bytes (a multiple of 1 MiB) written with
/// zeros and synced, so writes into it measure the disk, not block
/// allocation or extent conversion.
fn prezeroed_direct(path: &Path, span: u64) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("O_DIRECT open of {}", path.display()))?;
    let chunk = Aligned::new(1 << 20);
    f.set_len(span)?;
    for i in 0..span >> 20 {
        f.write_all_at(chunk.as_slice(), i << 20)?;
    }
    f.sync_all()?;
    Ok(f)
}

/// 4 KiB O_DIRECT writes (then with fdatasync) in `dir`: (write, fsync) µs.
pub fn disk(dir: &Path, writes: u32, syncs: u32) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let path = dir.join(".floor-probe");
    let span = 64u64 << 20;
    let f = prezeroed_direct(&path, span)?;
    let buf = Aligned::new(4096);
    let (mut w, mut s) = (histogram(), histogram());
    for i in 0..u64::from(writes) {
        let t = Instant::now();
        f.write_all_at(buf.as_slice(), (i * 4096) % span)?;
        let _ = w.record((t.elapsed().as_micros() as u64).max(1));
    }
    for i in 0..u64::from(syncs) {
        let t = Instant::now();
        f.write_all_at(buf.as_slice(), (i * 4096) % span)?;
        f.sync_data()?;
        let _ = s.record((t.elapsed().as_micros() as u64).max(1));
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok((w, s))
}

/// Bytes of the pre-zeroed file the group-commit floor writes into (it
/// wraps around when a run writes more).
const GROUP_COMMIT_SPAN_BYTES: u64 = 64 << 20;
/// Page the group-commit floor writes in: the broker's O_DIRECT unit.
const PAGE_BYTES: u64 = 4096;

/// The open-loop group-commit floor on the data directory's disk: one
/// thread (pinned to `cpu`), `size`-byte records arriving on a fixed
/// timetable at `rate` a second for `secs`; each turn of its loop writes
/// every record that has arrived into 4 KiB-aligned O_DIRECT pages of a
/// pre-zeroed file (rewriting the last partial page, as a log does), then,
/// with `sync`, fdatasyncs, then acknowledges every record it covered.
/// Plain blocking syscalls, no wake-ups (it spins for the next arrival):
/// what the disk itself costs a broker at this rate. Ack latency (arrival
/// to acknowledgement) per record, µs, after the first 10%.
pub fn group_commit(
    dir: &Path,
    cpu: Option<usize>,
    rate: f64,
    size: usize,
    secs: f64,
    sync: bool,
) -> Result<Histogram<u64>> {
    let path = dir.join(".floor-group-commit");
    let f = prezeroed_direct(&path, GROUP_COMMIT_SPAN_BYTES)?;
    // Alone on the core it is given.
    let measure = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(id) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id });
                }
                group_commit_loop(&f, rate, size.max(1), secs, sync)
            })
            .join()
            .expect("floor thread")
    });
    drop(f);
    let _ = std::fs::remove_file(&path);
    measure
}

fn group_commit_loop(
    f: &std::fs::File,
    rate: f64,
    size: usize,
    secs: f64,
    sync: bool,
) -> Result<Histogram<u64>> {
    let total = (rate * secs).max(1.0) as u64;
    let warm = total / 10;
    let interval_ns = 1e9 / rate;
    let arrival = |i: u64| (i as f64 * interval_ns) as u64;
    // Largest write: every record that can arrive while one turn runs is
    // bounded by the file; a 4 MiB buffer covers 40,000 records of 100 B.
    let buf = Aligned::new(4 << 20);
    let mut h = histogram();
    let t0 = Instant::now();
    let mut written = 0u64;
    while written < total {
        let now = t0.elapsed().as_nanos() as u64;
        let arrived = ((now as f64 / interval_ns) as u64 + 1).min(total);
        if arrived <= written {
            std::hint::spin_loop();
            continue;
        }
        // The pages holding records [written, arrived), from the page of
        // the first (partial: rewritten) to the page of the last.
        let start = written * size as u64;
        let end = arrived * size as u64;
        let first_page = start / PAGE_BYTES * PAGE_BYTES;
        let mut len = (end.div_ceil(PAGE_BYTES) * PAGE_BYTES - first_page) as usize;
        len = len.min(buf.layout.size());
        let at = first_page % GROUP_COMMIT_SPAN_BYTES;
        let len = len.min((GROUP_COMMIT_SPAN_BYTES - at) as usize);
        f.write_all_at(&buf.as_slice()[..len], at)?;
        if sync {
            f.sync_data()?;
        }
        let acked = t0.elapsed().as_nanos() as u64;
        // Records past what one write holds wait for the next turn.
        let covered = ((first_page + len as u64) / size as u64).min(arrived);
        for i in written..covered.max(written + 1) {
            if i >= warm {
                let _ = h.record((acked.saturating_sub(arrival(i)) / 1000).max(1));
            }
        }
        written = covered.max(written + 1);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record after the first 10% gets an ack latency, the fsync one
    /// no lower than the written one's write alone, none of them before
    /// its arrival (latencies are positive and bounded by the run).
    #[test]
    fn the_group_commit_floor_acks_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        for sync in [false, true] {
            let h = group_commit(dir.path(), None, 20_000.0, 208, 0.25, sync).unwrap();
            assert_eq!(h.len(), 5000 - 500, "sync {sync}");
            assert!(h.max() < 250_000 + 100_000, "sync {sync}: max {}", h.max());
        }
        assert!(!dir.path().join(".floor-group-commit").exists());
    }

    /// Both echo floors see every message after the first 10% once, none
    /// before it was due.
    #[test]
    fn both_echo_floors_time_every_message_once() {
        let busy = rtt(
            crate::run::ClientMode::BusyPoll,
            None,
            None,
            4000.0,
            100,
            0.5,
        )
        .unwrap();
        assert_eq!(busy.len(), 2000 - 200);
        let parked = rtt(
            crate::run::ClientMode::Blocking,
            None,
            None,
            4000.0,
            100,
            0.5,
        )
        .unwrap();
        assert_eq!(parked.len(), 2000 - 200);
        assert!(parked.max() < 500_000 + 100_000, "max {}", parked.max());
    }
}
