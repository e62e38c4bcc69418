//! Fuzzes Host/`:authority` normalisation: whatever it accepts is one
//! canonical, lower-case name without a trailing dot or a port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_ingress::normalize_host;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(host) = normalize_host(raw) {
        assert_eq!(host, host.to_ascii_lowercase());
        assert!(!host.ends_with('.'));
        assert!(!host.is_empty());
        assert_eq!(normalize_host(&host).as_deref(), Ok(host.as_str()), "normalising twice changes it");
    }
});
