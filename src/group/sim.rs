//! What the group simulations share: running a range of seeds (with
//! `KEELMQ_GROUP_SIM_SEEDS` seeds per test from `KEELMQ_GROUP_SIM_BASE`),
//! replaying `KEELMQ_SEED`, and a failure's report.

fn env(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// Runs test number `test`'s share of seeds (`per_test` unless the
/// environment says otherwise); a failure panics with the command that
/// replays it (`replay_test`: the path of the simulation's replay test).
pub fn run_seeds(
    test: u64,
    per_test: u64,
    replay_test: &str,
    run: impl Fn(u64) -> Result<(), String>,
) {
    let count = env("KEELMQ_GROUP_SIM_SEEDS").unwrap_or(per_test);
    let from = env("KEELMQ_GROUP_SIM_BASE").unwrap_or(0) + test * count;
    for seed in from..from + count {
        if let Err(e) = run(seed) {
            panic!(
                "seed {seed} failed: {e}\nreplay: KEELMQ_SEED={seed} cargo test --lib {replay_test} -- --nocapture"
            );
        }
    }
}

/// Replays `KEELMQ_SEED` (nothing without it).
pub fn replay(run: impl Fn(u64) -> Result<(), String>) {
    if let Some(seed) = env("KEELMQ_SEED") {
        if let Err(e) = run(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// A failure with the last `steps` lines of the run's log.
pub fn report(log: &[String], steps: usize, what: String) -> String {
    let from = log.len().saturating_sub(steps);
    format!("{what}\nlast steps:\n  {}", log[from..].join("\n  "))
}
