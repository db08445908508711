//! Any bytes into the decoder (`ipevent_core::wire::decode`) and into the protobuf reference
//! (`prost` with Google's rules where prost departs from them, plus our limits; shared with
//! `core/tests/protobuf.rs`): both reach the same verdict, the same event or a refusal for the
//! same cause.

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../core/tests/protobuf/oracle.rs"]
mod oracle;

use ipevent_core::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reference = oracle::verdict(data);
    let ours = wire::decode(data);
    assert!(
        oracle::agrees(&ours, &reference),
        "decoder says {ours:?}, protobuf says {reference:?}"
    );
});
