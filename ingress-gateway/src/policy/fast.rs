//! The shapes of condition ngrok's examples use most, evaluated on the
//! request itself instead of through CEL values: a field compared with a
//! literal (`req.method == 'PUT'`, `res.status_code >= 500`), a prefix,
//! suffix, substring or regular-expression test, `size(…)`, a header's
//! presence (`'x-a' in req.headers`), joined by `&&`, `||` and `!`. The
//! fields are the same [`Fact`]s the CEL variables are built from. A
//! condition of any other shape, or one that meets a field it cannot read
//! (the interpreter then reports the error), is left to the CEL
//! interpreter; a unit test runs both on the same conditions.

use std::cmp::Ordering;

use cel::common::ast::{Expr, LiteralValue, operators};
use regex::Regex;

use super::{
    cel::selection_chain,
    facts::{Fact, Facts},
};

/// A condition the fast path evaluates.
#[derive(Debug)]
pub(super) enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Text(Field, TextTest),
    Int(Number, Cmp, i64),
    /// `'name' in req.headers` (or `res.headers`), `name` in lower case.
    Header(String, String),
}

/// `root.first` or `root.first.second`.
#[derive(Debug)]
pub(super) struct Field {
    root: String,
    first: String,
    second: Option<String>,
}

#[derive(Debug)]
pub(super) enum TextTest {
    Eq(String),
    Ne(String),
    StartsWith(String),
    EndsWith(String),
    Contains(String),
    Matches(Regex),
}

#[derive(Debug)]
pub(super) enum Number {
    Field(Field),
    /// `size(field)`: the length of a text field in characters.
    Size(Field),
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn of(operator: &str) -> Option<Cmp> {
        Some(match operator {
            operators::EQUALS => Cmp::Eq,
            operators::NOT_EQUALS => Cmp::Ne,
            operators::LESS => Cmp::Lt,
            operators::LESS_EQUALS => Cmp::Le,
            operators::GREATER => Cmp::Gt,
            operators::GREATER_EQUALS => Cmp::Ge,
            _ => return None,
        })
    }

    /// The same test with its operands swapped (`1 < x` is `x > 1`).
    fn flipped(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            same => same,
        }
    }

    fn holds(self, order: Ordering) -> bool {
        match self {
            Cmp::Eq => order.is_eq(),
            Cmp::Ne => order.is_ne(),
            Cmp::Lt => order.is_lt(),
            Cmp::Le => order.is_le(),
            Cmp::Gt => order.is_gt(),
            Cmp::Ge => order.is_ge(),
        }
    }
}

/// `expr` when it names a field [`Facts::fact`] reads alone.
pub(super) fn field(expr: &Expr) -> Option<Field> {
    let (root, fields) = selection_chain(expr)?;
    match fields.as_slice() {
        [first] => Some(Field {
            root: root.to_string(),
            first: first.to_string(),
            second: None,
        }),
        [first, second] => Some(Field {
            root: root.to_string(),
            first: first.to_string(),
            second: Some(second.to_string()),
        }),
        _ => None,
    }
}

fn text_literal(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

fn int_literal(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::Literal(LiteralValue::Int(i)) => Some(*i.inner()),
        _ => None,
    }
}

impl Cond {
    /// The fast form of `expr`, when it has one.
    pub fn of(expr: &Expr) -> Option<Cond> {
        let Expr::Call(call) = expr else {
            return None;
        };
        let name = call.func_name.as_str();
        let args: Vec<&Expr> = call.args.iter().map(|a| &a.expr).collect();
        match (call.target.as_deref().map(|t| &t.expr), args.as_slice()) {
            (None, [a, b]) if name == operators::LOGICAL_AND => {
                Some(Cond::And(Box::new(Cond::of(a)?), Box::new(Cond::of(b)?)))
            }
            (None, [a, b]) if name == operators::LOGICAL_OR => {
                Some(Cond::Or(Box::new(Cond::of(a)?), Box::new(Cond::of(b)?)))
            }
            (None, [a]) if name == operators::LOGICAL_NOT => {
                Some(Cond::Not(Box::new(Cond::of(a)?)))
            }
            (None, [needle, map]) if name == operators::IN => {
                let needle = text_literal(needle)?;
                let map = field(map)?;
                let lower = needle.bytes().all(|b| !b.is_ascii_uppercase());
                (map.first == "headers" && map.second.is_none() && lower)
                    .then(|| Cond::Header(map.root, needle.to_string()))
            }
            (None, [a, b]) if Cmp::of(name).is_some() => {
                let cmp = Cmp::of(name)?;
                Cond::compared(a, cmp, b).or_else(|| Cond::compared(b, cmp.flipped(), a))
            }
            (Some(target), [arg]) => Cond::text_test(name, target, arg),
            (None, [target, arg]) if name == "matches" => Cond::text_test(name, target, arg),
            _ => None,
        }
    }

    /// `target.name(arg)`: a test of a text field against a literal.
    fn text_test(name: &str, target: &Expr, arg: &Expr) -> Option<Cond> {
        let field = field(target)?;
        let arg = text_literal(arg)?.to_string();
        let test = match name {
            "startsWith" => TextTest::StartsWith(arg),
            "endsWith" => TextTest::EndsWith(arg),
            "contains" => TextTest::Contains(arg),
            "matches" => TextTest::Matches(Regex::new(&arg).ok()?),
            _ => return None,
        };
        Some(Cond::Text(field, test))
    }

