//! Which core each shard is pinned to.
//!
//! One shard per usable core by default, each on its own core. When there
//! are fewer shards than cores, the shards take the cores where the data
//! disk's completion interrupts land: a write or fdatasync completes in
//! that interrupt, and io_uring posts its completion to the submitting
//! thread from there. On another core that costs an inter-processor
//! interrupt before the shard sees it: 17-21 µs p50 per write on the
//! reference VM (a single-queue virtio disk whose one interrupt the kernel
//! keeps on one core and will not move), 60 µs on a `written` ack at
//! 10,000/s (docs/BENCHMARKS.md). Multi-queue disks (NVMe) give every core
//! its own queue and interrupt, so completions are local wherever a shard
//! runs; there the weights are only how busy each queue was since boot and
//! the order they give does no harm and no good.
//!
//! The interrupts are read from sysfs and procfs: the block device of the
//! data directory (`/sys/dev/block/MAJ:MIN`), the MSI interrupts of the
//! device above it (`msi_irqs/`), each one's effective affinity
//! (`/proc/irq/N/effective_affinity_list`) weighted by how many it has
//! delivered (`/proc/interrupts`). Anything unreadable leaves the plain
//! order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Where a shard's core came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Core per shard; `None` when there are more shards than cores.
    pub cores: Vec<Option<usize>>,
    /// The data disk's interrupts: the device and the cores they land on,
    /// busiest first, when they decided the order.
    pub disk_irq: Option<DiskIrqs>,
}

/// The cores a block device's interrupts land on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIrqs {
    /// The sysfs device that owns the interrupts (e.g. `0000:00:02.0`).
    pub device: String,
    /// Core and the interrupts it took, busiest first.
    pub cores: Vec<(usize, u64)>,
}

/// The shards to run and their cores: the configured count, or one per
/// core the process may use.
pub fn shard_cores(config: &Config) -> Placement {
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let n = match config.broker.shards {
        0 => cores.len().max(1),
        n => n as usize,
    };
    if n > cores.len() {
        // More shards than cores run unpinned.
        return Placement {
            cores: vec![None; n],
            disk_irq: None,
        };
    }
    let irqs = if n < cores.len() {
        disk_irqs(&config.broker.data_dir)
    } else {
        None
    };
    let weights: BTreeMap<usize, u64> = irqs
        .as_ref()
        .map(|d| d.cores.iter().copied().collect())
        .unwrap_or_default();
    let ordered = order_cores(&cores, &weights);
    let decided = ordered[..n] != cores[..n];
    Placement {
        cores: ordered[..n].iter().map(|&c| Some(c)).collect(),
        disk_irq: if decided { irqs } else { None },
    }
}

/// `cores` with the ones taking the most disk interrupts first (stable:
/// equal weights keep their order).
pub fn order_cores(cores: &[usize], weights: &BTreeMap<usize, u64>) -> Vec<usize> {
    let mut out = cores.to_vec();
    out.sort_by_key(|c| std::cmp::Reverse(weights.get(c).copied().unwrap_or(0)));
    out
}

/// The interrupts of the block device holding `dir`, by core.
pub fn disk_irqs(dir: &Path) -> Option<DiskIrqs> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let (device, irqs) = msi_irqs_above(&sys)?;
    let counts = parse_interrupts(&std::fs::read_to_string("/proc/interrupts").ok()?);
    let mut by_core: BTreeMap<usize, u64> = BTreeMap::new();
    for irq in irqs {
        let Ok(list) = std::fs::read_to_string(format!("/proc/irq/{irq}/effective_affinity_list"))
        else {
            continue;
        };
        let cpus = parse_cpu_list(&list);
        let total = counts.get(&irq).copied().unwrap_or(0);
        if cpus.is_empty() || total == 0 {
            continue;
        }
        for c in &cpus {
            *by_core.entry(*c).or_default() += total / cpus.len() as u64;
        }
    }
    if by_core.is_empty() {
        return None;
    }
    let mut cores: Vec<(usize, u64)> = by_core.into_iter().collect();
    cores.sort_by_key(|&(c, n)| (std::cmp::Reverse(n), c));
    Some(DiskIrqs { device, cores })
}

/// The first directory at or above `sys` with MSI interrupts: its name and
/// the interrupt numbers.
fn msi_irqs_above(sys: &Path) -> Option<(String, Vec<u32>)> {
    let mut at: Option<PathBuf> = Some(sys.to_owned());
    while let Some(dir) = at {
        if let Ok(entries) = std::fs::read_dir(dir.join("msi_irqs")) {
            let mut irqs: Vec<u32> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            irqs.sort_unstable();
            let name = dir.file_name()?.to_string_lossy().into_owned();
            return (!irqs.is_empty()).then_some((name, irqs));
        }
        if dir == Path::new("/sys/devices") {
            return None;
        }
        at = dir.parent().map(Path::to_owned);
    }
    None
}

/// `/proc/interrupts`: interrupt number to the total delivered on all
/// cores (lines of named interrupts such as `NMI` are skipped).
pub fn parse_interrupts(text: &str) -> BTreeMap<u32, u64> {
    let mut lines = text.lines();
    let cpus = lines.next().map_or(0, |h| h.split_whitespace().count());
    lines
        .filter_map(|l| {
            let (irq, rest) = l.trim_start().split_once(':')?;
            let irq: u32 = irq.parse().ok()?;
            let total = rest
                .split_whitespace()
                .take(cpus)
                .map_while(|f| f.parse::<u64>().ok())
                .sum();
            Some((irq, total))
        })
        .collect()
}

/// A kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if a <= b => (a..=b).collect(),
                _ => Vec::new(),
            },
            None => p.parse().map(|c| vec![c]).unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPTS: &str = "           CPU0       CPU1       
 28:          0          0 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config
 35:          0          3 PCI-MSIX-0000:00:02.0   0-edge      virtio1-config
 36:          0   11654288 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
 41:       6122          0 PCI-MSIX-0000:00:04.0   1-edge      virtio3-rx
NMI:          0          0   Non-maskable interrupts
";

    #[test]
    fn interrupts_are_totalled_over_cores() {
        let m = parse_interrupts(INTERRUPTS);
        assert_eq!(m.get(&36), Some(&11_654_288));
        assert_eq!(m.get(&35), Some(&3));
        assert_eq!(m.get(&41), Some(&6122));
        assert_eq!(m.len(), 4, "named lines are skipped: {m:?}");
    }

    #[test]
    fn cpu_lists_expand_ranges() {
        assert_eq!(parse_cpu_list("1\n"), vec![1]);
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("3-1"), Vec::<usize>::new());
    }

    #[test]
    fn the_busiest_interrupt_cores_come_first_and_ties_keep_their_order() {
        let w: BTreeMap<usize, u64> = [(1, 11_654_288), (3, 10)].into_iter().collect();
        assert_eq!(order_cores(&[0, 1, 2, 3], &w), vec![1, 3, 0, 2]);
        assert_eq!(order_cores(&[0, 1, 2], &BTreeMap::new()), vec![0, 1, 2]);
        // Every core alike (one queue per core): the plain order.
        let even: BTreeMap<usize, u64> = (0..4).map(|c| (c, 100)).collect();
        assert_eq!(order_cores(&[0, 1, 2, 3], &even), vec![0, 1, 2, 3]);
    }
}
