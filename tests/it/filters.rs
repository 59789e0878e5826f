//! Broker-side message filters against the real broker with 2 shards: a
//! table of TAG and SQL92 expressions, each with the exact messages it must
//! pass out of 16 produced ones (tags, keys, born timestamps and
//! properties chosen to reach every operator, NULLs and type mismatches),
//! run through fetch-many (the `Consumer`) and single-queue fetches over
//! every queue (and the TAG rows again after a restart); a subset through
//! message-delivery groups, pull and push, with the client's
//! `GroupConsumer` and with bare requests: filtered-out messages never
//! arrive, do not come back after the invisible time, and the lag reaches
//! 0; queue-delivery members; the CLI; a filtered long poll; and the
//! refusals (`invalid_filter`, with the byte position) of bad expressions
//! at fetch and at group create.
//!
//! Expected matches are worked out by hand from `docs/PROTOCOL.md`
//! ("Filter expressions") and the unit tests of `src/filter/sql`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keelmq::client::{
    decode_batch, Admin, ClientError, Connection, Consumer, ErrorCode, FilterSpec, GroupConsumer,
    GroupMember, Incoming, Message, Producer, QueueSelector, Record, SeekTo, TopicInfo,
};
use keelmq::protocol::{
    decode_codes, Durability, FetchRequest, FetchResponse, Op, PushBatch, ReceiveRequest,
    ReceiveResponse, SettleRequest, SubscribeRequest, SubscribeResponse,
};

use super::*;

const TOPIC: &str = "flt";
const QUEUES: u32 = 6;
/// Born timestamps: `BORN + 1000 * i`, except message 12's.
const BORN: i64 = 1_600_000_000_000;
/// Message 12 was born after it was stored (a producer clock ahead).
const FUTURE: i64 = 4_000_000_000_000;
/// Invisible time of the group consumers: a message leased and neither
/// acked nor finished would come back after it (long enough for a reader
/// starved on a loaded machine to ack in time).
const INVISIBLE: Duration = Duration::from_millis(1500);

/// One produced message: payload `m{i:02}`.
struct Msg {
    tag: Option<&'static str>,
    key: Option<&'static str>,
    born: i64,
    props: &'static [(&'static str, &'static str)],
}

const fn m(
    tag: Option<&'static str>,
    key: Option<&'static str>,
    born: i64,
    props: &'static [(&'static str, &'static str)],
) -> Msg {
    Msg {
        tag,
        key,
        born,
        props,
    }
}

/// The 16 messages. 0-7 are stored before `{cut}` (see the table), 8-15
/// after it.
const MSGS: [Msg; 16] = [
    // 0
    m(
        Some("A"),
        Some("cust-1"),
        BORN,
        &[
            ("price", "150"),
            ("qty", "2.5"),
            ("desk", "fx"),
            ("flag", "true"),
            ("note", "50% off"),
        ],
    ),
    // 1
    m(
        Some("B"),
        Some("cust-2"),
        BORN + 1000,
        &[
            ("price", "99.5"),
            ("qty", "1"),
            ("desk", "eq"),
            ("flag", "false"),
        ],
    ),
    // 2
    m(
        Some("A"),
        Some("cust-22"),
        BORN + 2000,
        &[("price", "-7"), ("desk", "FX"), ("note", "it's")],
    ),
    // 3: an empty string property, a boolean in capitals
    m(
        Some("C"),
        Some("vip-3"),
        BORN + 3000,
        &[("price", "0"), ("desk", ""), ("flag", "TRUE")],
    ),
    // 4: no tag, a price that is not a number
    m(
        None,
        Some("cust-4"),
        BORN + 4000,
        &[("price", "abc"), ("desk", "fx-options"), ("note", "a_b")],
    ),
    // 5: no key
    m(
        Some("A"),
        None,
        BORN + 5000,
        &[("price", "1000"), ("qty", "10"), ("note", "a%b")],
    ),
    // 6: a lower-case tag, a flag that is not a boolean
    m(
        Some("a"),
        Some("cust-6"),
        BORN + 6000,
        &[("price", "200"), ("desk", "eq"), ("flag", "yes")],
    ),
    // 7: no properties at all
    m(Some("B"), Some("vip-7"), BORN + 7000, &[]),
    // 8
    m(
        Some("D"),
        Some("cust-8"),
        BORN + 8000,
        &[("price", "100"), ("desk", "fx"), ("region", "EU")],
    ),
    // 9: a decimal equal to an integer
    m(
        Some("A"),
        Some("vip-9"),
        BORN + 9000,
        &[("price", "100.0"), ("desk", "fx"), ("flag", "false")],
    ),
    // 10
    m(
        Some("C"),
        Some("cust-10"),
        BORN + 10_000,
        &[
            ("price", "-100"),
            ("qty", "0.25"),
            ("desk", "eq"),
            ("note", "50%"),
        ],
    ),
    // 11: neither tag nor key
    m(
        None,
        None,
        BORN + 11_000,
        &[("desk", "fx"), ("flag", "false")],
    ),
    // 12: born in the future, an empty note
    m(
        Some("B"),
        Some("cust-12"),
        FUTURE,
        &[("price", "5"), ("desk", "commodities"), ("note", "")],
    ),
    // 13
    m(
        Some("TagE"),
        Some("x_y"),
        BORN + 13_000,
        &[
            ("price", "42"),
            ("qty", "-0.5"),
            ("desk", "eq"),
            ("flag", "true"),
        ],
    ),
    // 14
    m(
        Some("C"),
        Some("x%y"),
        BORN + 14_000,
        &[("price", "7"), ("desk", "fx"), ("note", "100%")],
    ),
    // 15
    m(
        Some("D"),
        Some("KEY"),
        BORN + 15_000,
        &[("price", "99"), ("desk", "EQ"), ("flag", "false")],
    ),
];

/// Batches: (queue, messages), phase 1 then phase 2. Batches mix tags so
/// that filters send some whole, some as filtered copies, skip some.
const PHASE_1: &[(u32, &[usize])] = &[(0, &[0, 1, 2]), (1, &[3]), (2, &[4, 5, 6]), (3, &[7])];
const PHASE_2: &[(u32, &[usize])] = &[(4, &[8, 9]), (5, &[10, 11, 12, 13]), (0, &[14]), (2, &[15])];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lang {
    Tag,
    Sql,
}
use Lang::{Sql as S, Tag as T};

impl Lang {
    fn spec(self, expression: &str) -> FilterSpec {
        match self {
            Lang::Tag => FilterSpec::tag(expression),
            Lang::Sql => FilterSpec::sql(expression),
        }
    }
}

const ALL: &[usize] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
const NONE: &[usize] = &[];

type Row = (Lang, &'static str, &'static [usize], bool);

