use super::*;
use std::collections::HashMap;

struct Msg {
    props: HashMap<&'static str, &'static str>,
    tag: Option<&'static str>,
    key: Option<&'static str>,
}

impl Fields for Msg {
    fn property(&self, name: &str) -> Option<&str> {
        self.props.get(name).copied()
    }
    fn tag(&self) -> Option<&str> {
        self.tag
    }
    fn key(&self) -> Option<&str> {
        self.key
    }
    fn born_timestamp_ms(&self) -> i64 {
        1_000
    }
    fn store_timestamp_ms(&self) -> i64 {
        2_000
    }
}

fn msg() -> Msg {
    Msg {
        props: HashMap::from([
            ("price", "150"),
            ("qty", "2.5"),
            ("desk", "fx"),
            ("side", "buy"),
            ("flag", "TRUE"),
            ("note", "it's 50% off"),
            ("neg", "-7"),
        ]),
        tag: Some("NEW"),
        key: Some("cust-7"),
    }
}

#[test]
fn a_table_of_expressions_matches_as_rocketmq_does() {
    let m = msg();
    let table: &[(&str, bool)] = &[
        ("price > 100", true),
        ("price > 150", false),
        ("price >= 150", true),
        ("price < 150.5", true),
        ("price <= 149", false),
        ("price = 150", true),
        ("price = 150.0", true),
        ("price <> 150", false),
        ("qty > 2", true),
        ("qty = 2.5", true),
        ("neg < -6", true),
        ("neg = -7L", true),
        ("desk = 'fx'", true),
        ("desk <> 'fx'", false),
        ("'fx' = desk", true),
        ("desk = 'FX'", false),
        ("price > 100 AND desk = 'fx'", true),
        ("price > 200 OR desk = 'fx'", true),
        ("price > 200 OR desk = 'eq'", false),
        ("NOT desk = 'eq'", true),
        ("NOT (price > 100 AND desk = 'fx')", false),
        ("price BETWEEN 100 AND 200", true),
        ("price BETWEEN 151 AND 200", false),
        ("price NOT BETWEEN 151 AND 200", true),
        ("qty BETWEEN 2 AND 3", true),
        ("desk IN ('fx', 'eq')", true),
        ("desk NOT IN ('fx', 'eq')", false),
        ("side IN ('sell')", false),
        ("desk IS NOT NULL", true),
        ("missing IS NULL", true),
        ("missing IS NOT NULL", false),
        ("desk IS NULL", false),
        ("TAGS = 'NEW'", true),
        ("KEYS STARTSWITH 'cust'", true),
        ("KEYS ENDSWITH '-7'", true),
        ("KEYS NOT ENDSWITH '-7'", false),
        ("note CONTAINS '50%'", true),
        ("note NOT CONTAINS 'free'", true),
        ("BORN_TIMESTAMP < STORE_TIMESTAMP", true),
        ("STORE_TIMESTAMP = 2000", true),
        ("flag = TRUE", true),
        ("flag = FALSE", false),
        ("TRUE", true),
        ("FALSE", false),
        ("NOT FALSE", true),
        ("desk LIKE 'f_'", true),
        ("desk LIKE 'f'", false),
        ("note LIKE 'it''s%off'", true),
        ("note LIKE '%50\\%%' ESCAPE '\\'", true),
        ("note LIKE '%50\\%' ESCAPE '\\'", false),
        ("side NOT LIKE 's%'", true),
        ("side LIKE '%'", true),
        ("side LIKE '___'", true),
        ("side LIKE '____'", false),
        // A missing property: unknown, which never matches, even negated.
        ("missing > 1", false),
        ("NOT missing > 1", false),
        ("missing = 'x' OR desk = 'fx'", true),
        ("missing = 'x' AND desk = 'fx'", false),
        ("NOT (missing = 'x' AND desk = 'eq')", true),
        ("missing CONTAINS 'x'", false),
        ("missing NOT CONTAINS 'x'", false),
        ("missing NOT IN ('a')", false),
        ("missing NOT BETWEEN 1 AND 2", false),
        ("missing NOT LIKE 'a'", false),
        // Type mismatches: a non-number against a number, a number
        // against a boolean.
        ("desk > 1", false),
        ("desk = 1", false),
        ("NOT desk = 1", false),
        ("desk BETWEEN 1 AND 2", false),
        ("price = TRUE", false),
        ("price IN ('150')", true),
        ("side = TRUE", false),
        // Two properties: strings, ordered as numbers.
        ("price > qty", true),
        ("desk > side", false),
        ("desk = desk", true),
        ("-- a comment\n desk = 'fx' /* and another */", true),
        ("desk = 'fx' and price > 1 or side = 'x'", true),
        ("(((desk = 'fx')))", true),
        ("1 = 1.0", true),
        ("NULL IS NULL", true),
        ("NULL = NULL", false),
    ];
    for (e, want) in table {
        let f = SqlFilter::parse(e).unwrap_or_else(|err| panic!("{e}: {err}"));
        assert_eq!(f.matches(&m), *want, "{e}");
    }
    assert!(table.len() >= 60);
}

