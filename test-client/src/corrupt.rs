//! Corrupted datagrams: each one broken in one named way, and never valid.
//!
//! A corrupted datagram that happened to decode (a flipped bit can turn one hex digit into
//! another, or one address into another) would be counted by the receiver for some app and
//! make the expected count wrong. So every candidate is checked with
//! [`ipevent_core::wire::decode`], the receiver's own decoder, and rebuilt until it is
//! refused; the reason `decode` gives is the reason the receiver will count it under.

use std::fmt;

use ipevent_core::wire::{
    self, IpEvent, Reject, WireType, ENCODED_MAX_BYTES, FIELD_IP, MAX_DATAGRAM_BYTES, SHA_HEX_LEN,
};
use rand::Rng;

/// Largest datagram the test client sends: oversize datagrams are up to this long. It stays
/// under a 1500-byte Ethernet MTU with IP and UDP headers, so no datagram is fragmented.
pub const DATAGRAM_MAX_BYTES: usize = 1400;

/// Longest run of random bytes.
const RANDOM_BYTES_MAX: usize = 2 * ENCODED_MAX_BYTES;

/// Candidates tried before the kind's fixed, known-invalid form is used.
const CANDIDATE_ATTEMPTS_MAX: usize = 32;

/// Tag of field 2 (`ip`), varint.
pub(crate) const TAG_IP: u8 = wire::tag(FIELD_IP, WireType::Varint) as u8;
/// A field `IpEvent` does not have.
const FIELD_UNKNOWN: u32 = 3;
/// Tag of field 3, varint.
pub(crate) const TAG_UNKNOWN_VARINT: u8 = wire::tag(FIELD_UNKNOWN, WireType::Varint) as u8;
/// The field that pads oversize datagrams, length-delimited.
const FIELD_PADDING: u32 = 15;
/// What oversize datagrams are padded with.
const PADDING: [u8; DATAGRAM_MAX_BYTES] = [b'x'; DATAGRAM_MAX_BYTES];

/// The ways a datagram is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CorruptKind {
    /// One to three bits of a valid datagram flipped.
    BitFlip,
    /// Random bytes of random length.
    RandomBytes,
    /// A valid datagram cut short.
    Truncation,
    /// One to four SHA digits replaced by bytes that are no hex digit.
    BadShaChar,
    /// The address field holds a value outside 0..=4294967295 (too large, or negative).
    IpOutOfRange,
    /// Only one of the two fields.
    MissingField,
    /// A valid datagram padded with an unknown field past the receiver's size limit.
    Oversize,
    /// Zero bytes.
    Empty,
}

impl CorruptKind {
    /// Every kind, in the order of [`CorruptKind::index`].
    pub const ALL: [CorruptKind; 8] = [
        CorruptKind::BitFlip,
        CorruptKind::RandomBytes,
        CorruptKind::Truncation,
        CorruptKind::BadShaChar,
        CorruptKind::IpOutOfRange,
        CorruptKind::MissingField,
        CorruptKind::Oversize,
        CorruptKind::Empty,
    ];

    /// Number of kinds.
    pub const COUNT: usize = Self::ALL.len();

    /// The kind's name in summaries (`bit_flip`, `random_bytes`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CorruptKind::BitFlip => "bit_flip",
            CorruptKind::RandomBytes => "random_bytes",
            CorruptKind::Truncation => "truncation",
            CorruptKind::BadShaChar => "bad_sha_char",
            CorruptKind::IpOutOfRange => "ip_out_of_range",
            CorruptKind::MissingField => "missing_field",
            CorruptKind::Oversize => "oversize",
            CorruptKind::Empty => "empty",
        }
    }

    /// Dense index in `0..COUNT`, for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CorruptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Appends a minimal varint.
pub(crate) fn put_varint(out: &mut [u8], pos: &mut usize, value: u64) {
    wire::encode_varint(out, pos, value);
}

/// Writes `0x0a 0x40 <64 digits>` at `out[*pos..]`.
pub(crate) fn put_sha_field(event: &IpEvent, out: &mut [u8], pos: &mut usize) {
    wire::encode_sha_field(out, pos, &event.app);
}

/// The canonical encoding of `event` at the start of `out`; returns its length.
pub(crate) fn put_valid(event: &IpEvent, out: &mut [u8]) -> usize {
    let mut encoded = [0u8; ENCODED_MAX_BYTES];
    let len = wire::encode(event, &mut encoded);
    out[..len].copy_from_slice(&encoded[..len]);
    len
}

