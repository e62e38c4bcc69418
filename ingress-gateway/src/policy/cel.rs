//! CEL in policies: expressions compiled once per bind and checked against
//! ngrok's variables, `${…}` templates in action configs, ngrok's macros,
//! and the variables themselves, built lazily from what the request, its
//! connection and the rules before it know.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use cel::{
    Context, FunctionContext, Program, ResolveResult, Value,
    common::{
        ast::{EntryExpr, Expr},
        value::CowVal,
    },
    context::VariableResolver,
    extractors::This,
    objects::{Key, Map},
};

use super::{
    Phase,
    facts::{Fact, Facts},
    fast,
};

/// What a variable name is to Postern: supported, ngrok's but not
/// implemented here, or a map whose keys are data.
#[derive(Clone, Copy)]
enum Node {
    /// Fields, each with what it holds.
    Fields(&'static [(&'static str, Node)]),
    /// A value (string, number, list): no fields below.
    Leaf,
    /// A map keyed by data (`req.headers['x-a']`): anything below.
    Data,
    /// ngrok has it, Postern does not compute it.
    Unsupported,
}

use Node::{Data, Fields, Leaf, Unsupported};

const TLS_SUBJECT: Node = Fields(&[
    ("common_name", Leaf),
    ("organization", Unsupported),
    ("organizational_unit", Unsupported),
    ("country", Unsupported),
    ("locality", Unsupported),
    ("province", Unsupported),
    ("street_address", Unsupported),
    ("postal_code", Unsupported),
]);

const CONN: Node = Fields(&[
    ("client_ip", Leaf),
    ("client_port", Leaf),
    ("server_ip", Leaf),
    ("server_port", Leaf),
    ("server_region", Leaf),
    ("ts", Fields(&[("start", Leaf)])),
    (
        "tls",
        Fields(&[
            ("sni", Leaf),
            ("version", Leaf),
            ("cipher_suite", Leaf),
            (
                "client",
                Fields(&[
                    ("subject", TLS_SUBJECT),
                    ("issuer", Unsupported),
                    ("serial_number", Leaf),
                    (
                        "san",
                        Fields(&[
                            ("dns_names", Leaf),
                            ("email_addresses", Leaf),
                            ("ip_addresses", Unsupported),
                            ("uris", Unsupported),
                        ]),
                    ),
                    (
                        "validity",
                        Fields(&[("not_after", Leaf), ("not_before", Unsupported)]),
                    ),
                    ("pem", Unsupported),
                ]),
            ),
            ("negotiated_alpn", Unsupported),
            ("ja4_fingerprint", Unsupported),
            ("session_resumed", Unsupported),
        ]),
    ),
    ("bytes_in", Unsupported),
    ("bytes_out", Unsupported),
    ("geo", Unsupported),
    ("k8s", Unsupported),
]);

const URL: Node = Fields(&[
    ("scheme", Leaf),
    ("host", Leaf),
    ("port", Leaf),
    ("path", Leaf),
    ("raw_path", Leaf),
    ("query", Leaf),
    ("query_params", Data),
    ("authority", Leaf),
    ("uri", Leaf),
    ("raw", Leaf),
    ("user_password", Unsupported),
]);

const REQ: Node = Fields(&[
    ("method", Leaf),
    ("host", Leaf),
    ("url", URL),
    ("headers", Data),
    ("cookies", Data),
    ("content_length", Leaf),
    ("content_type", Leaf),
    ("content_encoding", Leaf),
    ("location", Leaf),
    ("version", Leaf),
    (
        "user_agent",
        Fields(&[
            ("raw", Leaf),
            ("name", Leaf),
            ("version", Leaf),
            ("os", Leaf),
            ("is_bot", Leaf),
            ("is_mobile", Leaf),
            ("is_tablet", Leaf),
            ("is_desktop", Leaf),
            ("os_version", Unsupported),
            ("device", Unsupported),
            ("url", Unsupported),
        ]),
    ),
    ("trailers", Unsupported),
    ("ts", Unsupported),
]);

