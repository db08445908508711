//! The wire format: one protobuf `IpEvent` per UDP datagram.
//!
//! ```text
//! message IpEvent {
//!   required string app_sha256 = 1;   // 64 hex digits
//!   required int64  ip         = 2;   // 0 ..= 4294967295
//! }
//! ```
//!
//! [`decode`] is the only decoder in the project: the receiver, the API, the test client and the
//! fuzz targets all call it, so every binary agrees on what is valid (contract 1). It works in
//! place on the received bytes and never allocates.

use std::fmt;
use std::str::FromStr;

/// Largest datagram the receiver looks at. A valid `IpEvent` is at most 77 bytes; anything
/// above this is refused before parsing so that floods of large datagrams cost nothing.
pub const MAX_DATAGRAM_BYTES: usize = 1024;

/// Length in bytes of the encoding [`encode`] produces at most (tag, length and 64 digits for
/// the SHA; tag and a five-byte varint for the address).
pub const ENCODED_MAX_BYTES: usize = 2 + 64 + 1 + 5;

/// Number of hex digits in an app's SHA-256.
pub const SHA_HEX_LEN: usize = 64;

/// A varint is never longer than this many bytes (64 bits in 7-bit groups).
const VARINT_MAX_BYTES: usize = 10;

const FIELD_APP_SHA256: u64 = 1;
const FIELD_IP: u64 = 2;

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

/// An app's SHA-256, held as 32 binary bytes. Its textual form is always lower case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppSha(pub [u8; 32]);

/// Lookup table: ASCII byte to nibble value, or `0xff` for a byte that is no hex digit.
const HEX_VALUE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

impl AppSha {
    /// Parses exactly 64 hex digits (either case). Anything else is `None`.
    #[inline]
    pub fn from_hex(hex: &[u8]) -> Option<AppSha> {
        if hex.len() != SHA_HEX_LEN {
            return None;
        }
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let hi = HEX_VALUE[pair[0] as usize];
            let lo = HEX_VALUE[pair[1] as usize];
            // Branch-free: any invalid digit leaves its 0xff mark in `bad`.
            bad |= hi | lo;
            *byte = (hi << 4) | (lo & 0x0f);
        }
        if bad & 0xf0 != 0 {
            return None;
        }
        Some(AppSha(out))
    }

    /// Writes the 64 lower-case hex digits into `out`.
    pub fn write_hex(&self, out: &mut [u8; SHA_HEX_LEN]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(self.0.iter()) {
            pair[0] = HEX_DIGITS[(byte >> 4) as usize];
            pair[1] = HEX_DIGITS[(byte & 0x0f) as usize];
        }
    }

    /// The 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        let mut out = [0u8; SHA_HEX_LEN];
        self.write_hex(&mut out);
        // The digits come from HEX_DIGITS, which is ASCII.
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl fmt::Display for AppSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for AppSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppSha({})", self.to_hex())
    }
}

/// Why a string is not an app SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an app SHA-256 is 64 hex digits (0-9, a-f), got {got_len} characters")]
pub struct ShaParseError {
    /// Length of the rejected input, in bytes.
    pub got_len: usize,
}

impl FromStr for AppSha {
    type Err = ShaParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AppSha::from_hex(s.as_bytes()).ok_or(ShaParseError { got_len: s.len() })
    }
}

/// One valid event: which app talked to which IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpEvent {
    /// The app's SHA-256.
    pub app: AppSha,
    /// The IPv4 address as a host-order integer (`1.2.3.4` is `0x01020304`).
    pub ip: u32,
}

/// Why a datagram was refused. Every rejected datagram is counted under exactly one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Zero bytes.
    Empty,
    /// Larger than [`MAX_DATAGRAM_BYTES`]; not parsed at all.
    Oversize,
    /// A field or length prefix runs past the end of the datagram.
    Truncated,
    /// Not protobuf: bad tag, field number 0, group wire types, over-long varints, garbage.
    Malformed,
    /// A known field with the wrong wire type.
    WireType,
    /// `app_sha256` or `ip` absent.
    MissingField,
    /// `app_sha256` is not exactly 64 hex digits.
    ShaFormat,
    /// `ip` outside 0..=4294967295.
    IpRange,
}