/// (language, expression, the messages it passes, also run through
/// message-delivery groups (pull and push)). `{cut}`
/// is replaced by the broker time after which messages 8-15 were stored
/// and before which 0-7 were.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    // TAG: `*`, one tag, tags joined by `||` (with spaces, repeated);
    // tags are case-sensitive; an untagged message matches only `*`.
    (T, "*", ALL, false),
    (T, " * ", ALL, false),
    (T, "A", &[0, 2, 5, 9], false),
    (T, "A || B", &[0, 1, 2, 5, 7, 9, 12], true),
    (T, " B||C ", &[1, 3, 7, 10, 12, 14], false),
    (T, "C", &[3, 10, 14], true),
    (T, "a", &[6], false),
    (T, "TagE || Nope", &[13], false),
    (T, "Nope", NONE, true),
    (T, "D||D||A", &[0, 2, 5, 8, 9, 15], false),
    (T, "B || D", &[1, 7, 8, 12, 15], false),
    // Numeric comparisons: properties read as numbers; 'abc' (4) and a
    // missing price (7, 11) are unknown; 100.0 = 100.
    (S, "price > 100", &[0, 5, 6], true),
    (S, "price >= 100", &[0, 5, 6, 8, 9], false),
    (S, "price < 0", &[2, 10], false),
    (S, "price <= 0", &[2, 3, 10], false),
    (S, "price = 100", &[8, 9], false),
    (S, "price <> 100", &[0, 1, 2, 3, 5, 6, 10, 12, 13, 14, 15], false),
    (S, "price = 99.5", &[1], false),
    (S, "price > -50", &[0, 1, 2, 3, 5, 6, 8, 9, 12, 13, 14, 15], false),
    (S, "price = -100", &[10], false),
    (S, "price = +42", &[13], false),
    (S, "price > 1e2", &[0, 5, 6], false),
    (S, "price > 999L", &[5], false),
    (S, "price > 10 AND price < 100", &[1, 13, 15], false),
    (S, "qty > 1", &[0, 5], false),
    (S, "qty <= -0.5", &[13], false),
    (S, "qty = 1.0", &[1], false),
    // Two properties: ordered as numbers.
    (S, "price > qty", &[0, 1, 5, 13], false),
    // Strings: equal or not, case-sensitive; '' is a value, not NULL.
    (S, "desk = 'fx'", &[0, 8, 9, 11, 14], false),
    (S, "desk <> 'fx'", &[1, 2, 3, 4, 6, 10, 12, 13, 15], false),
    (S, "desk = ''", &[3], false),
    (S, "'eq' = desk", &[1, 6, 10, 13], false),
    (S, "desk = 'FX'", &[2], false),
    (S, "desk = desk", &[0, 1, 2, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15], false),
    (S, "price = 'abc'", &[4], false),
    // Type mismatches are unknown (no match), never an error: the other
    // messages are still judged.
    (S, "price > 0", &[0, 1, 5, 6, 8, 9, 12, 13, 14, 15], false),
    (S, "NOT price > 0", &[2, 3, 10], false),
    (S, "price > 0 OR price = 'abc'", &[0, 1, 4, 5, 6, 8, 9, 12, 13, 14, 15], true),
    (S, "desk = 1", NONE, false),
    (S, "NOT (desk > 1)", NONE, false),
    (S, "desk BETWEEN 1 AND 2", NONE, false),
    (S, "price = TRUE", NONE, false),
    (S, "flag = 1", NONE, false),
    // Booleans: read as true/false (any case, as the unit tests have it);
    // 'yes' (6) is unknown. As a string, 'TRUE' is not 'true'.
    (S, "flag = TRUE", &[0, 3, 13], false),
    (S, "flag = FALSE", &[1, 9, 11, 15], false),
    (S, "flag <> TRUE", &[1, 9, 11, 15], false),
    (S, "NOT flag = TRUE", &[1, 9, 11, 15], false),
    (S, "flag = 'true'", &[0, 13], false),
    // BETWEEN / NOT BETWEEN (inclusive; numbers only).
    (S, "price BETWEEN 0 AND 100", &[1, 3, 8, 9, 12, 13, 14, 15], true),
    (S, "price NOT BETWEEN 0 AND 100", &[0, 2, 5, 6, 10], false),
    (S, "qty BETWEEN -1 AND 1", &[1, 10, 13], false),
    (S, "price BETWEEN -7.5 AND -6.5", &[2], false),
    // IN / NOT IN: string lists, compared as strings.
    (S, "desk IN ('fx', 'eq')", &[0, 1, 6, 8, 9, 10, 11, 13, 14], false),
    (S, "desk NOT IN ('fx', 'eq')", &[2, 3, 4, 12, 15], true),
    (S, "price IN ('100')", &[8], false),
    (S, "price NOT IN ('100', '100.0')", &[0, 1, 2, 3, 4, 5, 6, 10, 12, 13, 14, 15], false),
    (S, "TAGS IN ('A', 'C')", &[0, 2, 3, 5, 9, 10, 14], false),
    (S, "TAGS NOT IN ('A', 'B')", &[3, 6, 8, 10, 13, 14, 15], false),
    // IS NULL / IS NOT NULL.
    (S, "flag IS NULL", &[2, 4, 5, 7, 8, 10, 12, 14], false),
    (S, "flag IS NOT NULL", &[0, 1, 3, 6, 9, 11, 13, 15], false),
    (S, "note IS NOT NULL", &[0, 2, 4, 5, 10, 12, 14], false),
    (S, "missing IS NULL", ALL, false),
    (S, "TAGS IS NULL", &[4, 11], true),
    (S, "KEYS IS NULL", &[5, 11], false),
    (S, "desk = 'fx' AND price IS NULL", &[11], false),
    (S, "NULL IS NULL", ALL, false),
    (S, "desk = NULL", NONE, false),
    (S, "desk <> NULL", NONE, false),
    // AND / OR / NOT, precedence, lower-case keywords, comments.
    (S, "desk = 'fx' AND price > 100", &[0], false),
    (S, "desk = 'eq' OR price < 0", &[1, 2, 6, 10, 13], false),
    (S, "NOT desk = 'fx'", &[1, 2, 3, 4, 6, 10, 12, 13, 15], false),
    (S, "NOT (desk = 'fx' OR desk = 'eq')", &[2, 3, 4, 12, 15], true),
    (S, "desk = 'fx' AND NOT (TAGS = 'A')", &[8, 14], false),
    (S, "(TAGS = 'A' OR TAGS = 'B') AND (price >= 100 OR price < 0)", &[0, 2, 5, 9], false),
    (S, "price > 100 OR flag = TRUE", &[0, 3, 5, 6, 13], false),
    (S, "TAGS = 'C' and desk = 'fx' or KEYS = 'vip-3'", &[3, 14], false),
    (S, "NOT NOT TAGS = 'D'", &[8, 15], false),
    (S, "price > 100 OR TAGS = 'C'", &[0, 3, 5, 6, 10, 14], false),
    (S, "price >= 100 OR KEYS STARTSWITH 'vip'", &[0, 3, 5, 6, 7, 8, 9], false),
    (S, "TAGS IN ('C', 'D') AND price < 50", &[3, 10, 14], false),
    (S, "desk = 'eq' OR TAGS = 'a'", &[1, 6, 10, 13], false),
    (S, "-- pick eq\ndesk = 'eq' /* and true */ AND flag = true", &[13], false),
    (S, "price between 1 and 10 and not (TAGS in ('B'))", &[14], false),
    // TRUE / FALSE.
    (S, "TRUE", ALL, false),
    (S, "FALSE", NONE, false),
    (S, "NOT FALSE AND TAGS = 'D'", &[8, 15], false),
    (S, "FALSE OR desk = 'eq'", &[1, 6, 10, 13], false),
    // NULL handling: a missing property makes a predicate unknown, and
    // NOT of unknown is unknown; unknown OR true is true, unknown AND
    // false is false.
    (S, "missing = 1", NONE, true),
    (S, "NOT (missing = 1)", NONE, false),
    (S, "missing = 1 OR TRUE", ALL, false),
    (S, "missing = 1 AND FALSE", NONE, false),
    (S, "NOT (missing = 1 AND FALSE)", ALL, false),
    (S, "region = 'EU' OR TAGS = 'a'", &[6, 8], false),
    (S, "NOT (region = 'EU')", NONE, false),
    (S, "region <> 'EU'", NONE, false),
    (S, "flag = TRUE OR NOT flag = TRUE", &[0, 1, 3, 9, 11, 13, 15], true),
    (S, "missing NOT LIKE '%'", NONE, false),
    (S, "missing NOT CONTAINS 'x'", NONE, false),
    (S, "missing NOT IN ('x')", NONE, false),
    (S, "missing NOT BETWEEN 1 AND 2", NONE, false),
    // CONTAINS / STARTSWITH / ENDSWITH and their NOTs.
    (S, "note CONTAINS '%'", &[0, 5, 10, 14], true),
    (S, "note NOT CONTAINS '%'", &[2, 4, 12], false),
    (S, "TAGS CONTAINS 'ag'", &[13], false),
    (S, "price CONTAINS '.'", &[1, 9], false),
    (S, "KEYS STARTSWITH 'cust-'", &[0, 1, 2, 4, 6, 8, 10, 12], false),
    (S, "KEYS NOT STARTSWITH 'cust-'", &[3, 7, 9, 13, 14, 15], false),
    (S, "desk STARTSWITH 'fx'", &[0, 4, 8, 9, 11, 14], false),
    (S, "KEYS ENDSWITH '2'", &[1, 2, 12], false),
    (S, "desk NOT ENDSWITH 'x'", &[1, 2, 3, 4, 6, 10, 12, 13, 15], false),
    // LIKE / NOT LIKE: `%`, `_`, ESCAPE, a doubled quote, case.
    (S, "desk LIKE 'f%'", &[0, 4, 8, 9, 11, 14], false),
    (S, "desk LIKE '_q'", &[1, 6, 10, 13], false),
    (S, "desk LIKE '%o%s'", &[4, 12], false),
    (S, "desk NOT LIKE '%x%'", &[1, 2, 3, 6, 10, 12, 13, 15], false),
    (S, "desk LIKE ''", &[3], false),
    (S, "note LIKE '%'", &[0, 2, 4, 5, 10, 12, 14], false),
    (S, "note LIKE '_%'", &[0, 2, 4, 5, 10, 14], false),
    (S, "note LIKE 'a_b'", &[4, 5], false),
    (S, "note LIKE 'it''s'", &[2], false),
    (S, "KEYS LIKE 'x_y'", &[13, 14], false),
    (S, "KEYS LIKE 'x\\_y' ESCAPE '\\'", &[13], true),
    (S, "note LIKE '%!%' ESCAPE '!'", &[10, 14], false),
    (S, "note LIKE '%\\%%' ESCAPE '\\'", &[0, 5, 10, 14], false),
    (S, "TAGS LIKE 'Tag_'", &[13], false),
    (S, "KEYS NOT LIKE 'cust-_'", &[2, 3, 7, 9, 10, 12, 13, 14, 15], false),
    // Built-ins: TAGS, KEYS (case-sensitive names: `tags` is a user
    // property, as in src/filter/sql/tests.rs), BORN_TIMESTAMP (the
    // producer's), STORE_TIMESTAMP (the broker's).
    (S, "TAGS = 'A'", &[0, 2, 5, 9], false),
    (S, "TAGS <> 'A'", &[1, 3, 6, 7, 8, 10, 12, 13, 14, 15], false),
    (S, "TAGS = 'a'", &[6], false),
    (S, "tags = 'A'", NONE, false),
    (S, "KEYS = 'KEY'", &[15], false),
    (S, "KEYS = 'cust-1' OR KEYS = 'x%y'", &[0, 14], false),
    (S, "BORN_TIMESTAMP >= 1600000008000", &[8, 9, 10, 11, 12, 13, 14, 15], true),
    (S, "BORN_TIMESTAMP BETWEEN 1600000002000 AND 1600000004000", &[2, 3, 4], false),
    (S, "BORN_TIMESTAMP = 1600000005000", &[5], false),
    (S, "BORN_TIMESTAMP < STORE_TIMESTAMP", &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15], false),
    (S, "STORE_TIMESTAMP > {cut}", &[8, 9, 10, 11, 12, 13, 14, 15], false),
    (S, "STORE_TIMESTAMP <= {cut}", &[0, 1, 2, 3, 4, 5, 6, 7], false),
    (S, "STORE_TIMESTAMP > BORN_TIMESTAMP AND TAGS = 'B'", &[1, 7], false),
];