const RES: Node = Fields(&[
    ("status_code", Leaf),
    ("headers", Data),
    ("content_length", Leaf),
    ("content_type", Leaf),
    ("content_encoding", Leaf),
    ("location", Leaf),
    ("cookies", Unsupported),
    ("trailers", Unsupported),
]);

const ENDPOINT: Node = Fields(&[
    ("id", Leaf),
    ("url", Leaf),
    ("host", Leaf),
    ("port", Leaf),
    ("protocol", Leaf),
    ("addr", Unsupported),
]);

/// The top-level variables, and the phases that have them.
fn root(name: &str, phase: Phase) -> Result<Node, String> {
    let node = match name {
        "conn" => CONN,
        "endpoint" => ENDPOINT,
        "time" => Fields(&[("now", Leaf)]),
        "actions" => Data,
        "vars" => Data,
        "req" if phase != Phase::Connect => REQ,
        "res" if phase == Phase::Response => RES,
        "req" | "res" => {
            return Err(format!(
                "`{name}` is not available in {}; it is set only in the HTTP phases that have it",
                phase.key()
            ));
        }
        "secrets" => return Err("`secrets` (ngrok's vaults) is not supported by Postern".into()),
        other => {
            return Err(format!(
                "unknown variable `{other}`; the variables are conn, req, res, endpoint, time, actions and vars"
            ));
        }
    };
    Ok(node)
}

/// Checks a selection path (`req.url.path`) against the variables.
fn check_path(root_name: &str, fields: &[&str], phase: Phase) -> Result<(), String> {
    let mut node = root(root_name, phase)?;
    let mut path = root_name.to_string();
    for field in fields {
        path.push('.');
        path.push_str(field);
        node = match node {
            Fields(children) => match children.iter().find(|(n, _)| n == field) {
                Some((_, child)) => *child,
                None => return Err(format!("unknown variable `{path}`")),
            },
            Data => return Ok(()),
            Leaf => {
                return Err(format!(
                    "`{path}`: {} has no fields",
                    &path[..path.len() - field.len() - 1]
                ));
            }
            Unsupported => unreachable!("checked below"),
        };
        if let Unsupported = node {
            return Err(format!("the variable `{path}` is not supported by Postern"));
        }
    }
    Ok(())
}

/// The fields of `req.user_agent`: ngrok's variable is the header as a
/// string and has these fields too.
const USER_AGENT_FIELDS: &[&str] = &[
    "raw",
    "name",
    "version",
    "os",
    "is_bot",
    "is_mobile",
    "is_tablet",
    "is_desktop",
    "os_version",
    "device",
    "url",
];

/// ngrok's CEL as Postern's CEL runs it, rewritten outside string
/// literals:
/// - `req.user_agent` is both a string (`req.user_agent.matches(…)`) and an
///   object (`req.user_agent.is_bot`) in ngrok. Postern's is the object,
///   and a use as a string reads its `raw` field: `req.user_agent` not
///   followed by one of its fields gets `.raw`.
/// - `rand.double()` and `rand.int(a, b)` are the functions `randDouble`
///   and `randInt` (CEL has no namespaces for them).
fn dialect(source: &str) -> String {
    const NAME: &str = "req.user_agent";
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len() + 8);
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == b'\\' && i + 1 < bytes.len() {
                out.push_str(&source[i..i + 2]);
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
        } else if c == b'\'' || c == b'"' {
            quote = Some(c);
        } else if let Some((from, to)) =
            [("rand.double(", "randDouble("), ("rand.int(", "randInt(")]
                .into_iter()
                .find(|(from, _)| source[i..].starts_with(from) && starts_a_name(bytes, i))
        {
            out.push_str(to);
            i += from.len();
            continue;
        } else if source[i..].starts_with(NAME) && starts_a_name(bytes, i) {
            let after = &source[i + NAME.len()..];
            let field: String = after
                .strip_prefix('.')
                .map(|rest| {
                    rest.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect()
                })
                .unwrap_or_default();
            let continues = after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            out.push_str(NAME);
            if !continues && !USER_AGENT_FIELDS.contains(&field.as_str()) {
                out.push_str(".raw");
            }
            i += NAME.len();
            continue;
        }
        let ch_len = source[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&source[i..i + ch_len]);
        i += ch_len;
    }
    out
}

