//! Keys, values and the merge operator of a writer's database.
//!
//! Kinds of keys, told apart by their first byte so that every kind is one contiguous
//! range:
//!
//! | key | value | what |
//! | --- | --- | --- |
//! | `a ‖ bucket (2)` | [records](#records) of [`ADDR_ENTRY_BYTES`] entries: `ip (4, BE) ‖` [`AddrStats`] (16), sorted by address | the addresses of the apps of one bucket |
//! | `c ‖ bucket (2)` | records of one total (8 bytes, LE) | the totals of the apps of one bucket, so `list` reads no address |
//! | `i ‖ block (2)` | records of `lo (3)` entries (an address's low 20 bits), sorted | the address index: the apps that have had addresses in one /12 ([`block`]) |
//! | `m/format` | format (8 bytes, LE) | the key layout the database is written in ([`FORMAT`]) |
//! | `m/shipped_epoch` | epoch (8 bytes, LE) ‖ instance | the last flush epoch this database holds |
//! | `m/forgotten_seq` | sequence (8 bytes, LE) | the last forget of the bucket's log applied to it |
//! | `w ‖ epoch (8, big-endian)` | previous epoch (8 bytes, LE) | a shipped flush, for `watch` |
//! | `w ‖ epoch (8, big-endian) ‖ part (4, big-endian)` | up to [`CHANGE_PART_APPS`] SHAs | apps that flush changed, for `watch` |
//!
//! An app's bucket is the first 12 bits of its SHA ([`bucket`]) and an address's index block
//! its /12 ([`block`]), so a database holds at most 4,096 address keys, as many total keys and
//! as many index keys, however many apps and addresses it holds. Each key costs the database
//! the same work per write whatever its value holds (batch, memtable, table, compaction), so
//! a write batch of a round of 100,000 apps writes 4,096 address keys and as many totals, and
//! index keys only for blocks with addresses new to the database, instead of several keys per
//! app. A bucket's value holds about one 4,096th of the apps: a few hundred bytes per app,
//! so about 100 KB at a million apps, read whole to answer for one app.
//!
//! # Records
//!
//! Address, total and index values are records sorted by SHA, each app once: `sha (32) ‖
//! length (4, LE) ‖ payload`. They are written as merge operands; [`StatsMerge`] merges two
//! values record by record, and the payloads of one app entry by entry: address stats as
//! [`AddrStats::merge`] (counts summed, the earliest first and the latest last arrival kept),
//! index entries united, totals summed. A database thus holds the same per-address stats as
//! the writer's local log. A forget reads a value, drops the app's record and puts the rest.

use bytes::Bytes;
use ipevent_core::{AddrStats, AppSha};
use slatedb::{MergeOperator, MergeOperatorError};

/// First byte of an address key.
pub const ADDR_TAG: u8 = b'a';
/// First byte of a totals key.
pub const COUNT_TAG: u8 = b'c';
/// First byte of a change key (a shipped flush and the apps it changed).
pub const CHANGE_TAG: u8 = b'w';
/// First byte of an address index key.
pub const ADDR_INDEX_TAG: u8 = b'i';
/// The key holding the last flush epoch the database holds.
pub const SHIPPED_EPOCH_KEY: &[u8] = b"m/shipped_epoch";
/// The key holding the sequence number of the last forget (in the bucket's forget log of the
/// database's generation) whose app the database no longer holds.
pub const FORGOTTEN_SEQ_KEY: &[u8] = b"m/forgotten_seq";
/// The key holding the database's [`FORMAT`], written when the database is created.
pub const FORMAT_KEY: &[u8] = b"m/format";
/// The key layout this build writes and reads. Layout 1 (one key per address) had no format
/// key; layout 2 had one address key per app and /16 and one total key per app; layout 3
/// had 65,536 buckets (two SHA bytes) and index keys per /16.
pub const FORMAT: u64 = 4;

