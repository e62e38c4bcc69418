//! Fuzzes reading muxado frames (the ngrok agent ingress's multiplexer) as
//! an edge reads them from an SDK: bad headers are errors, never panics,
//! and whatever parses encodes to a frame that parses back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::muxado::{Frame, parse_frames};

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = parse_frames(data) {
        for frame in frames {
            if matches!(frame, Frame::GoAway { .. }) {
                continue; // its body is not read as declared
            }
            let again = parse_frames(&frame.encode()).expect("an encoded frame parses");
            assert_eq!(again, vec![frame]);
        }
    }
});
