//! Fuzzes decoding of every tunnel message an edge or an agent receives
//! from its peer, and checks that whatever decodes re-encodes to the same
//! message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::pb;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(again, message);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::Frame>(data);
    round_trip::<pb::AgentMessage>(data);
    round_trip::<pb::EdgeMessage>(data);
});