impl Reject {
    /// Every reason, in the order of [`Reject::index`].
    pub const ALL: [Reject; 8] = [
        Reject::Empty,
        Reject::Oversize,
        Reject::Truncated,
        Reject::Malformed,
        Reject::WireType,
        Reject::MissingField,
        Reject::ShaFormat,
        Reject::IpRange,
    ];

    /// Number of distinct reasons.
    pub const COUNT: usize = Self::ALL.len();

    /// The reason's name in counters, logs and JSON (`sha_format`, `ip_range`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Reject::Empty => "empty",
            Reject::Oversize => "oversize",
            Reject::Truncated => "truncated",
            Reject::Malformed => "malformed",
            Reject::WireType => "wire_type",
            Reject::MissingField => "missing_field",
            Reject::ShaFormat => "sha_format",
            Reject::IpRange => "ip_range",
        }
    }

    /// Dense index in `0..COUNT`, for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The reason with this [`Reject::name`].
    pub fn from_name(name: &str) -> Option<Reject> {
        Reject::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads a varint at `buf[*pos..]`. `cut` is the reason to give when the buffer ends inside it.
#[inline]
fn read_varint(buf: &[u8], pos: &mut usize, cut: Reject) -> Result<u64, Reject> {
    let mut value = 0u64;
    for i in 0..VARINT_MAX_BYTES {
        let Some(&byte) = buf.get(*pos) else {
            return Err(cut);
        };
        *pos += 1;
        if i == VARINT_MAX_BYTES - 1 && byte > 1 {
            // The tenth group may only carry the 64th bit.
            return Err(Reject::Malformed);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Reject::Malformed)
}

/// Skips `len` bytes at `buf[*pos..]`.
#[inline]
fn skip(buf: &[u8], pos: &mut usize, len: u64) -> Result<(), Reject> {
    let remaining = (buf.len() - *pos) as u64;
    if len > remaining {
        return Err(Reject::Truncated);
    }
    *pos += len as usize;
    Ok(())
}

/// Decodes and validates one datagram (contract 1).
///
/// Protobuf semantics: fields in any order, unknown fields skipped, the last of a repeated
/// field wins, non-minimal varints accepted. Both fields are required; the SHA must be 64 hex
/// digits (upper case accepted) and the address must fit in 32 bits.
pub fn decode(buf: &[u8]) -> Result<IpEvent, Reject> {
    if buf.is_empty() {
        return Err(Reject::Empty);
    }
    if buf.len() > MAX_DATAGRAM_BYTES {
        return Err(Reject::Oversize);
    }
    let mut pos = 0usize;
    let mut sha: Option<&[u8]> = None;
    let mut ip: Option<u64> = None;
    while pos < buf.len() {
        // A tag cut short is bytes that are no field at all, hence malformed, not truncated.
        let tag = read_varint(buf, &mut pos, Reject::Malformed)?;
        let field = tag >> 3;
        let wire_type = tag & 7;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(Reject::Malformed);
        }
        match (field, wire_type) {
            (FIELD_APP_SHA256, WIRE_LEN) => {
                let len = read_varint(buf, &mut pos, Reject::Truncated)?;
                let start = pos;
                skip(buf, &mut pos, len)?;
                sha = Some(&buf[start..pos]);
            }
            (FIELD_IP, WIRE_VARINT) => {
                ip = Some(read_varint(buf, &mut pos, Reject::Truncated)?);
            }
            (FIELD_APP_SHA256 | FIELD_IP, _) => return Err(Reject::WireType),
            (_, WIRE_VARINT) => {
                read_varint(buf, &mut pos, Reject::Truncated)?;
            }
            (_, WIRE_FIXED64) => skip(buf, &mut pos, 8)?,
            (_, WIRE_LEN) => {
                let len = read_varint(buf, &mut pos, Reject::Truncated)?;
                skip(buf, &mut pos, len)?;
            }
            (_, WIRE_FIXED32) => skip(buf, &mut pos, 4)?,
            // Groups (3, 4) are deprecated and never part of IpEvent; 6 and 7 do not exist.
            _ => return Err(Reject::Malformed),
        }
    }
    let (Some(sha), Some(ip)) = (sha, ip) else {
        return Err(Reject::MissingField);
    };
    let app = AppSha::from_hex(sha).ok_or(Reject::ShaFormat)?;
    // int64 on the wire: a negative address arrives as a huge u64 and is out of range too.
    let ip = u32::try_from(ip).map_err(|_| Reject::IpRange)?;
    Ok(IpEvent { app, ip })
}

/// Appends a varint to `out` at `*pos`.
fn put_varint(out: &mut [u8], pos: &mut usize, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[*pos] = byte;
            *pos += 1;
            return;
        }
        out[*pos] = byte | 0x80;
        *pos += 1;
    }
}

