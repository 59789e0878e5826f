//! `TAG` filters: `*` (every message) or tags joined by `||`
//! (`TagA || TagB`), as in RocketMQ. A message matches when its tag is one
//! of them; a message without a tag matches only `*`.

use super::FilterError;

/// A parsed tag filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagFilter {
    All,
    /// The tags, deduplicated, in the order written.
    AnyOf(Vec<String>),
}

impl TagFilter {
    pub fn parse(expression: &str) -> Result<TagFilter, FilterError> {
        let e = expression.trim();
        if e.is_empty() {
            return Err(FilterError::Empty);
        }
        if e == "*" {
            return Ok(TagFilter::All);
        }
        let mut tags: Vec<String> = Vec::new();
        let mut at = 0;
        for part in expression.split("||") {
            let lead = part.len() - part.trim_start().len();
            let t = part.trim();
            let bad =
                t.is_empty() || t == "*" || t.contains('|') || t.chars().any(char::is_whitespace);
            if bad {
                return Err(FilterError::Syntax {
                    position: at + lead,
                    expected: "a tag (tags are joined by `||`; `*` stands alone)".into(),
                    found: if t.is_empty() {
                        "nothing".into()
                    } else {
                        format!("`{t}`")
                    },
                });
            }
            if !tags.iter().any(|x| x == t) {
                tags.push(t.to_string());
            }
            at += part.len() + 2;
        }
        Ok(TagFilter::AnyOf(tags))
    }

    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::AnyOf(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_match_and_refuse_with_the_position() {
        assert_eq!(TagFilter::parse(" * "), Ok(TagFilter::All));
        let f = TagFilter::parse("A || B||A").unwrap();
        assert_eq!(f, TagFilter::AnyOf(vec!["A".into(), "B".into()]));
        assert!(f.matches(Some("A")) && f.matches(Some("B")));
        assert!(!f.matches(Some("C")) && !f.matches(None) && !f.matches(Some("a")));
        assert!(TagFilter::All.matches(None));
        assert_eq!(TagFilter::parse("  "), Err(FilterError::Empty));
        let Err(FilterError::Syntax { position, .. }) = TagFilter::parse("A || ") else {
            panic!("an empty tag parsed");
        };
        assert_eq!(position, 5);
        assert!(TagFilter::parse("A | B").is_err());
        assert!(TagFilter::parse("A || *").is_err());
        assert!(TagFilter::parse("A B").is_err());
    }
}