    /// `left cmp right` with a field on the left and a literal on the
    /// right.
    fn compared(left: &Expr, cmp: Cmp, right: &Expr) -> Option<Cond> {
        let number = match left {
            Expr::Call(call)
                if call.func_name == "size" && call.target.is_none() && call.args.len() == 1 =>
            {
                Number::Size(field(&call.args[0].expr)?)
            }
            other => {
                let field = field(other)?;
                if let Some(text) = text_literal(right) {
                    let text = text.to_string();
                    return match cmp {
                        Cmp::Eq => Some(Cond::Text(field, TextTest::Eq(text))),
                        Cmp::Ne => Some(Cond::Text(field, TextTest::Ne(text))),
                        _ => None,
                    };
                }
                Number::Field(field)
            }
        };
        Some(Cond::Int(number, cmp, int_literal(right)?))
    }

    /// The condition's truth, or `None` when it meets a field it cannot
    /// read as the test needs.
    pub fn eval(&self, facts: &Facts<'_>) -> Option<bool> {
        Some(match self {
            Cond::And(a, b) => a.eval(facts)? && b.eval(facts)?,
            Cond::Or(a, b) => a.eval(facts)? || b.eval(facts)?,
            Cond::Not(a) => !a.eval(facts)?,
            Cond::Header(root, name) => facts.has_header(root, name)?,
            Cond::Text(field, test) => {
                let Fact::Text(text) = field.read(facts)? else {
                    return None;
                };
                match test {
                    TextTest::Eq(t) => text == t.as_str(),
                    TextTest::Ne(t) => text != t.as_str(),
                    TextTest::StartsWith(t) => text.starts_with(t.as_str()),
                    TextTest::EndsWith(t) => text.ends_with(t.as_str()),
                    TextTest::Contains(t) => text.contains(t.as_str()),
                    TextTest::Matches(re) => re.is_match(&text),
                }
            }
            Cond::Int(number, cmp, value) => {
                let n = match (number, number.field().read(facts)?) {
                    (Number::Field(_), Fact::Int(n)) => n,
                    (Number::Size(_), Fact::Text(t)) => t.chars().count() as i64,
                    _ => return None,
                };
                cmp.holds(n.cmp(value))
            }
        })
    }
}

impl Number {
    fn field(&self) -> &Field {
        match self {
            Number::Field(f) | Number::Size(f) => f,
        }
    }
}

impl Field {
    pub fn read<'f>(&self, facts: &'f Facts<'_>) -> Option<Fact<'f>> {
        facts.fact(&self.root, &self.first, self.second.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Phase, cel::Expression, facts::Sample};

    /// Every condition of the fast shapes, on every request, is decided by
    /// the fast path and gives what the CEL interpreter gives; the others
    /// are left to the interpreter.
    #[test]
    fn the_fast_path_agrees_with_the_interpreter() {
        let fast = [
            "req.method == 'GET'",
            "'GET' == req.method",
            "req.method != 'GET' && req.method != 'HEAD'",
            "req.method == 'DELETE' || req.method == 'PUT'",
            "!(req.url.path.startsWith('/admin'))",
            "req.url.path.endsWith('.php') || req.url.query.contains('debug=1')",
            "req.url.path == '/a b'",
            "req.url.raw_path == '/a%20b'",
            "req.user_agent.raw.matches('(?i)(curl|wget)')",
            "matches(req.host, '^a\\\\.')",
            "'x-a' in req.headers",
            "'x-missing' in req.headers",
            "size(req.url.path) > 3",
            "size(req.url.path) <= 2000",
            "3 < size(req.url.path)",
            "req.url.port == 8443 && req.content_length == -1",
            "conn.client_ip == '192.0.2.7' && conn.server_region == 'eu'",
            "conn.client_port >= 1024",
            "endpoint.protocol == 'https' && endpoint.port == 443",
            "req.content_type == 'application/json'",
        ];
        let interpreted = [
            // A literal of another type, a field that is a map, a header
            // name in capitals (CEL's map keys are lower case), a macro.
            "req.method == 1",
            "req.url.port == '8443'",
            "req.headers == {}",
            "'X-A' in req.headers",
            "hasReqHeader('x-a')",
            "req.url.path.size() > 3",
        ];
        let requests = [
            http::Request::get("/a%20b?debug=1")
                .header("host", "a.example.test:8443")
                .header("x-a", "1")
                .header("user-agent", "curl/8.5.0")
                .body(())
                .unwrap(),
            http::Request::delete("/admin/users")
                .header("host", "a.example.test")
                .header("content-type", "application/json")
                .header("content-length", "0")
                .body(())
                .unwrap(),
            http::Request::put("/index.php").body(()).unwrap(),
        ];
        let sample = Sample::new();
        for req in &requests {
            let facts = sample.facts(req, None);
            for source in fast.iter().chain(&interpreted) {
                let program = cel::Program::compile(source).unwrap();
                let got = Cond::of(&program.expression().expr).and_then(|c| c.eval(&facts));
                if interpreted.contains(source) {
                    assert_eq!(got, None, "{source} is left to the interpreter");
                    continue;
                }
                let expected = Expression::compile(source, Phase::Request)
                    .unwrap()
                    .eval(&facts);
                let on = format!("{source} on {} {}", req.method(), req.uri());
                assert_eq!(got.map(cel::Value::Bool), Some(expected.unwrap()), "{on}");
            }
        }
    }
}
