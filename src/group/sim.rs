//! What the group simulations share: running a range of seeds (with
//! `KEELMQ_GROUP_SIM_SEEDS` seeds per test from `KEELMQ_GROUP_SIM_BASE`),
//! replaying `KEELMQ_SEED`, and a failure's report.

fn env(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// Runs test number `test`'s share of seeds (`per_test` unless the
/// environment says otherwise); a failure panics with the command that
/// replays it (`replay_test`: the path of the simulation's replay test).
///
/// Seeds run without a step log (formatting every step was most of the
/// simulations' time); a failing seed runs again with it, for the report.
pub fn run_seeds(
    test: u64,
    per_test: u64,
    replay_test: &str,
    run: impl Fn(u64, &mut Log) -> Result<(), String>,
) {
    let count = env("KEELMQ_GROUP_SIM_SEEDS").unwrap_or(per_test);
    let from = env("KEELMQ_GROUP_SIM_BASE").unwrap_or(0) + test * count;
    for seed in from..from + count {
        if run(seed, &mut Log::off()).is_err() {
            let e = run(seed, &mut Log::on()).expect_err("a seed fails the same way twice");
            panic!(
                "seed {seed} failed: {e}\nreplay: KEELMQ_SEED={seed} cargo test --lib {replay_test} -- --nocapture"
            );
        }
    }
}

/// Replays `KEELMQ_SEED` (nothing without it), with the step log.
pub fn replay(run: impl Fn(u64, &mut Log) -> Result<(), String>) {
    if let Some(seed) = env("KEELMQ_SEED") {
        if let Err(e) = run(seed, &mut Log::on()) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// A simulation's step log: the lines are formatted only when it is on.
pub struct Log {
    on: bool,
    lines: Vec<String>,
}

impl Log {
    pub fn on() -> Log {
        Log {
            on: true,
            lines: Vec::new(),
        }
    }

    pub fn off() -> Log {
        Log {
            on: false,
            lines: Vec::new(),
        }
    }

    pub fn push(&mut self, line: impl FnOnce() -> String) {
        if self.on {
            self.lines.push(line());
        }
    }

    /// A failure with the last `steps` lines.
    pub fn report(&self, steps: usize, what: String) -> String {
        let from = self.lines.len().saturating_sub(steps);
        format!("{what}\nlast steps:\n  {}", self.lines[from..].join("\n  "))
    }
}