/// Whether `bytes[i]` begins a name (is not inside one or after a `.`).
fn starts_a_name(bytes: &[u8], i: usize) -> bool {
    i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || matches!(bytes[i - 1], b'_' | b'.'))
}

/// The functions an expression may call: CEL's standard ones, the string
/// extensions, and ngrok's macros Postern implements.
const FUNCTIONS: &[&str] = &[
    // CEL standard library and macros.
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "type",
    "dyn",
    "max",
    "min",
    // String extensions.
    "charAt",
    "indexOf",
    "lastIndexOf",
    "lowerAscii",
    "upperAscii",
    "trim",
    "replace",
    "split",
    "substring",
    "join",
    "format",
    "reverse",
    // ngrok's macros.
    "getReqHeader",
    "hasReqHeader",
    "getQueryParam",
    "hasQueryParam",
    "getReqCookie",
    "hasReqCookie",
    "getResHeader",
    "hasResHeader",
    "inCidrRange",
    "inCidrRanges",
    "lower",
    "upper",
    "isPrivateIp",
    "randDouble",
    "randInt",
];

fn is_operator(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('!') || name.starts_with('-') || name.starts_with('@')
}

/// `a.b.c` as (`a`, [`b`, `c`]) when `expr` is a chain of selections on an
/// identifier.
pub(super) fn selection_chain(expr: &Expr) -> Option<(&str, Vec<&str>)> {
    let mut fields = Vec::new();
    let mut at = expr;
    loop {
        match at {
            Expr::Ident(name) => {
                fields.reverse();
                return Some((name, fields));
            }
            Expr::Select(select) => {
                fields.push(select.field.as_str());
                at = &select.operand.expr;
            }
            _ => return None,
        }
    }
}

/// Refuses unknown variables, variables of another phase, and unknown
/// functions. `bound` holds the names macros bind (`x` in `.all(x, …)`).
fn check(expr: &Expr, phase: Phase, bound: &mut Vec<String>) -> Result<(), String> {
    match expr {
        Expr::Ident(name) if bound.iter().any(|b| b == name) => Ok(()),
        Expr::Ident(name) => check_path(name, &[], phase),
        Expr::Select(select) => match selection_chain(expr) {
            Some((root, _)) if bound.iter().any(|b| b == root) => Ok(()),
            Some((root, fields)) => check_path(root, &fields, phase),
            None => check(&select.operand.expr, phase, bound),
        },
        Expr::Call(call) => {
            if !is_operator(&call.func_name) && !FUNCTIONS.contains(&call.func_name.as_str()) {
                return Err(format!(
                    "unknown function `{}`; see the README's Traffic Policy table of macros",
                    call.func_name
                ));
            }
            if let Some(target) = &call.target {
                check(&target.expr, phase, bound)?;
            }
            call.args
                .iter()
                .try_for_each(|a| check(&a.expr, phase, bound))
        }
        Expr::Comprehension(c) => {
            check(&c.iter_range.expr, phase, bound)?;
            check(&c.accu_init.expr, phase, bound)?;
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            let result = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .try_for_each(|e| check(&e.expr, phase, bound));
            bound.truncate(before);
            result
        }
        Expr::List(list) => list
            .elements
            .iter()
            .try_for_each(|e| check(&e.expr, phase, bound)),
        Expr::Map(map) => map
            .entries
            .iter()
            .try_for_each(|e| entry(&e.expr, phase, bound)),
        Expr::Struct(s) => s
            .entries
            .iter()
            .try_for_each(|e| entry(&e.expr, phase, bound)),
        Expr::Literal(_) | Expr::Unspecified => Ok(()),
    }
}