/// Bytes of an address, totals or index key.
pub const KEY_BYTES: usize = 3;
/// Bytes of a flush's change key (the flush itself).
pub const FLUSH_KEY_BYTES: usize = 1 + 8;
/// Bytes of a change key naming apps.
pub const CHANGE_KEY_BYTES: usize = FLUSH_KEY_BYTES + 4;
/// Most apps one change key names: a flush of a million apps writes 245 of them.
pub const CHANGE_PART_APPS: usize = 4096;
/// Bytes of an address's stats.
pub const STATS_BYTES: usize = 16;
/// Bytes of one address entry of a record: the address, then its stats.
pub const ADDR_ENTRY_BYTES: usize = 4 + STATS_BYTES;
/// Bits of a SHA that pick its bucket ([`bucket`]): 4,096 buckets.
pub const BUCKET_BITS: u32 = 12;
/// Bits of an address that pick its index block ([`block`]): 4,096 blocks of a /12 each.
pub const BLOCK_BITS: u32 = 12;
/// Bytes of one entry of an index record: an address's low 20 bits (the bits below its
/// block), big-endian.
pub const INDEX_ENTRY_BYTES: usize = 3;
/// Bytes of a total record's payload.
pub const TOTAL_BYTES: usize = 8;
/// Bytes of a record's head: the SHA and the payload's length.
pub const RECORD_HEAD_BYTES: usize = 32 + 4;

/// The index block of an address: its /12, the part of it in an index key.
pub fn block(ip: u32) -> u16 {
    (ip >> (32 - BLOCK_BITS)) as u16
}

/// The bucket of `app`: the first [`BUCKET_BITS`] bits of its SHA.
pub fn bucket(app: &AppSha) -> u16 {
    u16::from_be_bytes([app.0[0], app.0[1]]) >> (16 - BUCKET_BITS)
}

fn tagged(tag: u8, n: u16) -> [u8; KEY_BYTES] {
    let [hi, lo] = n.to_be_bytes();
    [tag, hi, lo]
}

