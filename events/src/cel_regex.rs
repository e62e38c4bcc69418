//! CEL's `matches` (`s.matches(re)` and `matches(s, re)`), RE2 syntax as
//! the `regex` crate reads it, with each pattern compiled once per thread.
//! The cel crate's own compiles the pattern on every evaluation, which made
//! a policy rule with `matches` cost a regex compilation per request.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use cel::{Context, ExecutionError, FunctionContext, extractors::This};
use regex::Regex;

/// Patterns kept per thread at most; past it the cache starts over.
const CACHED: usize = 1024;

thread_local! {
    static COMPILED: RefCell<HashMap<String, Result<Regex, String>>> =
        RefCell::new(HashMap::new());
}

/// Registers `matches` in `ctx`.
pub fn register_matches(ctx: &mut Context<'static, 'static>) {
    ctx.add_function("matches", matches)
        .expect("matches is not a built-in without the cel crate's regex feature");
}

fn matches(
    ftx: &FunctionContext,
    This(text): This<Arc<String>>,
    pattern: Arc<String>,
) -> Result<bool, ExecutionError> {
    COMPILED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.contains_key(pattern.as_str()) {
            if cache.len() >= CACHED {
                cache.clear();
            }
            let compiled = Regex::new(&pattern).map_err(|e| e.to_string());
            cache.insert(pattern.to_string(), compiled);
        }
        match &cache[pattern.as_str()] {
            Ok(re) => Ok(re.is_match(&text)),
            Err(e) => Err(ftx.error(format!("'{pattern}' is not a valid regex: {e}"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cel::Program;

    fn eval(source: &str) -> Result<cel::Value, ExecutionError> {
        let mut ctx = Context::default();
        register_matches(&mut ctx);
        Program::compile(source).unwrap().execute(&ctx)
    }

    #[test]
    fn both_call_styles_and_a_bad_pattern() {
        assert_eq!(eval("'FriendlyBot'.matches('(?i)bot$')"), Ok(true.into()));
        assert_eq!(eval("matches('curl/8', '^wget')"), Ok(false.into()));
        let err = eval("'x'.matches('(unclosed')").unwrap_err().to_string();
        assert!(err.contains("not a valid regex"), "{err}");
    }
}
