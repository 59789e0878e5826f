//! `keelmq-loadgen`: an open-loop load generator for KeelMQ that reports
//! produce-to-ack and end-to-end latency and throughput, with the machine's
//! steal time and, on request, its physical floor measured the same way.

mod floor;
mod run;
mod shape;
mod spawn;
mod sysstat;
mod workload;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use keelmq::client::Admin;
use keelmq::protocol::Durability;
use serde_json::{json, Value};
use std::path::PathBuf;

use workload::{Level, Workload};

#[derive(Parser)]
#[command(
    name = "keelmq-loadgen",
    version,
    about = "Open-loop load generator for KeelMQ"
)]
struct Args {
    /// Broker to load (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:7400")]
    broker: String,
    /// Start `keelmq serve` in a temp dir, pinned away from the loadgen.
    #[arg(long)]
    spawn: bool,
    /// Shards of the spawned broker.
    #[arg(long, default_value_t = 1)]
    shards: u16,
    /// Tuning profile of the spawned broker.
    #[arg(long)]
    profile: Option<String>,
    /// Where the spawned broker's temp data dir goes (default: the system temp dir).
    #[arg(long)]
    spawn_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    topics: u32,
    /// Queues per topic.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Message size in bytes (at least 16: the stamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per second over all producers, or `max`.
    #[arg(long, default_value = "10000")]
    rate: String,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Consumers per topic.
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// Most messages per produce batch (default 1 at a fixed rate, 1000 at max).
    #[arg(long)]
    batch_max: Option<usize>,
    /// How long a producer may wait to fill a batch, µs.
    #[arg(long, default_value_t = 0)]
    linger_us: u64,
    #[arg(long, default_value = "memory")]
    durability: String,
    /// Keys spread over (0: none; queues taken round-robin).
    #[arg(long, default_value_t = 0)]
    keys: u32,
    /// An OpenMessaging Benchmark workload file (overrides the workload flags).
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Runs; each is reported, then the one with the least steal.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Also measure this machine's floor (echo RTT, O_DIRECT write, write + fdatasync).
    #[arg(long)]
    floor: bool,
    /// One JSON object at the end instead of the table.
    #[arg(long)]
    json: bool,
    /// `busy-poll`: producers and consumers spin on non-blocking sockets,
    /// multiplexed on one pinned thread per free core (what trading clients
    /// do). `blocking`: one thread per producer and consumer that parks in
    /// the socket read until a reply comes or its next send is due, and
    /// pays the wake-up on every message.
    #[arg(long, value_enum, default_value_t = run::ClientMode::BusyPoll)]
    client_mode: run::ClientMode,
    /// Consume as one consumer group (`--consumers` members): `message`
    /// (receive and ack each), `queue` (one member per queue, commits) or
    /// `broadcast` (every member gets every message; lost and duplicates
    /// are counted per member).
    #[arg(long, value_enum)]
    group_mode: Option<workload::GroupMode>,
    /// Message delivery: share of deliveries nacked (0..1).
    #[arg(long, default_value_t = 0.0)]
    nack_ratio: f64,
    /// Message delivery: retry delay of a nack, ms.
    #[arg(long, default_value_t = 100)]
    nack_delay_ms: u64,
    /// Message delivery: the broker pushes messages within the consumers'
    /// credit instead of answering long-poll receives.
    #[arg(long)]
    push: bool,
    /// Consume-only throughput: produce this many messages as fast as
    /// possible with the consumers idle, then start them and report how
    /// fast they drain it (`drain_msgs_per_s`; e2e then includes the
    /// wait). Replaces --rate and --duration.
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Scheduled messages: each is due this many ms after its scheduled
    /// send time (an absolute deliver-at from the loadgen's clock); the
    /// run reports delivery lateness (received − due) and fails on an
    /// early delivery.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Scheduled messages: plus a uniform extra delay in [0, S) ms.
    #[arg(long, default_value_t = 0)]
    delay_spread_ms: u64,
    /// Scheduled burst: produce N messages as fast as possible, all due at
    /// start + --delay-ms (spread over --delay-spread-ms); consumers wait
    /// for them. Replaces --rate and --duration.
    #[arg(long, default_value_t = 0)]
    due_burst: u64,
    /// Produce with priorities 0..N (1-10), each drawn at random, and report e2e
    /// latency per priority (`e2e_by_priority`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=10))]
    priorities: Option<u8>,
    /// Tag P% of messages `pass` (the others `other`) and consume with
    /// the tag filter `pass`; only those are expected.
    #[arg(long, conflicts_with = "filter_sql_pass_pct")]
    filter_tag_pass_pct: Option<f64>,
    /// Give P% of messages the property k=1 (the others k=0) and consume
    /// with the SQL92 filter `k = 1`; only those are expected.
    #[arg(long)]
    filter_sql_pass_pct: Option<f64>,
    /// Message delivery: the members together take at most R messages a
    /// second (slow consumers: the backlog builds in the broker, which
    /// picks by priority; for --priorities).
    #[arg(long)]
    consume_rate: Option<f64>,
    /// Message delivery: the group's `priority_age_boost_ms` (priority's
    /// starvation guard; 0 turns aging off; the broker's default is 1000).
    #[arg(long)]
    priority_age_boost_ms: Option<u64>,
    /// Message delivery: the group's `inflight_messages_max` (the window a
    /// queue's messages are taken into, and ordered by priority within).
    #[arg(long)]
    inflight_messages_max: Option<u32>,
}

