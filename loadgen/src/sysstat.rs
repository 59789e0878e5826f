//! CPU steal and busy time from `/proc/stat`, sampled around a run. On a VM
//! the hypervisor's steal, not the broker, decides p99 and above, so every
//! result carries it.

/// Cumulative jiffies of the `cpu` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub idle: u64,
    pub steal: u64,
}

/// Parses the aggregate `cpu ` line of `/proc/stat` text.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    // (guest time is already counted in user and nice)
    let total: u64 = v[..8].iter().sum();
    Some(CpuTimes {
        total,
        idle: v[3] + v[4],
        steal: v[7],
    })
}

/// Reads the current counters (zeros where /proc/stat is unreadable).
pub fn sample() -> CpuTimes {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| parse_proc_stat(&t))
        .unwrap_or_default()
}

/// (steal %, busy %) between two samples; busy excludes idle, iowait and steal.
pub fn percentages(a: CpuTimes, b: CpuTimes) -> (f64, f64) {
    let total = b.total.saturating_sub(a.total) as f64;
    if total == 0.0 {
        return (0.0, 0.0);
    }
    let steal = b.steal.saturating_sub(a.steal) as f64;
    let idle = b.idle.saturating_sub(a.idle) as f64;
    (
        100.0 * steal / total,
        100.0 * (total - idle - steal) / total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_and_busy_from_two_samples() {
        let a = parse_proc_stat("cpu  100 0 50 800 20 0 0 30 0 0\ncpu0 1 2 3 4 5 6 7 8\n").unwrap();
        let b = parse_proc_stat("cpu  200 0 100 900 20 0 0 80 0 0\n").unwrap();
        assert_eq!(a.total, 1000);
        let (steal, busy) = percentages(a, b);
        // 300 jiffies passed: 50 stolen, 100 idle, 150 busy.
        assert!((steal - 100.0 * 50.0 / 300.0).abs() < 1e-9, "{steal}");
        assert!((busy - 50.0).abs() < 1e-9, "{busy}");
        assert_eq!(parse_proc_stat("intr 5\n"), None);
    }
}