fn parse_tagged(tag: u8, key: &[u8]) -> Option<u16> {
    match key {
        [t, hi, lo] if *t == tag => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// The key of the addresses of the apps of `bucket`.
pub fn addr_key(bucket: u16) -> [u8; KEY_BYTES] {
    tagged(ADDR_TAG, bucket)
}

/// The key of the totals of the apps of `bucket`.
pub fn count_key(bucket: u16) -> [u8; KEY_BYTES] {
    tagged(COUNT_TAG, bucket)
}

/// The index key of the /12 `block`: the keys of a wider block are one contiguous range.
pub fn addr_index_key(block: u16) -> [u8; KEY_BYTES] {
    tagged(ADDR_INDEX_TAG, block)
}

/// The bucket of an address key; `None` for any other key.
pub fn parse_addr_key(key: &[u8]) -> Option<u16> {
    parse_tagged(ADDR_TAG, key)
}

/// The bucket of a totals key; `None` for any other key.
pub fn parse_count_key(key: &[u8]) -> Option<u16> {
    parse_tagged(COUNT_TAG, key)
}

/// The /12 of an index key; `None` for any other key.
pub fn parse_addr_index_key(key: &[u8]) -> Option<u16> {
    parse_tagged(ADDR_INDEX_TAG, key)
}

/// Splits `records` (sorted by address, each address once) into runs of one index block
/// each, in order: the addresses of one index record each.
pub fn chunks(records: &[(u32, AddrStats)]) -> impl Iterator<Item = (u16, &[(u32, AddrStats)])> {
    records
        .chunk_by(|a, b| block(a.0) == block(b.0))
        .map(|run| (block(run[0].0), run))
}

/// Appends to `value` the record of `app` whose payload `payload` writes. Records go in SHA
/// order, each app once.
pub fn push_record(value: &mut Vec<u8>, app: &AppSha, payload: impl FnOnce(&mut Vec<u8>)) {
    value.extend_from_slice(&app.0);
    let at = value.len();
    value.extend_from_slice(&[0; 4]);
    payload(value);
    let len = (value.len() - at - 4) as u32;
    value[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends the address entries of `records` (sorted by address) to a payload.
pub fn encode_addrs(out: &mut Vec<u8>, records: &[(u32, AddrStats)]) {
    for (ip, stats) in records {
        out.extend_from_slice(&ip.to_be_bytes());
        out.extend_from_slice(&encode_stats(stats));
    }
}

/// Appends the index entries of `ips` (of one index block, in order) to a payload.
pub fn encode_lows(out: &mut Vec<u8>, ips: impl Iterator<Item = u32>) {
    for ip in ips {
        out.extend_from_slice(&ip.to_be_bytes()[4 - INDEX_ENTRY_BYTES..]);
    }
}

/// Records taken apart: each app's SHA and payload.
pub type Records<'a> = Vec<(AppSha, &'a [u8])>;

/// The records of a value, in order: each app's SHA and payload; `None` when the value is
/// not a whole number of records in SHA order.
pub fn records(value: &[u8]) -> Option<Records<'_>> {
    let mut out: Vec<(AppSha, &[u8])> = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(RECORD_HEAD_BYTES)?;
        let app = AppSha(head[..32].try_into().ok()?);
        let len = u32::from_le_bytes(head[32..].try_into().ok()?) as usize;
        let (payload, tail) = tail.split_at_checked(len)?;
        if out.last().is_some_and(|(last, _)| *last >= app) {
            return None;
        }
        out.push((app, payload));
        rest = tail;
    }
    Some(out)
}

/// The payload of `app`'s record in a value: `Some(None)` when the value holds no record of
/// it, `None` when the value is not a whole number of records.
pub fn find_record<'a>(value: &'a [u8], app: &AppSha) -> Option<Option<&'a [u8]>> {
    let mut rest = value;
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(RECORD_HEAD_BYTES)?;
        let len = u32::from_le_bytes(head[32..].try_into().ok()?) as usize;
        let (payload, tail) = tail.split_at_checked(len)?;
        match head[..32].cmp(&app.0[..]) {
            std::cmp::Ordering::Less => rest = tail,
            std::cmp::Ordering::Equal => return Some(Some(payload)),
            std::cmp::Ordering::Greater => return Some(None),
        }
    }
    Some(None)
}

/// A value without the records of the apps `gone` names: the value kept (empty when nothing
/// is left) and the records dropped; `None` when the value is not a whole number of records.
pub fn without_apps(
    value: &[u8],
    gone: impl Fn(&AppSha) -> bool,
) -> Option<(Vec<u8>, Records<'_>)> {
    let mut kept = Vec::with_capacity(value.len());
    let mut dropped = Vec::new();
    for (app, payload) in records(value)? {
        if gone(&app) {
            dropped.push((app, payload));
        } else {
            push_record(&mut kept, &app, |out| out.extend_from_slice(payload));
        }
    }
    Some((kept, dropped))
}

/// The addresses of an address record's payload, in order; `None` when it is not a whole
/// number of entries.
pub fn decode_addrs(payload: &[u8]) -> Option<impl Iterator<Item = (u32, AddrStats)> + '_> {
    if !payload.len().is_multiple_of(ADDR_ENTRY_BYTES) {
        return None;
    }
    Some(payload.chunks_exact(ADDR_ENTRY_BYTES).map(|entry| {
        let ip = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
        (ip, decode_stats(&entry[4..]).unwrap_or_default())
    }))
}

/// The addresses an index record of the block `block` names, in order; `None` when the
/// payload is not a whole number of entries.
pub fn decode_lows(block: u16, payload: &[u8]) -> Option<impl Iterator<Item = u32> + '_> {
    if !payload.len().is_multiple_of(INDEX_ENTRY_BYTES) {
        return None;
    }
    let high = u32::from(block) << (32 - BLOCK_BITS);
    Some(
        payload
            .chunks_exact(INDEX_ENTRY_BYTES)
            .map(move |lo| high | u32::from_be_bytes([0, lo[0], lo[1], lo[2]])),
    )
}

