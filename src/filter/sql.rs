//! `SQL92` filters with RocketMQ's grammar and semantics, plus `LIKE`.
//!
//! ```text
//! expr       := and ("OR" and)*
//! and        := not ("AND" not)*
//! not        := "NOT" not | "(" expr ")" | "TRUE" | "FALSE" | predicate
//! predicate  := operand cmp operand
//!             | operand ["NOT"] "BETWEEN" number "AND" number
//!             | operand ["NOT"] "IN" "(" string ("," string)* ")"
//!             | operand "IS" ["NOT"] "NULL"
//!             | operand ["NOT"] ("CONTAINS" | "STARTSWITH" | "ENDSWITH") string
//!             | operand ["NOT"] "LIKE" string ["ESCAPE" string]
//! cmp        := "=" | "<>" | ">" | ">=" | "<" | "<="
//! operand    := identifier | string | number | "TRUE" | "FALSE" | "NULL"
//! number     := ["+" | "-"] digits ["." digits] [("e" | "E") ["+" | "-"] digits] ["L"]
//! string     := "'" (any character, "''" for a quote)* "'"
//! identifier := [A-Za-z_$][A-Za-z0-9_$]*   (keywords are not identifiers)
//! ```
//!
//! Keywords are case-insensitive; `--` to the end of a line and `/* */`
//! are comments. Identifiers name user properties, except the built-ins
//! `TAGS`, `KEYS`, `BORN_TIMESTAMP` and `STORE_TIMESTAMP`.
//!
//! Semantics (RocketMQ's): properties are strings. Compared with a number
//! a property is read as a number, with a boolean as `true`/`false`; two
//! strings are equal or not, and ordered only as numbers. `>`, `>=`, `<`
//! and `<=` with a string literal are refused when parsing. A missing
//! property, or a value that cannot be read as the other side's type,
//! makes the predicate unknown; logic is three-valued (`NOT` of unknown
//! is unknown) and only a true expression matches.

use super::{Fields, FilterError};

/// Deepest nesting of parentheses and `NOT`s accepted.
pub const FILTER_NESTING_MAX: usize = 64;

/// A value in an expression or read from a message.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Operand {
    Lit(Value),
    Prop(String),
    Tags,
    Keys,
    BornTimestamp,
    StoreTimestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StrOp {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LikeTok {
    Any,
    One,
    Char(char),
}

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Bool(bool),
    Cmp(Operand, Cmp, Operand),
    Between {
        v: Operand,
        lo: Value,
        hi: Value,
        not: bool,
    },
    In {
        v: Operand,
        list: Vec<String>,
        not: bool,
    },
    IsNull {
        v: Operand,
        not: bool,
    },
    Str {
        v: Operand,
        op: StrOp,
        arg: String,
        not: bool,
    },
    Like {
        v: Operand,
        pattern: Vec<LikeTok>,
        not: bool,
    },
}

/// A parsed SQL92 filter.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlFilter {
    expr: Expr,
}

/// Three-valued logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tri {
    True,
    False,
    Unknown,
}

impl Tri {
    fn of(b: bool) -> Tri {
        if b {
            Tri::True
        } else {
            Tri::False
        }
    }
    fn not(self) -> Tri {
        match self {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Unknown => Tri::Unknown,
        }
    }
    fn negate_if(self, not: bool) -> Tri {
        if not {
            self.not()
        } else {
            self
        }
    }
}

impl SqlFilter {
    pub fn parse(expression: &str) -> Result<SqlFilter, FilterError> {
        let tokens = lex(expression)?;
        if tokens.len() == 1 {
            return Err(FilterError::Empty);
        }
        let mut p = Parser {
            t: tokens,
            i: 0,
            depth: 0,
        };
        let expr = p.expr()?;
        p.expect_end()?;
        Ok(SqlFilter { expr })
    }

    /// Whether the message passes (the expression is true for it).
    pub fn matches(&self, m: &impl Fields) -> bool {
        eval(&self.expr, m) == Tri::True
    }
}

fn read(o: &Operand, m: &impl Fields) -> Value {
    let s = |v: Option<&str>| v.map_or(Value::Null, |s| Value::Str(s.to_string()));
    match o {
        Operand::Lit(v) => v.clone(),
        Operand::Prop(name) => s(m.property(name)),
        Operand::Tags => s(m.tag()),
        Operand::Keys => s(m.key()),
        Operand::BornTimestamp => Value::Int(m.born_timestamp_ms()),
        Operand::StoreTimestamp => Value::Int(m.store_timestamp_ms()),
    }
}

