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
//! place on the received bytes and never allocates. Its verdict is Google's protobuf runtime's
//! for the message above, plus the limits of [`decode`]; `core/tests/protobuf.rs` checks that
//! against `prost` and against verdicts recorded from Google's runtime.
//!
//! The field encoders (`encode_*`) write protobuf fields for [`encode`] and for tests and tools
//! that build datagrams, valid or not, by hand.

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

/// A varint is never longer than this many bytes (64 bits in 7-bit groups). Protobuf readers
/// take the low 64 bits of a ten-byte varint whatever its last byte holds.
pub const VARINT_MAX_BYTES: usize = 10;

/// A tag (field number and wire type) is a varint of at most this many bytes whose value fits
/// in 32 bits; Google's runtimes refuse a longer one.
pub const TAG_MAX_BYTES: usize = 5;

/// A length prefix is a varint of at most this many bytes; Google's runtimes refuse a longer
/// one (whatever the value).
pub const LENGTH_MAX_BYTES: usize = 5;

/// Largest field number protobuf allows (2^29 - 1).
pub const FIELD_NUMBER_MAX: u32 = (1 << 29) - 1;

/// Deepest nesting of groups protobuf readers accept (Google's default recursion limit): an
/// unknown group may hold groups down to this depth, counting itself.
pub const GROUP_DEPTH_MAX: usize = 100;

/// Field number of `app_sha256`.
pub const FIELD_APP_SHA256: u32 = 1;
/// Field number of `ip`.
pub const FIELD_IP: u32 = 2;

/// The wire type in a protobuf tag: how the field's value is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireType {
    /// A varint (`int64`, `bool`, ...).
    Varint = 0,
    /// Eight little-endian bytes.
    Fixed64 = 1,
    /// A varint length, then that many bytes (`string`, `bytes`, messages).
    Len = 2,
    /// The start of a group; its fields follow up to the matching [`WireType::EndGroup`].
    StartGroup = 3,
    /// The end of a group.
    EndGroup = 4,
    /// Four little-endian bytes.
    Fixed32 = 5,
}

const WIRE_VARINT: u32 = WireType::Varint as u32;
const WIRE_FIXED64: u32 = WireType::Fixed64 as u32;
const WIRE_LEN: u32 = WireType::Len as u32;
const WIRE_START_GROUP: u32 = WireType::StartGroup as u32;
const WIRE_END_GROUP: u32 = WireType::EndGroup as u32;
const WIRE_FIXED32: u32 = WireType::Fixed32 as u32;

/// The tag value of field `field` with wire type `wire_type` (`(field << 3) | wire_type`).
/// `field` must be in `1..=FIELD_NUMBER_MAX` for the tag to be valid protobuf.
pub const fn tag(field: u32, wire_type: WireType) -> u32 {
    (field << 3) | wire_type as u32
}

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
    /// A field's value or length prefix runs past the end of the datagram.
    Truncated,
    /// Not protobuf: a tag cut short, longer than five bytes, above 32 bits or naming field 0;
    /// wire type 6 or 7; a varint longer than ten bytes; a length prefix longer than five; an end of group with no group open or
    /// naming another field; a group still open at the end or nested deeper than
    /// [`GROUP_DEPTH_MAX`].
    Malformed,
    /// `app_sha256` or `ip` is missing and a field of that number came with another wire type
    /// (which protobuf skips as an unknown field).
    WireType,
    /// `app_sha256` or `ip` is missing.
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

/// Reads a varint of at most `MAX` bytes at `buf[*pos..]`, of which the low 64 bits count (as
/// protobuf readers do with a tenth byte). `cut` is the reason to give when the buffer ends
/// inside it; a longer varint is malformed.
#[inline]
fn read_varint_of<const MAX: usize>(
    buf: &[u8],
    pos: &mut usize,
    cut: Reject,
) -> Result<u64, Reject> {
    let mut value = 0u64;
    for i in 0..MAX {
        let Some(&byte) = buf.get(*pos) else {
            return Err(cut);
        };
        *pos += 1;
        // The shift drops what a tenth byte holds above bit 63.
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Reject::Malformed)
}

/// Reads a value varint (at most [`VARINT_MAX_BYTES`]).
#[inline]
fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Reject> {
    read_varint_of::<VARINT_MAX_BYTES>(buf, pos, Reject::Truncated)
}

/// Reads a length prefix (at most [`LENGTH_MAX_BYTES`]).
#[inline]
fn read_length(buf: &[u8], pos: &mut usize) -> Result<u64, Reject> {
    read_varint_of::<LENGTH_MAX_BYTES>(buf, pos, Reject::Truncated)
}

