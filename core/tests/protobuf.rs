//! The decoder against protobuf itself: every datagram gets the verdict of a maintained protobuf
//! implementation (`prost`, with Google's rules where prost departs from them, see
//! `protobuf/oracle.rs`) plus our limits, over the shared vectors, each class of input where
//! implementations are known to differ, and random mutations of valid datagrams. Verdicts
//! recorded from Google's runtime (`protobuf/google_verdicts.txt`) check the decoder and the
//! reference alike.

#[path = "protobuf/oracle.rs"]
mod oracle;

use std::fmt::Write as _;

use ipevent_core::wire::{self, AppSha, IpEvent, WireType, FIELD_APP_SHA256, FIELD_IP};
use ipevent_core::{hex, testdata};
use oracle::Verdict;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Random mutations compared per run.
const MUTATIONS: u32 = 600;
/// Seed of the mutations: the same inputs on every run.
const SEED: [u8; 32] = *b"ipevent wire against protobuf 01";

const SHA: &str = "a3f1c0de00000000000000000000000000000000000000000000000000000001";

fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Builds a datagram from protobuf fields with the library's field encoders.
#[derive(Default)]
struct Datagram(Vec<u8>);

impl Datagram {
    fn put(mut self, write: impl FnOnce(&mut [u8], &mut usize)) -> Self {
        let mut out = [0u8; 2048];
        let mut pos = 0;
        write(&mut out, &mut pos);
        self.0.extend_from_slice(&out[..pos]);
        self
    }
    fn sha(self, digits: &[u8]) -> Self {
        self.put(|out, pos| wire::encode_len_field(out, pos, FIELD_APP_SHA256, digits))
    }
    fn ip(self, value: u64) -> Self {
        self.put(|out, pos| wire::encode_varint_field(out, pos, FIELD_IP, value))
    }
    fn varint(self, field: u32, value: u64) -> Self {
        self.put(|out, pos| wire::encode_varint_field(out, pos, field, value))
    }
    fn len(self, field: u32, bytes: &[u8]) -> Self {
        self.put(|out, pos| wire::encode_len_field(out, pos, field, bytes))
    }
    fn fixed64(self, field: u32, value: u64) -> Self {
        self.put(|out, pos| wire::encode_fixed64_field(out, pos, field, value))
    }
    fn fixed32(self, field: u32, value: u32) -> Self {
        self.put(|out, pos| wire::encode_fixed32_field(out, pos, field, value))
    }
    fn tag(self, field: u32, wire_type: WireType) -> Self {
        self.put(|out, pos| wire::encode_tag(out, pos, field, wire_type))
    }
    fn start(self, field: u32) -> Self {
        self.tag(field, WireType::StartGroup)
    }
    fn end(self, field: u32) -> Self {
        self.tag(field, WireType::EndGroup)
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// The valid event: SHA, then address 5.
    fn event() -> Self {
        Datagram::default().sha(SHA.as_bytes()).ip(5)
    }
}

fn valid(ip: u32) -> Verdict {
    Verdict::Valid {
        app: SHA.into(),
        ip,
    }
}

/// A ten-byte varint of `low` (below 2^7) whose last byte is `last`.
fn ten_byte_varint(low: u8, last: u8) -> Vec<u8> {
    let mut bytes = vec![0x80 | low];
    bytes.extend_from_slice(&[0x80; 8]);
    bytes.push(last);
    bytes
}

/// Each class of input on which protobuf implementations are known to differ, with the verdict
/// of Google's runtime for it (each recorded in `google_verdicts.txt` too).
fn classes() -> Vec<(String, Vec<u8>, Verdict)> {
    use Verdict::*;
    let d = Datagram::event;
    let mut cases: Vec<(String, Datagram, Verdict)> = vec![
        // Unknown groups are skipped whole.
        ("empty unknown group".into(), d().start(3).end(3), valid(5)),
        (
            "unknown group holding every wire type".into(),
            d().start(3)
                .varint(4, 1)
                .len(5, b"xy")
                .fixed32(6, 7)
                .fixed64(7, 8)
                .end(3),
            valid(5),
        ),
        (
            "nested unknown groups".into(),
            d().start(3).start(4).start(5).end(5).end(4).end(3),
            valid(5),
        ),
        (
            "group before the fields".into(),
            Datagram::default()
                .start(9)
                .varint(1, 3)
                .end(9)
                .sha(SHA.as_bytes())
                .ip(5),
            valid(5),
        ),
        (
            "group numbered like app_sha256".into(),
            d().start(1).end(1),
            valid(5),
        ),
        (
            "group numbered like ip".into(),
            d().start(2).end(2),
            valid(5),
        ),
        (
            "an address inside a group does not count".into(),
            Datagram::default()
                .sha(SHA.as_bytes())
                .start(3)
                .ip(5)
                .end(3),
            MissingField,
        ),
        (
            "a SHA inside a group does not count".into(),
            Datagram::default()
                .start(3)
                .sha(SHA.as_bytes())
                .end(3)
                .ip(5),
            MissingField,
        ),
        (
            "end of another group".into(),
            d().start(3).end(4),
            NotProtobuf,
        ),
        (
            "nested groups closed in the wrong order".into(),
            d().start(3).start(4).end(3).end(4),
            NotProtobuf,
        ),
        (
            "end of group with none open".into(),
            d().end(3),
            NotProtobuf,
        ),
        (
            "end of group numbered like app_sha256".into(),
            d().end(1),
            NotProtobuf,
        ),
        (
            "end of group numbered like ip".into(),
            d().end(2),
            NotProtobuf,
        ),
        ("group never closed".into(), d().start(3), NotProtobuf),
        (
            "group never closed, holding fields".into(),
            d().start(3).varint(4, 1),
            NotProtobuf,
        ),
        (
            "group with a field cut short".into(),
            d().start(3).raw(&[0x22, 0x05, b'x']),
            NotProtobuf,
        ),
        // A field of ours with another wire type is an unknown field.
        (
            "ip as fixed64 too".into(),
            d().fixed64(FIELD_IP, 9),
            valid(5),
        ),
        (
            "ip as fixed32 too".into(),
            d().fixed32(FIELD_IP, 9),
            valid(5),
        ),
        ("ip as bytes too".into(), d().len(FIELD_IP, b"9"), valid(5)),
        (
            "app_sha256 as a varint too".into(),
            d().varint(FIELD_APP_SHA256, 9),
            valid(5),
        ),
        (
            "app_sha256 as fixed32 too".into(),
            d().fixed32(FIELD_APP_SHA256, 9),
            valid(5),
        ),
        (
            "ip only as fixed64".into(),
            Datagram::default().sha(SHA.as_bytes()).fixed64(FIELD_IP, 5),
            MissingField,
        ),
        (
            "ip only as fixed32".into(),
            Datagram::default().sha(SHA.as_bytes()).fixed32(FIELD_IP, 5),
            MissingField,
        ),
        (
            "app_sha256 only as a varint".into(),
            Datagram::default().varint(FIELD_APP_SHA256, 5).ip(5),
            MissingField,
        ),
        (
            "ip as fixed64 cut short".into(),
            d().raw(&[0x11, 1, 2, 3]),
            NotProtobuf,
        ),
        // Varints.
        (
            "ten-byte address, last byte 0".into(),
            Datagram::event().raw(&[0x10]).raw(&ten_byte_varint(5, 0)),
            valid(5),
        ),
        (
            "ten-byte address, last byte 2".into(),
            Datagram::event().raw(&[0x10]).raw(&ten_byte_varint(6, 2)),
            valid(6),
        ),
        (
            "ten-byte address, last byte 0x7e".into(),
            Datagram::event()
                .raw(&[0x10])
                .raw(&ten_byte_varint(7, 0x7e)),
            valid(7),
        ),
        (
            "ten-byte address, last byte 0x7f (negative)".into(),
            Datagram::event()
                .raw(&[0x10])
                .raw(&ten_byte_varint(7, 0x7f)),
            IpRange,
        ),
        (
            "ten-byte address, last byte 1 (negative)".into(),
            Datagram::event().raw(&[0x10]).raw(&ten_byte_varint(7, 1)),
            IpRange,
        ),
        (
            "ten-byte unknown varint, last byte 0x40".into(),
            d().raw(&[0x18]).raw(&ten_byte_varint(1, 0x40)),
            valid(5),
        ),
        (
            "ten-byte varint in a group, last byte 0x7f".into(),
            d().start(3)
                .raw(&[0x20])
                .raw(&ten_byte_varint(1, 0x7f))
                .end(3),
            valid(5),
        ),
        (
            "eleven-byte varint".into(),
            d().raw(&[0x10]).raw(&ten_byte_varint(5, 0x80)).raw(&[0]),
            NotProtobuf,
        ),
        (
            "five-byte length of app_sha256".into(),
            Datagram::default()
                .raw(&[0x0a, 0xc0, 0x80, 0x80, 0x80, 0x00])
                .raw(SHA.as_bytes())
                .ip(5),
            valid(5),
        ),
        (
            "six-byte length of app_sha256".into(),
            Datagram::default()
                .raw(&[0x0a, 0xc0, 0x80, 0x80, 0x80, 0x80, 0x00])
                .raw(SHA.as_bytes())
                .ip(5),
            NotProtobuf,
        ),
        (
            "ten-byte length of app_sha256".into(),
            Datagram::default()
                .raw(&[0x0a])
                .raw(&ten_byte_varint(64, 0))
                .raw(SHA.as_bytes())
                .ip(5),
            NotProtobuf,
        ),
        (
            "five-byte length of an unknown field".into(),
            d().raw(&[0x1a, 0x81, 0x80, 0x80, 0x80, 0x00, b'x']),
            valid(5),
        ),
        (
            "six-byte length of an unknown field".into(),
            d().raw(&[0x1a, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00, b'x']),
            NotProtobuf,
        ),
        (
            "ten-byte length, last byte 2".into(),
            d().raw(&[0x1a]).raw(&ten_byte_varint(0, 2)),
            NotProtobuf,
        ),
        (
            "address -1".into(),
            Datagram::default().sha(SHA.as_bytes()).ip(u64::MAX),
            IpRange,
        ),
        (
            "address 2^32".into(),
            Datagram::default().sha(SHA.as_bytes()).ip(1 << 32),
            IpRange,
        ),
        (
            "address 2^32 - 1".into(),
            Datagram::default().sha(SHA.as_bytes()).ip(u32::MAX.into()),
            valid(u32::MAX),
        ),
        ("address then -1".into(), d().ip(u64::MAX), IpRange),
        (
            "-1 then address".into(),
            Datagram::default().sha(SHA.as_bytes()).ip(u64::MAX).ip(5),
            valid(5),
        ),
        // Tags.
        (
            "five-byte tag".into(),
            d().raw(&[0x98, 0x80, 0x80, 0x80, 0x00, 0x01]),
            valid(5),
        ),
        (
            "five-byte address tag".into(),
            Datagram::default()
                .sha(SHA.as_bytes())
                .raw(&[0x90, 0x80, 0x80, 0x80, 0x00, 0x05]),
            valid(5),
        ),
        (
            "six-byte tag".into(),
            d().raw(&[0x98, 0x80, 0x80, 0x80, 0x80, 0x00, 0x01]),
            NotProtobuf,
        ),
        (
            "ten-byte tag".into(),
            d().raw(&[
                0x98, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 0x01,
            ]),
            NotProtobuf,
        ),
        (
            "tag of field 2^29 - 1".into(),
            d().raw(&[0xf8, 0xff, 0xff, 0xff, 0x0f, 0x01]),
            valid(5),
        ),
        (
            "tag above 32 bits".into(),
            d().raw(&[0xf8, 0xff, 0xff, 0xff, 0x1f, 0x01]),
            NotProtobuf,
        ),
        (
            "tag of 2^32 (field 2^29)".into(),
            d().raw(&[0x80, 0x80, 0x80, 0x80, 0x10, 0x01]),
            NotProtobuf,
        ),
        (
            "field number 0, varint".into(),
            d().raw(&[0x00, 0x01]),
            NotProtobuf,
        ),
        (
            "field number 0, bytes".into(),
            d().raw(&[0x02, 0x00]),
            NotProtobuf,
        ),
        (
            "field number 0 in a group".into(),
            d().start(3).raw(&[0x00, 0x01]).end(3),
            NotProtobuf,
        ),
        ("wire type 6".into(), d().raw(&[0x1e, 0x00]), NotProtobuf),
        ("wire type 7".into(), d().raw(&[0x1f, 0x00]), NotProtobuf),
        (
            "wire type 6 for app_sha256".into(),
            d().raw(&[0x0e]),
            NotProtobuf,
        ),
        (
            "wire type 7 in a group".into(),
            d().start(3).raw(&[0x27]).end(3),
            NotProtobuf,
        ),
        ("a tag cut short".into(), d().raw(&[0x98]), NotProtobuf),
        // Lengths.
        (
            "length past the end".into(),
            d().raw(&[0x1a, 0x05, b'x']),
            NotProtobuf,
        ),
        (
            "length of 2^32".into(),
            d().raw(&[0x1a, 0x80, 0x80, 0x80, 0x80, 0x10]),
            NotProtobuf,
        ),
        (
            "length of 2^63".into(),
            d().raw(&[0x1a]).raw(&ten_byte_varint(0, 1)),
            NotProtobuf,
        ),
        (
            "SHA length past the end".into(),
            Datagram::default()
                .ip(5)
                .raw(&[0x0a, 0x41])
                .raw(SHA.as_bytes()),
            NotProtobuf,
        ),
        // Required fields, last one wins.
        (
            "only app_sha256".into(),
            Datagram::default().sha(SHA.as_bytes()),
            MissingField,
        ),
        ("only ip".into(), Datagram::default().ip(5), MissingField),
        (
            "only unknown fields".into(),
            Datagram::default().varint(3, 1).len(4, b""),
            MissingField,
        ),
        (
            "bad SHA, then a good one".into(),
            Datagram::default().sha(b"nope").sha(SHA.as_bytes()).ip(5),
            valid(5),
        ),
        (
            "good SHA, then a bad one".into(),
            d().sha(b"nope"),
            ShaFormat,
        ),
        (
            "SHA not UTF-8, then a good one".into(),
            Datagram::default()
                .sha(&[0xff, 0xfe])
                .sha(SHA.as_bytes())
                .ip(5),
            valid(5),
        ),
        (
            "good SHA, then one not UTF-8".into(),
            d().sha(&[0xc3, 0x28]),
            ShaFormat,
        ),
        (
            "SHA of 64 bytes not UTF-8".into(),
            Datagram::default().sha(&[0xff; 64]).ip(5),
            ShaFormat,
        ),
        (
            "upper-case SHA".into(),
            Datagram::default()
                .sha(SHA.to_ascii_uppercase().as_bytes())
                .ip(5),
            valid(5),
        ),
        ("two addresses".into(), d().ip(7), valid(7)),
    ];
    // Groups nested as deep as Google's runtime allows, and one deeper.
    for (depth, verdict) in [(99, valid(5)), (100, valid(5)), (101, NotProtobuf)] {
        let mut nested = d();
        for _ in 0..depth {
            nested = nested.start(3);
        }
        nested = nested.varint(4, 1);
        for _ in 0..depth {
            nested = nested.end(3);
        }
        cases.push((format!("groups nested {depth} deep"), nested, verdict));
    }
    // A valid message of 1025 bytes is over our limit.
    let padded = d().len(9, &[b'x'; wire::MAX_DATAGRAM_BYTES + 1 - 68 - 3]);
    assert_eq!(padded.0.len(), wire::MAX_DATAGRAM_BYTES + 1);
    cases.push(("valid but over our size limit".into(), padded, Oversize));
    cases.push(("empty".into(), Datagram::default(), Empty));
    cases
        .into_iter()
        .map(|(name, d, v)| (name, d.0, v))
        .collect()
}

fn assert_agrees(name: &str, bytes: &[u8]) -> Verdict {
    let reference = oracle::verdict(bytes);
    let ours = wire::decode(bytes);
    assert!(
        oracle::agrees(&ours, &reference),
        "{name}: decoder says {ours:?}, protobuf says {reference:?} for {}",
        hex(bytes)
    );
    reference
}

#[test]
fn every_class_gets_googles_verdict() {
    for (name, bytes, google) in classes() {
        let reference = assert_agrees(&name, &bytes);
        assert_eq!(
            reference,
            google,
            "{name}: the reference for {}",
            hex(&bytes)
        );
    }
}

#[test]
fn every_shared_vector_agrees_with_protobuf() {
    for v in testdata::wire_vectors().unwrap() {
        let reference = assert_agrees(&v.name, &v.bytes);
        let valid = matches!(reference, Verdict::Valid { .. });
        assert_eq!(valid, v.verdict.is_ok(), "{}", v.name);
    }
}

/// Pieces of protobuf that reach the places where implementations differ.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Group starts and ends, of ours and of unknown fields.
        (1..=4u32, any::<bool>()).prop_map(|(field, start)| {
            let wire_type = if start {
                WireType::StartGroup
            } else {
                WireType::EndGroup
            };
            Datagram::default().tag(field, wire_type).0
        }),
        (3..=5u32).prop_map(|field| Datagram::default().start(field).varint(6, 1).end(field).0),
        // Our fields with other wire types, and unknown fields.
        (1..=4u32, any::<u64>()).prop_map(|(f, v)| Datagram::default().varint(f, v).0),
        (1..=4u32, any::<u64>()).prop_map(|(f, v)| Datagram::default().fixed64(f, v).0),
        (1..=4u32, any::<u32>()).prop_map(|(f, v)| Datagram::default().fixed32(f, v).0),
        (1..=4u32, vec(any::<u8>(), 0..8)).prop_map(|(f, v)| Datagram::default().len(f, &v).0),
        // Long varints and runs of continuation bytes.
        (any::<u8>(), any::<u8>()).prop_map(|(low, last)| ten_byte_varint(low & 0x7f, last)),
        (1..12usize).prop_map(|n| vec![0x80; n]),
        // The bytes of a tag of wire type 6 or 7, or field 0.
        prop::sample::select(vec![vec![0x0e], vec![0x17], vec![0x00], vec![0x02, 0x00]]),
    ]
}