/// A string read as a number (an integer when it is one).
fn number(s: &str) -> Option<Value> {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Int(i));
    }
    t.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Value::Float)
}

/// Two values brought to one type, or `None` when they cannot be.
fn coerce(a: Value, b: Value) -> Option<(Value, Value)> {
    use Value::*;
    let num = |v: &Value| matches!(v, Int(_) | Float(_));
    Some(match (a, b) {
        (Null, _) | (_, Null) => return None,
        (Str(s), b) if num(&b) => (number(&s)?, b),
        (a, Str(s)) if num(&a) => (a, number(&s)?),
        (Str(s), Bool(b)) => (Bool(boolean(&s)?), Bool(b)),
        (Bool(a), Str(s)) => (Bool(a), Bool(boolean(&s)?)),
        (a, b) => (a, b),
    })
}

fn boolean(s: &str) -> Option<bool> {
    match s.trim() {
        t if t.eq_ignore_ascii_case("true") => Some(true),
        t if t.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    use Value::*;
    match (a, b) {
        (Int(x), Int(y)) => Some(x.cmp(y)),
        (Int(x), Float(y)) => (*x as f64).partial_cmp(y),
        (Float(x), Int(y)) => x.partial_cmp(&(*y as f64)),
        (Float(x), Float(y)) => x.partial_cmp(y),
        // Strings are ordered only as numbers.
        (Str(x), Str(y)) => {
            let (p, q) = (number(x)?, number(y)?);
            order(&p, &q)
        }
        _ => None,
    }
}

fn compare(a: Value, op: Cmp, b: Value) -> Tri {
    let Some((a, b)) = coerce(a, b) else {
        return Tri::Unknown;
    };
    match op {
        Cmp::Eq | Cmp::Ne => {
            let eq = match (&a, &b) {
                (Value::Str(x), Value::Str(y)) => Some(x == y),
                (Value::Bool(x), Value::Bool(y)) => Some(x == y),
                _ => order(&a, &b).map(|o| o == std::cmp::Ordering::Equal),
            };
            match eq {
                None => Tri::Unknown,
                Some(e) => Tri::of(e).negate_if(op == Cmp::Ne),
            }
        }
        _ => match order(&a, &b) {
            None => Tri::Unknown,
            Some(o) => Tri::of(match op {
                Cmp::Gt => o.is_gt(),
                Cmp::Ge => o.is_ge(),
                Cmp::Lt => o.is_lt(),
                _ => o.is_le(),
            }),
        },
    }
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

fn like(p: &[LikeTok], s: &str) -> bool {
    // Wildcard matching with backtracking to the last `%` only: O(n·m).
    let s: Vec<char> = s.chars().collect();
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match p.get(j) {
            Some(LikeTok::Any) => {
                star = Some((j, i));
                j += 1;
            }
            Some(LikeTok::One) => {
                i += 1;
                j += 1;
            }
            Some(LikeTok::Char(c)) if *c == s[i] => {
                i += 1;
                j += 1;
            }
            _ => match star {
                Some((sj, si)) => {
                    j = sj + 1;
                    i = si + 1;
                    star = Some((sj, si + 1));
                }
                None => return false,
            },
        }
    }
    p[j..].iter().all(|t| *t == LikeTok::Any)
}

fn eval(e: &Expr, m: &impl Fields) -> Tri {
    match e {
        Expr::Or(a, b) => match (eval(a, m), eval(b, m)) {
            (Tri::True, _) | (_, Tri::True) => Tri::True,
            (Tri::False, Tri::False) => Tri::False,
            _ => Tri::Unknown,
        },
        Expr::And(a, b) => match (eval(a, m), eval(b, m)) {
            (Tri::False, _) | (_, Tri::False) => Tri::False,
            (Tri::True, Tri::True) => Tri::True,
            _ => Tri::Unknown,
        },
        Expr::Not(a) => eval(a, m).not(),
        Expr::Bool(b) => Tri::of(*b),
        Expr::Cmp(a, op, b) => compare(read(a, m), *op, read(b, m)),
        Expr::Between { v, lo, hi, not } => {
            let x = read(v, m);
            match (
                compare(x.clone(), Cmp::Ge, lo.clone()),
                compare(x, Cmp::Le, hi.clone()),
            ) {
                (Tri::Unknown, _) | (_, Tri::Unknown) => Tri::Unknown,
                (a, b) => Tri::of(a == Tri::True && b == Tri::True).negate_if(*not),
            }
        }
        Expr::In { v, list, not } => match text(read(v, m)) {
            None => Tri::Unknown,
            Some(s) => Tri::of(list.contains(&s)).negate_if(*not),
        },
        Expr::IsNull { v, not } => Tri::of(read(v, m) == Value::Null).negate_if(*not),
        Expr::Str { v, op, arg, not } => match text(read(v, m)) {
            None => Tri::Unknown,
            Some(s) => Tri::of(match op {
                StrOp::Contains => s.contains(arg.as_str()),
                StrOp::StartsWith => s.starts_with(arg.as_str()),
                StrOp::EndsWith => s.ends_with(arg.as_str()),
            })
            .negate_if(*not),
        },
        Expr::Like { v, pattern, not } => match text(read(v, m)) {
            None => Tri::Unknown,
            Some(s) => Tri::of(like(pattern, &s)).negate_if(*not),
        },
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(Value),
    Sign(bool),
    LParen,
    RParen,
    Comma,
    Cmp(Cmp),
    End,
}

impl Tok {
    fn show(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("the string '{s}'"),
            Tok::Num(v) => format!("the number {v:?}"),
            Tok::Sign(neg) => format!("`{}`", if *neg { '-' } else { '+' }),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Cmp(c) => format!("`{}`", cmp_text(*c)),
            Tok::End => "the end".into(),
        }
    }
}

fn cmp_text(c: Cmp) -> &'static str {
    match c {
        Cmp::Eq => "=",
        Cmp::Ne => "<>",
        Cmp::Gt => ">",
        Cmp::Ge => ">=",
        Cmp::Lt => "<",
        Cmp::Le => "<=",
    }
}

