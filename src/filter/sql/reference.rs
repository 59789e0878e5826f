//! Seeded property test of the SQL92 filter: random expression trees are
//! rendered as text (random keyword case, spacing, redundant parentheses),
//! parsed by [`SqlFilter`], and evaluated on random messages; a reference
//! evaluator written straight from the documented semantics (three-valued
//! logic over `Option<bool>`, numbers as `f64`, a recursive `LIKE`) must
//! agree on every message.
//!
//! `KEELMQ_FILTER_SEEDS=N` runs N seeds (default 4000);
//! `KEELMQ_SEED=S cargo test -p keelmq --lib filter::sql` replays one.

#![allow(clippy::explicit_auto_deref)]

use super::*;
use std::collections::HashMap;

const SEEDS_DEFAULT: u64 = 4000;
const PROPS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 12] = [
    "1", "2.5", "-3", "10", "abc", "true", "FALSE", "", "a%b", "x_y", " 7 ", "1e2",
];
const STRINGS: [&str; 8] = ["1", "abc", "true", "", "a", "b", "x_y", "a%b"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A generated expression tree (the reference's own form).
#[derive(Debug)]
enum Gen {
    And(Box<Gen>, Box<Gen>),
    Or(Box<Gen>, Box<Gen>),
    Not(Box<Gen>),
    Lit(bool),
    /// prop op number
    Num(&'static str, &'static str, f64),
    /// prop (= or <>) string
    Str(&'static str, bool, &'static str),
    /// prop (= or <>) boolean
    Bool(&'static str, bool, bool),
    Between(&'static str, bool, f64, f64),
    In(&'static str, bool, Vec<&'static str>),
    IsNull(&'static str, bool),
    /// prop [NOT] CONTAINS/STARTSWITH/ENDSWITH string (0, 1, 2)
    StrOp(&'static str, bool, u8, &'static str),
    Like(&'static str, bool, String),
}

fn gen(r: &mut Rng, depth: u32) -> Gen {
    if depth > 0 && r.chance(45) {
        return match r.below(3) {
            0 => Gen::And(Box::new(gen(r, depth - 1)), Box::new(gen(r, depth - 1))),
            1 => Gen::Or(Box::new(gen(r, depth - 1)), Box::new(gen(r, depth - 1))),
            _ => Gen::Not(Box::new(gen(r, depth - 1))),
        };
    }
    let p = *r.pick(&PROPS);
    let numbers = [0.0, 1.0, 2.5, -3.0, 7.0, 100.0, 10.0];
    match r.below(10) {
        0 => Gen::Lit(r.chance(50)),
        1 | 2 => Gen::Num(
            p,
            *r.pick(&["=", "<>", ">", ">=", "<", "<="]),
            *r.pick(&numbers),
        ),
        3 => Gen::Str(p, r.chance(50), *r.pick(&STRINGS)),
        4 => Gen::Bool(p, r.chance(50), r.chance(50)),
        5 => {
            let (x, y) = (*r.pick(&numbers), *r.pick(&numbers));
            Gen::Between(p, r.chance(40), x.min(y), x.max(y))
        }
        6 => {
            let n = 1 + r.below(3);
            Gen::In(p, r.chance(40), (0..n).map(|_| *r.pick(&STRINGS)).collect())
        }
        7 => Gen::IsNull(p, r.chance(50)),
        8 => Gen::StrOp(p, r.chance(40), r.below(3) as u8, *r.pick(&STRINGS)),
        _ => {
            let n = r.below(5);
            let pat: String = (0..n)
                .map(|_| *r.pick(&['%', '_', 'a', 'b', '1', 'x']))
                .collect();
            Gen::Like(p, r.chance(40), pat)
        }
    }
}

fn kw(r: &mut Rng, k: &str) -> String {
    match r.below(3) {
        0 => k.to_ascii_lowercase(),
        1 => k.to_owned(),
        _ => k
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
            .collect(),
    }
}

fn num_text(r: &mut Rng, x: f64) -> String {
    if x.fract() == 0.0 && r.chance(50) {
        format!("{}", x as i64)
    } else {
        format!("{x:?}")
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn render(r: &mut Rng, g: &Gen) -> String {
    let not = |r: &mut Rng, n: bool| {
        if n {
            format!("{} ", kw(r, "NOT"))
        } else {
            String::new()
        }
    };
    let text = match g {
        Gen::And(a, b) => format!("({}) {} ({})", render(r, a), kw(r, "AND"), render(r, b)),
        Gen::Or(a, b) => format!("({}) {} ({})", render(r, a), kw(r, "OR"), render(r, b)),
        Gen::Not(a) => format!("{} ({})", kw(r, "NOT"), render(r, a)),
        Gen::Lit(b) => kw(r, if *b { "TRUE" } else { "FALSE" }),
        Gen::Num(p, op, x) => format!("{p} {op} {}", num_text(r, *x)),
        Gen::Str(p, ne, s) => format!("{p} {} {}", if *ne { "<>" } else { "=" }, quote(s)),
        Gen::Bool(p, ne, b) => format!(
            "{p} {} {}",
            if *ne { "<>" } else { "=" },
            kw(r, if *b { "TRUE" } else { "FALSE" })
        ),
        Gen::Between(p, n, lo, hi) => {
            let n = not(r, *n);
            let (lo, hi) = (num_text(r, *lo), num_text(r, *hi));
            format!("{p} {n}{} {lo} {} {hi}", kw(r, "BETWEEN"), kw(r, "AND"))
        }
        Gen::In(p, n, list) => {
            let n = not(r, *n);
            let items: Vec<String> = list.iter().map(|s| quote(s)).collect();
            format!("{p} {n}{} ({})", kw(r, "IN"), items.join(", "))
        }
        Gen::IsNull(p, n) => {
            let is = kw(r, "IS");
            let n = not(r, *n);
            format!("{p} {is} {n}{}", kw(r, "NULL"))
        }
        Gen::StrOp(p, n, op, s) => {
            let n = not(r, *n);
            let op = kw(r, ["CONTAINS", "STARTSWITH", "ENDSWITH"][*op as usize]);
            format!("{p} {n}{op} {}", quote(s))
        }
        Gen::Like(p, n, pat) => {
            let n = not(r, *n);
            format!("{p} {n}{} {}", kw(r, "LIKE"), quote(pat))
        }
    };
    if r.chance(10) {
        format!("( {text} )")
    } else {
        text
    }
}

fn ref_num(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|x| x.is_finite())
}

fn ref_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

fn ref_like(p: &[char], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some(('%', rest)) => (0..=s.len()).any(|i| ref_like(rest, &s[i..])),
        Some(('_', rest)) => !s.is_empty() && ref_like(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && ref_like(rest, &s[1..]),
    }
}

fn flip(v: Option<bool>, not: bool) -> Option<bool> {
    v.map(|b| b != not)
}

/// The reference: `None` is unknown.
fn reference(g: &Gen, m: &HashMap<&str, &str>) -> Option<bool> {
    let get = |p: &str| m.get(p).copied();
    match g {
        Gen::And(a, b) => match (reference(a, m), reference(b, m)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Gen::Or(a, b) => match (reference(a, m), reference(b, m)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Gen::Not(a) => reference(a, m).map(|b| !b),
        Gen::Lit(b) => Some(*b),
        Gen::Num(p, op, x) => {
            let v = ref_num(get(p)?)?;
            Some(match *op {
                "=" => v == *x,
                "<>" => v != *x,
                ">" => v > *x,
                ">=" => v >= *x,
                "<" => v < *x,
                _ => v <= *x,
            })
        }
        Gen::Str(p, ne, s) => Some((get(p)? == *s) != *ne),
        Gen::Bool(p, ne, b) => Some((ref_bool(get(p)?)? == *b) != *ne),
        Gen::Between(p, n, lo, hi) => {
            let v = ref_num(get(p)?)?;
            flip(Some(*lo <= v && v <= *hi), *n)
        }
        Gen::In(p, n, list) => flip(Some(list.contains(&get(p)?)), *n),
        Gen::IsNull(p, n) => Some(get(p).is_none() != *n),
        Gen::StrOp(p, n, op, s) => {
            let v = get(p)?;
            flip(
                Some(match op {
                    0 => v.contains(s),
                    1 => v.starts_with(s),
                    _ => v.ends_with(s),
                }),
                *n,
            )
        }
        Gen::Like(p, n, pat) => {
            let v: Vec<char> = get(p)?.chars().collect();
            let pat: Vec<char> = pat.chars().collect();
            flip(Some(ref_like(&pat, &v)), *n)
        }
    }
}

struct Props<'a>(&'a HashMap<&'a str, &'a str>);

impl Fields for Props<'_> {
    fn property(&self, name: &str) -> Option<&str> {
        self.0.get(name).copied()
    }
    fn tag(&self) -> Option<&str> {
        None
    }
    fn key(&self) -> Option<&str> {
        None
    }
    fn born_timestamp_ms(&self) -> i64 {
        0
    }
    fn store_timestamp_ms(&self) -> i64 {
        0
    }
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let g = gen(&mut r, 4);
    let text = render(&mut r, &g);
    let f = SqlFilter::parse(&text).map_err(|e| format!("`{text}` did not parse: {e}"))?;
    for _ in 0..16 {
        let mut m = HashMap::new();
        for p in PROPS {
            if r.chance(75) {
                m.insert(p, *r.pick(&VALUES));
            }
        }
        let want = reference(&g, &m) == Some(true);
        if f.matches(&Props(&m)) != want {
            return Err(format!(
                "`{text}` on {m:?}: filter says {}, reference {want}",
                !want
            ));
        }
    }
    Ok(())
}

#[test]
fn random_expressions_agree_with_the_reference_evaluator() {
    if let Some(seed) = std::env::var("KEELMQ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed).unwrap();
        return;
    }
    let n = std::env::var("KEELMQ_FILTER_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    for seed in 0..n {
        if let Err(e) = run_seed(seed) {
            panic!(
                "seed {seed}: {e}\nreplay: KEELMQ_SEED={seed} cargo test -p keelmq --lib filter::sql"
            );
        }
    }
}