/// Encodes `event` as protoc would (field 1, then field 2, minimal varints) into `out` and
/// returns the length used.
pub fn encode(event: &IpEvent, out: &mut [u8; ENCODED_MAX_BYTES]) -> usize {
    let mut pos = 0;
    out[pos] = ((FIELD_APP_SHA256 << 3) | WIRE_LEN) as u8;
    out[pos + 1] = SHA_HEX_LEN as u8;
    pos += 2;
    let mut hex = [0u8; SHA_HEX_LEN];
    event.app.write_hex(&mut hex);
    out[pos..pos + SHA_HEX_LEN].copy_from_slice(&hex);
    pos += SHA_HEX_LEN;
    out[pos] = ((FIELD_IP << 3) | WIRE_VARINT) as u8;
    pos += 1;
    put_varint(out, &mut pos, u64::from(event.ip));
    pos
}

/// [`encode`] into a fresh vector, for callers off the hot path.
pub fn encode_to_vec(event: &IpEvent) -> Vec<u8> {
    let mut out = [0u8; ENCODED_MAX_BYTES];
    let len = encode(event, &mut out);
    out[..len].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(byte: u8) -> AppSha {
        AppSha([byte; 32])
    }

    #[test]
    fn hex_round_trips_and_lowercases() {
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789";
        let app: AppSha = upper.parse().unwrap();
        assert_eq!(app.to_hex(), upper.to_ascii_lowercase());
        assert_eq!(AppSha::from_hex(app.to_hex().as_bytes()), Some(app));
    }

    #[test]
    fn hex_rejects_every_non_digit() {
        let good = [b'a'; 64];
        for byte in 0..=255u8 {
            let mut bytes = good;
            bytes[17] = byte;
            let expect = byte.is_ascii_hexdigit();
            assert_eq!(AppSha::from_hex(&bytes).is_some(), expect, "byte {byte:#x}");
        }
    }

    #[test]
    fn encode_decode_round_trip_edges() {
        for ip in [0, 1, 127, 128, 16_383, 16_384, 0x0102_0304, u32::MAX] {
            let event = IpEvent { app: sha(0x5a), ip };
            let bytes = encode_to_vec(&event);
            assert!(bytes.len() <= ENCODED_MAX_BYTES);
            assert_eq!(decode(&bytes), Ok(event));
        }
    }

    #[test]
    fn tenth_varint_byte_may_only_hold_one_bit() {
        let mut bytes = encode_to_vec(&IpEvent { app: sha(1), ip: 0 });
        bytes.pop();
        bytes.extend_from_slice(&[0x80; 9]);
        bytes.push(0x02);
        assert_eq!(decode(&bytes), Err(Reject::Malformed));
    }
}