/// Writes into `out` (at least [`DATAGRAM_MAX_BYTES`] long) a datagram made from `event` and
/// broken in the way `kind` says. Returns its length and the reason the receiver's decoder
/// refuses it. The result is never a valid datagram.
pub fn corrupt(
    kind: CorruptKind,
    event: &IpEvent,
    rng: &mut impl Rng,
    out: &mut [u8],
) -> (usize, Reject) {
    assert!(
        out.len() >= DATAGRAM_MAX_BYTES,
        "corrupt: output buffer too small"
    );
    for _ in 0..CANDIDATE_ATTEMPTS_MAX {
        let len = candidate(kind, event, rng, out);
        if let Err(reason) = wire::decode(&out[..len]) {
            return (len, reason);
        }
    }
    let len = fallback(kind, event, out);
    match wire::decode(&out[..len]) {
        Err(reason) => (len, reason),
        Ok(valid) => panic!("the fixed {kind} datagram decodes as {valid:?}"),
    }
}

/// One attempt at breaking `event` the way `kind` says; it may by chance still be valid.
fn candidate(kind: CorruptKind, event: &IpEvent, rng: &mut impl Rng, out: &mut [u8]) -> usize {
    match kind {
        CorruptKind::BitFlip => {
            let len = put_valid(event, out);
            for _ in 0..rng.gen_range(1..=3) {
                let byte = rng.gen_range(0..len);
                out[byte] ^= 1 << rng.gen_range(0..8);
            }
            len
        }
        CorruptKind::RandomBytes => {
            let len = rng.gen_range(1..=RANDOM_BYTES_MAX);
            rng.fill(&mut out[..len]);
            len
        }
        CorruptKind::Truncation => {
            let len = put_valid(event, out);
            rng.gen_range(1..len)
        }
        CorruptKind::BadShaChar => {
            let len = put_valid(event, out);
            for _ in 0..rng.gen_range(1..=4) {
                let digit = 2 + rng.gen_range(0..SHA_HEX_LEN);
                out[digit] = loop {
                    let byte: u8 = rng.gen();
                    if !byte.is_ascii_hexdigit() {
                        break byte;
                    }
                };
            }
            len
        }
        CorruptKind::IpOutOfRange => {
            let mut pos = 0;
            put_sha_field(event, out, &mut pos);
            // int64 on the wire: either above u32::MAX or negative (a ten-byte varint).
            let value = if rng.gen_bool(0.5) {
                rng.gen_range((1u64 << 32)..=i64::MAX as u64)
            } else {
                rng.gen_range(i64::MIN..0) as u64
            };
            wire::encode_varint_field(out, &mut pos, FIELD_IP, value);
            pos
        }
        CorruptKind::MissingField => {
            let mut pos = 0;
            match rng.gen_range(0..3) {
                0 => put_sha_field(event, out, &mut pos),
                1 => wire::encode_varint_field(out, &mut pos, FIELD_IP, u64::from(event.ip)),
                _ => {
                    put_sha_field(event, out, &mut pos);
                    let ip = u64::from(event.ip);
                    wire::encode_varint_field(out, &mut pos, FIELD_UNKNOWN, ip);
                }
            }
            pos
        }
        CorruptKind::Oversize => {
            let target = rng.gen_range(MAX_DATAGRAM_BYTES + 1..=DATAGRAM_MAX_BYTES);
            oversize(event, target, out)
        }
        CorruptKind::Empty => 0,
    }
}

/// A valid datagram followed by an unknown length-delimited field that pads it to exactly
/// `target` bytes: valid in every way but its size.
fn oversize(event: &IpEvent, target: usize, out: &mut [u8]) -> usize {
    let mut pos = put_valid(event, out);
    // Tag (1 byte) and a two-byte length: targets are above 1024 and below 16384 bytes.
    let padding = target - pos - 3;
    wire::encode_len_field(out, &mut pos, FIELD_PADDING, &PADDING[..padding]);
    debug_assert_eq!(pos, target);
    pos
}

