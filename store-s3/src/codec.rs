//! Keys, values and the merge operator of a writer's database.
//!
//! Kinds of keys, told apart by their first byte so that every kind is one contiguous
//! range:
//!
//! | key | value | what |
//! | --- | --- | --- |
//! | `a ‖ sha (32) ‖ hi (2)` | [`Chunk`] entries: `lo (2) ‖` [`AddrStats`] (16), sorted by `lo` | the app's addresses `hi.*.*` (one /16) |
//! | `c ‖ sha (32)` | count (8 bytes, LE) | the app's total, so `list` reads one key per app |
//! | `i ‖ hi (2) ‖ sha (32)` | `lo (2)` entries, sorted | the address index: the app has had addresses `hi.lo` |
//! | `m/format` | format (8 bytes, LE) | the key layout the database is written in ([`FORMAT`]) |
//! | `m/shipped_epoch` | epoch (8 bytes, LE) ‖ instance | the last flush epoch this database holds |
//! | `m/forgotten_seq` | sequence (8 bytes, LE) | the last forget of the bucket's log applied to it |
//! | `w ‖ epoch (8, big-endian)` | previous epoch (8 bytes, LE) | a shipped flush, for `watch` |
//! | `w ‖ epoch (8, big-endian) ‖ part (4, big-endian)` | up to [`CHANGE_PART_APPS`] SHAs | apps that flush changed, for `watch` |
//!
//! A flush writes one address key and one index key per app and /16 it touched, not one per
//! address: an app's traffic mostly stays in one netblock, so that is about one key per app,
//! and each key costs the database the same whatever its value holds. Address, index and
//! count keys are written as merge operands; [`StatsMerge`] merges address chunks entry by
//! entry (counts summed, the earliest first and the latest last arrival kept), unites index
//! entries and sums counts, so a database holds the same per-address stats as the writer's
//! local log. Chunks sort by /16 within their app and entries by address within their chunk,
//! so one prefix scan returns the app's addresses in the order the classifier wants.

use bytes::Bytes;
use ipevent_core::{AddrStats, AppSha};
use slatedb::{MergeOperator, MergeOperatorError};

/// First byte of an address key.
pub const ADDR_TAG: u8 = b'a';
/// First byte of an app total key.
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
/// The key layout this build writes and reads. Layout 1 (one key per address, before chunks)
/// had no format key.
pub const FORMAT: u64 = 2;

/// Bytes of an address key.
pub const ADDR_KEY_BYTES: usize = 1 + 32 + 2;
/// Bytes of an address index key.
pub const ADDR_INDEX_KEY_BYTES: usize = 1 + 2 + 32;
/// Bytes of an app total key.
pub const COUNT_KEY_BYTES: usize = 1 + 32;
/// Bytes of a flush's change key (the flush itself).
pub const FLUSH_KEY_BYTES: usize = 1 + 8;
/// Bytes of a change key naming apps.
pub const CHANGE_KEY_BYTES: usize = FLUSH_KEY_BYTES + 4;
/// Most apps one change key names: a flush of a million apps writes 245 of them.
pub const CHANGE_PART_APPS: usize = 4096;
/// Bytes of an address's stats.
pub const STATS_BYTES: usize = 16;
/// Bytes of one entry of an address chunk: the address's low 16 bits, then its stats.
pub const CHUNK_ENTRY_BYTES: usize = 2 + STATS_BYTES;
/// Bytes of one entry of an index value: an address's low 16 bits.
pub const INDEX_ENTRY_BYTES: usize = 2;

/// The /16 of an address: the part of it in the key.
pub fn high(ip: u32) -> u16 {
    (ip >> 16) as u16
}

/// The key of `app`'s addresses in the /16 `hi`.
pub fn addr_key(app: &AppSha, hi: u16) -> [u8; ADDR_KEY_BYTES] {
    let mut key = [0u8; ADDR_KEY_BYTES];
    key[0] = ADDR_TAG;
    key[1..33].copy_from_slice(&app.0);
    key[33..].copy_from_slice(&hi.to_be_bytes());
    key
}

/// The prefix of every address key of `app`.
pub fn addr_prefix(app: &AppSha) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = ADDR_TAG;
    key[1..].copy_from_slice(&app.0);
    key
}