fn entry(e: &EntryExpr, phase: Phase, bound: &mut Vec<String>) -> Result<(), String> {
    match e {
        EntryExpr::StructField(f) => check(&f.value.expr, phase, bound),
        EntryExpr::MapEntry(m) => {
            check(&m.key.expr, phase, bound)?;
            check(&m.value.expr, phase, bound)
        }
    }
}

thread_local! {
    /// CEL's standard functions and ngrok's macros, registered once per
    /// thread; each evaluation resolves variables in a child scope.
    static ROOT: Context<'static, 'static> = root_context();
}

fn root_context() -> Context<'static, 'static> {
    let mut env = cel::Env::stdlib();
    cel::extensions::strings(&mut env).expect("the string extension registers once");
    let mut ctx = Context::with_env(Arc::new(env));
    postern_events::register_matches(&mut ctx);
    let registered = "ngrok's macros do not collide with CEL's functions";
    ctx.add_function("lower", |This(s): This<Arc<String>>| s.to_lowercase())
        .expect(registered);
    ctx.add_function("upper", |This(s): This<Arc<String>>| s.to_uppercase())
        .expect(registered);
    ctx.add_function("isPrivateIp", |This(s): This<Arc<String>>| {
        s.parse::<IpAddr>().is_ok_and(is_private)
    })
    .expect(registered);
    ctx.add_function("randDouble", rand::random::<f64>)
        .expect(registered);
    ctx.add_function("randInt", |min: i64, max: i64| {
        if max <= min {
            min
        } else {
            rand::random_range(min..=max)
        }
    })
    .expect(registered);
    ctx.add_function("inCidrRange", |ip: Arc<String>, cidr: Arc<String>| {
        in_cidrs(&ip, std::slice::from_ref(&Value::String(cidr)))
    })
    .expect(registered);
    ctx.add_function("inCidrRanges", |ip: Arc<String>, cidrs: Arc<Vec<Value>>| {
        in_cidrs(&ip, &cidrs)
    })
    .expect(registered);
    for (name, root, field, has) in [
        ("getReqHeader", "req", "headers", false),
        ("hasReqHeader", "req", "headers", true),
        ("getResHeader", "res", "headers", false),
        ("hasResHeader", "res", "headers", true),
        ("getQueryParam", "req", "url.query_params", false),
        ("hasQueryParam", "req", "url.query_params", true),
        ("getReqCookie", "req", "cookies", false),
        ("hasReqCookie", "req", "cookies", true),
    ] {
        let lookup = move |ftx: &FunctionContext, key: Arc<String>| -> ResolveResult {
            let values = lookup_list(ftx, root, field, &key)?;
            Ok(if has {
                Value::Bool(!values.is_empty())
            } else {
                Value::List(Arc::new(values))
            })
        };
        ctx.add_function(name, lookup).expect(registered);
    }
    ctx
}

/// `root.field[key]` (header names folded to lower case) as a list; empty
/// when absent. `field` may be dotted (`url.query_params`).
fn lookup_list(
    ftx: &FunctionContext,
    root: &str,
    field: &str,
    key: &str,
) -> Result<Vec<Value>, cel::ExecutionError> {
    // `req.headers` alone, not the whole request.
    let Some(var) = ftx.ptx.get_variable(format!("{root}.{field}")) else {
        return Err(ftx.error(format!("`{root}` is not available here")));
    };
    let Value::Map(map) = Value::try_from(&*var)? else {
        return Ok(Vec::new());
    };
    let key = if field == "headers" {
        key.to_ascii_lowercase()
    } else {
        key.to_string()
    };
    let found = map.map.get(&Key::from(key.as_str())).cloned();
    Ok(match found {
        Some(Value::List(list)) => list.as_ref().clone(),
        Some(other) => vec![other],
        None => Vec::new(),
    })
}