fn syntax(position: usize, expected: &str, found: String) -> FilterError {
    FilterError::Syntax {
        position,
        expected: expected.into(),
        found,
    }
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let Some(end) = src[i + 2..].find("*/") else {
                    return Err(syntax(i, "`*/` closing the comment", "the end".into()));
                };
                i += 2 + end + 2;
            }
            b'(' | b')' | b',' | b'=' => {
                out.push((
                    i,
                    match c {
                        b'(' => Tok::LParen,
                        b')' => Tok::RParen,
                        b',' => Tok::Comma,
                        _ => Tok::Cmp(Cmp::Eq),
                    },
                ));
                i += 1;
            }
            b'<' | b'>' => {
                let next = b.get(i + 1).copied();
                let (t, n) = match (c, next) {
                    (b'<', Some(b'>')) => (Cmp::Ne, 2),
                    (b'<', Some(b'=')) => (Cmp::Le, 2),
                    (b'>', Some(b'=')) => (Cmp::Ge, 2),
                    (b'<', _) => (Cmp::Lt, 1),
                    _ => (Cmp::Gt, 1),
                };
                out.push((i, Tok::Cmp(t)));
                i += n;
            }
            b'+' | b'-' => {
                out.push((i, Tok::Sign(c == b'-')));
                i += 1;
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(rest) = src.get(i..).filter(|r| !r.is_empty()) else {
                        return Err(syntax(start, "a closing `'`", "the end".into()));
                    };
                    let ch = rest.chars().next().expect("non-empty");
                    if ch == '\'' {
                        if rest[1..].starts_with('\'') {
                            s.push('\'');
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    s.push(ch);
                    i += ch.len_utf8();
                }
                out.push((start, Tok::Str(s)));
            }
            b'0'..=b'9' | b'.' => {
                let digits = |i: &mut usize| {
                    let s = *i;
                    while *i < b.len() && b[*i].is_ascii_digit() {
                        *i += 1;
                    }
                    *i > s
                };
                let int = digits(&mut i);
                let mut float = false;
                if i < b.len() && b[i] == b'.' {
                    i += 1;
                    float = true;
                    if !digits(&mut i) && !int {
                        return Err(syntax(start, "a number", "`.`".into()));
                    }
                }
                if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                    let e = i;
                    i += 1;
                    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                        i += 1;
                    }
                    if !digits(&mut i) {
                        return Err(syntax(e, "the exponent's digits", "none".into()));
                    }
                    float = true;
                }
                let text = &src[start..i];
                let v = if float {
                    text.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map(Value::Float)
                } else {
                    if i < b.len() && (b[i] == b'L' || b[i] == b'l') {
                        i += 1;
                    }
                    text.parse::<i64>().ok().map(Value::Int)
                };
                let Some(v) = v else {
                    return Err(syntax(start, "a number in range", format!("`{text}`")));
                };
                if i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    return Err(syntax(
                        i,
                        "a space or an operator after a number",
                        format!("`{}`", b[i] as char),
                    ));
                }
                out.push((start, Tok::Num(v)));
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$')
                {
                    i += 1;
                }
                out.push((start, Tok::Ident(src[start..i].to_string())));
            }
            _ => {
                let ch = src[i..].chars().next().expect("in bounds");
                return Err(syntax(
                    i,
                    "an operand, an operator or a parenthesis",
                    format!("`{ch}`"),
                ));
            }
        }
    }
    out.push((src.len(), Tok::End));
    Ok(out)
}

