//! Fuzzes the agent's ngrok-style YAML config parser (parsing only: full
//! validation reads the files the config names).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_yaml_ng::from_slice::<serde_yaml_ng::Value>(data) {
        let _ = postern_agent::parse_raw(value);
    }
});
