//! Property tests against hostile input: arbitrary datagrams into the decoder, generated
//! protobuf messages against a reference verdict, arbitrary and damaged logs into the block
//! reader, and random address sets into the classifier.
//!
//! The reference verdict for generated messages is worked out from the list of fields the
//! generator chose (which field, which wire type, which value, where the bytes were cut), never
//! by parsing bytes, so it checks the decoder instead of repeating it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;

use ipevent_core::block::{self, BlockBuilder, BlockParse, ScanSummary, Tail};
use ipevent_core::report::{classify, is_host};
use ipevent_core::store::{self, AddrStats};
use ipevent_core::wire::{self, AppSha, IpEvent, Reject};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

/// A varint is at most this many bytes on the wire.
const VARINT_MAX_BYTES: usize = 10;
/// Longest arbitrary datagram tried: twice the decoder's limit, so both sides of it are hit.
const ARBITRARY_DATAGRAM_MAX_BYTES: usize = 2 * wire::MAX_DATAGRAM_BYTES;
/// Longest arbitrary log tried: several blocks' worth of bytes.
const ARBITRARY_LOG_MAX_BYTES: usize = 4096;

/// Addresses with their stats: what a scan delivers, in order, or what `classify` is given.
type Addrs = Vec<(u32, AddrStats)>;

// ---------------------------------------------------------------------------------------------
// Datagrams

fn event_strategy() -> impl Strategy<Value = IpEvent> {
    (any::<[u8; 32]>(), any::<u32>()).prop_map(|(sha, ip)| IpEvent {
        app: AppSha(sha),
        ip,
    })
}

/// One edit of a datagram.
#[derive(Clone, Debug)]
enum Edit {
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    Append(Vec<u8>),
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::Set(at, byte) if !bytes.is_empty() => {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        Edit::Insert(at, byte) => {
            let i = at.index(bytes.len() + 1);
            bytes.insert(i, *byte);
        }
        Edit::Remove(at) if !bytes.is_empty() => {
            let i = at.index(bytes.len());
            bytes.remove(i);
        }
        Edit::Truncate(at) => {
            let keep = at.index(bytes.len() + 1);
            bytes.truncate(keep);
        }
        Edit::Append(tail) => bytes.extend_from_slice(tail),
        Edit::Set(..) | Edit::Remove(..) => {}
    }
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => any::<Index>().prop_map(Edit::Remove),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(Edit::Append),
    ]
}