/// The change key of flush `epoch` itself; its value is the epoch of the flush shipped
/// before it to the same database, so a follower can tell that it missed flushes whose keys
/// expired. It sorts before the flush's app keys.
pub fn flush_key(epoch: u64) -> [u8; FLUSH_KEY_BYTES] {
    let mut key = [0u8; FLUSH_KEY_BYTES];
    key[0] = CHANGE_TAG;
    key[1..].copy_from_slice(&epoch.to_be_bytes());
    key
}

/// Change key `part` of flush `epoch`: its value names apps the flush changed. Change keys
/// sort by epoch, so a range scan from an epoch on returns the flushes in the order they were
/// shipped.
pub fn change_key(epoch: u64, part: u32) -> [u8; CHANGE_KEY_BYTES] {
    let mut key = [0u8; CHANGE_KEY_BYTES];
    key[..FLUSH_KEY_BYTES].copy_from_slice(&flush_key(epoch));
    key[FLUSH_KEY_BYTES..].copy_from_slice(&part.to_be_bytes());
    key
}

/// A change key taken apart: the flush's epoch, and the part (`None` for the flush's own
/// key). `None` for any other key.
pub fn parse_change_key(key: &[u8]) -> Option<(u64, Option<u32>)> {
    if key.first() != Some(&CHANGE_TAG) || key.len() < FLUSH_KEY_BYTES {
        return None;
    }
    let epoch = u64::from_be_bytes(key[1..FLUSH_KEY_BYTES].try_into().ok()?);
    match key.len() {
        FLUSH_KEY_BYTES => Some((epoch, None)),
        CHANGE_KEY_BYTES => Some((
            epoch,
            Some(u32::from_be_bytes(key[FLUSH_KEY_BYTES..].try_into().ok()?)),
        )),
        _ => None,
    }
}

/// The apps a change key's value names; `None` when it is not a whole number of SHAs.
pub fn decode_changed(value: &[u8]) -> Option<impl Iterator<Item = AppSha> + '_> {
    if !value.len().is_multiple_of(32) {
        return None;
    }
    Some(value.chunks_exact(32).map(|sha| {
        let mut app = [0u8; 32];
        app.copy_from_slice(sha);
        AppSha(app)
    }))
}

/// Encodes an address's stats: count (u64 LE), first seen (u32 LE), last seen (u32 LE).
pub fn encode_stats(stats: &AddrStats) -> [u8; STATS_BYTES] {
    let mut value = [0u8; STATS_BYTES];
    value[0..8].copy_from_slice(&stats.count.to_le_bytes());
    value[8..12].copy_from_slice(&stats.first_seen.to_le_bytes());
    value[12..16].copy_from_slice(&stats.last_seen.to_le_bytes());
    value
}

/// Decodes what [`encode_stats`] wrote; `None` for a value of another length.
pub fn decode_stats(value: &[u8]) -> Option<AddrStats> {
    let value: &[u8; STATS_BYTES] = value.try_into().ok()?;
    Some(AddrStats {
        count: u64::from_le_bytes(value[0..8].try_into().ok()?),
        first_seen: u32::from_le_bytes(value[8..12].try_into().ok()?),
        last_seen: u32::from_le_bytes(value[12..16].try_into().ok()?),
    })
}

/// Decodes the shipped epoch's value: the epoch and the instance token that wrote it.
pub fn decode_shipped(value: &[u8]) -> Option<(u64, &[u8])> {
    let (epoch, instance) = value.split_at_checked(8)?;
    Some((decode_u64(epoch)?, instance))
}

/// Decodes an 8-byte little-endian number (a total or an epoch).
pub fn decode_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.try_into().ok()?))
}

