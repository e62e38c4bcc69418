//! Subscription filters: CEL, with the event's `object` bound as `ev`, as
//! in ngrok. Only ngrok's filterable fields may be named:
//! `ev.conn.client_ip`, `ev.conn.server_ip`, `ev.conn.server_name` and
//! `ev.conn.server_port`; anything else is refused when the config loads
//! (ngrok's ERR_NGROK_6013). A field the event does not carry reads as
//! its zero value (`""`, `0`), as CEL does for unset protobuf fields, so
//! `ev.conn.server_name != "a.example.com"` also matches TCP events.

use std::{fmt, sync::Arc};

use cel::{
    Context, Program, Value,
    common::ast::{EntryExpr, Expr},
};

use crate::Event;

/// The fields a filter may name, under `ev.`.
pub const FILTERABLE_FIELDS: [&str; 4] = [
    "conn.client_ip",
    "conn.server_ip",
    "conn.server_name",
    "conn.server_port",
];

/// A compiled filter.
#[derive(Clone)]
pub struct Filter {
    source: Arc<str>,
    program: Arc<Program>,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Filter").field(&self.source).finish()
    }
}

/// Filters are equal when their source text is.
impl PartialEq for Filter {
    fn eq(&self, other: &Filter) -> bool {
        self.source == other.source
    }
}

/// Why a filter did not compile or run.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("{0}")]
    Syntax(String),
    #[error(
        "`ev.{0}` is not filterable; filters may use ev.conn.client_ip, ev.conn.server_ip, ev.conn.server_name and ev.conn.server_port"
    )]
    NotFilterable(String),
    #[error("unknown variable `{0}`; the event is `ev`")]
    UnknownVariable(String),
    /// ngrok's ERR_NGROK_6014.
    #[error("ERR_POSTERN_6014: the filter failed to run: {0} (ngrok: ERR_NGROK_6014)")]
    Run(String),
    #[error("the filter gave {0}, not true or false")]
    NotBool(String),
}

/// What a filter sees of an event: the filterable fields, zero when absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterInput {
    pub client_ip: String,
    pub server_ip: String,
    pub server_name: String,
    pub server_port: u16,
}

impl FilterInput {
    pub fn of(event: &Event) -> FilterInput {
        let Some(conn) = event.object.conn() else {
            return FilterInput::default();
        };
        FilterInput {
            client_ip: conn.client_ip.clone().unwrap_or_default(),
            server_ip: conn.server_ip.clone().unwrap_or_default(),
            server_name: conn.server_name.clone().unwrap_or_default(),
            server_port: conn.server_port.unwrap_or_default(),
        }
    }