/// Arbitrary bytes, and valid datagrams damaged by a few edits (which reach deeper into the
/// decoder than noise does).
fn datagram_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        8 => vec(any::<u8>(), 0..ARBITRARY_DATAGRAM_MAX_BYTES),
        8 => (event_strategy(), vec(edit_strategy(), 0..4)).prop_map(|(event, edits)| {
            let mut bytes = wire::encode_to_vec(&event);
            for edit in &edits {
                apply(&mut bytes, edit);
            }
            bytes
        }),
        1 => (event_strategy(), vec(any::<u8>(), 0..128)).prop_map(|(event, pad)| {
            // A valid datagram pushed over the size limit by an unknown field.
            let mut bytes = wire::encode_to_vec(&event);
            bytes.push(0x1a); // field 3, length-delimited
            let len = wire::MAX_DATAGRAM_BYTES - bytes.len() + pad.len();
            bytes.extend_from_slice(&[0x80 | (len & 0x7f) as u8, (len >> 7) as u8]);
            bytes.resize(bytes.len() + len, 0x55);
            bytes
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// (a) Any bytes are decoded or rejected, never a panic; the size checks come first.
    #[test]
    fn any_bytes_decode_or_are_rejected(bytes in datagram_strategy()) {
        match wire::decode(&bytes) {
            Ok(event) => {
                prop_assert!(bytes.len() <= wire::MAX_DATAGRAM_BYTES);
                prop_assert_eq!(wire::decode(&wire::encode_to_vec(&event)), Ok(event));
            }
            Err(reject) if bytes.is_empty() => prop_assert_eq!(reject, Reject::Empty),
            Err(reject) if bytes.len() > wire::MAX_DATAGRAM_BYTES => {
                prop_assert_eq!(reject, Reject::Oversize)
            }
            Err(reject) => prop_assert!(
                !matches!(reject, Reject::Empty | Reject::Oversize),
                "{} bytes rejected as {}", bytes.len(), reject
            ),
        }
    }

    /// (b) What `encode` writes, `decode` reads back, for every SHA and address.
    #[test]
    fn encode_decode_round_trips(event in event_strategy()) {
        let mut out = [0u8; wire::ENCODED_MAX_BYTES];
        let len = wire::encode(&event, &mut out);
        prop_assert!(len <= wire::ENCODED_MAX_BYTES);
        prop_assert_eq!(wire::decode(&out[..len]), Ok(event));
        prop_assert_eq!(wire::encode_to_vec(&event), out[..len].to_vec());
        let hex = event.app.to_hex();
        prop_assert_eq!(hex.parse::<AppSha>(), Ok(event.app));
        prop_assert_eq!(AppSha::from_hex(hex.to_ascii_uppercase().as_bytes()), Some(event.app));
    }
}

// ---------------------------------------------------------------------------------------------
// Generated protobuf messages and their reference verdict

/// A field's wire type and value, as the generator chose them.
#[derive(Clone, Debug)]
enum Value {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
    /// A tag with wire type 4, 6 or 7 (an end of group with none open, or no wire type at
    /// all); nothing follows.
    BadWireType(u8),
}

impl Value {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
            Value::BadWireType(wire_type) => *wire_type,
        }
    }
}

/// One field of a generated message.
#[derive(Clone, Debug)]
struct Field {
    number: u32,
    value: Value,
    /// Redundant 0x80 groups added to the tag varint.
    tag_pad: usize,
    /// Redundant 0x80 groups added to the value varint or length prefix.
    value_pad: usize,
}

/// A generated message: its fields, and optionally where the last field's bytes are cut.
#[derive(Clone, Debug)]
struct Message {
    fields: Vec<Field>,
    cut_last: Option<Index>,
}

/// Writes `value` as a varint stretched by `extra` redundant groups, to at most
/// [`VARINT_MAX_BYTES`] bytes (protobuf readers accept such non-minimal varints).
fn put_varint(out: &mut Vec<u8>, value: u64, extra: usize) {
    let minimal = (1..VARINT_MAX_BYTES)
        .find(|&n| value >> (7 * n) == 0)
        .unwrap_or(VARINT_MAX_BYTES);
    let total = (minimal + extra).min(VARINT_MAX_BYTES);
    for i in 0..total {
        let group = ((value >> (7 * i)) & 0x7f) as u8;
        let more = if i + 1 < total { 0x80 } else { 0 };
        out.push(group | more);
    }
}

/// The length of `value` as [`put_varint`] writes it with `extra` redundant groups.
fn padded_varint_len(value: u64, extra: usize) -> usize {
    let mut out = Vec::new();
    put_varint(&mut out, value, extra);
    out.len()
}

/// The field's bytes and the length of its tag.
fn encode_field(field: &Field) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let tag = (u64::from(field.number) << 3) | u64::from(field.value.wire_type());
    put_varint(&mut out, tag, field.tag_pad);
    let tag_len = out.len();
    match &field.value {
        Value::Varint(v) => put_varint(&mut out, *v, field.value_pad),
        Value::Fixed64(bytes) => out.extend_from_slice(bytes),
        Value::Bytes(bytes) => {
            put_varint(&mut out, bytes.len() as u64, field.value_pad);
            out.extend_from_slice(bytes);
        }
        Value::Fixed32(bytes) => out.extend_from_slice(bytes),
        Value::BadWireType(_) => {}
    }
    (out, tag_len)
}