/// The merge operator of every database: merges two values record by record, and one app's
/// payloads as their key's kind wants: address entries as [`AddrStats::merge`] (sum of
/// counts, earliest first, latest last), index entries united, totals summed. It is
/// associative, as SlateDB requires, and never fails on what this crate writes; a value it
/// cannot read is an error, never a guess.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatsMerge;

/// How the payloads of one app merge under a kind of key.
#[derive(Clone, Copy)]
enum Kind {
    /// Entries of `width` bytes sorted by their first `order` bytes; entries of the same
    /// address merge their stats when `stats`.
    Entries {
        width: usize,
        order: usize,
        stats: bool,
    },
    /// A total.
    Total,
}

impl Kind {
    fn of(key: &[u8]) -> Option<Kind> {
        match key.first() {
            Some(&ADDR_TAG) => Some(Kind::Entries {
                width: ADDR_ENTRY_BYTES,
                order: 4,
                stats: true,
            }),
            Some(&ADDR_INDEX_TAG) => Some(Kind::Entries {
                width: INDEX_ENTRY_BYTES,
                order: INDEX_ENTRY_BYTES,
                stats: false,
            }),
            Some(&COUNT_TAG) => Some(Kind::Total),
            _ => None,
        }
    }

    fn valid(self, payload: &[u8]) -> bool {
        match self {
            Kind::Entries { width, .. } => payload.len().is_multiple_of(width),
            Kind::Total => payload.len() == TOTAL_BYTES,
        }
    }

    /// Appends the merge of one app's payloads, the older first.
    fn merge(self, older: &[u8], newer: &[u8], out: &mut Vec<u8>) {
        match self {
            Kind::Total => {
                let total = decode_u64(older).unwrap_or(0) + decode_u64(newer).unwrap_or(0);
                out.extend_from_slice(&total.to_le_bytes());
            }
            Kind::Entries {
                width,
                order,
                stats,
            } => {
                let (mut a, mut b) = (older.chunks_exact(width), newer.chunks_exact(width));
                let (mut x, mut y) = (a.next(), b.next());
                while let (Some(l), Some(r)) = (x, y) {
                    match l[..order].cmp(&r[..order]) {
                        std::cmp::Ordering::Less => {
                            out.extend_from_slice(l);
                            x = a.next();
                        }
                        std::cmp::Ordering::Greater => {
                            out.extend_from_slice(r);
                            y = b.next();
                        }
                        std::cmp::Ordering::Equal => {
                            out.extend_from_slice(&l[..order]);
                            if stats {
                                let mut merged = decode_stats(&l[order..]).unwrap_or_default();
                                merged.merge(&decode_stats(&r[order..]).unwrap_or_default());
                                out.extend_from_slice(&encode_stats(&merged));
                            }
                            x = a.next();
                            y = b.next();
                        }
                    }
                }
                for rest in x.into_iter().chain(a).chain(y).chain(b) {
                    out.extend_from_slice(rest);
                }
            }
        }
    }
}

/// Merges two values record by record; `None` when either is not one this crate wrote.
fn merge_values(kind: Kind, older: &[u8], newer: &[u8]) -> Option<Vec<u8>> {
    let (old, new) = (records(older)?, records(newer)?);
    if !old
        .iter()
        .chain(&new)
        .all(|(_, payload)| kind.valid(payload))
    {
        return None;
    }
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let (mut a, mut b) = (old.into_iter(), new.into_iter());
    let (mut x, mut y) = (a.next(), b.next());
    while let (Some((la, lp)), Some((ra, rp))) = (x, y) {
        match la.cmp(&ra) {
            std::cmp::Ordering::Less => {
                push_record(&mut out, &la, |o| o.extend_from_slice(lp));
                x = a.next();
            }
            std::cmp::Ordering::Greater => {
                push_record(&mut out, &ra, |o| o.extend_from_slice(rp));
                y = b.next();
            }
            std::cmp::Ordering::Equal => {
                push_record(&mut out, &la, |o| kind.merge(lp, rp, o));
                x = a.next();
                y = b.next();
            }
        }
    }
    for (app, payload) in x.into_iter().chain(a).chain(y).chain(b) {
        push_record(&mut out, &app, |o| o.extend_from_slice(payload));
    }
    Some(out)
}

