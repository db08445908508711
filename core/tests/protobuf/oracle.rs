//! The reference verdict for a datagram, from a maintained protobuf implementation (`prost`)
//! and our own limits. Shared by the differential tests (`core/tests/protobuf.rs`) and the
//! fuzz target (`fuzz/fuzz_targets/differential.rs`).
//!
//! A datagram is valid when Google's protobuf runtime parses it as the proto2 `IpEvent` with
//! both required fields present, and our limits hold: at most `MAX_DATAGRAM_BYTES`, a SHA of
//! 64 hex digits, an address in 0..=4294967295. prost does the parsing; where prost departs
//! from Google's runtime, the rule Google follows is written out below, each checked against
//! verdicts recorded from Google's runtime (`google_verdicts.txt`):
//!
//! 1. `required`: prost does not check presence, so the fields are `optional` here and presence
//!    is checked after parsing, as Google's `IsInitialized` does.
//! 2. A proto2 `string` is not checked for UTF-8 by Google's runtimes (upb refuses bad UTF-8
//!    only in proto3 fields; C++ only logs it in debug builds). prost's `string` refuses it, so
//!    `app_sha256` is declared `bytes`, which has the same wire form. Only the last value counts
//!    either way, and a SHA that is not UTF-8 is no hex.
//! 3. A field of ours sent with another wire type: Google skips it as an unknown field; prost's
//!    derived code refuses it. Such fields go to [`skip`].
//! 4. Tags and lengths: Google refuses a tag or a length prefix longer than five bytes; prost
//!    reads up to ten.
//! 5. Varints (values and lengths): Google keeps the low 64 bits of a ten-byte varint whatever
//!    its last byte holds; prost refuses a last byte above 1.
//! 6. Groups: Google skips an unknown group with everything in it, nested up to 100 deep (prost
//!    counts each field inside towards its limit of 100 too, so it refuses 100 nested groups
//!    that hold a field); rules 4 and 5 hold inside too, so [`skip`] walks groups itself and
//!    leaves fixed-size values and ends of groups to prost's `skip_field`.

use ipevent_core::wire::{IpEvent, Reject, MAX_DATAGRAM_BYTES};
use prost::encoding::WireType;
use prost::encoding::{decode_key, decode_varint, encode_varint, skip_field, DecodeContext};
use prost::Message;

/// The proto2 message, as prost declares it (see rules 1 and 2 for the two departures).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IpEventProto {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub app_sha256: Option<Vec<u8>>,
    #[prost(int64, optional, tag = "2")]
    pub ip: Option<i64>,
}

/// Google's runtimes accept groups nested this deep, counting the outermost.
const GROUP_DEPTH_MAX: usize = 100;

/// What a datagram is: valid, with the event (SHA in lower case), or refused, and why. The
/// causes of refusal are as fine as prost and our limits can tell them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid {
        app: String,
        ip: u32,
    },
    Empty,
    Oversize,
    /// The bytes are not a protobuf message.
    NotProtobuf,
    /// A protobuf message without both required fields.
    MissingField,
    ShaFormat,
    IpRange,
}

/// The verdict for `bytes`: our size limits, prost's parse with Google's rules, then our limits
/// on the SHA and the address.
pub fn verdict(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() {
        return Verdict::Empty;
    }
    if bytes.len() > MAX_DATAGRAM_BYTES {
        return Verdict::Oversize;
    }
    let Ok(message) = parse(bytes) else {
        return Verdict::NotProtobuf;
    };
    let (Some(sha), Some(ip)) = (message.app_sha256, message.ip) else {
        return Verdict::MissingField;
    };
    if sha.len() != 64 || !sha.iter().all(u8::is_ascii_hexdigit) {
        return Verdict::ShaFormat;
    }
    let Ok(ip) = u32::try_from(ip) else {
        return Verdict::IpRange;
    };
    Verdict::Valid {
        app: String::from_utf8_lossy(&sha).to_ascii_lowercase(),
        ip,
    }
}

/// Whether the decoder's result is `verdict`: the same event, or a reason of the same cause.
pub fn agrees(ours: &Result<IpEvent, Reject>, verdict: &Verdict) -> bool {
    match (ours, verdict) {
        (Ok(event), Verdict::Valid { app, ip }) => event.app.to_hex() == *app && event.ip == *ip,
        (Err(reject), _) => matches!(
            (reject, verdict),
            (Reject::Empty, Verdict::Empty)
                | (Reject::Oversize, Verdict::Oversize)
                | (Reject::Truncated | Reject::Malformed, Verdict::NotProtobuf)
                | (
                    Reject::MissingField | Reject::WireType,
                    Verdict::MissingField
                )
                | (Reject::ShaFormat, Verdict::ShaFormat)
                | (Reject::IpRange, Verdict::IpRange)
        ),
        (Ok(_), _) => false,
    }
}