/// Per field: its bytes as sent (the last one possibly cut), its whole length and its tag's.
fn encode_message(msg: &Message) -> Vec<(Vec<u8>, usize, usize)> {
    let last = msg.fields.len().wrapping_sub(1);
    msg.fields
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let (mut bytes, tag_len) = encode_field(field);
            let full = bytes.len();
            if let (true, Some(cut)) = (i == last, msg.cut_last) {
                bytes.truncate(cut.index(full));
            }
            (bytes, full, tag_len)
        })
        .collect()
}

/// The reference verdict: the lower-case SHA and the address, or the reason for refusal.
fn expected_verdict(msg: &Message) -> Result<(String, u32), Reject> {
    let encoded = encode_message(msg);
    let total: usize = encoded.iter().map(|(bytes, _, _)| bytes.len()).sum();
    if total == 0 {
        return Err(Reject::Empty);
    }
    if total > wire::MAX_DATAGRAM_BYTES {
        return Err(Reject::Oversize);
    }
    let mut sha: Option<&[u8]> = None;
    let mut ip: Option<u64> = None;
    // Whether field 1 or 2 came with another wire type (index: field number).
    let mut other_wire_type = [false; 3];
    for (field, (bytes, full, tag_len)) in msg.fields.iter().zip(&encoded) {
        let kept = bytes.len();
        if kept == 0 {
            continue;
        }
        if kept < *tag_len || *tag_len > wire::TAG_MAX_BYTES {
            // Bytes that end inside a tag, or a tag longer than protobuf allows, are no field.
            return Err(Reject::Malformed);
        }
        if let Value::Bytes(bytes) = &field.value {
            // A length prefix longer than protobuf allows, read whole before the cut.
            let prefix = padded_varint_len(bytes.len() as u64, field.value_pad);
            if prefix > wire::LENGTH_MAX_BYTES && kept >= tag_len + wire::LENGTH_MAX_BYTES {
                return Err(Reject::Malformed);
            }
        }
        match (field.number, &field.value) {
            (_, Value::BadWireType(_)) => return Err(Reject::Malformed),
            (1, Value::Bytes(digits)) => sha = Some(digits),
            (2, Value::Varint(value)) => ip = Some(*value),
            // Protobuf skips a field of ours with another wire type as an unknown field.
            (number @ (1 | 2), _) => other_wire_type[number as usize] = true,
            _ => {}
        }
        if kept < *full {
            return Err(Reject::Truncated);
        }
    }
    // Last one wins: `sha` and `ip` hold the last occurrence of each.
    let (Some(sha), Some(ip)) = (sha, ip) else {
        let skipped = (sha.is_none() && other_wire_type[1]) || (ip.is_none() && other_wire_type[2]);
        return Err(if skipped {
            Reject::WireType
        } else {
            Reject::MissingField
        });
    };
    if sha.len() != wire::SHA_HEX_LEN || !sha.iter().all(u8::is_ascii_hexdigit) {
        return Err(Reject::ShaFormat);
    }
    let ip = u32::try_from(ip).map_err(|_| Reject::IpRange)?;
    Ok((String::from_utf8_lossy(sha).to_ascii_lowercase(), ip))
}

fn hex_digit() -> impl Strategy<Value = u8> {
    prop::sample::select(b"0123456789abcdefABCDEF".to_vec())
}

fn sha_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => vec(hex_digit(), wire::SHA_HEX_LEN),
        1 => vec(hex_digit(), 0..=wire::SHA_HEX_LEN + 2),
        2 => (vec(hex_digit(), wire::SHA_HEX_LEN), any::<Index>(), any::<u8>()).prop_map(
            |(mut digits, at, byte)| {
                let i = at.index(digits.len());
                digits[i] = byte;
                digits
            }
        ),
        1 => vec(any::<u8>(), 0..80),
    ]
}