fn in_cidrs(ip: &str, cidrs: &[Value]) -> bool {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    cidrs.iter().any(|c| match c {
        Value::String(c) => postern_net::parse_cidr("cidr", c).is_ok_and(|net| net.contains(&ip)),
        _ => false,
    })
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 // fc00::/7
        }
    }
}

/// A compiled CEL expression and its source, with its fast forms: as a
/// condition, and as a field read alone (for `${…}`).
#[derive(Clone)]
pub(crate) struct Expression {
    source: Arc<str>,
    program: Arc<Program>,
    condition: Option<Arc<fast::Cond>>,
    field: Option<Arc<fast::Field>>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expression {
    /// Compiles `source` for `phase`, refusing what Postern cannot run.
    pub fn compile(source: &str, phase: Phase) -> Result<Expression, String> {
        let program =
            Program::compile(&dialect(source)).map_err(|e| format!("does not compile: {e}"))?;
        let expr = &program.expression().expr;
        check(expr, phase, &mut Vec::new())?;
        Ok(Expression {
            source: source.into(),
            condition: fast::Cond::of(expr).map(Arc::new),
            field: fast::field(expr).map(Arc::new),
            program: Arc::new(program),
        })
    }

    /// Evaluates against `facts`.
    pub fn eval(&self, facts: &Facts<'_>) -> Result<Value, String> {
        let resolver = Resolver::new(facts);
        ROOT.with(|root| {
            let mut scope = root.new_inner_scope();
            scope.set_variable_resolver(&resolver);
            self.program
                .execute(&scope)
                .map_err(|e| format!("`{}` failed: {e}", self.source))
        })
    }

    /// Evaluates a rule's condition: it must give a bool.
    pub fn holds(&self, facts: &Facts<'_>) -> Result<bool, String> {
        if let Some(holds) = self.condition.as_ref().and_then(|c| c.eval(facts)) {
            return Ok(holds);
        }
        match self.eval(facts)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "`{}` gave {}, not true or false",
                self.source,
                display(&other)
            )),
        }
    }
}

/// A value as text, as `${…}` puts it into a string.
pub(crate) fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::List(items) => items.iter().map(display).collect::<Vec<_>>().join(","),
        other => to_json(other).to_string(),
    }
}

/// A CEL value as JSON (for `log` metadata and `set-vars`).
pub(crate) fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::String(s) => J::String(s.to_string()),
        Value::Int(i) => J::from(*i),
        Value::UInt(u) => J::from(*u),
        Value::Float(f) => J::from(*f),
        Value::Bool(b) => J::Bool(*b),
        Value::List(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(map) => J::Object(
            map.map
                .iter()
                .map(|(k, v)| (key_text(k), to_json(v)))
                .collect(),
        ),
        Value::Bytes(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        _ => J::Null,
    }
}

fn key_text(key: &Key) -> String {
    match key {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

/// JSON as a CEL value (action results, `set-vars` values).
pub(crate) fn from_json(value: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float))
            .unwrap_or(Value::Null),
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => Value::List(Arc::new(items.iter().map(from_json).collect())),
        J::Object(map) => map_value(map.iter().map(|(k, v)| (k.as_str(), from_json(v)))),
    }
}

/// A string-keyed map value.
pub(crate) fn map_value<'k>(entries: impl IntoIterator<Item = (&'k str, Value)>) -> Value {
    Value::Map(Map {
        map: Arc::new(
            entries
                .into_iter()
                .map(|(k, v)| (Key::from(k), v))
                .collect::<HashMap<Key, Value>>(),
        ),
    })
}

/// A config string with `${expr}` parts, compiled once.
#[derive(Clone, Debug)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug)]
enum Part {
    Text(String),
    Expr(Expression),
}