/// prost's parse of `bytes` as `IpEventProto`, with Google's rules 3 to 6.
pub fn parse(mut bytes: &[u8]) -> Result<IpEventProto, String> {
    let buf = &mut bytes;
    let mut message = IpEventProto::default();
    while !buf.is_empty() {
        let (field, wire_type) = key(buf)?;
        match (field, wire_type) {
            // Rules 4 and 5 read the varint (the SHA's length, the address); prost's field
            // takes it from there.
            (1, WireType::LengthDelimited) | (2, WireType::Varint) => {
                let delimited = wire_type == WireType::LengthDelimited;
                let value = if delimited {
                    length(buf)?
                } else {
                    varint(buf)?
                };
                let mut canonical = Vec::new();
                encode_varint(value, &mut canonical);
                if delimited {
                    canonical.extend_from_slice(buf);
                }
                let mut rest = canonical.as_slice();
                message
                    .merge_field(field, wire_type, &mut rest, DecodeContext::default())
                    .map_err(|e| e.to_string())?;
                if delimited {
                    *buf = &buf[buf.len() - rest.len()..];
                }
            }
            // Rule 3.
            _ => skip(field, wire_type, buf, 0)?,
        }
    }
    Ok(message)
}

/// The raw prost parse, without Google's rules: what `prost` alone says.
#[allow(dead_code)] // The tests compare it; the fuzz target does not.
pub fn parse_prost_only(bytes: &[u8]) -> Result<IpEventProto, String> {
    IpEventProto::decode(bytes).map_err(|e| e.to_string())
}

/// Rule 4: whether the varint at the start of `buf` is longer than five bytes.
fn over_five_bytes(buf: &[u8]) -> bool {
    buf.len() >= 5 && buf[..5].iter().all(|b| b & 0x80 != 0)
}

/// Rule 4: a key of at most five bytes, then prost's `decode_key`.
fn key(buf: &mut &[u8]) -> Result<(u32, WireType), String> {
    if over_five_bytes(buf) {
        return Err("tag longer than five bytes".into());
    }
    decode_key(buf).map_err(|e| e.to_string())
}

/// Rule 4: a length prefix of at most five bytes, then prost's `decode_varint`.
fn length(buf: &mut &[u8]) -> Result<u64, String> {
    if over_five_bytes(buf) {
        return Err("length prefix longer than five bytes".into());
    }
    decode_varint(buf).map_err(|e| e.to_string())
}

/// Rule 5: a ten-byte varint counts for its low 64 bits; anything else goes to prost.
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    if buf.len() >= 10 && buf[..9].iter().all(|b| b & 0x80 != 0) && buf[9] < 0x80 {
        let mut ten = [0u8; 10];
        ten.copy_from_slice(&buf[..10]);
        ten[9] &= 1;
        *buf = &buf[10..];
        return decode_varint(&mut &ten[..]).map_err(|e| e.to_string());
    }
    decode_varint(buf).map_err(|e| e.to_string())
}

/// Skips an unknown field whose key was just read; `depth` counts the groups open around it.
fn skip(field: u32, wire_type: WireType, buf: &mut &[u8], depth: usize) -> Result<(), String> {
    match wire_type {
        WireType::Varint => varint(buf).map(drop),
        WireType::LengthDelimited => {
            let len = length(buf)?;
            if len > buf.len() as u64 {
                return Err("length past the end".into());
            }
            *buf = &buf[len as usize..];
            Ok(())
        }
        WireType::StartGroup => {
            if depth == GROUP_DEPTH_MAX {
                return Err("groups nested too deep".into());
            }
            loop {
                let (inner, inner_type) = key(buf)?;
                if inner_type == WireType::EndGroup {
                    return if inner == field {
                        Ok(())
                    } else {
                        Err("end of another group".into())
                    };
                }
                skip(inner, inner_type, buf, depth + 1)?;
            }
        }
        // Fixed sizes; an end of group with no group open is refused by prost.
        _ => skip_field(wire_type, field, buf, DecodeContext::default()).map_err(|e| e.to_string()),
    }
}