fn payload_index(m: &Message) -> usize {
    std::str::from_utf8(&m.payload)
        .ok()
        .and_then(|p| p.strip_prefix('m'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {:?}", m.payload))
}

/// The message's index, after checking every field came through intact
/// (a filtered copy of a batch must keep its records whole).
fn checked_index(m: &Message, errors: &mut Vec<String>) -> usize {
    let i = payload_index(m);
    let want = &MSGS[i];
    let props: Vec<(String, String)> = want
        .props
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if m.tag.as_deref() != want.tag
        || m.key.as_deref() != want.key.map(str::as_bytes)
        || m.properties != props
        || m.producer_timestamp_ms != want.born
    {
        errors.push(format!("message {i} came back altered: {m:?}"));
    }
    i
}

/// What the test produced: where each message went and the cut time.
struct Produced {
    /// Queue end offsets (all queues).
    ends: BTreeMap<u32, u64>,
    /// Broker time: messages 0-7 stored at or before it, 8-15 after.
    cut: i64,
    info: TopicInfo,
}

fn record(i: usize) -> Record {
    let s = &MSGS[i];
    let mut r = Record::new(format!("m{i:02}"));
    if let Some(t) = s.tag {
        r = r.with_tag(t);
    }
    if let Some(k) = s.key {
        r = r.with_key(k);
    }
    for (k, v) in s.props {
        r = r.with_property(*k, *v);
    }
    r.timestamp_ms = s.born;
    r
}

fn produce(addr: &str, info: TopicInfo) -> Produced {
    let mut p = Producer::connect(addr).unwrap();
    let mut ends: BTreeMap<u32, u64> = (0..QUEUES).map(|q| (q, 0)).collect();
    let mut send = |batches: &[(u32, &[usize])]| -> Vec<i64> {
        let mut times = Vec::new();
        for (q, idx) in batches {
            let records: Vec<Record> = idx.iter().map(|&i| record(i)).collect();
            let rs = p
                .send_batch(TOPIC, QueueSelector::Queue(*q), &records)
                .unwrap();
            for r in rs {
                assert_eq!(r.queue, *q);
                let end = ends.get_mut(q).unwrap();
                assert_eq!(r.offset, *end, "a fresh queue fills from 0");
                *end += 1;
                times.push(r.append_time_ms);
            }
        }
        times
    };
    let first = send(PHASE_1);
    let cut = *first.iter().max().unwrap();
    // Let the broker's clock pass the cut before phase 2.
    while keelmq::runtime::now_ms() <= cut + 5 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = send(PHASE_2);
    assert!(
        second.iter().all(|&t| t > cut),
        "phase 2 stored at {second:?}, not after the cut {cut}"
    );
    assert_eq!(ends.values().sum::<u64>(), MSGS.len() as u64);
    Produced { ends, cut, info }
}

fn expression(e: &str, cut: i64) -> String {
    e.replace("{cut}", &cut.to_string())
}

fn set(v: &[usize]) -> BTreeSet<usize> {
    v.iter().copied().collect()
}

/// Compares what came with what should have, exactly once each.
fn judge(what: &str, got: &[usize], want: &BTreeSet<usize>, errors: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    let dups: Vec<usize> = got.iter().filter(|&&i| !seen.insert(i)).copied().collect();
    if !dups.is_empty() {
        errors.push(format!("{what}: delivered more than once: {dups:?}"));
    }
    if seen != *want {
        let extra: Vec<_> = seen.difference(want).collect();
        let missing: Vec<_> = want.difference(&seen).collect();
        errors.push(format!(
            "{what}: got {seen:?}, want {want:?} (extra {extra:?}, missing {missing:?})"
        ));
    }
}

/// Every message `filter` passes, read with a `Consumer` (fetch-many over
/// every queue, both shards) until its positions reach the ends.
fn fetch_with_consumer(
    addr: &str,
    filter: FilterSpec,
    ends: &BTreeMap<u32, u64>,
) -> Result<Vec<Message>, String> {
    let mut c = Consumer::connect(addr).map_err(|e| e.to_string())?;
    c.set_filter(Some(filter));
    c.set_fetch_wait(Some(Duration::from_millis(10)));
    c.assign_all(TOPIC).map_err(|e| e.to_string())?;
    c.seek(SeekTo::Earliest).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while c.positions() != *ends {
        if Instant::now() > deadline {
            return Err(format!(
                "positions stuck at {:?} (ends {ends:?}) after {} messages",
                c.positions(),
                out.len()
            ));
        }
        out.extend(
            c.poll(Duration::from_millis(30))
                .map_err(|e| e.to_string())?,
        );
    }
    // At the ends: nothing more comes.
    out.extend(
        c.poll(Duration::from_millis(20))
            .map_err(|e| e.to_string())?,
    );
    Ok(out)
}

/// Every message `filter` passes, read queue by queue with single-queue
/// fetches of at most 1 byte (one batch, or one filtered copy, a reply).
fn fetch_single(
    conn: &mut Connection,
    p: &Produced,
    filter: &FilterSpec,
) -> Result<Vec<Message>, String> {
    let topic: Arc<str> = TOPIC.into();
    let mut out = Vec::new();
    for (q, qi) in p.info.queues.iter().enumerate() {
        let q = q as u32;
        let end = p.ends[&q];
        let mut offset = 0;
        let mut rounds = 0;
        while offset < end {
            rounds += 1;
            if rounds > 50 {
                return Err(format!("queue {q}: no end after 50 fetches (at {offset})"));
            }
            let mut b = BytesMut::new();
            FetchRequest {
                topic: TOPIC.into(),
                queue: q,
                offset,
                max_bytes: 1,
                wait_ms: 0,
                filter: Some(filter.clone()),
            }
            .encode(&mut b);
            let body = conn.call(Op::Fetch, &b).map_err(|e| e.to_string())?;
            let resp = FetchResponse::decode(body).map_err(|e| e.to_string())?;
            let mut next = offset;
            for batch in &resp.batches {
                for m in
                    decode_batch(&topic, q, qi.shard, batch, offset).map_err(|e| e.to_string())?
                {
                    next = m.offset + 1;
                    out.push(m);
                }
            }
            if resp.next < next {
                return Err(format!(
                    "queue {q}: reply says next {} behind what it sent ({next})",
                    resp.next
                ));
            }
            if resp.next <= offset {
                return Err(format!("queue {q}: no progress from {offset}"));
            }
            offset = resp.next;
        }
    }
    Ok(out)
}

/// Sums `lag` and `in_flight` over the group's queues, and counts them.
fn lag_in_flight(admin: &mut Admin, group: &str) -> (u64, u64, usize) {
    let d = admin.describe_group(group).unwrap();
    let qs = d["queues"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| qs.iter().map(|q| q[k].as_u64().unwrap_or(0)).sum::<u64>();
    (sum("lag"), sum("in_flight"), qs.len())
}

/// How a test takes leased messages of a message-delivery group.
trait Leases {
    /// Leased messages (message, attempt, handle), waiting up to `wait`.
    fn take(&mut self, wait: Duration) -> Result<Vec<(Message, u32, Bytes)>, String>;
    fn ack(&mut self, handles: &[Bytes]) -> Result<(), String>;
    fn close(&mut self) -> Result<(), String>;
}

/// The client's group consumer (pull, or push once subscribed).
impl Leases for GroupConsumer {
    fn take(&mut self, wait: Duration) -> Result<Vec<(Message, u32, Bytes)>, String> {
        let ds = self.receive(wait).map_err(|e| e.to_string())?;
        Ok(ds
            .into_iter()
            .map(|d| (d.message, d.attempt, d.handle))
            .collect())
    }
    fn ack(&mut self, handles: &[Bytes]) -> Result<(), String> {
        let codes = GroupConsumer::ack(self, handles).map_err(|e| e.to_string())?;
        match codes.iter().all(|c| *c == ErrorCode::Ok) {
            true => Ok(()),
            false => Err(format!("acks refused: {codes:?}")),
        }
    }
    fn close(&mut self) -> Result<(), String> {
        GroupConsumer::close(self).map_err(|e| e.to_string())
    }
}

/// Receive and ack requests on a bare connection, the leases matched to
/// the records of the reply's batches by their offsets: what the broker
/// sends, whatever the client library makes of it.
struct RawReceiver {
    conn: Connection,
    group: String,
    shards: Vec<u16>,
}

/// The leases of a receive reply (or a push), each with its record, found
/// in the reply's batches by its offset.
fn leases_of(shard: u16, resp: ReceiveResponse) -> Result<Vec<(Message, u32, Bytes)>, String> {
    let topic: Arc<str> = TOPIC.into();
    let mut out = Vec::new();
    for l in resp.leases {
        let batch = resp
            .batches
            .get(l.batch as usize)
            .ok_or_else(|| format!("lease names batch {} of {}", l.batch, resp.batches.len()))?;
        let m = decode_batch(&topic, l.queue, shard, batch, 0)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|m| m.offset == l.offset)
            .ok_or_else(|| {
                format!(
                    "offset {} of queue {} is not in its batch",
                    l.offset, l.queue
                )
            })?;
        out.push((m, l.attempt, l.handle));
    }
    Ok(out)
}

/// Acks on a bare connection, each handle at the shard it names (bytes
/// 2..4).
fn raw_ack(conn: &mut Connection, handles: &[Bytes]) -> Result<(), String> {
    let mut by_shard: BTreeMap<u16, Vec<Bytes>> = BTreeMap::new();
    for h in handles {
        let shard = u16::from_le_bytes([h[2], h[3]]);
        by_shard.entry(shard).or_default().push(h.clone());
    }
    for handles in by_shard.into_values() {
        let mut b = BytesMut::new();
        SettleRequest {
            delay_ms: None,
            handles,
        }
        .encode(false, &mut b);
        let body = conn.call(Op::Ack, &b).map_err(|e| e.to_string())?;
        let codes = decode_codes(body).map_err(|e| e.to_string())?;
        if codes.iter().any(|&c| c != ErrorCode::Ok as u16) {
            return Err(format!("acks refused: {codes:?}"));
        }
    }
    Ok(())
}

impl Leases for RawReceiver {
    fn take(&mut self, wait: Duration) -> Result<Vec<(Message, u32, Bytes)>, String> {
        let mut out = Vec::new();
        for &shard in &self.shards {
            let mut b = BytesMut::new();
            ReceiveRequest {
                group: self.group.clone(),
                topic: TOPIC.into(),
                shard,
                max_messages: 256,
                invisible_ms: INVISIBLE.as_millis() as u64,
                wait_ms: (wait.as_millis() as u32) / self.shards.len() as u32,
            }
            .encode(&mut b);
            let body = self.conn.call(Op::Receive, &b).map_err(|e| e.to_string())?;
            let resp = ReceiveResponse::decode(body).map_err(|e| e.to_string())?;
            out.extend(leases_of(shard, resp)?);
        }
        Ok(out)
    }
    fn ack(&mut self, handles: &[Bytes]) -> Result<(), String> {
        raw_ack(&mut self.conn, handles)
    }
    fn close(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A push subscription on a bare connection (credit for more than every
/// message, so none is granted back); acks on another connection.
struct RawPush {
    push: Connection,
    subscription: u64,
    acks: Connection,
}

impl RawPush {
    fn subscribe(addr: &str, group: &str) -> RawPush {
        let mut push = Connection::connect(addr).unwrap();
        let mut b = BytesMut::new();
        SubscribeRequest {
            group: group.into(),
            topic: TOPIC.into(),
            invisible_ms: INVISIBLE.as_millis() as u64,
            credit_messages: 1000,
            credit_bytes: 1 << 20,
        }
        .encode(&mut b);
        let resp = SubscribeResponse::decode(push.call(Op::Subscribe, &b).unwrap()).unwrap();
        RawPush {
            push,
            subscription: resp.subscription,
            acks: Connection::connect(addr).unwrap(),
        }
    }
}

impl Leases for RawPush {
    fn take(&mut self, wait: Duration) -> Result<Vec<(Message, u32, Bytes)>, String> {
        let until = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(f) = self
            .push
            .recv_incoming(Some(until))
            .map_err(|e| e.to_string())?
        {
            if let Incoming::Push {
                subscription,
                code,
                body,
            } = f
            {
                if subscription != self.subscription || code != 0 {
                    return Err(format!("push frame of {subscription} with code {code}"));
                }
                let batch = PushBatch::decode(body).map_err(|e| e.to_string())?;
                out.extend(leases_of(batch.shard, batch.response)?);
            }
        }
        Ok(out)
    }
    fn ack(&mut self, handles: &[Bytes]) -> Result<(), String> {
        raw_ack(&mut self.acks, handles)
    }
    fn close(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A group's name, how it is read ("pull", "push", "raw", "rawpush"), the
/// consumer that created it, what it must deliver, its filter.
type GroupUnderTest = (
    String,
    &'static str,
    GroupConsumer,
    BTreeSet<usize>,
    &'static str,
);

/// Takes and acks leases until every expected message came, the lag is 0
/// and nothing is in flight; then waits past the invisible time: nothing
/// comes back (the filtered-out messages were finished, not leased).
fn drain_group(addr: &str, group: &str, c: &mut dyn Leases, want: &BTreeSet<usize>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut admin = Admin::connect(addr).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ds = match c.take(Duration::from_millis(50)) {
            Ok(ds) => ds,
            Err(e) => {
                errors.push(format!("{group}: receive: {e}"));
                return errors;
            }
        };
        let mut handles = Vec::new();
        for (m, attempt, handle) in ds {
            let i = checked_index(&m, &mut errors);
            if attempt != 1 {
                errors.push(format!("{group}: message {i} at attempt {attempt}"));
            }
            got.push(i);
            handles.push(handle);
        }
        if !handles.is_empty() {
            if let Err(e) = c.ack(&handles) {
                errors.push(format!("{group}: {e}"));
            }
        }
        if set(&got).len() >= want.len() {
            let (lag, in_flight, queues) = lag_in_flight(&mut admin, group);
            if lag == 0 && in_flight == 0 {
                if queues != QUEUES as usize {
                    errors.push(format!("{group}: describe shows {queues} queues"));
                }
                break;
            }
        }
        if Instant::now() > deadline {
            let (lag, in_flight, _) = lag_in_flight(&mut admin, group);
            errors.push(format!(
                "{group}: timed out with {got:?} received, lag {lag}, in flight {in_flight}"
            ));
            break;
        }
    }
    let quiet = Instant::now() + INVISIBLE + Duration::from_millis(250);
    while Instant::now() < quiet {
        match c.take(Duration::from_millis(50)) {
            Ok(ds) => {
                for (m, attempt, handle) in ds {
                    let i = payload_index(&m);
                    errors.push(format!(
                        "{group}: message {i} came again (attempt {attempt})"
                    ));
                    let _ = c.ack(&[handle]);
                }
            }
            Err(e) => {
                errors.push(format!("{group}: receive: {e}"));
                break;
            }
        }
    }
    let (lag, in_flight, _) = lag_in_flight(&mut admin, group);
    if lag != 0 || in_flight != 0 {
        errors.push(format!(
            "{group}: lag {lag}, in flight {in_flight} at the end"
        ));
    }
    judge(group, &got, want, &mut errors);
    if let Err(e) = c.close() {
        errors.push(format!("{group}: close: {e}"));
    }
    errors
}

/// A queue-delivery group with a filter: one member polls and commits
/// until it has every expected message and the committed lag is 0.
fn drain_member(addr: &str, group: &str, want: &BTreeSet<usize>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut admin = Admin::connect(addr).unwrap();
    let mut m = GroupMember::connect(addr, group, TOPIC, "only").unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for msg in m.poll(Duration::from_millis(50)).unwrap() {
            got.push(checked_index(&msg, &mut errors));
        }
        m.commit().unwrap();
        if set(&got).len() >= want.len() {
            let (lag, _, queues) = lag_in_flight(&mut admin, group);
            if lag == 0 && queues == QUEUES as usize {
                break;
            }
        }
        if Instant::now() > deadline {
            let d = admin.describe_group(group).unwrap();
            errors.push(format!("{group}: timed out with {got:?}; {d}"));
            break;
        }
    }
    // Nothing more.
    for msg in m.poll(Duration::from_millis(100)).unwrap() {
        got.push(payload_index(&msg));
    }
    judge(group, &got, want, &mut errors);
    m.close().unwrap();
    errors
}

fn cli_indexes(what: &str, out: &Output, errors: &mut Vec<String>) -> Vec<usize> {
    if !out.status.success() {
        errors.push(format!(
            "{what}: failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let p = v["payload"].as_str().unwrap();
            p[1..].parse().unwrap()
        })
        .collect()
}

/// Every row, with fetch-many (the Consumer) and single-queue fetches.
fn fetch_rows(addr: &str, p: &Produced, rows: &[Row], when: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut conn = Connection::connect(addr).unwrap();
    for (lang, e, want, _) in rows {
        let e = expression(e, p.cut);
        let spec = lang.spec(&e);
        let want = set(want);
        match fetch_with_consumer(addr, spec.clone(), &p.ends) {
            Ok(ms) => {
                let got: Vec<usize> = ms.iter().map(|m| checked_index(m, &mut errors)).collect();
                judge(
                    &format!("{when}fetch-many {lang:?} `{e}`"),
                    &got,
                    &want,
                    &mut errors,
                );
            }
            Err(err) => errors.push(format!("{when}fetch-many {lang:?} `{e}`: {err}")),
        }
        match fetch_single(&mut conn, p, &spec) {
            Ok(ms) => {
                let got: Vec<usize> = ms.iter().map(|m| checked_index(m, &mut errors)).collect();
                judge(
                    &format!("{when}fetch {lang:?} `{e}`"),
                    &got,
                    &want,
                    &mut errors,
                );
            }
            Err(err) => errors.push(format!("{when}fetch {lang:?} `{e}`: {err}")),
        }
    }
    errors
}

fn want_of(e: &str) -> BTreeSet<usize> {
    let row = TABLE
        .iter()
        .find(|r| r.1 == e)
        .unwrap_or_else(|| panic!("{e} is not in the table"));
    set(row.2)
}

/// A broker with the topic on both shards.
fn broker_with_topic() -> (Broker, TopicInfo) {
    let b = Broker::start(2, None);
    let info = b
        .admin()
        .create_topic(TOPIC, QUEUES, Some(Durability::Written))
        .unwrap();
    let shards: BTreeSet<u16> = info.queues.iter().map(|q| q.shard).collect();
    assert_eq!(shards.len(), 2, "the queues are on both shards: {info:?}");
    (b, info)
}

fn assert_no_errors(errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "{} failures:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

/// The CLI's consume: the messages it printed (`--json`).
fn cli_consume(b: &Broker, what: &str, args: &[&str], want: &BTreeSet<usize>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut all = vec![
        "consume",
        "--topic",
        TOPIC,
        "--json",
        "--timeout-ms",
        "2500",
    ];
    all.extend_from_slice(args);
    let out = b.cli(&all);
    let got = cli_indexes(what, &out, &mut errors);
    judge(what, &got, want, &mut errors);
    errors
}

#[test]
fn filters_pass_exactly_the_table_through_fetch_queue_members_and_the_cli() {
    assert!(TABLE.len() >= 60, "{} rows", TABLE.len());
    let (b, info) = broker_with_topic();
    let t0 = Instant::now();
    let p = produce(&b.addr, info);
    // Queue-delivery groups: the members' fetches carry the group's filter.
    let qd = [
        ("qd-sql", S, "price > 100 OR TAGS = 'C'"),
        ("qd-tag", T, "B || D"),
    ];
    for (name, lang, e) in qd {
        let kind = if lang == S { "SQL92" } else { "TAG" };
        b.admin()
            .create_group(
                name,
                &serde_json::json!({
                    "delivery": "queue",
                    "start": "earliest",
                    "subscriptions": [{"topic": TOPIC, "filter": e, "filter_type": kind}],
                }),
            )
            .unwrap();
    }
    let mut errors: Vec<String> = Vec::new();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (name, _, e) in qd {
            let addr = b.addr.as_str();
            handles.push(s.spawn(move || drain_member(addr, name, &want_of(e))));
        }
        let e = "price >= 100 OR KEYS STARTSWITH 'vip'";
        let b = &b;
        handles.push(s.spawn(move || {
            cli_consume(
                b,
                &format!("consume --sql `{e}`"),
                &["--sql", e],
                &want_of(e),
            )
        }));
        handles.push(s.spawn(move || {
            cli_consume(
                b,
                "consume --tag `A||B`",
                &["--tag", "A||B"],
                &want_of("A || B"),
            )
        }));
        // Every row, with fetch-many (the Consumer) and single-queue
        // fetches, on 4 threads.
        for chunk in TABLE.chunks(TABLE.len().div_ceil(4)) {
            let (addr, p) = (b.addr.as_str(), &p);
            handles.push(s.spawn(move || fetch_rows(addr, p, chunk, "")));
        }
        for h in handles {
            errors.extend(h.join().unwrap());
        }
    });
    assert_no_errors(errors);

    // After a restart (the consume index and its tag summaries come back
    // from the disk), the TAG rows and some SQL ones again.
    let mut b = b;
    b.stop();
    b.restart();
    let again: Vec<_> = TABLE.iter().filter(|r| r.0 == T || r.3).copied().collect();
    assert_no_errors(fetch_rows(&b.addr, &p, &again, "after a restart: "));

    // A long poll under a filter wakes for a matching message only: the
    // others go by unseen, and the positions move past them.
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.set_filter(Some(FilterSpec::tag("LIVE")));
    c.assign_all(TOPIC).unwrap();
    c.seek(SeekTo::Latest).unwrap();
    let addr = b.addr.clone();
    let producer = std::thread::spawn(move || {
        let mut p = Producer::connect(&addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let other = |i: u32| Record::new(format!("other{i}")).with_tag("X");
        p.send_batch(TOPIC, QueueSelector::Queue(3), &[other(0)])
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let live = Record::new("live").with_tag("LIVE");
        p.send_batch(TOPIC, QueueSelector::Queue(4), &[other(1), live, other(2)])
            .unwrap();
        p.send_batch(TOPIC, QueueSelector::Queue(1), &[other(3)])
            .unwrap();
    });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < deadline {
        got.extend(c.poll(Duration::from_millis(500)).unwrap());
    }
    producer.join().unwrap();
    got.extend(c.poll(Duration::from_millis(300)).unwrap());
    let payloads: Vec<_> = got.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(payloads, vec![&b"live"[..]], "a filtered long poll");
    let mut ends = p.ends.clone();
    for q in [1, 3] {
        *ends.get_mut(&q).unwrap() += 1;
    }
    *ends.get_mut(&4).unwrap() += 3;
    wait_until(
        Duration::from_secs(5),
        "the positions past the others",
        || {
            c.poll(Duration::from_millis(50)).unwrap();
            (c.positions() == ends).then_some(())
        },
    );
    eprintln!(
        "filters: {} expressions fetched two ways, 2 members, 2 CLI runs, {} again after a restart, in {:?}",
        TABLE.len(),
        again.len(),
        t0.elapsed()
    );
}

// Found a client bug when written: `GroupConsumer` looked a lease's record
// up at index `offset - base_offset` of the decoded batch, which is wrong
// for a view holding only the passed records; fixed in client/src/group.rs
// (by offset). Every expression of the subset but `C`, `Nope`,
// `missing = 1` and `BORN_TIMESTAMP >= 1600000008000` hit it.
#[test]
fn filtered_message_groups_deliver_each_match_once_by_pull_push_and_the_cli() {
    let (b, info) = broker_with_topic();
    let subset: Vec<(Lang, &str, &[usize])> = TABLE
        .iter()
        .filter(|r| r.3)
        .map(|r| (r.0, r.1, r.2))
        .collect();
    assert!(subset.len() >= 10);
    assert!(subset.iter().any(|r| r.0 == T) && subset.iter().any(|r| r.0 == S));
    // Four groups per expression, each created with its filter by
    // `connect_filtered` before anything is produced: one received by the
    // client (pull), one pushed to it, and the same with bare requests
    // (what the broker sends, whatever the client library makes of it).
    let mut groups: Vec<GroupUnderTest> = Vec::new();
    for (k, (lang, e, want)) in subset.iter().enumerate() {
        for how in ["pull", "push", "raw", "rawpush"] {
            let name = format!("{how}{k}");
            let mut c = GroupConsumer::connect_filtered(&b.addr, &name, TOPIC, Some(lang.spec(e)))
                .unwrap_or_else(|err| panic!("{name} with `{e}`: {err}"));
            c.set_invisible(Some(INVISIBLE));
            c.set_wait(Duration::from_millis(200));
            groups.push((name, how, c, set(want), *e));
        }
    }
    let t0 = Instant::now();
    produce(&b.addr, info);
    let mut errors: Vec<String> = Vec::new();
    // Joining again with the filter the group was created with is fine,
    // `*` included (it is no filter at all).
    for (name, f) in [
        ("again-a", FilterSpec::tag("A")),
        ("again-star", FilterSpec::tag("*")),
    ] {
        for join in 0..2 {
            if let Err(e) = GroupConsumer::connect_filtered(&b.addr, name, TOPIC, Some(f.clone())) {
                errors.push(format!("{name}: join {join} with `{}`: {e}", f.expression));
            }
        }
    }
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (name, how, mut c, want, e) in groups {
            let addr = b.addr.as_str();
            handles.push(s.spawn(move || {
                // Push subscriptions start here, when their reader is
                // ready: a push leases at once, and the invisible time
                // runs from then.
                let mut leases: Box<dyn Leases> = match how {
                    "push" => {
                        c.subscribe(64, 1 << 20).unwrap();
                        Box::new(c)
                    }
                    "raw" => Box::new(RawReceiver {
                        conn: Connection::connect(addr).unwrap(),
                        group: name.clone(),
                        shards: vec![0, 1],
                    }),
                    "rawpush" => Box::new(RawPush::subscribe(addr, &name)),
                    _ => Box::new(c),
                };
                drain_group(addr, &name, leases.as_mut(), &want)
                    .into_iter()
                    .map(|x| format!("{x} [filter `{e}`]"))
                    .collect::<Vec<_>>()
            }));
        }
        // The CLI: a group created with --filter-sql, consumed with
        // --group; `group describe` then shows no lag.
        handles.push(s.spawn(|| {
            let e = "desk = 'eq' OR TAGS = 'a'";
            ok_stdout(&b.cli(&[
                "group",
                "create",
                "cli-g",
                "--topic",
                TOPIC,
                "--start",
                "earliest",
                "--filter-sql",
                e,
            ]));
            let what = format!("consume --group cli-g (`{e}`)");
            let mut errors = cli_consume(&b, &what, &["--group", "cli-g", "--ack"], &want_of(e));
            let qs = wait_until(Duration::from_secs(10), "cli-g described", || {
                let out = b.cli(&["group", "describe", "cli-g", "--json"]);
                let d: serde_json::Value = serde_json::from_str(ok_stdout(&out).trim()).ok()?;
                let qs = d["queues"].as_array()?.clone();
                (qs.len() == QUEUES as usize).then_some(qs)
            });
            for q in qs {
                if q["lag"] != 0 || q["in_flight"] != 0 {
                    errors.push(format!("group describe cli-g (`{e}`): {q}"));
                }
            }
            errors
        }));
        for h in handles {
            errors.extend(h.join().unwrap());
        }
    });
    eprintln!(
        "filters: {} groups and a CLI group in {:?}",
        subset.len() * 4,
        t0.elapsed()
    );
    assert_no_errors(errors);
}

/// A refusal's code and message.
fn refusal(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Broker { code, message }) => (code, message),
        other => panic!("expected a broker refusal, got {other:?}"),
    }
}

#[test]
fn bad_filters_are_refused_with_invalid_filter_at_fetch_and_group_create() {
    let b = Broker::start(2, None);
    let mut admin = b.admin();
    admin.create_topic("bf", 2, None).unwrap();
    let mut p = Producer::connect(&b.addr).unwrap();
    p.send(
        "bf",
        Record::new("x").with_tag("A").with_property("desk", "fx"),
    )
    .unwrap();
    let deep = format!("{}desk = 'fx'{}", "(".repeat(65), ")".repeat(65));
    let long_sql = format!("desk = 'fx'{}", " ".repeat(4097 - 11));
    let long_tag = "A".repeat(5000);
    // (language, expression, what the message must say: a position, or
    // a fragment)
    let cases: Vec<(Lang, &str, &str)> = vec![
        (S, "price >", "at byte 7"),
        (S, "price > 'a'", "at byte 6"),
        (S, "desk = 'fx", "at byte 7"),
        (S, "(desk = 'fx'", "at byte 12"),
        (S, "desk IN ()", "at byte 9"),
        (S, "desk = 'x' # 1", "at byte 11"),
        (S, "desk LIKE 'a' ESCAPE 'ab'", "at byte 21"),
        // Unknown functions and operators.
        (S, "UPPER(desk) = 'FX'", "at byte 5"),
        (S, "price != 1", "at byte 6"),
        (S, "desk REGEXP 'f.*'", "at byte 5"),
        (S, "desk MATCHES 'x'", "at byte 5"),
        (S, deep.as_str(), "nested"),
        (T, "A || ", "at byte 5"),
        (T, "A || B C", "at byte 5"),
        (T, "A || *", "at byte 5"),
        // Empty, and over 4096 bytes.
        (S, "", "empty"),
        (S, "   -- only a comment", "empty"),
        (T, "", "empty"),
        (T, "  ", "empty"),
        (S, long_sql.as_str(), "4096"),
        (T, long_tag.as_str(), "4096"),
    ];
    let mut conn = Connection::connect(&b.addr).unwrap();
    for (k, (lang, e, says)) in cases.iter().enumerate() {
        let shown: String = e.chars().take(40).collect();
        let check = |what: &str, (code, message): (ErrorCode, String)| {
            assert_eq!(
                code,
                ErrorCode::InvalidFilter,
                "{what} `{shown}`: {message}"
            );
            assert!(
                message.contains(says),
                "{what} `{shown}`: `{message}` does not say `{says}`"
            );
            if says.starts_with("at byte") {
                assert!(message.contains("expected"), "{what}: {message}");
            }
        };
        // Fetch-many, through the Consumer.
        let mut c = Consumer::connect(&b.addr).unwrap();
        c.set_filter(Some(lang.spec(e)));
        c.assign_all("bf").unwrap();
        c.seek(SeekTo::Earliest).unwrap();
        check("fetch-many", refusal(c.poll(Duration::from_secs(2))));
        // A single-queue fetch.
        let mut body = BytesMut::new();
        FetchRequest {
            topic: "bf".into(),
            queue: 0,
            offset: 0,
            max_bytes: 1 << 20,
            wait_ms: 0,
            filter: Some(lang.spec(e)),
        }
        .encode(&mut body);
        check("fetch", refusal(conn.call(Op::Fetch, &body)));
        // Group create, through the admin and through connect_filtered.
        let kind = if *lang == S { "SQL92" } else { "TAG" };
        let name = format!("bad{k}");
        let settings = serde_json::json!({
            "subscriptions": [{"topic": "bf", "filter": e, "filter_type": kind}],
        });
        check(
            "group create",
            refusal(admin.create_group(&name, &settings)),
        );
        let r = GroupConsumer::connect_filtered(&b.addr, &name, "bf", Some(lang.spec(e)));
        check("connect_filtered", refusal(r.map(|_| ())));
        let (code, _) = refusal(admin.describe_group(&name));
        assert_eq!(code, ErrorCode::UnknownGroup, "a refused group was created");
    }

    // Exactly 4096 bytes is not too long.
    let at_limit = format!("desk = 'fx'{}", " ".repeat(4096 - 11));
    assert_eq!(at_limit.len(), 4096);
    let mut c = Consumer::connect(&b.addr).unwrap();
    c.set_filter(Some(FilterSpec::sql(at_limit.clone())));
    c.assign_all("bf").unwrap();
    c.seek(SeekTo::Earliest).unwrap();
    let got = wait_until(Duration::from_secs(5), "the message", || {
        let v = c.poll(Duration::from_millis(100)).unwrap();
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(&got[0].payload[..], b"x");
    admin
        .create_group(
            "at-limit",
            &serde_json::json!({
                "subscriptions": [{"topic": "bf", "filter": at_limit, "filter_type": "SQL92"}],
            }),
        )
        .unwrap();

    // A group's filter is set when it is created: another one is refused.
    let ok = GroupConsumer::connect_filtered(&b.addr, "tagged", "bf", Some(FilterSpec::tag("A")));
    drop(ok.unwrap());
    GroupConsumer::connect_filtered(&b.addr, "tagged", "bf", Some(FilterSpec::tag("A"))).unwrap();
    match GroupConsumer::connect_filtered(&b.addr, "tagged", "bf", Some(FilterSpec::tag("B"))) {
        Err(ClientError::InvalidArgument(_)) => {}
        Err(e) => panic!("another filter: {e}"),
        Ok(_) => panic!("another filter on an existing group was taken"),
    }

    // The CLI says invalid_filter and where.
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "consume",
                "--topic",
                "bf",
                "--sql",
                "price >",
                "--timeout-ms",
                "500",
            ],
            "at byte 7",
        ),
        (
            &[
                "consume",
                "--topic",
                "bf",
                "--tag",
                "A ||",
                "--timeout-ms",
                "500",
            ],
            "at byte 4",
        ),
        (
            &[
                "group",
                "create",
                "cli-bad",
                "--topic",
                "bf",
                "--filter-sql",
                "price > 'a'",
            ],
            "at byte 6",
        ),
        (
            &[
                "group",
                "create",
                "cli-bad",
                "--topic",
                "bf",
                "--filter-tag",
                "",
            ],
            "empty",
        ),
    ];
    for (args, where_) in cases {
        let out = b.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("invalid_filter") && err.contains(where_),
            "{args:?}: {err}"
        );
    }
}