/// Reads a tag at `buf[*pos..]` and returns its field number and wire type. A tag cut short,
/// longer than [`TAG_MAX_BYTES`], above 32 bits (a field number above [`FIELD_NUMBER_MAX`]) or
/// naming field 0 is bytes that are no field at all: malformed, not truncated.
#[inline]
fn read_tag(buf: &[u8], pos: &mut usize) -> Result<(u32, u32), Reject> {
    let tag = read_varint_of::<TAG_MAX_BYTES>(buf, pos, Reject::Malformed)?;
    let tag = u32::try_from(tag).map_err(|_| Reject::Malformed)?;
    let field = tag >> 3;
    if field == 0 {
        return Err(Reject::Malformed);
    }
    Ok((field, tag & 7))
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

/// Skips the value of a field `IpEvent` does not read (an unknown field, or one of its own sent
/// with another wire type), whose tag was just read. `depth` counts the groups open around it.
fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    field: u32,
    wire_type: u32,
    depth: usize,
) -> Result<(), Reject> {
    match wire_type {
        WIRE_VARINT => read_varint(buf, pos).map(drop),
        WIRE_FIXED64 => skip(buf, pos, 8),
        WIRE_LEN => {
            let len = read_length(buf, pos)?;
            skip(buf, pos, len)
        }
        WIRE_FIXED32 => skip(buf, pos, 4),
        WIRE_START_GROUP => skip_group(buf, pos, field, depth + 1),
        // An end of group where no group is open, or wire type 6 or 7, which do not exist.
        _ => Err(Reject::Malformed),
    }
}

/// Skips the fields of a group whose start tag (field `field`) was just read, up to and
/// including its end tag. `depth` counts this group and those around it.
fn skip_group(buf: &[u8], pos: &mut usize, field: u32, depth: usize) -> Result<(), Reject> {
    if depth > GROUP_DEPTH_MAX {
        return Err(Reject::Malformed);
    }
    while *pos < buf.len() {
        let (inner, wire_type) = read_tag(buf, pos)?;
        if wire_type == WIRE_END_GROUP {
            // The end tag must name the group it closes.
            return if inner == field {
                Ok(())
            } else {
                Err(Reject::Malformed)
            };
        }
        skip_value(buf, pos, inner, wire_type, depth)?;
    }
    // The datagram ended with the group still open.
    Err(Reject::Malformed)
}

/// Decodes and validates one datagram (contract 1: wire validation).
///
/// The verdict is the one Google's protobuf runtime reaches for the proto2 message above, plus
/// our own limits: at most [`MAX_DATAGRAM_BYTES`], a SHA of 64 hex digits (upper case
/// accepted) and an address that fits in 32 bits. So fields come in any order; unknown fields
/// are skipped, groups included; a field of ours sent with another wire type is an unknown
/// field too; the last of a repeated field wins; varints may be non-minimal (up to five bytes
/// for tags and lengths, ten for values), and a ten-byte varint counts for its low 64 bits.
/// Both fields are required.
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
    // Bit `1 << n` set: field n of ours came with another wire type (and was skipped).
    let mut other_wire_type = 0u8;
    while pos < buf.len() {
        let (field, wire_type) = read_tag(buf, &mut pos)?;
        match (field, wire_type) {
            (FIELD_APP_SHA256, WIRE_LEN) => {
                let len = read_length(buf, &mut pos)?;
                let start = pos;
                skip(buf, &mut pos, len)?;
                sha = Some(&buf[start..pos]);
            }
            (FIELD_IP, WIRE_VARINT) => {
                ip = Some(read_varint(buf, &mut pos)?);
            }
            _ => {
                if field <= FIELD_IP {
                    other_wire_type |= 1 << field;
                }
                skip_value(buf, &mut pos, field, wire_type, 0)?;
            }
        }
    }
    let (Some(sha), Some(ip)) = (sha, ip) else {
        // A required field is missing. When it came, but with another wire type, say so.
        let missing =
            (u8::from(sha.is_none()) << FIELD_APP_SHA256) | (u8::from(ip.is_none()) << FIELD_IP);
        return Err(if missing & other_wire_type != 0 {
            Reject::WireType
        } else {
            Reject::MissingField
        });
    };
    let app = AppSha::from_hex(sha).ok_or(Reject::ShaFormat)?;
    // int64 on the wire: a negative address arrives as a huge u64 and is out of range too.
    let ip = u32::try_from(ip).map_err(|_| Reject::IpRange)?;
    Ok(IpEvent { app, ip })
}

/// Number of bytes [`encode_varint`] writes for `value`.
pub const fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

// Encoders of protobuf fields. Each writes at `out[*pos..]` and advances `*pos`; each panics if
// `out` is too short, so callers size their buffers for what they write.

/// Writes `value` as a minimal varint.
pub fn encode_varint(out: &mut [u8], pos: &mut usize, mut value: u64) {
    while value >= 0x80 {
        out[*pos] = (value as u8) | 0x80;
        *pos += 1;
        value >>= 7;
    }
    out[*pos] = value as u8;
    *pos += 1;
}