impl Template {
    pub fn compile(text: &str, phase: Phase) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = closing_brace(after)
                .ok_or_else(|| format!("{text:?}: `${{` without its closing `}}`"))?;
            parts.push(Part::Expr(Expression::compile(&after[..end], phase)?));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The text with every `${…}` evaluated.
    pub fn render(&self, facts: &Facts<'_>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Expr(e) => match e.field.as_ref().and_then(|f| f.read(facts)) {
                    Some(Fact::Text(text)) => out.push_str(&text),
                    Some(Fact::Int(n)) => out.push_str(&n.to_string()),
                    Some(Fact::Value(value)) => out.push_str(&display(&value)),
                    None => out.push_str(&display(&e.eval(facts)?)),
                },
            }
        }
        Ok(out)
    }

    /// The text when it has no `${…}`.
    pub fn fixed(&self) -> Option<String> {
        match self.parts.as_slice() {
            [] => Some(String::new()),
            [Part::Text(t)] => Some(t.clone()),
            _ => None,
        }
    }
}

/// The `}` that closes a `${`, skipping braces inside quotes and nested
/// maps.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '{' => depth += 1,
                '}' if depth == 0 => return Some(i),
                '}' => depth -= 1,
                _ => {}
            },
        }
    }
    None
}

/// The variables of one evaluation: a whole variable (`req`) built on first
/// use and kept for the rest of the evaluation, a dotted name
/// (`req.url.path`) answered alone when [`Facts::lookup`] builds it alone.
struct Resolver<'f> {
    facts: &'f Facts<'f>,
    built: [OnceLock<Option<Box<dyn cel::common::value::Val>>>; 7],
}

const ROOTS: [&str; 7] = ["conn", "req", "res", "endpoint", "time", "actions", "vars"];

impl<'f> Resolver<'f> {
    fn new(facts: &'f Facts<'f>) -> Resolver<'f> {
        Resolver {
            facts,
            built: Default::default(),
        }
    }
}

impl VariableResolver for Resolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let Some(index) = ROOTS.iter().position(|r| *r == variable) else {
            let value = self.facts.lookup(variable)?;
            return Box::try_from(value).ok().map(CowVal::Owned);
        };
        let value = self.built[index].get_or_init(|| {
            self.facts
                .lookup(variable)
                .and_then(|v| Box::try_from(v).ok())
        });
        value.as_deref().map(CowVal::Borrowed)
    }
}

/// Results of actions (`actions.ngrok.<action>`) and user variables
/// (`vars.<name>`) gathered while a request is evaluated.
#[derive(Default)]
pub(crate) struct Scratch {
    pub actions: BTreeMap<&'static str, Value>,
    pub vars: BTreeMap<String, Value>,
    /// What `log` actions recorded, for the event's `traffic_policy.logs`.
    pub logs: Vec<serde_json::Value>,
    /// Actions that want to see the upstream's status (circuit breaker).
    pub observers: Vec<Arc<dyn super::ResponseObserver>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_per_phase() {
        let ok = |s: &str, p| Expression::compile(s, p).map(|_| ());
        assert!(
            ok(
                "req.method == 'GET' && conn.client_ip != ''",
                Phase::Request
            )
            .is_ok()
        );
        assert!(ok("req.headers['x-a'][0] == 'b'", Phase::Request).is_ok());
        assert!(
            ok(
                "req.url.query_params['a'].exists(v, v == '1')",
                Phase::Request
            )
            .is_ok()
        );
        assert!(ok("actions.ngrok.rate_limit.limited", Phase::Request).is_ok());
        assert!(ok("res.status_code >= 500", Phase::Response).is_ok());
        let err = |s: &str, p| Expression::compile(s, p).unwrap_err();
        assert!(err("res.status_code == 200", Phase::Request).contains("`res` is not available"));
        assert!(err("req.method == 'GET'", Phase::Connect).contains("`req` is not available"));
        assert!(err("req.nope == 1", Phase::Request).contains("unknown variable `req.nope`"));
        assert!(err("conn.geo.country == 'DE'", Phase::Request).contains("not supported"));
        assert!(err("foo == 1", Phase::Request).contains("unknown variable `foo`"));
        assert!(err("req.method ==", Phase::Request).contains("does not compile"));
        assert!(err("frobnicate(req.method)", Phase::Request).contains("unknown function"));
        assert!(err("req.method.foo == 1", Phase::Request).contains("has no fields"));
    }