/// Splits an address key into app and /16; `None` for any other key.
pub fn parse_addr_key(key: &[u8]) -> Option<(AppSha, u16)> {
    if key.len() != ADDR_KEY_BYTES || key[0] != ADDR_TAG {
        return None;
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&key[1..33]);
    Some((AppSha(sha), u16::from_be_bytes([key[33], key[34]])))
}

/// The index key saying `app` has had addresses in the /16 `hi`: the keys of one /16 (or of
/// a wider block) are one contiguous range.
pub fn addr_index_key(hi: u16, app: &AppSha) -> [u8; ADDR_INDEX_KEY_BYTES] {
    let mut key = [0u8; ADDR_INDEX_KEY_BYTES];
    key[0] = ADDR_INDEX_TAG;
    key[1..3].copy_from_slice(&hi.to_be_bytes());
    key[3..].copy_from_slice(&app.0);
    key
}

/// The /16 and app of an address index key; `None` for any other key.
pub fn parse_addr_index_key(key: &[u8]) -> Option<(u16, AppSha)> {
    if key.len() != ADDR_INDEX_KEY_BYTES || key[0] != ADDR_INDEX_TAG {
        return None;
    }
    let hi = u16::from_be_bytes([key[1], key[2]]);
    Some((hi, AppSha(key[3..].try_into().ok()?)))
}

/// The key of `app`'s total.
pub fn count_key(app: &AppSha) -> [u8; COUNT_KEY_BYTES] {
    let mut key = [0u8; COUNT_KEY_BYTES];
    key[0] = COUNT_TAG;
    key[1..].copy_from_slice(&app.0);
    key
}

/// The app of a total key; `None` for any other key.
pub fn parse_count_key(key: &[u8]) -> Option<AppSha> {
    if key.len() != COUNT_KEY_BYTES || key[0] != COUNT_TAG {
        return None;
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&key[1..]);
    Some(AppSha(sha))
}

/// Splits `records` (sorted by address, each address once) into runs of one /16 each, in
/// order: the records of one address key.
pub fn chunks(records: &[(u32, AddrStats)]) -> impl Iterator<Item = (u16, &[(u32, AddrStats)])> {
    records
        .chunk_by(|a, b| high(a.0) == high(b.0))
        .map(|run| (high(run[0].0), run))
}

/// The value of an address key holding `records` (one /16's, sorted by address).
pub fn encode_chunk(records: &[(u32, AddrStats)]) -> Vec<u8> {
    let mut value = Vec::with_capacity(records.len() * CHUNK_ENTRY_BYTES);
    for (ip, stats) in records {
        value.extend_from_slice(&(*ip as u16).to_be_bytes());
        value.extend_from_slice(&encode_stats(stats));
    }
    value
}

/// The value of an index key naming `ips` (of one /16, in order).
pub fn encode_lows(ips: impl Iterator<Item = u32>) -> Vec<u8> {
    ips.flat_map(|ip| (ip as u16).to_be_bytes()).collect()
}

/// The addresses of an address chunk of the /16 `hi`, in order; `None` when the value is not
/// a whole number of entries.
pub fn decode_chunk(hi: u16, value: &[u8]) -> Option<impl Iterator<Item = (u32, AddrStats)> + '_> {
    if !value.len().is_multiple_of(CHUNK_ENTRY_BYTES) {
        return None;
    }
    Some(value.chunks_exact(CHUNK_ENTRY_BYTES).map(move |entry| {
        let lo = u16::from_be_bytes([entry[0], entry[1]]);
        let stats = decode_stats(&entry[2..]).unwrap_or_default();
        ((u32::from(hi) << 16) | u32::from(lo), stats)
    }))
}

/// An address key and its value taken apart: the app and its addresses in that /16, in
/// order; `None` for any other key or a value that is not a whole number of entries.
pub fn decode_addr_entry<'a>(
    key: &[u8],
    value: &'a [u8],
) -> Option<(AppSha, impl Iterator<Item = (u32, AddrStats)> + 'a)> {
    let (app, hi) = parse_addr_key(key)?;
    Some((app, decode_chunk(hi, value)?))
}