fn ip_value() -> impl Strategy<Value = u64> {
    let max = u64::from(u32::MAX);
    prop_oneof![
        6 => any::<u32>().prop_map(u64::from),
        1 => Just(max),
        1 => (max + 1)..=(max + 2),
        1 => any::<u64>(),
        1 => Just(u64::MAX), // -1 as an int64
    ]
}

fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => any::<u64>().prop_map(Value::Varint),
        2 => (0..300u64).prop_map(Value::Varint),
        2 => any::<[u8; 8]>().prop_map(Value::Fixed64),
        3 => vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        // Large enough that a few of them push a message over the size limit.
        1 => vec(any::<u8>(), 300..700).prop_map(Value::Bytes),
        2 => any::<[u8; 4]>().prop_map(Value::Fixed32),
        // A group start (3) is left to the differential test (`protobuf.rs`), which builds
        // whole groups; here an end of group with none open (4) and wire types 6 and 7.
        1 => prop::sample::select(vec![4u8, 6, 7]).prop_map(Value::BadWireType),
    ]
}

fn pad() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 1 => 1..VARINT_MAX_BYTES]
}

fn field_strategy() -> impl Strategy<Value = Field> {
    let value = prop_oneof![
        4 => sha_payload().prop_map(|digits| (1u32, Value::Bytes(digits))),
        4 => ip_value().prop_map(|ip| (2u32, Value::Varint(ip))),
        3 => (3..=20u32, any_value()),
        1 => (1..=2u32, any_value()),
    ];
    (value, pad(), pad()).prop_map(|((number, value), tag_pad, value_pad)| Field {
        number,
        value,
        tag_pad,
        value_pad,
    })
}

fn message_strategy() -> impl Strategy<Value = Message> {
    (
        vec(field_strategy(), 0..12),
        prop::option::weighted(0.15, any::<Index>()),
    )
        .prop_map(|(fields, cut_last)| Message { fields, cut_last })
}

fn message_bytes(msg: &Message) -> Vec<u8> {
    encode_message(msg)
        .into_iter()
        .flat_map(|(bytes, _, _)| bytes)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// (c) Generated messages get exactly the verdict the reference model gives.
    #[test]
    fn generated_messages_get_the_reference_verdict(msg in message_strategy()) {
        let bytes = message_bytes(&msg);
        let got = wire::decode(&bytes).map(|event| (event.app.to_hex(), event.ip));
        prop_assert_eq!(got, expected_verdict(&msg), "bytes {:02x?}", bytes);
    }
}