/// A fixed datagram of kind `kind` that is invalid by construction.
fn fallback(kind: CorruptKind, event: &IpEvent, out: &mut [u8]) -> usize {
    match kind {
        CorruptKind::BitFlip => {
            // Field 1 with wire type 6, which does not exist.
            let len = put_valid(event, out);
            out[0] ^= 0x04;
            len
        }
        // Field number 0 is never valid.
        CorruptKind::RandomBytes => {
            out[0] = 0;
            1
        }
        // The SHA field's tag alone: its length is missing.
        CorruptKind::Truncation => {
            put_valid(event, out);
            1
        }
        CorruptKind::BadShaChar => {
            let len = put_valid(event, out);
            out[2] = b'g';
            len
        }
        CorruptKind::IpOutOfRange => {
            let mut pos = 0;
            put_sha_field(event, out, &mut pos);
            wire::encode_varint_field(out, &mut pos, FIELD_IP, 1 << 32);
            pos
        }
        CorruptKind::MissingField => {
            let mut pos = 0;
            put_sha_field(event, out, &mut pos);
            pos
        }
        CorruptKind::Oversize => oversize(event, MAX_DATAGRAM_BYTES + 1, out),
        CorruptKind::Empty => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipevent_core::AppSha;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn event(rng: &mut StdRng) -> IpEvent {
        IpEvent {
            app: AppSha(rng.gen()),
            ip: rng.gen(),
        }
    }

    #[test]
    fn no_corrupted_datagram_is_valid() {
        let mut out = [0u8; DATAGRAM_MAX_BYTES];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..20 {
                for kind in CorruptKind::ALL {
                    let base = event(&mut rng);
                    let (len, reason) = corrupt(kind, &base, &mut rng, &mut out);
                    assert_eq!(
                        wire::decode(&out[..len]),
                        Err(reason),
                        "seed {seed} kind {kind}"
                    );
                    seen.insert((kind, reason));
                    let expected: &[Reject] = match kind {
                        CorruptKind::Empty => &[Reject::Empty],
                        CorruptKind::Oversize => &[Reject::Oversize],
                        CorruptKind::BadShaChar => &[Reject::ShaFormat],
                        CorruptKind::IpOutOfRange => &[Reject::IpRange],
                        CorruptKind::MissingField => &[Reject::MissingField],
                        CorruptKind::Truncation => &[Reject::Truncated, Reject::MissingField],
                        CorruptKind::BitFlip | CorruptKind::RandomBytes => &Reject::ALL,
                    };
                    assert!(
                        expected.contains(&reason),
                        "seed {seed} kind {kind}: {reason}"
                    );
                    match kind {
                        CorruptKind::Oversize => {
                            assert!(len > MAX_DATAGRAM_BYTES && len <= DATAGRAM_MAX_BYTES)
                        }
                        CorruptKind::Empty => assert_eq!(len, 0),
                        _ => assert!((1..=MAX_DATAGRAM_BYTES).contains(&len)),
                    }
                }
            }
        }
        // Bit flips break datagrams in many ways; the receiver must tell them apart.
        let flip_reasons = seen
            .iter()
            .filter(|(k, _)| *k == CorruptKind::BitFlip)
            .count();
        assert!(
            flip_reasons >= 4,
            "bit flips gave only {flip_reasons} reasons: {seen:?}"
        );
    }

    #[test]
    fn bit_flips_that_stay_valid_are_replaced() {
        // Flipping bit 1 of the digit 'a' (0x61) gives 'c' (0x63): another valid SHA. The
        // corrupter must never hand out such a datagram, so over many tries we find at least
        // one candidate that was valid and check that `corrupt` still returned an invalid one.
        let mut found_valid_candidate = false;
        let mut out = [0u8; DATAGRAM_MAX_BYTES];
        for seed in 0..2000u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let base = event(&mut rng);
            let len = candidate(CorruptKind::BitFlip, &base, &mut rng.clone(), &mut out);
            if wire::decode(&out[..len]).is_ok() {
                found_valid_candidate = true;
                let (len, reason) = corrupt(CorruptKind::BitFlip, &base, &mut rng, &mut out);
                assert_eq!(wire::decode(&out[..len]), Err(reason));
            }
        }
        assert!(
            found_valid_candidate,
            "no bit flip stayed valid in 2000 tries"
        );
    }

    #[test]
    fn fallbacks_are_invalid_with_the_intended_reason() {
        let mut out = [0u8; DATAGRAM_MAX_BYTES];
        let base = IpEvent {
            app: AppSha([0xab; 32]),
            ip: 0x0a00_0001,
        };
        let want = [
            (CorruptKind::BitFlip, Reject::Malformed),
            (CorruptKind::RandomBytes, Reject::Malformed),
            (CorruptKind::Truncation, Reject::Truncated),
            (CorruptKind::BadShaChar, Reject::ShaFormat),
            (CorruptKind::IpOutOfRange, Reject::IpRange),
            (CorruptKind::MissingField, Reject::MissingField),
            (CorruptKind::Oversize, Reject::Oversize),
            (CorruptKind::Empty, Reject::Empty),
        ];
        for (kind, reason) in want {
            let len = fallback(kind, &base, &mut out);
            assert_eq!(wire::decode(&out[..len]), Err(reason), "{kind}");
        }
    }
}
