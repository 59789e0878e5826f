//! The `keelmq` command: run the broker, and talk to one.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use keelmq::client::{
    Admin, Consumer, FilterSpec, GroupConsumer, Message, MessageId, Producer, QueueSelector,
    Record, SeekTo,
};
use keelmq::config::Config;
use keelmq::protocol::Durability;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DEFAULT_BROKER: &str = "127.0.0.1:7400";

#[derive(Parser)]
#[command(
    name = "keelmq",
    version,
    about = "KeelMQ: a thread-per-core, io_uring message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (no config file needed).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Tuning profile: low-latency, throughput, durable (or a .toml path).
        #[arg(long)]
        profile: Option<String>,
        /// Data directory (default ./keelmq-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Listen address (default 127.0.0.1:7400).
        #[arg(long)]
        listen: Option<String>,
        /// Shards, one per core (default: every core).
        #[arg(long)]
        shards: Option<u16>,
    },
    /// Manage topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
        #[arg(long, global = true, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Produce messages: the arguments, or each line of stdin.
    Produce(ProduceArgs),
    /// Consume messages and print them.
    Consume {
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
        #[arg(long)]
        topic: String,
        /// Queue index (default: every queue).
        #[arg(long)]
        queue: Option<u32>,
        /// earliest, latest, offset:N or time:MILLIS.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Exit when nothing new arrived for this long.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// One JSON object per message, with every field.
        #[arg(long)]
        json: bool,
        /// Receive as a member of this consumer group (message delivery;
        /// the group is created if it does not exist).
        #[arg(long)]
        group: Option<String>,
        /// With --group: acknowledge every message received.
        #[arg(long, requires = "group")]
        ack: bool,
        /// With --group: nack every Nth message (it comes back after the
        /// group's backoff), ack the others.
        #[arg(long, requires = "group")]
        nack_every: Option<u64>,
        /// Only messages with one of these tags: "TagA||TagB" (filtered in
        /// the broker; with --group, the group's filter).
        #[arg(long, conflicts_with = "sql")]
        tag: Option<String>,
        /// Only messages this SQL92 expression passes, over properties and
        /// TAGS, KEYS, BORN_TIMESTAMP, STORE_TIMESTAMP:
        /// "price > 100 AND desk = 'fx'".
        #[arg(long)]
        sql: Option<String>,
    },
    /// Manage consumer groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
        #[arg(long, global = true, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Dead letters of a consumer group (its `%DLQ%<group>` topic).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[arg(long, global = true, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Look messages up.
    Message {
        #[command(subcommand)]
        command: MessageCommand,
        #[arg(long, global = true, default_value = DEFAULT_BROKER)]
        broker: String,
    },
    /// Per-shard counters and latencies.
    Stats {
        #[arg(long, default_value = DEFAULT_BROKER)]
        broker: String,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        /// memory, written or fsync (default: the broker's).
        #[arg(long)]
        durability: Option<String>,
    },
    /// List topics.
    List,
    /// Show a topic's queues, shards and offsets.
    Describe { name: String },
    /// Delete a topic.
    Delete { name: String },
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum GroupCommand {
    /// Create a consumer group.
    Create {
        name: String,
        /// A topic the group consumes (repeat for more).
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// clustering (members share the work) or broadcast.
        #[arg(long, default_value = "clustering")]
        mode: String,
        /// message (any member receives any message, acks each) or queue
        /// (one owner per queue, offsets committed).
        #[arg(long, default_value = "message")]
        delivery: String,
        /// Deliver each queue (each message group, keyed by the record key)
        /// in order: the next only after the previous is acked.
        #[arg(long)]
        orderly: bool,
        /// Deliveries of one message before it goes to the dead letters.
        #[arg(long)]
        attempts_max: Option<u32>,
        /// Retry delays, one per failed attempt: "10s 30s 1m" (ms, s, m, h, d).
        #[arg(long)]
        backoff: Option<String>,
        /// Default invisible time of a receive, in ms.
        #[arg(long)]
        invisible_ms: Option<u64>,
        /// Most messages in flight per queue.
        #[arg(long)]
        inflight_max: Option<u32>,
        /// Session timeout of members, in ms.
        #[arg(long)]
        session_timeout_ms: Option<u64>,
        /// memory, written or fsync for acks and commits (default: each topic's).
        #[arg(long)]
        durability: Option<String>,
        /// alongside (default) or before: when deliveries are journaled.
        #[arg(long)]
        journal_deliveries: Option<String>,
        /// latest (default) or earliest: where the group starts.
        #[arg(long)]
        start: Option<String>,
        /// Deliver only messages with one of these tags: "TagA||TagB".
        #[arg(long, conflicts_with = "filter_sql")]
        filter_tag: Option<String>,
        /// Deliver only messages this SQL92 expression passes.
        #[arg(long)]
        filter_sql: Option<String>,
    },
    /// List consumer groups.
    List,
    /// Show a group's settings, members and per-queue state.
    Describe {
        name: String,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Delete a consumer group.
    Delete { name: String },
    /// Move a group's position in every queue of a topic (stop its members
    /// first in queue delivery).
    Reset {
        name: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest, time:MILLIS or offset:N.
        #[arg(long)]
        to: String,
        /// Broadcast groups: the instance whose offsets move.
        #[arg(long, default_value = "")]
        instance: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print a group's dead letters.
    List {
        group: String,
        /// One JSON object per message.
        #[arg(long)]
        json: bool,
    },
    /// Produce dead letters again to the topic they came from.
    Resend {
        group: String,
        /// Only this dead letter (its id in the DLQ topic).
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum MessageCommand {
    /// Show a message by id.
    Get {
        id: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a scheduled message that is not due yet (it is never
    /// delivered).
    Cancel { id: String },
}

/// Parses "250ms", "5s", "2m", "1h", "3d" or a bare number of ms.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 250ms, 5s, 2m, 1h or 3d"))?;
    let scale = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        u => return Err(format!("unknown unit '{u}' in '{s}' (ms, s, m, h or d)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("'{s}' is too long"))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            profile,
            data_dir,
            listen,
            shards,
        } => serve(config, profile, data_dir, listen, shards),
        Command::Topic { command, broker } => topic(&broker, command),
        Command::Produce(args) => produce(args),
        Command::Consume {
            broker,
            topic,
            queue,
            from,
            count,
            timeout_ms,
            json,
            group,
            ack,
            nack_every,
            tag,
            sql,
        } => {
            let filter = filter_spec(tag, sql);
            match group {
                Some(g) => consume_group(
                    &broker, &g, &topic, count, timeout_ms, json, ack, nack_every, filter,
                ),
                None => consume(
                    &broker, &topic, queue, &from, count, timeout_ms, json, filter,
                ),
            }
        }
        Command::Group { command, broker } => group(&broker, command),
        Command::Dlq { command, broker } => dlq(&broker, command),
        Command::Message { command, broker } => match command {
            MessageCommand::Get { id, json } => message_get(&broker, &id, json),
            MessageCommand::Cancel { id } => message_cancel(&broker, &id),
        },
        Command::Stats { broker, json } => stats(&broker, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn serve(
    config: Option<PathBuf>,
    profile: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    shards: Option<u16>,
) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = Config::default();
    if let Some(p) = &profile {
        cfg.apply_profile(p)?;
    }
    if let Some(path) = &config {
        cfg.apply_file(path)?;
    }
    if let Some(d) = data_dir {
        cfg.broker.data_dir = d;
    }
    if let Some(l) = listen {
        cfg.broker.listen = keelmq::config::parse_listen(&l)?;
    }
    if let Some(n) = shards {
        if n == 0 {
            bail!("--shards must be at least 1");
        }
        cfg.broker.shards = n;
    }
    keelmq::broker::run(cfg)?;
    Ok(())
}

fn topic(broker: &str, command: TopicCommand) -> Result<()> {
    let mut admin =
        Admin::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    match command {
        TopicCommand::Create {
            name,
            queues,
            durability,
        } => {
            let d = durability
                .map(|d| {
                    Durability::parse(&d).ok_or_else(|| {
                        anyhow!("--durability must be memory, written or fsync, not '{d}'")
                    })
                })
                .transpose()?;
            let t = admin.create_topic(&name, queues, d)?;
            println!(
                "created topic {} with {} queues, durability {}",
                t.name,
                t.queues.len(),
                t.durability.name()
            );
        }
        TopicCommand::List => {
            for t in admin.list_topics()? {
                println!(
                    "{}\tqueues={}\tdurability={}",
                    t.name,
                    t.queues.len(),
                    t.durability.name()
                );
            }
        }
        TopicCommand::Describe { name } => {
            let d = admin.describe_topic(&name)?;
            println!(
                "topic {} durability={} queues={}",
                d.topic.name,
                d.topic.durability.name(),
                d.topic.queues.len()
            );
            println!("queue\tshard\tqueue_id\tearliest\tlatest");
            for (i, (q, o)) in d.topic.queues.iter().zip(&d.offsets).enumerate() {
                println!(
                    "{i}\t{}\t{}\t{}\t{}",
                    q.shard, q.queue_id, o.earliest, o.latest
                );
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name)?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct ProduceArgs {
    #[arg(long, default_value = DEFAULT_BROKER)]
    broker: String,
    #[arg(long)]
    topic: String,
    /// Queue index (default: by key, else spread over the queues).
    #[arg(long)]
    queue: Option<u32>,
    /// Message key; also picks the queue when --queue is absent.
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    tag: Option<String>,
    /// A property k=v (repeatable).
    #[arg(long = "prop", value_name = "K=V")]
    props: Vec<String>,
    /// Deliver each message this long after the broker takes it: "250ms",
    /// "5s", "2m", "1h", "3d" (a bare number is ms). Prints each
    /// scheduled message's id, for `keelmq message cancel`.
    #[arg(long, conflicts_with = "at", value_parser = parse_duration_ms)]
    delay: Option<u64>,
    /// Deliver at this time, ms since the Unix epoch (broker clock; a
    /// time already past is now).
    #[arg(long)]
    at: Option<i64>,
    /// Priority, 0 (default, lowest) to 9 (highest).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: u8,
    /// Most messages per batch.
    #[arg(long, default_value_t = 1000)]
    batch_max: usize,
    /// Most batches awaiting acknowledgement.
    #[arg(long, default_value_t = 32)]
    in_flight_max: usize,
    /// Messages; with none, each line of stdin is one message.
    messages: Vec<String>,
}

/// Tracks which sent batches are acknowledged, to report the acknowledged
/// prefix: `acked N` means the first N messages read are stored.
struct AckPrefix {
    /// (ticket, messages) in send order, not yet counted.
    sent: std::collections::VecDeque<(u64, usize)>,
    acked_tickets: std::collections::HashSet<u64>,
    prefix: usize,
}

impl AckPrefix {
    fn ack(&mut self, ticket: u64) {
        self.acked_tickets.insert(ticket);
        while let Some(&(t, n)) = self.sent.front() {
            if !self.acked_tickets.remove(&t) {
                break;
            }
            self.prefix += n;
            self.sent.pop_front();
        }
    }
}

fn produce(a: ProduceArgs) -> Result<()> {
    let mut acks = AckPrefix {
        sent: Default::default(),
        acked_tickets: Default::default(),
        prefix: 0,
    };
    let result = produce_inner(&a, &mut acks);
    eprintln!("acked {}", acks.prefix);
    result
}

fn produce_inner(a: &ProduceArgs, acks: &mut AckPrefix) -> Result<()> {
    let mut properties = Vec::new();
    for p in &a.props {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--prop takes k=v, got '{p}'"))?;
        properties.push((k.to_owned(), v.to_owned()));
    }
    let mut producer = Producer::connect(&a.broker)
        .with_context(|| format!("cannot reach broker {}", a.broker))?;
    let sel = match (a.queue, &a.key) {
        (Some(q), _) => QueueSelector::Queue(q),
        (None, Some(k)) => QueueSelector::Key(k.clone().into()),
        (None, None) => QueueSelector::RoundRobin,
    };
    let deliver_at_ms = match (a.delay, a.at) {
        (Some(d), _) => i64::try_from(d).unwrap_or(i64::MAX).saturating_neg(),
        (None, Some(at)) => at.max(1),
        (None, None) => 0,
    };
    let make = |payload: String| Record {
        key: a.key.clone().map(Into::into),
        tag: a.tag.clone(),
        properties: properties.clone(),
        payload: payload.into(),
        priority: a.priority,
        deliver_at_ms,
        ..Record::default()
    };
    let show_ids = deliver_at_ms != 0;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut print_ids = |receipts: Vec<keelmq::client::SendReceipt>| -> Result<()> {
        if show_ids {
            for r in receipts.iter().filter(|r| r.is_scheduled()) {
                writeln!(out, "scheduled {}", r.id)?;
            }
            out.flush()?;
        }
        Ok(())
    };
    let batch_max = a.batch_max.max(1);
    let budget = producer.batch_bytes_max().saturating_sub(1024);
    // Lines come from a reader thread, so a batch is sent as soon as stdin
    // has nothing more ready (no waiting to fill it).
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<String>>(batch_max * 4);
    if a.messages.is_empty() {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let stop = line.is_err();
                if tx.send(line).is_err() || stop {
                    return;
                }
            }
        });
    } else {
        for m in &a.messages {
            tx.send(Ok(m.clone()))
                .expect("channel has room for the arguments");
        }
        drop(tx);
    }
    let mut pending: Option<String> = None;
    let mut done = false;
    while !done || producer.in_flight() > 0 {
        // Gather a batch from what is ready.
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        if !done && producer.in_flight() < a.in_flight_max.max(1) {
            let first = match pending.take() {
                Some(p) => Some(p),
                None if producer.in_flight() == 0 => match rx.recv() {
                    Ok(line) => Some(line?),
                    Err(_) => {
                        done = true;
                        None
                    }
                },
                None => match rx.try_recv() {
                    Ok(line) => Some(line?),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        done = true;
                        None
                    }
                },
            };
            if let Some(first) = first {
                bytes += first.len() + 64;
                batch.push(make(first));
                while batch.len() < batch_max {
                    match rx.try_recv() {
                        Ok(line) => {
                            let line = line?;
                            if bytes + line.len() + 64 > budget {
                                pending = Some(line);
                                break;
                            }
                            bytes += line.len() + 64;
                            batch.push(make(line));
                        }
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            done = pending.is_none();
                            break;
                        }
                    }
                }
            }
        }
        if !batch.is_empty() {
            let ticket = producer.submit_batch(&a.topic, sel.clone(), &batch)?;
            acks.sent.push_back((ticket, batch.len()));
            // Keep sending while there is room and input is ready.
            if producer.in_flight() < a.in_flight_max.max(1) {
                if let Some((t, r)) = producer.poll_ack(Duration::ZERO)? {
                    print_ids(r?)?;
                    acks.ack(t);
                }
                continue;
            }
        }
        if producer.in_flight() > 0 {
            let wait = if batch.is_empty() && !done {
                Duration::from_millis(1)
            } else {
                Duration::from_secs(60)
            };
            if let Some((t, r)) = producer.poll_ack(wait)? {
                print_ids(r?)?;
                acks.ack(t);
            }
        }
    }
    Ok(())
}

fn parse_from(from: &str) -> Result<SeekTo> {
    Ok(match from {
        "earliest" => SeekTo::Earliest,
        "latest" => SeekTo::Latest,
        f => match f.split_once(':') {
            Some(("offset", n)) => SeekTo::Offset(
                n.parse()
                    .with_context(|| format!("bad offset in --from {f}"))?,
            ),
            Some(("time", n)) => SeekTo::Timestamp(
                n.parse()
                    .with_context(|| format!("bad time in --from {f}"))?,
            ),
            _ => bail!("--from must be earliest, latest, offset:N or time:MILLIS, not '{f}'"),
        },
    })
}

fn print_message(out: &mut impl Write, m: &Message, json: bool) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", m.to_json())
    } else {
        out.write_all(&m.payload)?;
        out.write_all(b"\n")
    }
}

/// The filter of `--tag`/`--sql` (or `--filter-tag`/`--filter-sql`).
fn filter_spec(tag: Option<String>, sql: Option<String>) -> Option<FilterSpec> {
    tag.map(FilterSpec::tag).or(sql.map(FilterSpec::sql))
}

#[allow(clippy::too_many_arguments)]
fn consume(
    broker: &str,
    topic: &str,
    queue: Option<u32>,
    from: &str,
    count: Option<u64>,
    timeout_ms: u64,
    json: bool,
    filter: Option<FilterSpec>,
) -> Result<()> {
    let seek = parse_from(from)?;
    let mut consumer =
        Consumer::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    consumer.set_filter(filter);
    match queue {
        Some(q) => consumer.assign(topic, &[q])?,
        None => consumer.assign_all(topic)?,
    }
    consumer.seek(seek)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut seen = 0u64;
    let idle = Duration::from_millis(timeout_ms);
    let mut last = Instant::now();
    while count.is_none_or(|c| seen < c) {
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            break;
        }
        let batch = consumer.poll(left)?;
        if !batch.is_empty() {
            last = Instant::now();
        }
        for m in batch {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            print_message(&mut out, &m, json)?;
            seen += 1;
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn consume_group(
    broker: &str,
    group: &str,
    topic: &str,
    count: Option<u64>,
    timeout_ms: u64,
    json: bool,
    ack: bool,
    nack_every: Option<u64>,
    filter: Option<FilterSpec>,
) -> Result<()> {
    if nack_every == Some(0) {
        bail!("--nack-every must be at least 1");
    }
    let mut c = GroupConsumer::connect_filtered(broker, group, topic, filter)
        .with_context(|| format!("cannot join group {group} at {broker}"))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut seen = 0u64;
    let idle = Duration::from_millis(timeout_ms);
    let mut last = Instant::now();
    while count.is_none_or(|c| seen < c) {
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            break;
        }
        let want = count.map_or(usize::MAX, |c| (c - seen) as usize);
        c.set_receive_batch(want.min(256) as u32);
        let got = c.receive_at_most(want, left)?;
        if !got.is_empty() {
            last = Instant::now();
        }
        let (mut acks, mut nacks) = (Vec::new(), Vec::new());
        for d in got {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            seen += 1;
            if json {
                let mut v = d.message.to_json();
                v["attempt"] = d.attempt.into();
                writeln!(out, "{v}")?;
            } else {
                print_message(&mut out, &d.message, false)?;
            }
            if nack_every.is_some_and(|n| seen % n == 0) {
                nacks.push(d.handle);
            } else if ack || nack_every.is_some() {
                acks.push(d.handle);
            }
        }
        out.flush()?;
        if !acks.is_empty() {
            c.ack(&acks)?;
        }
        if !nacks.is_empty() {
            c.nack(&nacks, None)?;
        }
    }
    out.flush()?;
    c.close()?;
    Ok(())
}

fn group(broker: &str, command: GroupCommand) -> Result<()> {
    let mut admin =
        Admin::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    match command {
        GroupCommand::Create {
            name,
            topics,
            mode,
            delivery,
            orderly,
            attempts_max,
            backoff,
            invisible_ms,
            inflight_max,
            session_timeout_ms,
            durability,
            journal_deliveries,
            start,
            filter_tag,
            filter_sql,
        } => {
            let filter = filter_spec(filter_tag, filter_sql);
            let subscriptions: Vec<serde_json::Value> = topics
                .iter()
                .map(|t| match &filter {
                    None => serde_json::json!({"topic": t}),
                    Some(f) => serde_json::json!({
                        "topic": t,
                        "filter": f.expression,
                        "filter_type": f.kind.name(),
                    }),
                })
                .collect();
            let mut v = serde_json::json!({
                "mode": mode,
                "delivery": delivery,
                "orderly": orderly,
                "subscriptions": subscriptions,
            });
            if let Some(a) = attempts_max {
                v["attempts_max"] = a.into();
            }
            if let Some(b) = backoff {
                let b = keelmq::group::backoff::Backoff::parse(&b)
                    .map_err(|e| anyhow!("--backoff: {e}"))?;
                v["backoff"] = serde_json::json!(b.steps_ms());
            }
            if let Some(x) = invisible_ms {
                v["invisible_ms"] = x.into();
            }
            if let Some(x) = inflight_max {
                v["inflight_messages_max"] = x.into();
            }
            if let Some(x) = session_timeout_ms {
                v["session_timeout_ms"] = x.into();
            }
            if let Some(x) = durability {
                v["durability"] = x.into();
            }
            if let Some(x) = journal_deliveries {
                v["journal_deliveries"] = x.into();
            }
            if let Some(x) = start {
                v["start"] = x.into();
            }
            let g = admin.create_group(&name, &v)?;
            println!(
                "created group {} (id {}, coordinator shard {}, dead letters in {})",
                name,
                g["id"],
                g["coordinator"],
                g["dlq_topic"].as_str().unwrap_or("?")
            );
        }
        GroupCommand::List => {
            let groups = admin.list_groups()?;
            println!(
                "{:<32} {:>6} {:<11} {:<8} {:<7} topics",
                "group", "id", "mode", "delivery", "orderly"
            );
            for g in groups.as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>6} {:<11} {:<8} {:<7} {}",
                    g["name"].as_str().unwrap_or("?"),
                    g["id"].to_string(),
                    g["mode"].as_str().unwrap_or("?"),
                    g["delivery"].as_str().unwrap_or("?"),
                    g["orderly"].to_string(),
                    g["topics"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
        }
        GroupCommand::Describe { name, json } => {
            let d = admin.describe_group(&name)?;
            if json {
                println!("{d}");
                return Ok(());
            }
            let s = &d["settings"];
            println!(
                "group {} (id {}) · {} · {} delivery · orderly {} · attempts {} · coordinator shard {}",
                name,
                d["id"],
                s["mode"].as_str().unwrap_or("?"),
                s["delivery"].as_str().unwrap_or("?"),
                s["orderly"],
                s["attempts_max"],
                d["coordinator"]
            );
            println!(
                "dead letters: {} in {}",
                d["dlq_depth"],
                d["dlq_topic"].as_str().unwrap_or("?")
            );
            let members = d["members"].as_array().cloned().unwrap_or_default();
            println!("members: {}", members.len());
            for m in &members {
                let queues: Vec<String> = m["queues"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|q| format!("{}/{}", q["topic"].as_str().unwrap_or("?"), q["queue"]))
                    .collect();
                println!(
                    "  member {} ({}): {}",
                    m["member"],
                    m["instance"].as_str().unwrap_or("?"),
                    queues.join(" ")
                );
            }
            println!(
                "{:<24} {:>5} {:>5} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6}  instance",
                "topic",
                "queue",
                "shard",
                "committed",
                "latest",
                "lag",
                "in_flight",
                "retrying",
                "dlq'ing"
            );
            for q in d["queues"].as_array().into_iter().flatten() {
                let f = |k: &str| q.get(k).map_or(String::new(), |v| v.to_string());
                let committed = q.get("committed").or_else(|| q.get("acked_below"));
                println!(
                    "{:<24} {:>5} {:>5} {:>12} {:>12} {:>10} {:>9} {:>8} {:>6}  {}",
                    q["topic"].as_str().unwrap_or("?"),
                    f("queue"),
                    f("shard"),
                    committed.map_or(String::new(), |v| v.to_string()),
                    f("latest"),
                    f("lag"),
                    f("in_flight"),
                    f("retrying"),
                    f("dead_lettering"),
                    q.get("instance").and_then(|i| i.as_str()).unwrap_or("")
                );
            }
        }
        GroupCommand::Delete { name } => {
            admin.delete_group(&name)?;
            println!("deleted group {name}");
        }
        GroupCommand::Reset {
            name,
            topic,
            to,
            instance,
        } => {
            use keelmq::protocol::OffsetSpec;
            let info = admin
                .metadata(std::slice::from_ref(&topic))?
                .topics
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("no topic {topic}"))?;
            for (i, q) in info.queues.iter().enumerate() {
                let i = i as u32;
                let offset = match parse_from(&to)? {
                    SeekTo::Earliest => admin.list_offset(&topic, i, OffsetSpec::Earliest)?,
                    SeekTo::Latest => admin.list_offset(&topic, i, OffsetSpec::Latest)?,
                    SeekTo::Timestamp(t) => {
                        admin.list_offset(&topic, i, OffsetSpec::Timestamp(t))?
                    }
                    SeekTo::Offset(o) => o,
                };
                admin
                    .reset_group_offset(&name, q.queue_id, &instance, offset)
                    .with_context(|| format!("queue {i}"))?;
                println!("queue {i}: {offset}");
            }
        }
    }
    Ok(())
}

/// Every dead letter of a group (read from the start of its DLQ topic).
fn dead_letters(broker: &str, group: &str) -> Result<Vec<Message>> {
    let topic = format!("%DLQ%{group}");
    let mut c =
        Consumer::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    c.assign_all(&topic)
        .with_context(|| format!("group {group} has no dead-letter topic"))?;
    c.seek(SeekTo::Earliest)?;
    let mut out = Vec::new();
    loop {
        let got = c.poll(Duration::from_millis(300))?;
        if got.is_empty() {
            return Ok(out);
        }
        out.extend(got);
    }
}

fn dlq(broker: &str, command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List { group, json } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for m in dead_letters(broker, &group)? {
                print_message(&mut out, &m, json)?;
            }
            out.flush()?;
        }
        DlqCommand::Resend { group, id, all } => {
            if id.is_none() && !all {
                bail!("say which: --id ID or --all");
            }
            let id = id
                .map(|s| {
                    MessageId::parse(&s)
                        .ok_or_else(|| anyhow!("'{s}' is not a message id (28 hex digits)"))
                })
                .transpose()?;
            let mut p = Producer::connect(broker)
                .with_context(|| format!("cannot reach broker {broker}"))?;
            let mut sent = 0;
            for m in dead_letters(broker, &group)? {
                if id.is_some_and(|id| id != m.id) {
                    continue;
                }
                let prop = |k: &str| {
                    m.properties
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                };
                let topic = prop("DLQ_ORIGIN_TOPIC")
                    .ok_or_else(|| anyhow!("dead letter {} names no origin topic", m.id))?;
                let queue: u32 = prop("DLQ_ORIGIN_QUEUE")
                    .and_then(|q| q.parse().ok())
                    .ok_or_else(|| anyhow!("dead letter {} names no origin queue", m.id))?;
                let mut r = Record::new(m.payload.clone());
                r.key = m.key.clone();
                r.tag = m.tag.clone();
                r.priority = m.priority;
                r.properties = m
                    .properties
                    .iter()
                    .filter(|(k, _)| !k.starts_with("DLQ_"))
                    .cloned()
                    .collect();
                p.send_batch(&topic, QueueSelector::Queue(queue), &[r])
                    .with_context(|| format!("resending {} to {topic}", m.id))?;
                sent += 1;
            }
            if id.is_some() && sent == 0 {
                bail!("no dead letter with that id in group {group}");
            }
            println!("resent {sent} dead letters");
        }
    }
    Ok(())
}

fn message_cancel(broker: &str, id: &str) -> Result<()> {
    let id = MessageId::parse(id)
        .ok_or_else(|| anyhow!("'{id}' is not a message id (28 hex digits)"))?;
    let mut admin =
        Admin::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    admin.cancel_message(id)?;
    println!("cancelled {id}");
    Ok(())
}

fn message_get(broker: &str, id: &str, json: bool) -> Result<()> {
    let id = MessageId::parse(id)
        .ok_or_else(|| anyhow!("'{id}' is not a message id (28 hex digits)"))?;
    let mut admin =
        Admin::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    let m = admin.get_message(id)?;
    if json {
        println!("{}", m.to_json());
    } else {
        println!("{}", serde_json::to_string_pretty(&m.to_json())?);
    }
    Ok(())
}

fn stats(broker: &str, json: bool) -> Result<()> {
    let mut admin =
        Admin::connect(broker).with_context(|| format!("cannot reach broker {broker}"))?;
    let s = admin.stats()?;
    if json {
        println!("{s}");
        return Ok(());
    }
    println!(
        "keelmq {} · {} shards · {} topics",
        s["broker_version"].as_str().unwrap_or("?"),
        s["shard_count"],
        s["topics"]
    );
    println!("shard  queues  msgs_in  bytes_in  msgs_out  bytes_out  append_p50/p99/p999_us  fsync_p50/p99_us  conns  disk_free");
    for sh in s["shards"].as_array().into_iter().flatten() {
        let c = &sh["counters"];
        let a = &sh["append_latency"];
        let f = &sh["fsync_latency"];
        let t = |v: &serde_json::Value| v.to_string();
        let log = &sh["log"];
        let disk = match log["free_bytes"].as_u64() {
            Some(b) => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
            None => "?".into(),
        };
        let state = if !log["failed"].is_null() {
            " FAILED"
        } else if !log["full"].is_null() {
            " FULL"
        } else {
            ""
        };
        println!(
            "{:<6} {:<7} {:<8} {:<9} {:<9} {:<10} {:<23} {:<17} {:<6} {disk}{state}",
            t(&sh["shard"]),
            t(&sh["queues"]),
            t(&c["messages_in"]),
            t(&c["bytes_in"]),
            t(&c["messages_out"]),
            t(&c["bytes_out"]),
            format!("{}/{}/{}", a["p50_us"], a["p99_us"], a["p999_us"]),
            format!("{}/{}", f["p50_us"], f["p99_us"]),
            t(&c["connections_open"])
        );
    }
    // Where an append's time goes on the write path.
    println!("shard  append->written_p50/p99/p999_us  written->synced_p50/p99/p999_us  write_p50/p99_us  fdatasync_p50/p99_us");
    for sh in s["shards"].as_array().into_iter().flatten() {
        let h = |k: &str| {
            let v = &sh[k];
            format!("{}/{}/{}", v["p50_us"], v["p99_us"], v["p999_us"])
        };
        let w = &sh["write_latency"];
        let f = &sh["fsync_latency"];
        let write = format!("{}/{}", w["p50_us"], w["p99_us"]);
        println!(
            "{:<6} {:<31} {:<31} {:<17} {}/{}",
            sh["shard"].to_string(),
            h("append_written_latency"),
            h("written_synced_latency"),
            write,
            f["p50_us"],
            f["p99_us"],
        );
    }
    for sh in s["shards"].as_array().into_iter().flatten() {
        let log = &sh["log"];
        for (what, v) in [
            ("storage failed", &log["failed"]),
            ("disk full", &log["full"]),
        ] {
            if let Some(why) = v.as_str() {
                println!("shard {}: {what}: {why}", sh["shard"]);
            }
        }
    }
    // Scheduled messages, where a shard has any.
    for sh in s["shards"].as_array().into_iter().flatten() {
        let t = &sh["schedule"];
        if t["scheduled"].as_u64().unwrap_or(0) == 0 && t["pending"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let l = &t["fire_lateness"];
        println!(
            "shard {}: scheduled {} pending, {} fired, {} cancelled, {} carried; fired late p50/p99/max {}/{}/{} ms; {:.1} MiB",
            sh["shard"],
            t["pending"],
            t["fired"],
            t["cancelled"],
            t["carried"],
            l["p50_ms"],
            l["p99_ms"],
            l["max_ms"],
            t["memory_bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64
        );
    }
    Ok(())
}
