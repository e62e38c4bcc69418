//! Fuzzes ACL rule parsing and matching: the first line is a name to bind,
//! the rest are rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_ingress::DomainPattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.lines();
    let Some(name) = lines.next() else { return };
    let rules: Vec<&str> = lines.collect();
    if let (Ok(acl), Ok(pattern)) = (postern_edge::Acl::parse(&rules), DomainPattern::parse(name)) {
        let allowed = acl.allows_name(&pattern);
        if rules.is_empty() || rules.contains(&"bind:*") {
            assert!(allowed, "an unrestricted ACL refused {name:?}");
        }
    }
});
