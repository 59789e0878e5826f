//! Applying a filter to stored batches: which batches the consume index
//! lets a filter skip unread (by their tag summary), and which records of a
//! batch it keeps. Plain code over bytes; the broker does the reading.

use crate::batch::{self, BatchHeader, RecordIter, RecordView};

use super::{Fields, Filter, FilterError, FilterKind, TagFilter};

/// A filter ready to run: parsed once, with the tag summary bits of a tag
/// filter's tags worked out.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageFilter {
    filter: Filter,
    /// Per tag of a tag filter, the bits it sets in a batch's summary.
    blooms: Vec<u32>,
}

/// What a filter keeps of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every record at or after the offset asked for: send the batch as is.
    All,
    /// No record: send nothing.
    None,
    /// The records at these places (increasing, in iteration order): send
    /// a view of them (`batch::select_records`).
    Some(Vec<u32>),
}

impl MessageFilter {
    /// Parses an expression; `None` when it passes every message (`*`), so
    /// callers take the unfiltered path.
    pub fn parse(kind: FilterKind, expression: &str) -> Result<Option<MessageFilter>, FilterError> {
        let filter = Filter::parse(kind, expression)?;
        let blooms = match &filter {
            Filter::Tag(TagFilter::All) => return Ok(None),
            Filter::Tag(TagFilter::AnyOf(tags)) => tags
                .iter()
                .map(|t| batch::tag_bloom(t.as_bytes()))
                .collect(),
            Filter::Sql(_) => Vec::new(),
        };
        Ok(Some(MessageFilter { filter, blooms }))
    }

    /// Whether a batch with this tag summary may hold a passing record
    /// (false: skip it without reading). Only tag filters can tell.
    pub fn may_match_tags(&self, summary: u32) -> bool {
        match &self.filter {
            Filter::Tag(_) => self.blooms.iter().any(|&b| b & !summary == 0),
            Filter::Sql(_) => true,
        }
    }

    /// Whether one record passes.
    pub fn matches(&self, header: &BatchHeader, r: &RecordView<'_>) -> bool {
        match &self.filter {
            Filter::Tag(t) => t.matches(r.tag),
            Filter::Sql(s) => s.matches(&RecordFields { header, r }),
        }
    }

    /// What the filter keeps of `batch` (a checked stored batch or a
    /// view) from queue offset `from` on; records before `from` are the
    /// consumer's to skip, so they do not stop a batch going out whole.
    pub fn select(&self, batch: &[u8], from: u64) -> Selection {
        let Ok(h) = BatchHeader::parse(batch) else {
            return Selection::None;
        };
        let mut keep = Vec::new();
        let mut whole = true;
        for (place, r) in RecordIter::new(batch).map_while(Result::ok).enumerate() {
            if h.base_offset + u64::from(r.index) < from {
                continue;
            }
            if self.matches(&h, &r) {
                keep.push(place as u32);
            } else {
                whole = false;
            }
        }
        if keep.is_empty() {
            Selection::None
        } else if whole {
            Selection::All
        } else {
            Selection::Some(keep)
        }
    }
}

/// A stored record as a filter sees it.
pub struct RecordFields<'a, 'b> {
    pub header: &'a BatchHeader,
    pub r: &'a RecordView<'b>,
}

impl Fields for RecordFields<'_, '_> {
    fn property(&self, name: &str) -> Option<&str> {
        self.r
            .properties
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
    fn tag(&self) -> Option<&str> {
        self.r.tag
    }
    fn key(&self) -> Option<&str> {
        self.r.key.and_then(|k| std::str::from_utf8(k).ok())
    }
    fn born_timestamp_ms(&self) -> i64 {
        self.r.timestamp_ms
    }
    fn store_timestamp_ms(&self) -> i64 {
        self.header.append_time_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{stamp, BatchBuilder, Record, SegmentKey};

    type Spec<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)]);

    fn stored(records: &[Spec]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for (tag, props) in records {
            let mut r = Record::new(&b"x"[..]);
            r.tag = tag.map(str::to_owned);
            for (k, v) in *props {
                r = r.with_property(*k, *v);
            }
            b.push(&r);
        }
        let mut v = b.finish().to_vec();
        stamp(&mut v, 1, 10, 5, 4096, &SegmentKey([1; 16]));
        v
    }

    #[test]
    fn a_tag_filter_skips_batches_by_summary_and_keeps_only_its_tags() {
        let f = MessageFilter::parse(FilterKind::Tag, "A || B")
            .unwrap()
            .unwrap();
        let b = stored(&[
            (Some("A"), &[]),
            (Some("C"), &[]),
            (None, &[]),
            (Some("B"), &[]),
        ]);
        assert!(f.may_match_tags(batch::tag_summary(&b)));
        assert_eq!(f.select(&b, 0), Selection::Some(vec![0, 3]));
        // Records before the offset asked for do not count.
        assert_eq!(f.select(&b, 13), Selection::All);
        assert_eq!(f.select(&b, 14), Selection::None);
        let only_c = stored(&[(Some("C"), &[]), (None, &[])]);
        assert_eq!(f.select(&only_c, 0), Selection::None);
        assert!(!f.may_match_tags(0), "an untagged batch cannot match a tag");
        // `*` is no filter at all.
        assert!(MessageFilter::parse(FilterKind::Tag, " * ")
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_sql_filter_reads_properties_and_builtins() {
        let f = MessageFilter::parse(FilterKind::Sql, "price > 100 AND TAGS = 'fx'")
            .unwrap()
            .unwrap();
        let b = stored(&[
            (Some("fx"), &[("price", "101")]),
            (Some("fx"), &[("price", "99")]),
            (Some("eq"), &[("price", "500")]),
            (Some("fx"), &[]),
        ]);
        assert!(f.may_match_tags(0), "SQL cannot skip by summary");
        assert_eq!(f.select(&b, 0), Selection::Some(vec![0]));
        let s = MessageFilter::parse(FilterKind::Sql, "STORE_TIMESTAMP = 5")
            .unwrap()
            .unwrap();
        assert_eq!(s.select(&b, 0), Selection::All);
    }
}
