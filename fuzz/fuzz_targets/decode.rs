//! Any bytes into the one decoder (`ipevent_core::wire::decode`): it never panics, it refuses
//! empty and oversize datagrams for exactly those reasons, and whatever it accepts re-encodes
//! to a datagram that decodes to the same event.

#![no_main]
#![forbid(unsafe_code)]

use ipevent_core::wire::{self, Reject};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let event = match wire::decode(data) {
        Ok(event) => event,
        Err(reject) => {
            let size_reason = match data.len() {
                0 => Some(Reject::Empty),
                n if n > wire::MAX_DATAGRAM_BYTES => Some(Reject::Oversize),
                _ => None,
            };
            match size_reason {
                Some(want) => assert_eq!(reject, want, "{} bytes", data.len()),
                None => assert!(
                    !matches!(reject, Reject::Empty | Reject::Oversize),
                    "{} bytes rejected as {reject}",
                    data.len()
                ),
            }
            return;
        }
    };
    assert!(data.len() <= wire::MAX_DATAGRAM_BYTES);

    let mut out = [0u8; wire::ENCODED_MAX_BYTES];
    let len = wire::encode(&event, &mut out);
    assert_eq!(wire::decode(&out[..len]), Ok(event), "re-encoded {event:?}");

    let hex = event.app.to_hex();
    assert_eq!(hex.len(), wire::SHA_HEX_LEN, "{hex:?}");
    assert!(
        hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{hex:?} is not lower-case hex"
    );
    // The stored SHA is the datagram's own digits, only lower-cased.
    assert!(
        data.windows(wire::SHA_HEX_LEN)
            .any(|digits| digits.eq_ignore_ascii_case(hex.as_bytes())),
        "{hex:?} does not appear in the datagram"
    );
});
