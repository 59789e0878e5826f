//! Message filters of a subscription: `TAG` expressions (`*`, `A || B`)
//! and `SQL92` expressions over a message's properties and built-ins,
//! with RocketMQ's grammar plus `LIKE` (see `docs/PROTOCOL.md`, "Filter
//! expressions"). Plain code, no I/O: the broker parses a filter once at
//! subscribe time and evaluates it per message against a [`Fields`] view.

pub mod select;
pub mod sql;
pub mod tag;

pub use select::{MessageFilter, Selection};
pub use sql::{SqlFilter, Value};
pub use tag::TagFilter;

/// Longest filter expression accepted, in bytes.
pub const FILTER_EXPRESSION_BYTES_MAX: usize = 4096;

/// Why an expression was refused: where, and what the parser expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter expression is {0} bytes; at most {FILTER_EXPRESSION_BYTES_MAX}")]
    TooLong(usize),
    #[error("filter expression is empty")]
    Empty,
    #[error("at byte {position}: expected {expected}, found {found}")]
    Syntax {
        /// Byte offset into the expression.
        position: usize,
        expected: String,
        found: String,
    },
}

/// What a filter may read of a message.
pub trait Fields {
    /// A user property's value (`None`: the message has no such property).
    fn property(&self, name: &str) -> Option<&str>;
    /// The message's tag.
    fn tag(&self) -> Option<&str>;
    /// The message's key (`KEYS`).
    fn key(&self) -> Option<&str>;
    /// The producer's timestamp, ms since the epoch (`BORN_TIMESTAMP`).
    fn born_timestamp_ms(&self) -> i64;
    /// The broker's timestamp, ms since the epoch (`STORE_TIMESTAMP`).
    fn store_timestamp_ms(&self) -> i64;
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Tag(TagFilter),
    Sql(SqlFilter),
}

/// The kind of a filter expression on the wire and in the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    Tag,
    Sql,
}

impl From<crate::protocol::FilterType> for FilterKind {
    fn from(t: crate::protocol::FilterType) -> FilterKind {
        match t {
            crate::protocol::FilterType::Tag => FilterKind::Tag,
            crate::protocol::FilterType::Sql92 => FilterKind::Sql,
        }
    }
}

impl Filter {
    /// Parses `expression` as a filter of `kind`.
    pub fn parse(kind: FilterKind, expression: &str) -> Result<Filter, FilterError> {
        if expression.len() > FILTER_EXPRESSION_BYTES_MAX {
            return Err(FilterError::TooLong(expression.len()));
        }
        match kind {
            FilterKind::Tag => TagFilter::parse(expression).map(Filter::Tag),
            FilterKind::Sql => SqlFilter::parse(expression).map(Filter::Sql),
        }
    }

    /// Whether the message passes.
    pub fn matches(&self, m: &impl Fields) -> bool {
        match self {
            Filter::Tag(t) => t.matches(m.tag()),
            Filter::Sql(s) => s.matches(m),
        }
    }
}
