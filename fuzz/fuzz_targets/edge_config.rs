//! Fuzzes the edge's config loader: any text either validates or gives an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = postern_edge::EdgeConfig::from_toml(text);
    }
});