/// The message shape (due times, priorities, filter) the flags ask for.
fn shape(a: &Args) -> Result<shape::Shape> {
    let scheduled = a.delay_ms > 0 || a.delay_spread_ms > 0 || a.due_burst > 0;
    if scheduled && a.backlog > 0 {
        bail!("--backlog cannot be combined with scheduled messages (--delay-ms, --delay-spread-ms, --due-burst)");
    }
    let filter = match (a.filter_tag_pass_pct, a.filter_sql_pass_pct) {
        (Some(p), None) => Some((shape::FilterKind::Tag, p)),
        (None, Some(p)) => Some((shape::FilterKind::Sql, p)),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("one filter at a time"),
    };
    if let Some((_, p)) = filter {
        if !(0.0..=100.0).contains(&p) {
            bail!("a filter's pass percentage must be within 0..=100");
        }
    }
    Ok(shape::Shape {
        due: scheduled.then_some(shape::DueSpec {
            delay_ms: a.delay_ms,
            spread_ms: a.delay_spread_ms,
            burst: a.due_burst > 0,
        }),
        priorities: a.priorities,
        filter: filter.map(|(kind, pass_pct)| shape::FilterShape { kind, pass_pct }),
    })
}

fn quantile_us(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

fn workload(a: &Args) -> Result<Workload> {
    let durability = Level::parse(&a.durability)?;
    let rate = match a.rate.as_str() {
        "max" => None,
        r => Some(
            r.parse::<f64>()
                .with_context(|| format!("--rate must be a number or max, not '{r}'"))?,
        ),
    };
    let rate = if a.backlog > 0 || a.due_burst > 0 {
        None
    } else {
        rate
    };
    let shape = shape(a)?;
    let consume_rate = a.consume_rate;
    if let Some(r) = consume_rate {
        if !r.is_finite() || r <= 0.0 || a.group_mode != Some(workload::GroupMode::Message) {
            bail!("--consume-rate needs --group-mode message and a rate above 0");
        }
    }
    let batch_max = a.batch_max.unwrap_or(if rate.is_none() { 1000 } else { 1 });
    if let Some(path) = &a.workload {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut w = Workload::from_omb(&text, durability, batch_max, a.linger_us)?;
        w.group = a.group_mode;
        w.nack_ratio = a.nack_ratio;
        w.nack_delay_ms = a.nack_delay_ms;
        w.push = a.push;
        w.backlog = a.backlog;
        w.due_burst = a.due_burst;
        w.shape = shape;
        w.consume_rate = consume_rate;
        if a.backlog > 0 || a.due_burst > 0 {
            // Produced as fast as possible, whatever the file's rate.
            w.rate = None;
        }
        if w.rate.is_none() {
            w.batch_max = a.batch_max.unwrap_or(1000);
        }
        return Ok(w);
    }
    if !(0.0..1.0).contains(&a.nack_ratio) {
        bail!("--nack-ratio must be at least 0 and below 1");
    }
    if a.nack_ratio > 0.0 && a.group_mode != Some(workload::GroupMode::Message) {
        bail!("--nack-ratio needs --group-mode message");
    }
    if a.push && a.group_mode != Some(workload::GroupMode::Message) {
        bail!("--push needs --group-mode message");
    }
    if a.size < run::STAMP_BYTES {
        bail!("--size must be at least {} bytes", run::STAMP_BYTES);
    }
    Ok(Workload {
        name: "flags".into(),
        topics: a.topics.max(1),
        queues: a.queues.max(1),
        size: a.size,
        rate,
        duration_s: a.duration,
        warmup_s: a.warmup,
        producers: a.producers.max(1),
        consumers: a.consumers.max(1),
        batch_max,
        linger_us: a.linger_us,
        durability,
        keys: a.keys,
        group: a.group_mode,
        nack_ratio: a.nack_ratio,
        nack_delay_ms: a.nack_delay_ms,
        push: a.push,
        backlog: a.backlog,
        due_burst: a.due_burst,
        shape,
        consume_rate,
    })
}

/// A group's subscription to `topic`, with the run's filter.
fn subscription(topic: &str, shape: &shape::Shape) -> Value {
    let mut s = json!({ "topic": topic });
    if let Some(f) = shape.filter.map(|f| f.spec()) {
        s["filter"] = f.expression.into();
        s["filter_type"] = f.kind.name().into();
    }
    s
}

/// What the run puts on its messages besides the defaults, in words.
fn shape_line(w: &Workload) -> Option<String> {
    let mut parts = Vec::new();
    match (w.shape.due, w.due_burst) {
        (Some(d), 0) => parts.push(format!(
            "scheduled: each due {} ms (+0..{} ms) after its send time",
            d.delay_ms, d.spread_ms
        )),
        (Some(d), n) => parts.push(format!(
            "scheduled burst: {n} messages produced at once, all due {} ms (+0..{} ms) after the start",
            d.delay_ms, d.spread_ms
        )),
        (None, _) => {}
    }
    if let Some(n) = w.shape.priorities {
        parts.push(format!("priorities 0..{}", n - 1));
    }
    if let Some(f) = w.shape.filter {
        parts.push(format!("filter {} passing {}%", f.describe(), f.pass_pct));
    }
    if let Some(r) = w.consume_rate {
        parts.push(format!("consumers take ≤ {r}/s"));
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// µs as ms with three decimals.
fn us_as_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `e2e_by_priority`: one row per priority, highest first.
fn priority_rows(hs: &[Histogram<u64>]) -> Vec<Value> {
    hs.iter()
        .enumerate()
        .rev()
        .map(|(p, h)| {
            json!({
                "priority": p,
                "count": h.len(),
                "p50_us": quantile_us(h, 0.5),
                "p99_us": quantile_us(h, 0.99),
                "p999_us": quantile_us(h, 0.999),
                "max_us": h.max(),
            })
        })
        .collect()
}

fn result_json(r: &run::RunResult, w: &Workload) -> Value {
    let mut v = base_json(r);
    let o = v.as_object_mut().expect("object");
    o.insert(
        "consumed_msgs_per_s".into(),
        r.consumed_msgs_per_s.round().into(),
    );
    o.insert(
        "filter".into(),
        w.shape.filter.map_or(Value::Null, |f| f.describe().into()),
    );
    if let Some(f) = w.shape.filter {
        o.insert("filter_pass_pct".into(), f.pass_pct.into());
        o.insert("expected".into(), r.expected.into());
        o.insert("unexpected".into(), r.unexpected.into());
    }
    if let Some(d) = w.shape.due {
        o.insert("delay_ms".into(), d.delay_ms.into());
        o.insert("delay_spread_ms".into(), d.spread_ms.into());
        o.insert("due_burst".into(), w.due_burst.into());
        o.insert("lateness_count".into(), r.lateness.len().into());
        o.insert(
            "lateness_p50_ms".into(),
            us_as_ms(quantile_us(&r.lateness, 0.5)).into(),
        );
        o.insert(
            "lateness_p99_ms".into(),
            us_as_ms(quantile_us(&r.lateness, 0.99)).into(),
        );
        o.insert(
            "lateness_p999_ms".into(),
            us_as_ms(quantile_us(&r.lateness, 0.999)).into(),
        );
        o.insert("lateness_max_ms".into(), us_as_ms(r.lateness.max()).into());
        o.insert("early".into(), r.early.into());
        o.insert("acked_after_due".into(), r.acked_after_due.into());
        o.insert(
            "burst_s".into(),
            r.burst_s
                .map_or(Value::Null, |s| ((s * 1000.0).round() / 1000.0).into()),
        );
    }
    if let Some(n) = w.shape.priorities {
        o.insert("priorities".into(), n.into());
        o.insert(
            "e2e_by_priority".into(),
            priority_rows(&r.e2e_by_priority).into(),
        );
    }
    if let Some(r) = w.consume_rate {
        o.insert("consume_rate".into(), r.into());
    }
    if w.shape != shape::Shape::default() {
        o.insert("mismatched".into(), r.mismatched.into());
        o.insert(
            "first_mismatch".into(),
            r.first_mismatch.clone().map_or(Value::Null, Value::from),
        );
    }
    v
}

fn base_json(r: &run::RunResult) -> Value {
    json!({
        "sent": r.sent,
        "acked": r.acked,
        "received": r.received,
        "lost": r.lost,
        "duplicates": r.duplicates,
        "errors": r.errors,
        "rate_msgs": r.rate_msgs.round(),
        "drain_msgs_per_s": r.drain_msgs_per_s.map(f64::round),
        "drain_s": r.drain_s.map(|s| (s * 1000.0).round() / 1000.0),
        "mb_per_s": (r.mb_per_s * 100.0).round() / 100.0,
        "ack_p50_us": quantile_us(&r.ack, 0.5),
        "ack_p99_us": quantile_us(&r.ack, 0.99),
        "ack_p999_us": quantile_us(&r.ack, 0.999),
        "e2e_p50_us": quantile_us(&r.e2e, 0.5),
        "e2e_p99_us": quantile_us(&r.e2e, 0.99),
        "e2e_p999_us": quantile_us(&r.e2e, 0.999),
        "e2e_p9999_us": quantile_us(&r.e2e, 0.9999),
        "e2e_max_us": r.e2e.max(),
        "steal_pct": (r.steal_pct * 10.0).round() / 10.0,
        "cpu_busy_pct": (r.cpu_busy_pct * 10.0).round() / 10.0,
        "first_error": r.first_error,
        "group_ack_p50_us": quantile_us(&r.group_ack, 0.5),
        "group_ack_p99_us": quantile_us(&r.group_ack, 0.99),
        "redeliveries": r.redelivery_ms.len(),
        "redelivery_lateness_p50_ms": quantile_us(&r.redelivery_ms, 0.5),
        "redelivery_lateness_p99_ms": quantile_us(&r.redelivery_ms, 0.99),
        "redelivery_lateness_max_ms": r.redelivery_ms.max(),
    })
}

fn print_table(i: u32, r: &run::RunResult, w: &Workload) {
    eprintln!(
        "run {i}: sent {} acked {} received {} lost {} dup {} errors {} | {:.0} msg/s {:.1} MB/s | steal {:.1}% busy {:.1}%",
        r.sent, r.acked, r.received, r.lost, r.duplicates, r.errors, r.rate_msgs, r.mb_per_s, r.steal_pct, r.cpu_busy_pct
    );
    eprintln!(
        "       ack  p50 {:>7} µs  p99 {:>7} µs  p99.9 {:>7} µs",
        quantile_us(&r.ack, 0.5),
        quantile_us(&r.ack, 0.99),
        quantile_us(&r.ack, 0.999)
    );
    eprintln!(
        "       e2e  p50 {:>7} µs  p99 {:>7} µs  p99.9 {:>7} µs  p99.99 {:>7} µs  max {:>8} µs",
        quantile_us(&r.e2e, 0.5),
        quantile_us(&r.e2e, 0.99),
        quantile_us(&r.e2e, 0.999),
        quantile_us(&r.e2e, 0.9999),
        r.e2e.max()
    );
    if let (Some(rate), Some(s)) = (r.drain_msgs_per_s, r.drain_s) {
        if w.shape.filter.is_some() {
            eprintln!(
                "       backlog drained in {s:.3} s: {rate:.0} msg/s scanned (all produced), {:.0} msg/s delivered (e2e includes the wait)",
                r.consumed_msgs_per_s
            );
        } else {
            eprintln!(
                "       backlog drained in {s:.3} s: {rate:.0} msg/s consumed (e2e includes the wait)"
            );
        }
    }
    if !r.group_ack.is_empty() {
        eprintln!(
            "       group ack/commit call p50 {:>7} µs  p99 {:>7} µs",
            quantile_us(&r.group_ack, 0.5),
            quantile_us(&r.group_ack, 0.99)
        );
    }
    if !r.redelivery_ms.is_empty() {
        eprintln!(
            "       redelivery lateness ({} redeliveries) p50 {} ms  p99 {} ms  max {} ms",
            r.redelivery_ms.len(),
            quantile_us(&r.redelivery_ms, 0.5),
            quantile_us(&r.redelivery_ms, 0.99),
            r.redelivery_ms.max()
        );
    }
    if let Some(f) = w.shape.filter {
        eprintln!(
            "       filter {} passing {}%: {} of {} acked expected, {:.0} msg/s delivered · unexpected {}",
            f.describe(),
            f.pass_pct,
            r.expected,
            r.acked,
            r.consumed_msgs_per_s,
            r.unexpected
        );
    }
    if let Some(d) = w.shape.due {
        let burst = r.burst_s.map_or(String::new(), |s| {
            format!(
                " · burst of {} delivered {s:.3} s after it came due ({:.0} msg/s)",
                w.due_burst, r.consumed_msgs_per_s
            )
        });
        eprintln!(
            "       scheduled +{} ms (+0..{} ms): lateness p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms ({} measured) · early {} · acked after due {}{burst}",
            d.delay_ms,
            d.spread_ms,
            us_as_ms(quantile_us(&r.lateness, 0.5)),
            us_as_ms(quantile_us(&r.lateness, 0.99)),
            us_as_ms(quantile_us(&r.lateness, 0.999)),
            us_as_ms(r.lateness.max()),
            r.lateness.len(),
            r.early,
            r.acked_after_due
        );
        eprintln!(
            "       (e2e of scheduled messages includes their delay: lateness is the figure)"
        );
    }
    for (p, h) in r.e2e_by_priority.iter().enumerate().rev() {
        eprintln!(
            "       e2e priority {p}: {:>9} msgs  p50 {:>7} µs  p99 {:>7} µs  p99.9 {:>7} µs  max {:>8} µs",
            h.len(),
            quantile_us(h, 0.5),
            quantile_us(h, 0.99),
            quantile_us(h, 0.999),
            h.max()
        );
    }
    if r.mismatched > 0 {
        eprintln!(
            "       !! {} deliveries not as produced, first: {}",
            r.mismatched,
            r.first_mismatch.as_deref().unwrap_or("?")
        );
    }
    if r.early > 0 {
        eprintln!("!!!!! {} SCHEDULED MESSAGES DELIVERED EARLY !!!!!", r.early);
    }
    if r.unexpected > 0 {
        eprintln!(
            "!!!!! {} MESSAGES DELIVERED THAT THE FILTER DROPS !!!!!",
            r.unexpected
        );
    }
    if r.lost > 0 {
        eprintln!("!!!!! LOST {} ACKNOWLEDGED MESSAGES !!!!!", r.lost);
    }
    if let Some(e) = &r.first_error {
        eprintln!("       first error: {e}");
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let a = Args::parse();
    let w = workload(&a)?;
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let spawned = if a.spawn {
        Some(spawn::Spawned::start(
            a.shards,
            a.profile.as_deref(),
            a.spawn_dir.as_deref(),
        )?)
    } else {
        None
    };
    let broker = spawned
        .as_ref()
        .map_or(a.broker.clone(), |s| s.addr.clone());
    // The spawned broker pins its shards (with fewer shards than cores, to
    // the cores taking the data disk's interrupts); the loadgen takes the
    // rest (or shares all of them when none is left).
    let (broker_cpu, cpus) = match &spawned {
        Some(s) => {
            let taken = s.wait_shard_cores(a.shards.max(1));
            let rest: Vec<usize> = cores
                .iter()
                .copied()
                .filter(|c| !taken.contains(c))
                .collect();
            let broker_cpu = taken.first().copied().or(cores.first().copied());
            if taken.is_empty() || rest.is_empty() {
                (broker_cpu, Vec::new())
            } else {
                (broker_cpu, rest)
            }
        }
        None => (None, Vec::new()),
    };
    let mode = a.client_mode.name();
    eprintln!(
        "keelmq-loadgen: {} · {} topic(s) × {} queue(s) · {} B · rate {} · {} s (+{} s warm-up) · {} producer(s), {} consumer(s)/topic · batch ≤ {} · durability {} · client {mode} · broker {broker}",
        w.name,
        w.topics,
        w.queues,
        w.size,
        w.rate.map_or("max".to_string(), |r| format!("{r}/s")),
        w.duration_s,
        w.warmup_s,
        w.producers,
        w.consumers,
        w.batch_max,
        w.durability.name()
    );
    if let Some(extra) = shape_line(&w) {
        eprintln!("keelmq-loadgen: {extra}");
    }
    let mut results = Vec::new();
    for i in 0..a.repeat.max(1) {
        let mut admin =
            Admin::connect(&broker).with_context(|| format!("cannot reach broker {broker}"))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let topics: Vec<String> = (0..w.topics)
            .map(|t| format!("loadgen-{stamp}-{i}-{t}"))
            .collect();
        let level = match w.durability {
            Level::Memory => Durability::Memory,
            Level::Written => Durability::Written,
            Level::Fsync => Durability::Fsync,
        };
        for t in &topics {
            admin.create_topic(t, w.queues, Some(level))?;
        }
        let group = w.group.map(|g| format!("loadgen-{stamp}-{i}-{}", g.name()));
        if let (Some(name), Some(mode)) = (&group, w.group) {
            let mut settings = json!({
                "mode": if mode == workload::GroupMode::Broadcast { "broadcast" } else { "clustering" },
                "delivery": if mode == workload::GroupMode::Message { "message" } else { "queue" },
                "subscriptions": topics.iter().map(|t| subscription(t, &w.shape)).collect::<Vec<_>>(),
            });
            if let Some(b) = a.priority_age_boost_ms {
                settings["priority_age_boost_ms"] = b.into();
            }
            if let Some(n) = a.inflight_messages_max {
                settings["inflight_messages_max"] = n.into();
            }
            admin.create_group(name, &settings)?;
        }
        let r = run::run(&run::RunSpec {
            group: group.clone(),
            broker: &broker,
            workload: &w,
            topics: topics.clone(),
            cpus: cpus.clone(),
            progress: !a.json,
            mode: a.client_mode,
        })?;
        if let Some(g) = &group {
            let _ = admin.delete_group(g);
            let _ = admin.delete_topic(&format!("%DLQ%{g}"));
        }
        for t in &topics {
            let _ = admin.delete_topic(t);
        }
        print_table(i + 1, &r, &w);
        results.push(r);
    }
    let best = results
        .iter()
        .enumerate()
        .min_by(|x, y| x.1.steal_pct.total_cmp(&y.1.steal_pct))
        .map(|(i, _)| i)
        .expect("at least one run");
    if results.len() > 1 {
        eprintln!("least steal: run {}", best + 1);
    }
    let floor = if a.floor {
        let rate = w.rate.unwrap_or(10_000.0);
        let client_cpu = cpus.first().copied();
        // The echo is driven in the run's client mode: a parked client's
        // floor includes the wake-ups any parked client pays.
        let rtt = floor::rtt(a.client_mode, broker_cpu, client_cpu, rate, w.size, 5.0)?;
        let dir = spawned
            .as_ref()
            .map_or_else(std::env::temp_dir, |s| s.data_dir.path().to_path_buf());
        let (wr, fs) = floor::disk(&dir, 3000, 500)?;
        // The group-commit floor writes what the broker writes for one
        // record: a batch of one.
        let record_bytes = {
            let mut b = keelmq::batch::BatchBuilder::new();
            b.push(&keelmq::batch::Record::new(vec![0u8; w.size]));
            b.finish().len()
        };
        // On the shard's core, idle by now: with fewer shards than cores
        // that is where the data disk's interrupts land, so the floor, like
        // the shard, sees its completions without a cross-core wake-up.
        // (The idle shard still wakes there up to 1,000 times a second, the
        // reactor's sleep bound: the floor pays that, the best core's
        // price.)
        let gc_cpu = broker_cpu.or(client_cpu);
        let gc_fsync = floor::group_commit(&dir, gc_cpu, rate, record_bytes, 5.0, true)?;
        let gc_written = floor::group_commit(&dir, gc_cpu, rate, record_bytes, 5.0, false)?;
        let f = floor::Floor {
            rtt: floor::Quantiles::of(&rtt),
            write: floor::Quantiles::of(&wr),
            fsync: floor::Quantiles::of(&fs),
            gc_fsync: floor::Quantiles::of(&gc_fsync),
            gc_written: floor::Quantiles::of(&gc_written),
        };
        eprintln!(
            "floor: echo rtt ({mode}) p50 {} µs p99 {} µs p99.9 {} µs · O_DIRECT 4 KiB write p50 {} µs p99 {} µs · write+fdatasync p50 {} µs p99 {} µs",
            f.rtt.p50, f.rtt.p99, f.rtt.p999, f.write.p50, f.write.p99, f.fsync.p50, f.fsync.p99
        );
        eprintln!(
            "floor: open-loop group commit at {rate}/s of {record_bytes} B: written ack p50 {} µs p99 {} µs p99.9 {} µs · fdatasync ack p50 {} µs p99 {} µs p99.9 {} µs",
            f.gc_written.p50, f.gc_written.p99, f.gc_written.p999, f.gc_fsync.p50, f.gc_fsync.p99, f.gc_fsync.p999
        );
        Some(f)
    } else {
        None
    };
    let rss = spawned.as_ref().and_then(|s| s.rss_bytes());
    // The broker's own group-timer precision (how late its redelivery
    // timers fired), worst shard, since the broker started.
    let stats = (w.group == Some(workload::GroupMode::Message) || w.shape.due.is_some())
        .then(|| keelmq::client::Admin::connect(&broker).ok()?.stats().ok())
        .flatten();
    let message_group = w.group == Some(workload::GroupMode::Message);
    let fire = stats
        .as_ref()
        .filter(|_| message_group)
        .map(|s| broker_lateness(s, "redelivery_fire_lateness"));
    let redelivered = stats
        .as_ref()
        .filter(|_| message_group)
        .map(|s| broker_lateness(s, "redelivery_lateness"));
    // The broker's scheduled-message timers: how late they fired.
    let schedule = stats
        .as_ref()
        .filter(|_| w.shape.due.is_some())
        .map(schedule_stats);
    if let Some(s) = &schedule {
        eprintln!(
            "       broker: scheduled timers ({} fired, {} pending) late p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
            s.fired, s.pending, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
    if let (Some((n, p99, max)), Some((rn, rp99, rmax))) = (fire, redelivered) {
        eprintln!(
            "       broker: redelivery timers ({n} fired) late p99 {p99} ms  max {max} ms · redeliveries ({rn}) received after due p99 {rp99} ms  max {rmax} ms"
        );
    }
    if a.json {
        let mut v = result_json(&results[best], &w);
        let o = v.as_object_mut().expect("object");
        o.insert("mode".into(), mode.into());
        o.insert("workload".into(), w.name.clone().into());
        o.insert("durability".into(), w.durability.name().into());
        o.insert(
            "group_mode".into(),
            w.group.map_or(Value::Null, |g| g.name().into()),
        );
        o.insert("push".into(), w.push.into());
        o.insert("backlog".into(), w.backlog.into());
        o.insert("size".into(), w.size.into());
        o.insert(
            "rate".into(),
            w.rate.map_or(Value::from("max"), Value::from),
        );
        o.insert(
            "broker_rss_bytes".into(),
            rss.map_or(Value::Null, Value::from),
        );
        if let Some((n, p99, max)) = fire {
            o.insert("redelivery_fire_count".into(), n.into());
            o.insert("redelivery_fire_p99_ms".into(), p99.into());
            o.insert("redelivery_fire_max_ms".into(), max.into());
        }
        if let Some((n, p99, max)) = redelivered {
            o.insert("broker_redeliveries".into(), n.into());
            o.insert("broker_redelivery_lateness_p99_ms".into(), p99.into());
            o.insert("broker_redelivery_lateness_max_ms".into(), max.into());
        }
        if let Some(s) = &schedule {
            o.insert("schedule_fired".into(), s.fired.into());
            o.insert("schedule_pending".into(), s.pending.into());
            o.insert("schedule_fire_lateness_count".into(), s.count.into());
            o.insert("schedule_fire_lateness_p50_ms".into(), s.p50_ms.into());
            o.insert("schedule_fire_lateness_p99_ms".into(), s.p99_ms.into());
            o.insert("schedule_fire_lateness_p999_ms".into(), s.p999_ms.into());
            o.insert("schedule_fire_lateness_max_ms".into(), s.max_ms.into());
        }
        if let Some(f) = &floor {
            let all = |q: &floor::Quantiles| [("p50", q.p50), ("p99", q.p99), ("p999", q.p999)];
            let fields = [
                ("rtt", all(&f.rtt).to_vec()),
                ("write", vec![("p99", f.write.p99)]),
                ("fsync", vec![("p99", f.fsync.p99)]),
                ("gc_fsync", all(&f.gc_fsync).to_vec()),
                ("gc_written", all(&f.gc_written).to_vec()),
            ];
            for (name, qs) in fields {
                for (q, v) in qs {
                    o.insert(format!("floor_{name}_{q}_us"), v.into());
                }
            }
        }
        if results.len() > 1 {
            o.insert(
                "runs".into(),
                results
                    .iter()
                    .map(|r| result_json(r, &w))
                    .collect::<Vec<_>>()
                    .into(),
            );
            o.insert("best_run".into(), (best + 1).into());
        }
        println!("{v}");
    }
    if results.iter().any(|r| r.lost > 0) {
        bail!("acknowledged messages were lost");
    }
    if results.iter().any(|r| r.early > 0) {
        bail!("scheduled messages were delivered before they were due");
    }
    if results.iter().any(|r| r.unexpected > 0) {
        bail!("the consumers got messages their filter drops");
    }
    if let Some(e) = results.iter().find_map(|r| r.first_error.as_ref()) {
        bail!("a run failed, its counts are incomplete: {e}");
    }
    Ok(())
}

/// (count, p99 ms, max ms) of the broker's histogram `name`, worst shard.
fn broker_lateness(stats: &Value, name: &str) -> (u64, u64, u64) {
    let mut out = (0u64, 0u64, 0u64);
    for sh in stats["shards"].as_array().into_iter().flatten() {
        let h = &sh[name];
        out.0 += h["count"].as_u64().unwrap_or(0);
        out.1 = out.1.max(h["p99_ms"].as_u64().unwrap_or(0));
        out.2 = out.2.max(h["max_ms"].as_u64().unwrap_or(0));
    }
    out
}

/// The broker's scheduled-message timers over its shards (since it
/// started): counts summed, percentiles the worst shard's.
#[derive(Debug, Default, PartialEq, Eq)]
struct ScheduleStats {
    fired: u64,
    pending: u64,
    count: u64,
    p50_ms: u64,
    p99_ms: u64,
    p999_ms: u64,
    max_ms: u64,
}

fn schedule_stats(stats: &Value) -> ScheduleStats {
    let mut out = ScheduleStats::default();
    for sh in stats["shards"].as_array().into_iter().flatten() {
        let s = &sh["schedule"];
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        out.fired += u(&s["fired"]);
        out.pending += u(&s["pending"]);
        let h = &s["fire_lateness"];
        out.count += u(&h["count"]);
        out.p50_ms = out.p50_ms.max(u(&h["p50_ms"]));
        out.p99_ms = out.p99_ms.max(u(&h["p99_ms"]));
        out.p999_ms = out.p999_ms.max(u(&h["p999_ms"]));
        out.max_ms = out.max_ms.max(u(&h["max_ms"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("keelmq-loadgen").chain(extra.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn defaults_keep_the_plain_shape() {
        let w = workload(&args(&[])).unwrap();
        assert_eq!(w.shape, shape::Shape::default());
        assert_eq!(w.due_burst, 0);
        assert_eq!(w.rate, Some(10_000.0));
        assert_eq!(w.batch_max, 1);
    }

    #[test]
    fn new_flags_make_the_shape() {
        let w = workload(&args(&[
            "--delay-ms",
            "1000",
            "--delay-spread-ms",
            "500",
            "--priorities",
            "4",
            "--filter-sql-pass-pct",
            "1",
        ]))
        .unwrap();
        let d = w.shape.due.unwrap();
        assert_eq!((d.delay_ms, d.spread_ms, d.burst), (1000, 500, false));
        assert_eq!(w.shape.priorities, Some(4));
        assert_eq!(w.shape.filter.unwrap().describe(), "SQL92 k = 1");
        assert_eq!(w.rate, Some(10_000.0));
        // A burst is produced as fast as possible.
        let b = workload(&args(&["--due-burst", "500000", "--delay-ms", "20000"])).unwrap();
        assert!(b.shape.due.unwrap().burst);
        assert_eq!((b.rate, b.batch_max, b.due_burst), (None, 1000, 500_000));
        // Refused: out of range, both filters, a backlog of scheduled messages.
        assert!(Args::try_parse_from(["x", "--priorities", "11"]).is_err());
        assert!(Args::try_parse_from(["x", "--priorities", "0"]).is_err());
        assert!(workload(&args(&["--filter-tag-pass-pct", "101"])).is_err());
        assert!(Args::try_parse_from([
            "x",
            "--filter-tag-pass-pct",
            "1",
            "--filter-sql-pass-pct",
            "1"
        ])
        .is_err());
        assert!(workload(&args(&["--backlog", "10", "--delay-ms", "5"])).is_err());
    }

    #[test]
    fn group_subscription_carries_the_filter() {
        let w = workload(&args(&["--filter-tag-pass-pct", "1"])).unwrap();
        let s = subscription("t", &w.shape);
        assert_eq!(
            s,
            json!({"topic": "t", "filter": "pass", "filter_type": "TAG"})
        );
        // What the client reads back from a group's settings.
        let settings = json!({ "subscriptions": [s] });
        assert_eq!(
            keelmq::client::subscription_filter(&settings, "t"),
            w.shape.filter.map(|f| f.spec())
        );
        assert_eq!(
            subscription("t", &shape::Shape::default()),
            json!({"topic": "t"})
        );
    }

    #[test]
    fn priority_rows_highest_first() {
        let mut hs: Vec<Histogram<u64>> = (0..3)
            .map(|_| Histogram::new_with_bounds(1, 600_000_000, 3).unwrap())
            .collect();
        for v in 1..=100u64 {
            hs[0].record(v * 1000).unwrap();
            hs[2].record(v).unwrap();
        }
        let rows = priority_rows(&hs);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["priority"], 2);
        assert_eq!(rows[0]["count"], 100);
        assert_eq!(rows[0]["p50_us"], 50);
        assert_eq!(rows[0]["max_us"], 100);
        assert_eq!(rows[1]["priority"], 1);
        assert_eq!(rows[1]["count"], 0);
        assert_eq!(rows[1]["p99_us"], 0);
        assert_eq!(rows[2]["priority"], 0);
        let p99 = rows[2]["p99_us"].as_u64().unwrap();
        assert!((99_000..=99_100).contains(&p99), "{p99}");
    }

    #[test]
    fn schedule_stats_over_shards() {
        let stats = json!({"shards": [
            {"schedule": {"pending": 3, "fired": 10, "fire_lateness": {"count": 10, "p50_ms": 1, "p99_ms": 2, "p999_ms": 3, "max_ms": 4}}},
            {"schedule": {"pending": 0, "fired": 5, "fire_lateness": {"count": 5, "p50_ms": 2, "p99_ms": 1, "p999_ms": 7, "max_ms": 9}}},
            {}
        ]});
        assert_eq!(
            schedule_stats(&stats),
            ScheduleStats {
                fired: 15,
                pending: 3,
                count: 15,
                p50_ms: 2,
                p99_ms: 2,
                p999_ms: 7,
                max_ms: 9
            }
        );
    }
}
