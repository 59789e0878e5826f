//! A consumer group's settings: what `keelmq group create` takes, what the
//! metadata keeps, and what the delivery window and the membership run
//! with. Validated once, when the group is created or changed.

use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::membership::{MembershipConfig, GROUP_MEMBERS_MAX, SESSION_TIMEOUT_MS_DEFAULT};
use super::window::{
    WindowConfig, ATTEMPTS_MAX_DEFAULT, INFLIGHT_MESSAGES_MAX_DEFAULT, INFLIGHT_MESSAGES_MAX_LIMIT,
    INVISIBLE_MS_MAX, INVISIBLE_MS_MIN,
};
use crate::ids::{is_valid_name, TOPIC_NAME_BYTES_MAX};
use crate::protocol::Durability;

/// Longest group name, in bytes (its dead-letter topic is `%DLQ%<name>`).
pub const GROUP_NAME_BYTES_MAX: usize = 200;
/// Most subscriptions of one group.
pub const SUBSCRIPTIONS_MAX: usize = 64;
/// Most deliveries of one message a group may allow.
pub const ATTEMPTS_MAX_LIMIT: u32 = 1000;
/// Default invisible time of a receive: 30 s, in milliseconds.
pub const INVISIBLE_MS_DEFAULT: u64 = 30_000;
/// Shortest session timeout, in milliseconds.
pub const SESSION_TIMEOUT_MS_MIN: u64 = 1_000;
/// Longest session timeout: 10 minutes, in milliseconds.
pub const SESSION_TIMEOUT_MS_MAX: u64 = 600_000;
/// The prefix of dead-letter topics (not a valid user topic name).
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

/// Who receives a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupMode {
    /// The members share the work: each message goes to one of them.
    Clustering,
    /// Every live instance receives every message.
    Broadcast,
}

/// How members consume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// A queue has one owner at a time, which commits offsets.
    Queue,
    /// Any member receives any message and acks it ("pop").
    Message,
}

/// When a delivery is journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalDeliveries {
    /// In the same group commit as the reply, which does not wait for it:
    /// no durable write on the receive path; after a crash an attempt may
    /// count one short (the default, as Kafka's share groups choose: a
    /// receive costs no fdatasync, and attempts_max is a bound on work,
    /// not a promise to the message).
    Alongside,
    /// Durable before the messages are sent: exact attempt counts across
    /// crashes, one more durable write per receive.
    Before,
}

fn every_message() -> String {
    "*".to_owned()
}

/// Where a new group starts in each queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// After the newest message when the group is created (Kafka's
    /// `latest`, RocketMQ's `CONSUME_FROM_LAST_OFFSET`).
    #[default]
    Latest,
    /// The oldest retained message.
    Earliest,
}

/// A topic the group consumes, with its filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub topic: String,
    /// The filter's expression: `*` (everything), tags (`A || B`) or a
    /// SQL92 expression, as `filter_type` says.
    #[serde(default = "every_message")]
    pub filter: String,
    #[serde(default)]
    pub filter_type: FilterLanguage,
}

/// The language of a subscription's filter (`"TAG"` or `"SQL92"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterLanguage {
    #[default]
    #[serde(rename = "TAG", alias = "tag")]
    Tag,
    #[serde(rename = "SQL92", alias = "sql92", alias = "sql", alias = "SQL")]
    Sql92,
}

impl FilterLanguage {
    pub fn kind(self) -> crate::filter::FilterKind {
        match self {
            FilterLanguage::Tag => crate::filter::FilterKind::Tag,
            FilterLanguage::Sql92 => crate::filter::FilterKind::Sql,
        }
    }
}

impl Subscription {
    /// The parsed filter; `None` for `*`.
    pub fn message_filter(
        &self,
    ) -> Result<Option<crate::filter::MessageFilter>, crate::filter::FilterError> {
        crate::filter::MessageFilter::parse(self.filter_type.kind(), &self.filter)
    }
}

/// A consumer group's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    pub name: String,
    pub mode: GroupMode,
    pub delivery: Delivery,
    pub orderly: bool,
    pub attempts_max: u32,
    /// Retry delays, one per failed attempt, in milliseconds.
    #[serde(with = "backoff_ms")]
    pub backoff: Backoff,
    pub invisible_ms: u64,
    pub inflight_messages_max: u32,
    pub session_timeout_ms: u64,
    /// Level of commits and acks; `None`: each topic's own.
    pub durability: Option<Durability>,
    pub journal_deliveries: JournalDeliveries,
    /// Where the group starts in a queue it had no position in.
    pub start: StartFrom,
    pub subscriptions: Vec<Subscription>,
    /// Priority's starvation guard (message delivery, not orderly): a
    /// waiting message counts one priority higher per this many ms waited
    /// (0: never; at most a day).
    pub priority_age_boost_ms: u64,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig::new("", Vec::new())
    }
}