fn err_at(e: &str) -> (usize, String) {
    match SqlFilter::parse(e) {
        Err(FilterError::Syntax {
            position, expected, ..
        }) => (position, expected),
        other => panic!("{e}: {other:?}"),
    }
}

#[test]
fn bad_expressions_name_the_position_and_what_was_expected() {
    assert_eq!(SqlFilter::parse(""), Err(FilterError::Empty));
    assert_eq!(
        SqlFilter::parse(" -- only a comment"),
        Err(FilterError::Empty)
    );
    assert_eq!(err_at("price >").0, 7);
    assert_eq!(
        err_at("price > 'a'"),
        (6, "`=` or `<>` (a string cannot be ordered)".into())
    );
    assert_eq!(err_at("desk = 'fx").0, 7);
    assert_eq!(err_at("desk = 'fx' price").0, 12);
    assert_eq!(err_at("(desk = 'fx'").0, 12);
    assert_eq!(err_at("desk BETWEEN 'a' AND 'b'").0, 13);
    assert_eq!(err_at("desk BETWEEN 1 2").0, 15);
    assert_eq!(err_at("desk IN ()").0, 9);
    assert_eq!(err_at("desk IN ('a' 'b')").0, 13);
    assert_eq!(err_at("desk IS 'x'").0, 8);
    assert_eq!(err_at("desk NOT = 'x'").0, 9);
    assert_eq!(err_at("desk").0, 4);
    assert_eq!(err_at("AND = 1").0, 0);
    assert_eq!(err_at("desk = 'x' # 1").0, 11);
    assert_eq!(err_at("price = 12abc").0, 10);
    assert_eq!(err_at("price = 99999999999999999999").0, 8);
    assert_eq!(err_at("desk LIKE 'a' ESCAPE 'ab'").0, 21);
    assert_eq!(err_at("desk LIKE 'a\\' ESCAPE '\\'").0, 10);
    assert_eq!(err_at("desk = 1 /* open").0, 9);
    assert_eq!(err_at("desk = - 'a'").0, 9);
    let deep = format!("{}desk = 'fx'{}", "(".repeat(65), ")".repeat(65));
    assert!(err_at(&deep).1.contains("nested"));
    let ok = format!("{}desk = 'fx'{}", "(".repeat(64), ")".repeat(64));
    assert!(SqlFilter::parse(&ok).unwrap().matches(&msg()));
    let nots = format!("{}TRUE", "NOT ".repeat(65));
    assert!(err_at(&nots).1.contains("nested"));
}

#[test]
fn keywords_are_case_insensitive_and_properties_are_not() {
    let m = msg();
    assert!(
        SqlFilter::parse("desk in ('fx') and not price between 1 and 2")
            .unwrap()
            .matches(&m)
    );
    assert!(!SqlFilter::parse("Desk = 'fx'").unwrap().matches(&m));
    assert!(SqlFilter::parse("tags = 'NEW'").unwrap() != SqlFilter::parse("TAGS = 'NEW'").unwrap());
}