/// One edit of a datagram.
#[derive(Clone, Debug)]
enum Edit {
    Set(Index, u8),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index),
    Truncate(Index),
    Append(Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<Index>(), 0..8u8).prop_map(|(i, bit)| Edit::Flip(i, bit)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..4)).prop_map(|(i, b)| Edit::Insert(i, b)),
        3 => (any::<Index>(), piece()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<Index>().prop_map(Edit::Remove),
        1 => any::<Index>().prop_map(Edit::Truncate),
        6 => piece().prop_map(Edit::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::Set(at, byte) if !bytes.is_empty() => {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        Edit::Flip(at, bit) if !bytes.is_empty() => {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Edit::Insert(at, piece) => {
            let i = at.index(bytes.len() + 1);
            bytes.splice(i..i, piece.iter().copied());
        }
        Edit::Remove(at) if !bytes.is_empty() => {
            bytes.remove(at.index(bytes.len()));
        }
        Edit::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
        Edit::Append(tail) => bytes.extend_from_slice(tail),
        Edit::Set(..) | Edit::Flip(..) | Edit::Remove(..) => {}
    }
}

/// A valid datagram (in either field order) damaged by one to three edits.
fn mutation() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<bool>(),
        vec(edit(), 1..=3),
    )
        .prop_map(|(sha, ip, reversed, edits)| {
            let event = IpEvent {
                app: AppSha(sha),
                ip,
            };
            let mut bytes = if reversed {
                Datagram::default()
                    .ip(ip.into())
                    .sha(event.app.to_hex().as_bytes())
                    .0
            } else {
                wire::encode_to_vec(&event)
            };
            for edit in &edits {
                apply(&mut bytes, edit);
            }
            bytes
        })
}

