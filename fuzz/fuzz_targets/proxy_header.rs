//! Fuzzes the PROXY protocol header parser (v1 text, v2 binary) that a
//! listener runs on bytes from a trusted load balancer, and checks that what
//! it parses survives a round trip through the writer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_net::proxy_header::{encode, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, used))) = parse(data) else {
        return;
    };
    assert!(used <= data.len(), "consumed more than it was given");
    if let (Some(source), Some(destination)) = (header.source, header.destination) {
        let written = encode(header.version, source, destination);
        let (again, n) = parse(&written).expect("own header parses").expect("complete");
        assert_eq!(n, written.len());
        assert_eq!(again.source.map(|a| a.port()), Some(source.port()));
        assert_eq!(again.destination.map(|a| a.port()), Some(destination.port()));
    }
});
