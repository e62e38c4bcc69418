//! Fuzzes the CA-bundle loader: every certificate it accepts as a CA must
//! be a well-formed one with a fingerprint, and bundles stay within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_net::{MAX_CAS, parse_ca_bundle};

fuzz_target!(|data: &[u8]| {
    if let Ok(cas) = parse_ca_bundle(data) {
        assert!(!cas.is_empty() && cas.len() <= MAX_CAS);
        for ca in cas {
            assert_eq!(ca.fingerprint.len(), 64);
        }
    }
});