/// The addresses an index value of the /16 `hi` names, in order; `None` when the value is
/// not a whole number of entries.
pub fn decode_lows(hi: u16, value: &[u8]) -> Option<impl Iterator<Item = u32> + '_> {
    if !value.len().is_multiple_of(INDEX_ENTRY_BYTES) {
        return None;
    }
    Some(
        value
            .chunks_exact(INDEX_ENTRY_BYTES)
            .map(move |lo| (u32::from(hi) << 16) | u32::from(u16::from_be_bytes([lo[0], lo[1]]))),
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

/// The merge operator of every database: address chunks merge entry by entry as
/// [`AddrStats::merge`] (sum of counts, earliest first, latest last), index values unite,
/// totals sum. It is associative, as SlateDB requires, and never fails on what this crate
/// writes; a value of an unexpected length is an error, never a guess.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatsMerge;

/// Merges two runs of fixed-width entries sorted by their first two bytes; `both` combines
/// the entries of one address found in each.
fn merge_sorted(
    older: &[u8],
    newer: &[u8],
    width: usize,
    both: impl Fn(&[u8], &[u8], &mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let (mut a, mut b) = (older.chunks_exact(width), newer.chunks_exact(width));
    let (mut x, mut y) = (a.next(), b.next());
    while let (Some(l), Some(r)) = (x, y) {
        match l[..2].cmp(&r[..2]) {
            std::cmp::Ordering::Less => {
                out.extend_from_slice(l);
                x = a.next();
            }
            std::cmp::Ordering::Greater => {
                out.extend_from_slice(r);
                y = b.next();
            }
            std::cmp::Ordering::Equal => {
                both(l, r, &mut out);
                x = a.next();
                y = b.next();
            }
        }
    }
    for rest in x.into_iter().chain(a).chain(y).chain(b) {
        out.extend_from_slice(rest);
    }
    out
}

impl StatsMerge {
    fn fold<'a>(
        key: &Bytes,
        values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Bytes, MergeOperatorError> {
        let bad = |what: &str| MergeOperatorError::Callback {
            message: format!("{what} under key of {} bytes", key.len()),
        };
        let width = match key.first() {
            Some(&ADDR_TAG) => CHUNK_ENTRY_BYTES,
            Some(&ADDR_INDEX_TAG) => INDEX_ENTRY_BYTES,
            Some(&COUNT_TAG) => {
                let mut total = 0u64;
                for value in values {
                    total += decode_u64(value).ok_or_else(|| bad("bad total value"))?;
                }
                return Ok(Bytes::copy_from_slice(&total.to_le_bytes()));
            }
            _ => return Err(bad("merge")),
        };
        let mut acc: Option<Vec<u8>> = None;
        for value in values {
            if !value.len().is_multiple_of(width) {
                return Err(bad("bad address value"));
            }
            acc = Some(match acc {
                None => value.to_vec(),
                Some(older) => merge_sorted(&older, value, width, |l, r, out| {
                    out.extend_from_slice(&l[..2]);
                    if width == CHUNK_ENTRY_BYTES {
                        let mut stats = decode_stats(&l[2..]).unwrap_or_default();
                        stats.merge(&decode_stats(&r[2..]).unwrap_or_default());
                        out.extend_from_slice(&encode_stats(&stats));
                    }
                }),
            });
        }
        acc.map(Bytes::from).ok_or(MergeOperatorError::EmptyBatch)
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
    fn keys_round_trip_and_sort_by_address() {
        let a = app(7);
        assert_eq!(parse_addr_key(&addr_key(&a, 0x0a00)), Some((a, 0x0a00)));
        assert_eq!(parse_count_key(&count_key(&a)), Some(a));
        assert!(addr_key(&a, 1) < addr_key(&a, 256));
        assert!(addr_key(&a, u16::MAX) < addr_key(&app(8), 0));
        assert!(addr_key(&a, 5).starts_with(&addr_prefix(&a)));
        assert_eq!(parse_addr_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_count_key(&addr_key(&a, 1)), None);
        assert_eq!(
            parse_addr_index_key(&addr_index_key(0x0a00, &a)),
            Some((0x0a00, a))
        );
        assert!(addr_index_key(1, &app(9)) < addr_index_key(2, &app(0)));
        assert_eq!(parse_addr_index_key(&addr_key(&a, 1)), None);
    }

    #[test]
    fn chunks_split_by_slash_16_and_decode_back() {
        let records = [
            (0x0a00_0001, stats(2, 5, 6)),
            (0x0a00_ff00, stats(1, 7, 7)),
            (0x0a01_0000, stats(4, 1, 9)),
            (0xc0a8_0001, stats(1, 3, 3)),
        ];
        let runs: Vec<(u16, &[(u32, AddrStats)])> = chunks(&records).collect();
        assert_eq!(
            runs.iter()
                .map(|(hi, run)| (*hi, run.len()))
                .collect::<Vec<_>>(),
            [(0x0a00, 2), (0x0a01, 1), (0xc0a8, 1)]
        );
        let back: Vec<(u32, AddrStats)> = runs
            .iter()
            .flat_map(|(hi, run)| {
                decode_chunk(*hi, &encode_chunk(run))
                    .unwrap()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(back, records);
        let lows: Vec<u32> = runs
            .iter()
            .flat_map(|(hi, run)| {
                let value = encode_lows(run.iter().map(|(ip, _)| *ip));
                decode_lows(*hi, &value).unwrap().collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(lows, records.map(|(ip, _)| ip));
        assert!(decode_chunk(1, &[0; 17]).is_none());
        assert!(decode_lows(1, &[0; 3]).is_none());
    }

    #[test]
    fn change_keys_round_trip_and_sort_by_epoch_flush_first() {
        assert_eq!(parse_change_key(&flush_key(7)), Some((7, None)));
        assert_eq!(parse_change_key(&change_key(7, 3)), Some((7, Some(3))));
        assert!(flush_key(7)[..] < change_key(7, 0)[..]);
        assert!(change_key(7, u32::MAX)[..] < flush_key(8)[..]);
        assert!(change_key(255, 9)[..] < flush_key(256)[..]);
        assert_eq!(parse_change_key(&count_key(&app(1))), None);
        assert_eq!(parse_change_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_change_key(&change_key(1, 1)[..11]), None);
        let names: Vec<u8> = [app(1), app(2)].iter().flat_map(|a| a.0).collect();
        assert_eq!(
            decode_changed(&names).unwrap().collect::<Vec<_>>(),
            [app(1), app(2)]
        );
        assert!(decode_changed(&names[1..]).is_none());
    }

    fn chunk_value(records: &[(u32, AddrStats)]) -> Bytes {
        Bytes::from(encode_chunk(records))
    }

    #[test]
    fn merge_unites_chunks_summing_counts_and_keeping_earliest_and_latest() {
        let key = Bytes::copy_from_slice(&addr_key(&app(1), 0x0a00));
        let older = chunk_value(&[
            (0x0a00_0001, stats(2, 100, 150)),
            (0x0a00_0009, stats(1, 5, 5)),
        ]);
        let mid = chunk_value(&[(0x0a00_0001, stats(3, 90, 120))]);
        let newer = chunk_value(&[
            (0x0a00_0002, stats(1, 200, 200)),
            (0x0a00_0009, stats(2, 1, 300)),
        ]);
        let merged = StatsMerge
            .merge_batch(&key, Some(older.clone()), &[mid.clone(), newer.clone()])
            .unwrap();
        assert_eq!(
            decode_chunk(0x0a00, &merged).unwrap().collect::<Vec<_>>(),
            [
                (0x0a00_0001, stats(5, 90, 150)),
                (0x0a00_0002, stats(1, 200, 200)),
                (0x0a00_0009, stats(3, 1, 300)),
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

        let index_key = Bytes::copy_from_slice(&addr_index_key(0x0a00, &app(1)));
        let lows =
            |l: &[u16]| Bytes::from(l.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>());
        let united = StatsMerge
            .merge_batch(
                &index_key,
                Some(lows(&[1, 9])),
                &[lows(&[1, 2]), lows(&[0xffff])],
            )
            .unwrap();
        assert_eq!(united, lows(&[1, 2, 9, 0xffff]));

        let total_key = Bytes::copy_from_slice(&count_key(&app(1)));
        let t = |n: u64| Bytes::copy_from_slice(&n.to_le_bytes());
        let total = StatsMerge
            .merge_batch(&total_key, None, &[t(4), t(5)])
            .unwrap();
        assert_eq!(decode_u64(&total), Some(9));
    }

    #[test]
    fn merge_refuses_values_it_did_not_write() {
        let key = Bytes::copy_from_slice(&addr_key(&app(1), 9));
        assert!(StatsMerge
            .merge(&key, None, Bytes::from_static(b"short"))
            .is_err());
        assert!(StatsMerge
            .merge(&Bytes::from_static(b"zzz"), None, Bytes::from_static(b"x"))
            .is_err());
        assert!(StatsMerge.merge_batch(&key, None, &[]).is_err());
    }
}