/// The generator reaches every verdict, so the property above is not satisfied vacuously.
#[test]
fn generated_messages_reach_every_verdict() {
    let mut runner = TestRunner::deterministic();
    let strategy = message_strategy();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..4096 {
        let msg = strategy.new_tree(&mut runner).unwrap().current();
        let name = match expected_verdict(&msg) {
            Ok(_) => "valid",
            Err(reject) => reject.name(),
        };
        *seen.entry(name).or_default() += 1;
    }
    let mut want: Vec<&str> = Reject::ALL.iter().map(|r| r.name()).collect();
    want.push("valid");
    for name in want {
        assert!(seen.contains_key(name), "no {name} among {seen:?}");
    }
    assert!(seen["valid"] >= 200, "too few valid messages: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Logs

fn scan(bytes: &[u8]) -> (ScanSummary, Addrs) {
    let mut delivered = Vec::new();
    let summary = block::scan_log(bytes, |ip, stats| delivered.push((ip, stats)));
    (summary, delivered)
}

fn scan_file(bytes: &[u8]) -> (ScanSummary, Addrs) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(bytes).unwrap();
    file.flush().unwrap();
    let mut delivered = Vec::new();
    let summary = store::scan_log_file(file.path(), |ip, stats| delivered.push((ip, stats)))
        .unwrap()
        .expect("the temp file exists");
    (summary, delivered)
}

/// One address as a writer would push it: a count of at least 1 (an address is stored only
/// once it was seen), sometimes above `u32::MAX` so that it is split over several records.
fn record_strategy() -> impl Strategy<Value = (u32, AddrStats)> {
    let max = u64::from(u32::MAX);
    let count = prop_oneof![
        8 => 1..1000u64,
        1 => (max - 1)..=(max + 1),
        1 => 1..=(3 * max),
    ];
    (any::<u32>(), count, any::<u32>(), any::<u32>()).prop_map(|(ip, count, first, last)| {
        (
            ip,
            AddrStats {
                count,
                first_seen: first,
                last_seen: last,
            },
        )
    })
}

/// A block: its epoch and the addresses pushed into it.
type BlockSpec = (u64, Vec<(u32, AddrStats)>);

fn blocks_strategy() -> impl Strategy<Value = Vec<BlockSpec>> {
    vec((any::<u64>(), vec(record_strategy(), 1..12)), 0..5)
}

fn build_block(builder: &mut BlockBuilder, (epoch, records): &BlockSpec) -> Vec<u8> {
    builder.begin(*epoch);
    for (ip, stats) in records {
        builder.push(*ip, stats);
    }
    builder.finish().to_vec()
}

/// Bytes after the valid blocks that can never verify as a block.
#[derive(Clone, Debug)]
enum Garbage {
    None,
    Noise(Vec<u8>),
    /// The magic and then noise.
    Magic(Vec<u8>),
    /// A proper prefix of a valid block: a torn write.
    Torn(BlockSpec, Index),
    /// A valid block with one byte changed, then noise. The record count (bytes 8..12) is left
    /// alone: changing it changes which bytes the checksum covers, so detection would only be
    /// probable; every other single-byte change is a burst CRC-32C always detects, or fails an
    /// exact header check.
    Damaged(BlockSpec, Index, u8, Vec<u8>),
}

fn garbage_block_strategy() -> impl Strategy<Value = BlockSpec> {
    (any::<u64>(), vec(record_strategy(), 1..6))
}

fn garbage_strategy() -> impl Strategy<Value = Garbage> {
    prop_oneof![
        1 => Just(Garbage::None),
        2 => vec(any::<u8>(), 1..512).prop_map(Garbage::Noise),
        1 => vec(any::<u8>(), 0..64).prop_map(Garbage::Magic),
        2 => (garbage_block_strategy(), any::<Index>()).prop_map(|(b, at)| Garbage::Torn(b, at)),
        2 => (garbage_block_strategy(), any::<Index>(), 1..=255u8, vec(any::<u8>(), 0..64))
            .prop_map(|(b, at, xor, tail)| Garbage::Damaged(b, at, xor, tail)),
    ]
}

fn garbage_bytes(builder: &mut BlockBuilder, garbage: &Garbage) -> Vec<u8> {
    match garbage {
        Garbage::None => Vec::new(),
        Garbage::Noise(bytes) => bytes.clone(),
        Garbage::Magic(rest) => [block::BLOCK_MAGIC.as_slice(), rest].concat(),
        Garbage::Torn(spec, at) => {
            let mut bytes = build_block(builder, spec);
            let keep = at.index(bytes.len() - 1) + 1;
            bytes.truncate(keep);
            bytes
        }
        Garbage::Damaged(spec, at, xor, tail) => {
            let mut bytes = build_block(builder, spec);
            let mut i = at.index(bytes.len() - 4);
            if i >= 8 {
                i += 4; // skip the record count
            }
            bytes[i] ^= xor;
            bytes.extend_from_slice(tail);
            bytes
        }
    }
}

/// Arbitrary bytes, and valid logs with bytes changed.
fn log_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..ARBITRARY_LOG_MAX_BYTES),
        2 => (blocks_strategy(), vec(edit_strategy(), 0..4)).prop_map(|(blocks, edits)| {
            let mut builder = BlockBuilder::default();
            let mut bytes: Vec<u8> =
                blocks.iter().flat_map(|b| build_block(&mut builder, b)).collect();
            for edit in &edits {
                apply(&mut bytes, edit);
            }
            bytes
        }),
    ]
}