const KEYWORDS: [&str; 14] = [
    "AND",
    "OR",
    "NOT",
    "BETWEEN",
    "IN",
    "IS",
    "NULL",
    "TRUE",
    "FALSE",
    "CONTAINS",
    "STARTSWITH",
    "ENDSWITH",
    "LIKE",
    "ESCAPE",
];

struct Parser {
    t: Vec<(usize, Tok)>,
    i: usize,
    depth: usize,
}

impl Parser {
    /// The token at `i` (the end past the last).
    fn at(&self, i: usize) -> &(usize, Tok) {
        &self.t[i.min(self.t.len() - 1)]
    }
    fn peek(&self) -> &Tok {
        &self.at(self.i).1
    }
    fn pos(&self) -> usize {
        self.at(self.i).0
    }
    /// Takes a token; `self.i -= 1` puts it back.
    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        self.i += 1;
        t
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        let yes = self.is_kw(kw);
        if yes {
            self.i += 1;
        }
        yes
    }
    fn fail<T>(&self, expected: &str) -> Result<T, FilterError> {
        Err(syntax(self.pos(), expected, self.peek().show()))
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), FilterError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            self.fail(&format!("`{kw}`"))
        }
    }
    fn expect_end(&self) -> Result<(), FilterError> {
        if *self.peek() == Tok::End {
            Ok(())
        } else {
            self.fail("`AND`, `OR` or the end")
        }
    }
    fn deeper(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > FILTER_NESTING_MAX {
            return self.fail(&format!(
                "at most {FILTER_NESTING_MAX} nested parentheses and NOTs"
            ));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.and()?;
        while self.eat_kw("OR") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.not()?;
        while self.eat_kw("AND") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, FilterError> {
        if self.eat_kw("NOT") {
            self.deeper()?;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth -= 1;
            return Ok(e);
        }
        if *self.peek() == Tok::LParen {
            self.next();
            self.deeper()?;
            let e = self.expr()?;
            self.depth -= 1;
            if self.next() != Tok::RParen {
                self.i -= 1;
                return self.fail("`)`");
            }
            return Ok(e);
        }
        // A lone TRUE / FALSE (not the left side of a comparison).
        for (kw, b) in [("TRUE", true), ("FALSE", false)] {
            if self.is_kw(kw) && !matches!(self.at(self.i + 1).1, Tok::Cmp(_)) {
                self.i += 1;
                return Ok(Expr::Bool(b));
            }
        }
        self.predicate()
    }

    fn operand(&mut self) -> Result<Operand, FilterError> {
        let at = self.pos();
        Ok(match self.next() {
            Tok::Str(s) => Operand::Lit(Value::Str(s)),
            Tok::Num(v) => Operand::Lit(v),
            Tok::Sign(neg) => match self.next() {
                Tok::Num(Value::Int(i)) => Operand::Lit(Value::Int(if neg { -i } else { i })),
                Tok::Num(Value::Float(f)) => Operand::Lit(Value::Float(if neg { -f } else { f })),
                _ => {
                    self.i -= 1;
                    return self.fail("a number after the sign");
                }
            },
            Tok::Ident(s) => {
                let up = s.to_ascii_uppercase();
                match up.as_str() {
                    "TRUE" => Operand::Lit(Value::Bool(true)),
                    "FALSE" => Operand::Lit(Value::Bool(false)),
                    "NULL" => Operand::Lit(Value::Null),
                    _ if KEYWORDS.contains(&up.as_str()) => {
                        return Err(syntax(
                            at,
                            "a property, a built-in or a literal",
                            format!("the keyword `{s}`"),
                        ))
                    }
                    _ => match s.as_str() {
                        "TAGS" => Operand::Tags,
                        "KEYS" => Operand::Keys,
                        "BORN_TIMESTAMP" => Operand::BornTimestamp,
                        "STORE_TIMESTAMP" => Operand::StoreTimestamp,
                        _ => Operand::Prop(s),
                    },
                }
            }
            _ => {
                self.i -= 1;
                return self.fail("a property, a built-in or a literal");
            }
        })
    }

    fn string(&mut self, what: &str) -> Result<String, FilterError> {
        match self.next() {
            Tok::Str(s) => Ok(s),
            _ => {
                self.i -= 1;
                self.fail(what)
            }
        }
    }

    fn number(&mut self) -> Result<Value, FilterError> {
        match self.operand() {
            Ok(Operand::Lit(v @ (Value::Int(_) | Value::Float(_)))) => Ok(v),
            Ok(_) => {
                self.i -= 1;
                self.fail("a number")
            }
            Err(e) => Err(e),
        }
    }

    fn predicate(&mut self) -> Result<Expr, FilterError> {
        let v = self.operand()?;
        if let Tok::Cmp(op) = *self.peek() {
            let at = self.pos();
            self.next();
            let r = self.operand()?;
            let string_lit = |o: &Operand| matches!(o, Operand::Lit(Value::Str(_)));
            if !matches!(op, Cmp::Eq | Cmp::Ne) && (string_lit(&v) || string_lit(&r)) {
                return Err(syntax(
                    at,
                    "`=` or `<>` (a string cannot be ordered)",
                    format!("`{}`", cmp_text(op)),
                ));
            }
            return Ok(Expr::Cmp(v, op, r));
        }
        if self.eat_kw("IS") {
            let not = self.eat_kw("NOT");
            self.expect_kw("NULL")?;
            return Ok(Expr::IsNull { v, not });
        }
        let not = self.eat_kw("NOT");
        if self.eat_kw("BETWEEN") {
            let lo = self.number()?;
            self.expect_kw("AND")?;
            let hi = self.number()?;
            return Ok(Expr::Between { v, lo, hi, not });
        }
        if self.eat_kw("IN") {
            if self.next() != Tok::LParen {
                self.i -= 1;
                return self.fail("`(`");
            }
            let mut list = vec![self.string("a string")?];
            loop {
                match self.next() {
                    Tok::Comma => list.push(self.string("a string")?),
                    Tok::RParen => break,
                    _ => {
                        self.i -= 1;
                        return self.fail("`,` or `)`");
                    }
                }
            }
            return Ok(Expr::In { v, list, not });
        }
        for (kw, op) in [
            ("CONTAINS", StrOp::Contains),
            ("STARTSWITH", StrOp::StartsWith),
            ("ENDSWITH", StrOp::EndsWith),
        ] {
            if self.eat_kw(kw) {
                let arg = self.string("a string")?;
                return Ok(Expr::Str { v, op, arg, not });
            }
        }
        if self.eat_kw("LIKE") {
            let at = self.pos();
            let p = self.string("a pattern string")?;
            let escape = if self.eat_kw("ESCAPE") {
                let e_at = self.pos();
                let e = self.string("the escape character as a string")?;
                let mut cs = e.chars();
                match (cs.next(), cs.next()) {
                    (Some(c), None) => Some(c),
                    _ => return Err(syntax(e_at, "one escape character", format!("'{e}'"))),
                }
            } else {
                None
            };
            let mut pattern = Vec::new();
            let mut cs = p.chars();
            while let Some(c) = cs.next() {
                pattern.push(match c {
                    c if Some(c) == escape => match cs.next() {
                        Some(n) => LikeTok::Char(n),
                        None => {
                            return Err(syntax(
                                at,
                                "a character after the escape",
                                "the pattern's end".into(),
                            ))
                        }
                    },
                    '%' => LikeTok::Any,
                    '_' => LikeTok::One,
                    c => LikeTok::Char(c),
                });
            }
            return Ok(Expr::Like { v, pattern, not });
        }
        if not {
            self.fail("`BETWEEN`, `IN`, `CONTAINS`, `STARTSWITH`, `ENDSWITH` or `LIKE` after `NOT`")
        } else {
            self.fail("a comparison, `BETWEEN`, `IN`, `IS`, `CONTAINS`, `STARTSWITH`, `ENDSWITH` or `LIKE`")
        }
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