/// The seeded mutations, the same on every run.
fn mutations() -> Vec<Vec<u8>> {
    let config = Config::default();
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let strategy = mutation();
    (0..MUTATIONS)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

#[test]
fn random_mutations_agree_with_protobuf() {
    let mut verdicts = std::collections::BTreeMap::<String, u32>::new();
    for bytes in mutations() {
        let reference = assert_agrees("mutation", &bytes);
        let kind = format!("{reference:?}");
        let kind = kind.split([' ', '{']).next().unwrap().to_owned();
        *verdicts.entry(kind).or_default() += 1;
    }
    // The mutations reach every verdict the parser can give, not only one.
    for kind in ["Valid", "NotProtobuf", "MissingField", "ShaFormat"] {
        assert!(verdicts.get(kind).is_some_and(|&n| n >= 5), "{verdicts:?}");
    }
}

/// One recorded verdict of Google's runtime: `ok <SHA bytes in hex> <ip>`, `missing` or
/// `error`.
fn google_agrees(reference: &Verdict, google: &str) -> bool {
    let mut words = google.split(' ');
    match (words.next(), reference) {
        (Some("error"), Verdict::NotProtobuf) => true,
        (Some("missing"), Verdict::MissingField) => true,
        (Some("ok"), reference) => {
            let sha = unhex(words.next().unwrap_or(""));
            let ip: i64 = words.next().and_then(|w| w.parse().ok()).unwrap();
            match reference {
                Verdict::Valid { app, ip: ours } => {
                    sha.to_ascii_lowercase() == app.as_bytes() && ip == i64::from(*ours)
                }
                Verdict::ShaFormat => sha.len() != 64 || !sha.iter().all(u8::is_ascii_hexdigit),
                Verdict::IpRange => u32::try_from(ip).is_err(),
                _ => false,
            }
        }
        _ => false,
    }
}

#[test]
fn google_runtime_verdicts_agree() {
    let path = format!(
        "{}/tests/protobuf/google_verdicts.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // Where Google's runtimes disagree among themselves, we follow the specification, C++ and
    // prost: upb (the recorded runtime) skips a field numbered 0 inside an unknown group, which
    // C++ and prost refuse (field numbers start at 1).
    let upb_departures: Vec<String> = classes()
        .into_iter()
        .filter(|(name, _, _)| name == "field number 0 in a group")
        .map(|(_, bytes, _)| hex(&bytes))
        .collect();
    assert_eq!(upb_departures.len(), 1);
    let mut checked = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (input, google) = line.split_once(' ').unwrap();
        let bytes = unhex(input);
        // Sizes are our limits alone: Google's runtime has no say on them.
        let reference = assert_agrees("recorded", &bytes);
        if matches!(reference, Verdict::Empty | Verdict::Oversize) {
            continue;
        }
        if upb_departures.iter().any(|d| d == input) {
            assert!(google.starts_with("ok"), "{input}: upb now says {google}");
            continue;
        }
        assert!(
            google_agrees(&reference, google),
            "{input}: Google says {google}, we say {reference:?}"
        );
        checked += 1;
    }
    assert!(checked >= 500, "only {checked} recorded verdicts");
}

/// What `prost` alone says differs from Google's runtime only in the documented ways.
#[test]
fn prost_alone_departs_from_google_only_as_documented() {
    let departs = |bytes: &[u8]| {
        let alone = oracle::parse_prost_only(bytes)
            .ok()
            .map(|m| (m.app_sha256, m.ip));
        let google = oracle::parse(bytes).ok().map(|m| (m.app_sha256, m.ip));
        alone != google
    };
    let documented = [
        "ip as fixed64 too",
        "ip as fixed32 too",
        "ip as bytes too",
        "app_sha256 as a varint too",
        "app_sha256 as fixed32 too",
        "ten-byte address, last byte 2",
        "ten-byte address, last byte 0x7e",
        "ten-byte address, last byte 0x7f (negative)",
        "ten-byte unknown varint, last byte 0x40",
        "ten-byte varint in a group, last byte 0x7f",
        "six-byte length of app_sha256",
        "ten-byte length of app_sha256",
        "six-byte length of an unknown field",
        "groups nested 100 deep",
        "six-byte tag",
        "ten-byte tag",
        "group numbered like app_sha256",
        "group numbered like ip",
        "ip only as fixed64",
        "ip only as fixed32",
        "app_sha256 only as a varint",
    ];
    for (name, bytes, _) in classes() {
        assert_eq!(
            departs(&bytes),
            documented.contains(&name.as_str()),
            "{name}"
        );
    }
}

/// Writes every input of these tests, one hex line each, for `protobuf/google_verdicts.py`.
#[test]
#[ignore = "writes the inputs for recording Google's verdicts"]
fn write_inputs_for_google() {
    let path = std::env::var("IPEVENT_PROTOBUF_INPUTS").expect("IPEVENT_PROTOBUF_INPUTS=<file>");
    let mut out = String::new();
    for v in testdata::wire_vectors().unwrap() {
        writeln!(out, "{}", hex(&v.bytes)).unwrap();
    }
    for (_, bytes, _) in classes() {
        writeln!(out, "{}", hex(&bytes)).unwrap();
    }
    for bytes in mutations() {
        writeln!(out, "{}", hex(&bytes)).unwrap();
    }
    std::fs::write(path, out).unwrap();
}