/// Why group settings were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupConfigError {
    #[error("group name `{0}` must be 1 to {GROUP_NAME_BYTES_MAX} bytes of letters, digits, `.`, `_` or `-`")]
    Name(String),
    #[error("attempts_max {0} must be 1 to {ATTEMPTS_MAX_LIMIT}")]
    AttemptsMax(u32),
    #[error("invisible_ms {0} must be {INVISIBLE_MS_MIN} to {INVISIBLE_MS_MAX}")]
    InvisibleMs(u64),
    #[error("inflight_messages_max {0} must be 1 to {INFLIGHT_MESSAGES_MAX_LIMIT}")]
    InflightMax(u32),
    #[error("session_timeout_ms {0} must be {SESSION_TIMEOUT_MS_MIN} to {SESSION_TIMEOUT_MS_MAX}")]
    SessionTimeout(u64),
    #[error("a group has 1 to {SUBSCRIPTIONS_MAX} subscriptions, not {0}")]
    Subscriptions(usize),
    #[error("subscription to `{0}` is listed twice")]
    DuplicateSubscription(String),
    #[error("subscription topic `{0}` is not a valid topic name")]
    Topic(String),
    #[error("priority_age_boost_ms {0} must be at most 86400000 (a day)")]
    PriorityAgeBoost(u64),
    #[error("filter of the subscription to `{topic}`: {error}")]
    Filter {
        topic: String,
        error: crate::filter::FilterError,
    },
    #[error(
        "a broadcast group delivers every message to every instance: delivery must be `queue`"
    )]
    BroadcastDelivery,
}

impl GroupConfig {
    /// A group of `name` with the defaults: clustering, message delivery,
    /// not orderly, 16 attempts, RocketMQ's backoff, 30 s invisible time,
    /// 10,000 in flight per queue, 10 s sessions, the topics' durability,
    /// deliveries journaled alongside.
    pub fn new(name: &str, subscriptions: Vec<Subscription>) -> GroupConfig {
        GroupConfig {
            name: name.to_string(),
            mode: GroupMode::Clustering,
            delivery: Delivery::Message,
            orderly: false,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            backoff: Backoff::default(),
            invisible_ms: INVISIBLE_MS_DEFAULT,
            inflight_messages_max: INFLIGHT_MESSAGES_MAX_DEFAULT,
            session_timeout_ms: SESSION_TIMEOUT_MS_DEFAULT,
            durability: None,
            journal_deliveries: JournalDeliveries::Alongside,
            start: StartFrom::Latest,
            subscriptions,
            priority_age_boost_ms: crate::group::window::PRIORITY_AGE_BOOST_MS_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), GroupConfigError> {
        if !is_valid_name(&self.name, GROUP_NAME_BYTES_MAX) {
            return Err(GroupConfigError::Name(self.name.clone()));
        }
        if self.priority_age_boost_ms > 86_400_000 {
            return Err(GroupConfigError::PriorityAgeBoost(
                self.priority_age_boost_ms,
            ));
        }
        if !(1..=ATTEMPTS_MAX_LIMIT).contains(&self.attempts_max) {
            return Err(GroupConfigError::AttemptsMax(self.attempts_max));
        }
        if !(INVISIBLE_MS_MIN..=INVISIBLE_MS_MAX).contains(&self.invisible_ms) {
            return Err(GroupConfigError::InvisibleMs(self.invisible_ms));
        }
        if !(1..=INFLIGHT_MESSAGES_MAX_LIMIT).contains(&self.inflight_messages_max) {
            return Err(GroupConfigError::InflightMax(self.inflight_messages_max));
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&self.session_timeout_ms) {
            return Err(GroupConfigError::SessionTimeout(self.session_timeout_ms));
        }
        if self.mode == GroupMode::Broadcast && self.delivery == Delivery::Message {
            return Err(GroupConfigError::BroadcastDelivery);
        }
        let n = self.subscriptions.len();
        if !(1..=SUBSCRIPTIONS_MAX).contains(&n) {
            return Err(GroupConfigError::Subscriptions(n));
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            if !is_valid_name(&s.topic, TOPIC_NAME_BYTES_MAX) {
                return Err(GroupConfigError::Topic(s.topic.clone()));
            }
            if self.subscriptions[..i].iter().any(|o| o.topic == s.topic) {
                return Err(GroupConfigError::DuplicateSubscription(s.topic.clone()));
            }
            if let Err(error) = s.message_filter() {
                return Err(GroupConfigError::Filter {
                    topic: s.topic.clone(),
                    error,
                });
            }
        }
        Ok(())
    }

    /// The group's dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        format!("{DLQ_TOPIC_PREFIX}{}", self.name)
    }

