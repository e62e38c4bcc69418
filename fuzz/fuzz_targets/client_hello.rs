//! Fuzzes the SNI/ALPN ClientHello peeker with arbitrary first bytes of a
//! connection. Beyond "never panics", it checks the invariants routing
//! relies on and that parsing is monotonic in the bytes received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_ingress::{Peek, peek_client_hello};

/// The edge buffers at most one full TLS record before routing.
const MAX_LEN: usize = 16 * 1024 + 5;

fuzz_target!(|data: &[u8]| {
    let Ok(Peek::Complete(hello)) = peek_client_hello(data, MAX_LEN) else {
        return;
    };
    if let Some(name) = &hello.server_name {
        assert!(!name.is_empty(), "empty server_name");
        assert!(name.is_ascii(), "non-ASCII server_name {name:?}");
        assert_eq!(*name, name.to_ascii_lowercase(), "server_name not lower-cased");
        assert!(!name.ends_with('.'), "server_name keeps its trailing dot");
    }
    for protocol in &hello.alpn {
        assert!(!protocol.is_empty(), "empty ALPN protocol name");
    }
    // A prefix of a complete hello is either still complete (the cut fell
    // after the hello) with the same result, or merely incomplete: never an
    // error.
    let prefix = peek_client_hello(&data[..data.len() / 2], MAX_LEN);
    assert!(
        prefix == Ok(Peek::Incomplete) || prefix == Ok(Peek::Complete(hello.clone())),
        "prefix of a complete hello gave {prefix:?}"
    );
});