impl StatsMerge {
    fn fold<'a>(
        key: &Bytes,
        mut values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Bytes, MergeOperatorError> {
        let bad = |what: &str| MergeOperatorError::Callback {
            message: format!("{what} under key of {} bytes", key.len()),
        };
        let kind = Kind::of(key).ok_or_else(|| bad("merge"))?;
        let first = values.next().ok_or(MergeOperatorError::EmptyBatch)?;
        let mut acc = match values.next() {
            // One value: checked as a merge of it with nothing.
            None => merge_values(kind, first, &[]),
            Some(second) => merge_values(kind, first, second),
        }
        .ok_or_else(|| bad("unreadable value"))?;
        for value in values {
            acc = merge_values(kind, &acc, value).ok_or_else(|| bad("unreadable value"))?;
        }
        Ok(Bytes::from(acc))
    }
}

impl MergeOperator for StatsMerge {
    fn merge(
        &self,
        key: &Bytes,
        existing_value: Option<Bytes>,
        value: Bytes,
    ) -> Result<Bytes, MergeOperatorError> {
        let existing = existing_value.as_deref();
        StatsMerge::fold(key, existing.into_iter().chain([value.as_ref()]))
    }

    fn merge_batch(
        &self,
        key: &Bytes,
        existing_value: Option<Bytes>,
        operands: &[Bytes],
    ) -> Result<Bytes, MergeOperatorError> {
        let existing = existing_value.as_deref();
        StatsMerge::fold(
            key,
            existing
                .into_iter()
                .chain(operands.iter().map(|b| b.as_ref())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(byte: u8) -> AppSha {
        AppSha([byte; 32])
    }

    fn stats(count: u64, first: u32, last: u32) -> AddrStats {
        AddrStats {
            count,
            first_seen: first,
            last_seen: last,
        }
    }

    #[test]
    fn keys_round_trip_and_sort_by_bucket() {
        let mut sha = [7u8; 32];
        sha[0] = 0x0a;
        sha[1] = 0x01;
        assert_eq!(bucket(&AppSha(sha)), 0x0a0);
        sha[1] = 0xf1;
        assert_eq!(bucket(&AppSha(sha)), 0x0af);
        assert_eq!(bucket(&AppSha([0xab; 32])), 0xaba);
        assert_eq!(block(0xffff_ffff), 0xfff);
        assert_eq!(parse_addr_key(&addr_key(0x0a0)), Some(0x0a0));
        assert_eq!(parse_count_key(&count_key(0x0af)), Some(0x0af));
        assert_eq!(parse_addr_index_key(&addr_index_key(0xc0a)), Some(0xc0a));
        assert!(addr_key(1) < addr_key(256));
        assert_eq!(parse_addr_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_count_key(&addr_key(1)), None);
        assert_eq!(parse_addr_index_key(&addr_key(1)), None);
        assert_eq!(parse_addr_key(&[ADDR_TAG, 1]), None);
    }

    fn addr_value(apps: &[(AppSha, &[(u32, AddrStats)])]) -> Bytes {
        let mut value = Vec::new();
        for (app, records) in apps {
            push_record(&mut value, app, |out| encode_addrs(out, records));
        }
        Bytes::from(value)
    }

    fn decoded(value: &[u8]) -> Vec<(AppSha, Vec<(u32, AddrStats)>)> {
        records(value)
            .unwrap()
            .into_iter()
            .map(|(app, payload)| (app, decode_addrs(payload).unwrap().collect()))
            .collect()
    }

    #[test]
    fn records_round_trip_and_are_found_and_dropped_by_app() {
        let records_a = [(0x0a00_0001, stats(2, 5, 6)), (0xc0a8_0001, stats(1, 3, 3))];
        let records_c = [(0x0a01_0000, stats(4, 1, 9))];
        let value = addr_value(&[(app(1), &records_a), (app(3), &records_c)]);
        assert_eq!(
            decoded(&value),
            [(app(1), records_a.to_vec()), (app(3), records_c.to_vec())]
        );
        let found = find_record(&value, &app(3)).unwrap().unwrap();
        assert_eq!(decode_addrs(found).unwrap().collect::<Vec<_>>(), records_c);
        assert_eq!(find_record(&value, &app(2)), Some(None));
        assert_eq!(find_record(&value, &app(9)), Some(None));
        assert_eq!(find_record(&value[..value.len() - 1], &app(3)), None);

        let (kept, dropped) = without_apps(&value, |a| *a == app(1)).unwrap();
        assert_eq!(decoded(&kept), [(app(3), records_c.to_vec())]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0, app(1));
        let (kept, _) = without_apps(&value, |_| true).unwrap();
        assert!(kept.is_empty());

        // Truncated, out of order, or an app twice: not a value this crate wrote.
        assert!(records(&value[..value.len() - 1]).is_none());
        let swapped = addr_value(&[(app(3), &records_c), (app(1), &records_a)]);
        assert!(records(&swapped).is_none());
        let twice = addr_value(&[(app(1), &records_a), (app(1), &records_a)]);
        assert!(records(&twice).is_none());

        let runs: Vec<(u16, usize)> = chunks(&records_a)
            .map(|(hi, run)| (hi, run.len()))
            .collect();
        assert_eq!(runs, [(0x0a0, 1), (0xc0a, 1)]);
        let mut lows = Vec::new();
        encode_lows(&mut lows, [0x0a00_0001u32, 0x0a0f_ff00].into_iter());
        assert_eq!(lows, [0x00, 0x00, 0x01, 0x0f, 0xff, 0x00]);
        assert_eq!(
            decode_lows(0x0a0, &lows).unwrap().collect::<Vec<_>>(),
            [0x0a00_0001, 0x0a0f_ff00]
        );
        assert!(decode_addrs(&[0; 19]).is_none());
        assert!(decode_lows(1, &[0; 4]).is_none());
    }

    #[test]
    fn change_keys_round_trip_and_sort_by_epoch_flush_first() {
        assert_eq!(parse_change_key(&flush_key(7)), Some((7, None)));
        assert_eq!(parse_change_key(&change_key(7, 3)), Some((7, Some(3))));
        assert!(flush_key(7)[..] < change_key(7, 0)[..]);
        assert!(change_key(7, u32::MAX)[..] < flush_key(8)[..]);
        assert!(change_key(255, 9)[..] < flush_key(256)[..]);
        assert_eq!(parse_change_key(&count_key(1)), None);
        assert_eq!(parse_change_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_change_key(&change_key(1, 1)[..11]), None);
        let names: Vec<u8> = [app(1), app(2)].iter().flat_map(|a| a.0).collect();
        assert_eq!(
            decode_changed(&names).unwrap().collect::<Vec<_>>(),
            [app(1), app(2)]
        );
        assert!(decode_changed(&names[1..]).is_none());
    }

    #[test]
    fn merge_unites_records_summing_counts_and_keeping_earliest_and_latest() {
        let key = Bytes::copy_from_slice(&addr_key(0x0101));
        let older = addr_value(&[
            (
                app(1),
                &[
                    (0x0a00_0001, stats(2, 100, 150)),
                    (0x0b00_0009, stats(1, 5, 5)),
                ],
            ),
            (app(4), &[(0x0c00_0001, stats(1, 1, 1))]),
        ]);
        let mid = addr_value(&[(app(1), &[(0x0a00_0001, stats(3, 90, 120))])]);
        let newer = addr_value(&[
            (
                app(1),
                &[
                    (0x0a00_0002, stats(1, 200, 200)),
                    (0x0b00_0009, stats(2, 1, 300)),
                ],
            ),
            (app(2), &[(0x0d00_0001, stats(7, 8, 9))]),
        ]);
        let merged = StatsMerge
            .merge_batch(&key, Some(older.clone()), &[mid.clone(), newer.clone()])
            .unwrap();
        assert_eq!(
            decoded(&merged),
            [
                (
                    app(1),
                    vec![
                        (0x0a00_0001, stats(5, 90, 150)),
                        (0x0a00_0002, stats(1, 200, 200)),
                        (0x0b00_0009, stats(3, 1, 300)),
                    ]
                ),
                (app(2), vec![(0x0d00_0001, stats(7, 8, 9))]),
                (app(4), vec![(0x0c00_0001, stats(1, 1, 1))]),
            ]
        );
        // Associative: pairwise, in either grouping, gives the same.
        let left = StatsMerge
            .merge(&key, Some(older.clone()), mid.clone())
            .unwrap();
        assert_eq!(
            StatsMerge.merge(&key, Some(left), newer.clone()).unwrap(),
            merged
        );
        let right = StatsMerge.merge(&key, Some(mid), newer).unwrap();
        assert_eq!(StatsMerge.merge(&key, Some(older), right).unwrap(), merged);

        let index_key = Bytes::copy_from_slice(&addr_index_key(0x0a0));
        let lows = |apps: &[(u8, &[u32])]| {
            let mut value = Vec::new();
            for (a, l) in apps {
                push_record(&mut value, &app(*a), |out| {
                    encode_lows(out, l.iter().copied())
                });
            }
            Bytes::from(value)
        };
        let united = StatsMerge
            .merge_batch(
                &index_key,
                Some(lows(&[(1, &[1, 9])])),
                &[lows(&[(1, &[1, 2]), (5, &[3])]), lows(&[(1, &[0xf_ffff])])],
            )
            .unwrap();
        assert_eq!(united, lows(&[(1, &[1, 2, 9, 0xf_ffff]), (5, &[3])]));

        let total_key = Bytes::copy_from_slice(&count_key(0x0101));
        let totals = |apps: &[(u8, u64)]| {
            let mut value = Vec::new();
            for (a, n) in apps {
                push_record(&mut value, &app(*a), |out| {
                    out.extend_from_slice(&n.to_le_bytes())
                });
            }
            Bytes::from(value)
        };
        let total = StatsMerge
            .merge_batch(
                &total_key,
                None,
                &[totals(&[(1, 4), (2, 1)]), totals(&[(1, 5)])],
            )
            .unwrap();
        assert_eq!(total, totals(&[(1, 9), (2, 1)]));
    }

    #[test]
    fn merge_refuses_values_it_did_not_write() {
        let key = Bytes::copy_from_slice(&addr_key(9));
        assert!(StatsMerge
            .merge(&key, None, Bytes::from_static(b"short"))
            .is_err());
        // A whole record whose payload is not whole entries.
        let mut value = Vec::new();
        push_record(&mut value, &app(1), |out| out.extend_from_slice(&[0; 19]));
        assert!(StatsMerge.merge(&key, None, Bytes::from(value)).is_err());
        let mut total = Vec::new();
        push_record(&mut total, &app(1), |out| out.extend_from_slice(&[0; 7]));
        let total_key = Bytes::copy_from_slice(&count_key(9));
        assert!(StatsMerge
            .merge(&total_key, None, Bytes::from(total))
            .is_err());
        assert!(StatsMerge
            .merge(&Bytes::from_static(b"zzz"), None, Bytes::from_static(b"x"))
            .is_err());
        assert!(StatsMerge.merge_batch(&key, None, &[]).is_err());
    }
}