    /// What each (group, queue) delivery window runs with.
    pub fn window(&self) -> WindowConfig {
        WindowConfig {
            inflight_max: self.inflight_messages_max,
            attempts_max: self.attempts_max,
            orderly: self.orderly,
            backoff: self.backoff.clone(),
            priority_age_boost_ms: self.priority_age_boost_ms,
        }
    }

    /// What the coordinator's membership runs with.
    pub fn membership(&self) -> MembershipConfig {
        MembershipConfig {
            session_timeout_ms: self.session_timeout_ms,
            members_max: GROUP_MEMBERS_MAX,
        }
    }
}

/// A backoff kept as its list of milliseconds.
mod backoff_ms {
    use super::Backoff;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(b: &Backoff, s: S) -> Result<S::Ok, S::Error> {
        b.steps_ms().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Backoff, D::Error> {
        let steps = Vec::<u64>::deserialize(d)?;
        Backoff::new(steps).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(topic: &str) -> Subscription {
        Subscription {
            topic: topic.into(),
            filter: "*".into(),
            filter_type: FilterLanguage::Tag,
        }
    }

    #[test]
    fn the_defaults_validate_and_persist() {
        let g = GroupConfig::new("risk-engine", vec![sub("orders")]);
        g.validate().unwrap();
        assert_eq!(g.dlq_topic(), "%DLQ%risk-engine");
        assert_eq!(g.window().attempts_max, 16);
        assert_eq!(g.membership().session_timeout_ms, 10_000);
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains("\"backoff\":[10000,30000,"), "{json}");
        assert_eq!(serde_json::from_str::<GroupConfig>(&json).unwrap(), g);
        let bad = json.replace("\"backoff\":[10000,", "\"backoff\":[999999999999,");
        assert!(serde_json::from_str::<GroupConfig>(&bad).is_err());
    }

    #[test]
    fn each_bad_setting_is_named() {
        let ok = GroupConfig::new("g", vec![sub("orders")]);
        let with = |f: &dyn Fn(&mut GroupConfig)| {
            let mut g = ok.clone();
            f(&mut g);
            g.validate().unwrap_err()
        };
        assert_eq!(
            with(&|g| g.name = "a b".into()),
            GroupConfigError::Name("a b".into())
        );
        assert_eq!(
            with(&|g| g.name = "x".repeat(201)),
            GroupConfigError::Name("x".repeat(201))
        );
        assert_eq!(
            with(&|g| g.attempts_max = 0),
            GroupConfigError::AttemptsMax(0)
        );
        assert_eq!(
            with(&|g| g.invisible_ms = 9),
            GroupConfigError::InvisibleMs(9)
        );
        assert_eq!(
            with(&|g| g.invisible_ms = 12 * 3600 * 1000 + 1),
            GroupConfigError::InvisibleMs(12 * 3600 * 1000 + 1)
        );
        assert_eq!(
            with(&|g| g.inflight_messages_max = 0),
            GroupConfigError::InflightMax(0)
        );
        assert_eq!(
            with(&|g| g.session_timeout_ms = 999),
            GroupConfigError::SessionTimeout(999)
        );
        assert_eq!(
            with(&|g| {
                g.mode = GroupMode::Broadcast;
                g.delivery = Delivery::Message
            }),
            GroupConfigError::BroadcastDelivery
        );
        assert_eq!(
            with(&|g| g.subscriptions.clear()),
            GroupConfigError::Subscriptions(0)
        );
        assert_eq!(
            with(&|g| g.subscriptions.push(sub("orders"))),
            GroupConfigError::DuplicateSubscription("orders".into())
        );
        assert_eq!(
            with(&|g| g.subscriptions = vec![sub("%DLQ%x")]),
            GroupConfigError::Topic("%DLQ%x".into())
        );
        assert!(matches!(
            with(&|g| g.subscriptions[0].filter = "TagA ||".into()),
            GroupConfigError::Filter { topic, error: crate::filter::FilterError::Syntax { position: 7, .. } }
                if topic == "orders"
        ));
        assert!(matches!(
            with(&|g| {
                g.subscriptions[0].filter = "a >".into();
                g.subscriptions[0].filter_type = FilterLanguage::Sql92;
            }),
            GroupConfigError::Filter { .. }
        ));
        assert!(matches!(
            with(&|g| g.subscriptions[0].filter = "x".repeat(4097)),
            GroupConfigError::Filter {
                error: crate::filter::FilterError::TooLong(4097),
                ..
            }
        ));
        // Good filters of both languages validate and persist.
        let mut g = ok.clone();
        g.subscriptions[0].filter = "a > 1 AND b LIKE 'x%'".into();
        g.subscriptions[0].filter_type = FilterLanguage::Sql92;
        g.validate().unwrap();
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains("\"filter_type\":\"SQL92\""), "{json}");
        assert_eq!(serde_json::from_str::<GroupConfig>(&json).unwrap(), g);
    }
}