/// Writes the tag of field `field` with wire type `wire_type`.
pub fn encode_tag(out: &mut [u8], pos: &mut usize, field: u32, wire_type: WireType) {
    encode_varint(out, pos, u64::from(tag(field, wire_type)));
}

/// Writes field `field` as a varint (`int64`, `uint64`, `bool`...; a negative `int64` is its
/// two's complement as a `u64`).
pub fn encode_varint_field(out: &mut [u8], pos: &mut usize, field: u32, value: u64) {
    encode_tag(out, pos, field, WireType::Varint);
    encode_varint(out, pos, value);
}

/// Writes field `field` as length-delimited bytes (`string`, `bytes`).
pub fn encode_len_field(out: &mut [u8], pos: &mut usize, field: u32, bytes: &[u8]) {
    encode_tag(out, pos, field, WireType::Len);
    encode_varint(out, pos, bytes.len() as u64);
    out[*pos..*pos + bytes.len()].copy_from_slice(bytes);
    *pos += bytes.len();
}

/// Writes field `field` as eight little-endian bytes (`fixed64`, `double`...).
pub fn encode_fixed64_field(out: &mut [u8], pos: &mut usize, field: u32, value: u64) {
    encode_tag(out, pos, field, WireType::Fixed64);
    out[*pos..*pos + 8].copy_from_slice(&value.to_le_bytes());
    *pos += 8;
}

/// Writes field `field` as four little-endian bytes (`fixed32`, `float`...).
pub fn encode_fixed32_field(out: &mut [u8], pos: &mut usize, field: u32, value: u32) {
    encode_tag(out, pos, field, WireType::Fixed32);
    out[*pos..*pos + 4].copy_from_slice(&value.to_le_bytes());
    *pos += 4;
}

/// Writes the `app_sha256` field of `app`: its 64 lower-case hex digits.
pub fn encode_sha_field(out: &mut [u8], pos: &mut usize, app: &AppSha) {
    let mut hex = [0u8; SHA_HEX_LEN];
    app.write_hex(&mut hex);
    encode_len_field(out, pos, FIELD_APP_SHA256, &hex);
}

/// Encodes `event` as protoc would (field 1, then field 2, minimal varints) into `out` and
/// returns the length used.
pub fn encode(event: &IpEvent, out: &mut [u8; ENCODED_MAX_BYTES]) -> usize {
    let mut pos = 0;
    encode_sha_field(out, &mut pos, &event.app);
    encode_varint_field(out, &mut pos, FIELD_IP, u64::from(event.ip));
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
    fn a_tenth_varint_byte_counts_for_its_lowest_bit_only() {
        let mut bytes = encode_to_vec(&IpEvent { app: sha(1), ip: 0 });
        bytes.pop();
        bytes.extend_from_slice(&[0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x7e]);
        assert_eq!(decode(&bytes), Ok(IpEvent { app: sha(1), ip: 5 }));
        bytes.push(0x01);
        assert_eq!(decode(&bytes), Err(Reject::Malformed), "eleven bytes");
    }

    #[test]
    fn field_encoders_write_protobuf_fields() {
        let mut out = [0u8; 64];
        let mut pos = 0;
        encode_varint_field(&mut out, &mut pos, FIELD_IP, 300);
        encode_len_field(&mut out, &mut pos, 15, b"xy");
        encode_fixed64_field(&mut out, &mut pos, 3, 0x0102_0304_0506_0708);
        encode_fixed32_field(&mut out, &mut pos, 4, 0x0a0b_0c0d);
        encode_tag(&mut out, &mut pos, 5, WireType::StartGroup);
        encode_tag(&mut out, &mut pos, 5, WireType::EndGroup);
        encode_tag(&mut out, &mut pos, FIELD_NUMBER_MAX, WireType::Varint);
        let want: &[u8] = &[
            0x10, 0xac, 0x02, // field 2, varint 300
            0x7a, 0x02, b'x', b'y', // field 15, two bytes
            0x19, 8, 7, 6, 5, 4, 3, 2, 1, // field 3, fixed64
            0x25, 0x0d, 0x0c, 0x0b, 0x0a, // field 4, fixed32
            0x2b, 0x2c, // group 5
            0xf8, 0xff, 0xff, 0xff, 0x0f, // the largest field number, five bytes
        ];
        assert_eq!(&out[..pos], want);
    }

    #[test]
    fn varint_len_matches_encode_varint() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = [0u8; VARINT_MAX_BYTES];
            let mut pos = 0;
            encode_varint(&mut out, &mut pos, value);
            assert_eq!(pos, varint_len(value), "{value}");
        }
    }
}