fn check_summary(bytes: &[u8], summary: &ScanSummary, delivered: &Addrs) {
    assert!(summary.good_bytes <= bytes.len() as u64, "{summary:?}");
    assert_eq!(summary.records, delivered.len() as u64, "{summary:?}");
    assert_eq!(
        summary.events,
        delivered.iter().map(|(_, s)| s.count).sum::<u64>()
    );
    match &summary.tail {
        Tail::Clean => assert_eq!(summary.good_bytes, bytes.len() as u64),
        Tail::Torn { offset, .. } => {
            assert_eq!(*offset, summary.good_bytes);
            let rest = &bytes[summary.good_bytes as usize..];
            assert!(!matches!(block::parse_block(rest), BlockParse::Ok { .. }));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// (d) Any file contents are scanned without a panic, the same from memory and from a file,
    /// and the summary agrees with the records delivered.
    #[test]
    fn any_log_scans_without_panic(bytes in log_strategy()) {
        let (summary, delivered) = scan(&bytes);
        check_summary(&bytes, &summary, &delivered);
        let (from_file, file_delivered) = scan_file(&bytes);
        prop_assert_eq!(&from_file, &summary);
        prop_assert_eq!(&file_delivered, &delivered);
    }

    /// (d) Garbage after valid blocks never changes what the valid blocks count.
    #[test]
    fn garbage_after_valid_blocks_changes_nothing(
        blocks in blocks_strategy(),
        garbage in garbage_strategy(),
    ) {
        let mut builder = BlockBuilder::default();
        let prefix: Vec<u8> = blocks.iter().flat_map(|b| build_block(&mut builder, b)).collect();
        let tail = garbage_bytes(&mut builder, &garbage);
        let log = [prefix.as_slice(), tail.as_slice()].concat();

        // What the blocks hold, from what was pushed into them.
        let pushed: Vec<&(u32, AddrStats)> = blocks.iter().flat_map(|(_, r)| r).collect();
        let events: u64 = pushed.iter().map(|(_, s)| s.count).sum();
        let records: u64 = pushed
            .iter()
            .map(|(_, s)| s.count.div_ceil(u64::from(u32::MAX)))
            .sum();
        let expect = ScanSummary {
            blocks: blocks.len() as u64,
            records,
            events,
            good_bytes: prefix.len() as u64,
            max_epoch: blocks.iter().map(|(epoch, _)| *epoch).max().unwrap_or(0),
            tail: Tail::Clean,
        };
        let (clean, clean_delivered) = scan(&prefix);
        prop_assert_eq!(&clean, &expect);

        let (summary, delivered) = scan(&log);
        check_summary(&log, &summary, &delivered);
        prop_assert_eq!(&ScanSummary { tail: Tail::Clean, ..summary.clone() }, &expect);
        if tail.is_empty() {
            prop_assert_eq!(&summary.tail, &Tail::Clean);
        } else {
            let torn_at_prefix = matches!(
                summary.tail,
                Tail::Torn { offset, .. } if offset == prefix.len() as u64
            );
            prop_assert!(torn_at_prefix, "{:?} after {} bytes", summary.tail, prefix.len());
        }
        prop_assert_eq!(&delivered, &clean_delivered);

        let (from_file, file_delivered) = scan_file(&log);
        prop_assert_eq!(&from_file, &summary);
        prop_assert_eq!(&file_delivered, &delivered);
    }
}

#[test]
fn missing_and_empty_files_scan_as_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.log");
    assert!(store::scan_log_file(&missing, |_, _| {}).unwrap().is_none());
    let (summary, delivered) = scan_file(&[]);
    assert_eq!(summary, scan(&[]).0);
    assert_eq!(summary.tail, Tail::Clean);
    assert_eq!(summary.good_bytes, 0);
    assert!(delivered.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Classification

/// Mask of a /28 network.
const NET_MASK: u32 = !0xf;

/// Distinct addresses with counts, clustered in a few /28s so that blocks compete and tie,
/// plus scattered addresses; and the same addresses in another order.
fn addrs_strategy() -> impl Strategy<Value = (Addrs, Addrs)> {
    vec(any::<u32>(), 1..4)
        .prop_flat_map(|nets| {
            let nets: Vec<u32> = nets.into_iter().map(|n| n & NET_MASK).collect();
            let clustered =
                (prop::sample::select(nets), 0..16u32).prop_map(|(net, host)| net | host);
            let ip = prop_oneof![4 => clustered, 1 => any::<u32>()];
            let count = prop_oneof![4 => 1..4u64, 1 => 1..1_000_000u64];
            vec((ip, count), 0..40)
        })
        .prop_map(|list| {
            // Distinct addresses, as the store hands them over; the first count wins.
            let mut distinct: BTreeMap<u32, u64> = BTreeMap::new();
            for (ip, count) in list {
                distinct.entry(ip).or_insert(count);
            }
            distinct
                .into_iter()
                .map(|(ip, count)| {
                    (
                        ip,
                        AddrStats {
                            count,
                            first_seen: 1,
                            last_seen: 2,
                        },
                    )
                })
                .collect::<Vec<_>>()
        })
        .prop_flat_map(|addrs| (Just(addrs.clone()), Just(addrs).prop_shuffle()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// (e) The classification partitions the addresses, keeps the good ones in one /28 of host
    /// addresses, counts every event, ignores input order, and picks the block with the most
    /// distinct hosts (ties: more events, then the lower block).
    #[test]
    fn classify_invariants((addrs, shuffled) in addrs_strategy()) {
        let report = classify(&addrs);
        prop_assert_eq!(&classify(&shuffled), &report);

        let input: BTreeSet<u32> = addrs.iter().map(|(ip, _)| *ip).collect();
        prop_assert!(report.good.windows(2).all(|w| w[0] < w[1]), "{:?}", report.good);
        prop_assert!(report.bad.windows(2).all(|w| w[0] < w[1]), "{:?}", report.bad);
        let good: BTreeSet<u32> = report.good.iter().copied().collect();
        let bad: BTreeSet<u32> = report.bad.iter().copied().collect();
        prop_assert!(good.is_disjoint(&bad));
        prop_assert_eq!(&(&good | &bad), &input);
        prop_assert_eq!(report.count, addrs.iter().map(|(_, s)| s.count).sum::<u64>());

        // Per /28: (distinct hosts seen, events on them).
        let mut nets: HashMap<u32, (u32, u64)> = HashMap::new();
        for (ip, stats) in &addrs {
            if is_host(*ip) {
                let entry = nets.entry(ip & NET_MASK).or_default();
                entry.0 += 1;
                entry.1 += stats.count;
            }
        }
        let Some(chosen) = report.netblock else {
            prop_assert!(nets.is_empty(), "no block chosen among {:?}", nets);
            prop_assert!(report.good.is_empty());
            return Ok(());
        };
        for ip in &report.good {
            prop_assert!(is_host(*ip), "{ip:#x} is no host address");
            prop_assert_eq!(ip & NET_MASK, chosen);
        }
        // Every seen host of the chosen block is good.
        let hosts_in_chosen: Vec<u32> = input
            .iter()
            .copied()
            .filter(|ip| ip & NET_MASK == chosen && is_host(*ip))
            .collect();
        prop_assert_eq!(&report.good, &hosts_in_chosen);

        let (hosts, events) = nets[&chosen];
        for (net, (other_hosts, other_events)) in &nets {
            prop_assert!(*other_hosts <= hosts, "{net:#x} has more hosts than {chosen:#x}");
            if *other_hosts == hosts {
                prop_assert!(*other_events <= events, "{net:#x} ties on hosts, has more events");
                if *other_events == events {
                    prop_assert!(chosen <= *net, "{net:#x} ties and is lower than {chosen:#x}");
                }
            }
        }
    }
}