    #[test]
    fn user_agent_is_text_and_an_object() {
        assert_eq!(
            dialect("req.user_agent.matches('bot') || req.user_agent.is_bot"),
            "req.user_agent.raw.matches('bot') || req.user_agent.is_bot"
        );
        assert_eq!(
            dialect("'req.user_agent' == req.user_agent"),
            "'req.user_agent' == req.user_agent.raw"
        );
        assert_eq!(dialect("xreq.user_agent"), "xreq.user_agent");
        assert_eq!(
            dialect("rand.double() <= 0.5 && rand.int(1, 6) > 2 && 'rand.int(' != ''"),
            "randDouble() <= 0.5 && randInt(1, 6) > 2 && 'rand.int(' != ''"
        );
        assert!(Expression::compile("rand.double() <= 0.5", Phase::Request).is_ok());
        assert!(Expression::compile("req.user_agent.matches('(?i)bot')", Phase::Request).is_ok());
        assert!(Expression::compile("req.user_agent.is_bot", Phase::Request).is_ok());
    }

    #[test]
    fn names_read_alone_equal_the_fields_of_the_whole_variable() {
        let req = http::Request::get("/a%20b?q=1&r=2&q=3")
            .header("host", "a.example.test:8443")
            .header("x-a", "b")
            .header("user-agent", "curl/8.5.0")
            .body(())
            .unwrap();
        let sample = super::super::facts::Sample::new();
        let facts = sample.facts(&req, None);
        let holds = |source: &str| {
            Expression::compile(source, Phase::Request)
                .unwrap()
                .holds(&facts)
                .unwrap_or_else(|e| panic!("{source}: {e}"))
        };
        for source in [
            "req.url.path == '/a b' && req['url']['path'] == req.url.path",
            "req.url.raw_path == '/a%20b' && req.url.query == 'q=1&r=2&q=3'",
            "req.url.port == 8443 && req['url']['port'] == req.url.port",
            "req.url.raw == 'https://a.example.test:8443/a%20b?q=1&r=2&q=3'",
            "req.method == 'GET' && req['method'] == req.method",
            "'x-a' in req.headers && req.headers == req['headers']",
            "req.user_agent.name == 'curl' && req.user_agent.is_bot",
            "req.content_length == -1 && req['content_length'] == -1",
            "conn.client_ip == '192.0.2.7' && conn['client_ip'] == conn.client_ip",
            "conn.server_region == 'eu' && conn.tls == null",
            "endpoint.protocol == 'https' && endpoint['port'] == endpoint.port",
            "getQueryParam('q') == ['1', '3'] && hasQueryParam('r') && !hasQueryParam('s')",
            "getReqHeader('X-A') == ['b'] && !hasReqHeader('x-b')",
        ] {
            assert!(holds(source), "{source}");
        }
        let err = Expression::compile("req.url.nope == 1", Phase::Request);
        assert!(err.is_err());
    }

    #[test]
    fn templates_split_text_and_expressions() {
        let t = Template::compile("a ${'b' + \"}\"} c ${{'k': 1}['k']}", Phase::Request).unwrap();
        assert_eq!(t.parts.len(), 4);
        assert!(Template::compile("${req.method", Phase::Request).is_err());
        assert_eq!(
            Template::compile("plain", Phase::Request)
                .unwrap()
                .fixed()
                .as_deref(),
            Some("plain")
        );
    }
}