    /// From an event as JSON (as a consumer reads it).
    pub fn of_json(event: &serde_json::Value) -> FilterInput {
        let conn = &event["object"]["conn"];
        let text = |name: &str| conn[name].as_str().unwrap_or_default().to_string();
        FilterInput {
            client_ip: text("client_ip"),
            server_ip: text("server_ip"),
            server_name: text("server_name"),
            server_port: conn["server_port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_default(),
        }
    }

    fn to_value(&self) -> Value {
        let conn: std::collections::HashMap<String, Value> = [
            ("client_ip", Value::from(self.client_ip.as_str())),
            ("server_ip", Value::from(self.server_ip.as_str())),
            ("server_name", Value::from(self.server_name.as_str())),
            ("server_port", Value::Int(i64::from(self.server_port))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Value::from(std::collections::HashMap::from([(
            "conn".to_string(),
            Value::from(conn),
        )]))
    }
}

thread_local! {
    /// The built-in functions, registered once per thread; each
    /// evaluation binds `ev` in a child scope.
    static ROOT: Context<'static, 'static> = {
        let mut ctx = Context::default();
        crate::register_matches(&mut ctx);
        ctx
    };
}

impl Filter {
    pub fn compile(source: &str) -> Result<Filter, FilterError> {
        let program = Program::compile(source).map_err(|e| FilterError::Syntax(e.to_string()))?;
        check(&program.expression().expr, &mut Vec::new())?;
        Ok(Filter {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, input: &FilterInput) -> Result<bool, FilterError> {
        ROOT.with(|root| {
            let mut context = root.new_inner_scope();
            context.add_variable_from_value("ev", input.to_value());
            match self.program.execute(&context) {
                Ok(Value::Bool(b)) => Ok(b),
                Ok(other) => Err(FilterError::NotBool(format!("{other:?}"))),
                Err(e) => Err(FilterError::Run(e.to_string())),
            }
        })
    }
}

/// `a.b.c` as (`a`, [`b`, `c`]) when `expr` is a chain of field selections
/// on an identifier.
fn selection_chain(expr: &Expr) -> Option<(&str, Vec<&str>)> {
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

/// Refuses variables other than `ev` (and those a macro binds) and
/// fields that are not filterable.
fn check(expr: &Expr, bound: &mut Vec<String>) -> Result<(), FilterError> {
    match expr {
        Expr::Ident(name) => {
            if bound.iter().any(|b| b == name) {
                Ok(())
            } else if name == "ev" {
                Err(FilterError::NotFilterable(String::new()))
            } else {
                Err(FilterError::UnknownVariable(name.clone()))
            }
        }
        Expr::Select(select) => match selection_chain(expr) {
            Some((root, _)) if bound.iter().any(|b| b == root) => Ok(()),
            Some(("ev", fields)) => {
                let path = fields.join(".");
                if FILTERABLE_FIELDS.contains(&path.as_str()) {
                    Ok(())
                } else {
                    Err(FilterError::NotFilterable(path))
                }
            }
            Some((root, _)) => Err(FilterError::UnknownVariable(root.to_string())),
            None => check(&select.operand.expr, bound),
        },
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                check(&target.expr, bound)?;
            }
            call.args.iter().try_for_each(|a| check(&a.expr, bound))
        }
        Expr::Comprehension(c) => {
            check(&c.iter_range.expr, bound)?;
            check(&c.accu_init.expr, bound)?;
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            let result = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .try_for_each(|e| check(&e.expr, bound));
            bound.truncate(before);
            result
        }
        Expr::List(list) => list.elements.iter().try_for_each(|e| check(&e.expr, bound)),
        Expr::Map(map) => map.entries.iter().try_for_each(|e| entry(&e.expr, bound)),
        Expr::Struct(s) => s.entries.iter().try_for_each(|e| entry(&e.expr, bound)),
        Expr::Literal(_) | Expr::Unspecified => Ok(()),
    }
}

fn entry(e: &EntryExpr, bound: &mut Vec<String>) -> Result<(), FilterError> {
    match e {
        EntryExpr::StructField(f) => check(&f.value.expr, bound),
        EntryExpr::MapEntry(m) => {
            check(&m.key.expr, bound)?;
            check(&m.value.expr, bound)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, port: u16) -> FilterInput {
        FilterInput {
            client_ip: "203.0.113.7".into(),
            server_ip: "127.0.0.1".into(),
            server_name: name.into(),
            server_port: port,
        }
    }

    #[test]
    fn ngrok_style_filters() {
        let a = input("a.example.test", 443);
        let b = input("b.example.test", 80);
        let tcp = input("", 20001);
        let cases = [
            (
                r#"ev.conn.server_name == "a.example.test""#,
                [true, false, false],
            ),
            (
                r#"ev.conn.server_name != "a.example.test""#,
                [false, true, true],
            ),
            ("ev.conn.server_port == 443", [true, false, false]),
            (
                r#"ev.conn.server_name.endsWith(".example.test") && !(ev.conn.server_port == 80)"#,
                [true, false, false],
            ),
            (
                r#"ev.conn.server_name.matches("^[ab]\\.") || ev.conn.server_port > 20000"#,
                [true, true, true],
            ),
            (
                r#"ev.conn.client_ip.startsWith("203.0.113.")"#,
                [true, true, true],
            ),
            (
                r#"ev.conn.server_name.contains("b.")"#,
                [false, true, false],
            ),
            (
                r#"ev.conn.server_name in ["a.example.test", "x"]"#,
                [true, false, false],
            ),
        ];
        for (source, want) in cases {
            let f = Filter::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            let got = [&a, &b, &tcp].map(|i| f.matches(i).unwrap());
            assert_eq!(got, want, "{source}");
        }
    }

    #[test]
    fn only_filterable_fields_and_ev() {
        for (source, want) in [
            (
                "ev.http.request.method == 'GET'",
                "`ev.http.request.method` is not filterable",
            ),
            (
                "ev.conn.bytes_in > 0",
                "`ev.conn.bytes_in` is not filterable",
            ),
            ("ev == {}", "not filterable"),
            ("event.conn.server_name == 'a'", "unknown variable `event`"),
            ("ev.conn.server_name ==", "Syntax error"),
        ] {
            let err = Filter::compile(source).unwrap_err().to_string();
            assert!(err.contains(want), "{source}: {err}");
        }
        // Macros bind their own variables.
        Filter::compile(r#"["a", "b"].exists(x, ev.conn.server_name.startsWith(x))"#).unwrap();
    }

    #[test]
    fn a_type_error_is_a_run_error_not_a_match() {
        let f = Filter::compile(r#"ev.conn.server_port == "443""#).unwrap();
        match f.matches(&input("a", 443)) {
            Ok(false) | Err(FilterError::Run(_)) => {}
            other => panic!("{other:?}"),
        }
        let f = Filter::compile("ev.conn.server_port").unwrap();
        assert!(matches!(
            f.matches(&input("a", 443)),
            Err(FilterError::NotBool(_))
        ));
    }

    #[test]
    fn input_from_json_matches_input_from_the_event() {
        let mut event = crate::Event::tcp(
            crate::TcpConnectionClosed {
                conn: Some(crate::Conn {
                    client_ip: Some("127.0.0.1".into()),
                    server_name: Some("t.example.test".into()),
                    server_port: Some(443),
                    ..Default::default()
                }),
                ..Default::default()
            },
            std::time::SystemTime::now(),
            None,
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(FilterInput::of(&event), FilterInput::of_json(&json));
        event.object = crate::EventObject::Tcp(Box::default());
        assert_eq!(FilterInput::of(&event), FilterInput::default());
    }
}
