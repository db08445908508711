//! Keys, values and the merge operator of a writer's database.
//!
//! Kinds of keys, told apart by their first byte so that every kind is one contiguous
//! range:
//!
//! | key | value | what |
//! | --- | --- | --- |
//! | `a ‖ sha (32) ‖ ip (4, big-endian)` | [`AddrStats`] (16 bytes) | one address of one app |
//! | `c ‖ sha (32)` | count (8 bytes, LE) | the app's total, so `list` reads one key per app |
//! | `i ‖ ip (4, big-endian) ‖ sha (32)` | empty | the address index: the app has had that address |
//! | `m/shipped_epoch` | epoch (8 bytes, LE) ‖ instance | the last flush epoch this database holds |
//! | `m/addr_index` | empty | every address key has its index key (written once the database has them) |
//! | `m/forgotten_seq` | sequence (8 bytes, LE) | the last forget of the bucket's log applied to it |
//! | `w ‖ epoch (8, big-endian)` | previous epoch (8 bytes, LE) | a shipped flush, for `watch` |
//! | `w ‖ epoch (8, big-endian) ‖ sha (32)` | empty | an app that flush changed, for `watch` |
//!
//! Address and count keys are written as merge operands; [`StatsMerge`] sums counts and keeps
//! the earliest first and the latest last arrival, so a database holds the same per-address
//! stats as the writer's local log. An address key sorts by address within its app, so one
//! prefix scan returns the app's addresses in the order the classifier wants.

use bytes::Bytes;
use ipevent_core::{AddrStats, AppSha};
use slatedb::{MergeOperator, MergeOperatorError};

/// First byte of an address key.
pub const ADDR_TAG: u8 = b'a';
/// First byte of an app total key.
pub const COUNT_TAG: u8 = b'c';
/// First byte of a change key (a shipped flush and the apps it changed).
pub const CHANGE_TAG: u8 = b'w';
/// The key holding the last flush epoch the database holds.
pub const SHIPPED_EPOCH_KEY: &[u8] = b"m/shipped_epoch";
/// The key holding the sequence number of the last forget (in the bucket's forget log of the
/// database's generation) whose app the database no longer holds.
pub const FORGOTTEN_SEQ_KEY: &[u8] = b"m/forgotten_seq";

/// First byte of an address index key.
pub const ADDR_INDEX_TAG: u8 = b'i';
/// Present once every address key of the database has its index key: a database without it
/// (written before the index existed) is read whole by an address lookup.
pub const ADDR_INDEX_MARKER_KEY: &[u8] = b"m/addr_index";
/// Bytes of an address index key.
pub const ADDR_INDEX_KEY_BYTES: usize = 1 + 4 + 32;

/// The index key saying `app` has had address `ip`: the keys of one address (or block) are
/// one contiguous range.
pub fn addr_index_key(ip: u32, app: &AppSha) -> [u8; ADDR_INDEX_KEY_BYTES] {
    let mut key = [0u8; ADDR_INDEX_KEY_BYTES];
    key[0] = ADDR_INDEX_TAG;
    key[1..5].copy_from_slice(&ip.to_be_bytes());
    key[5..].copy_from_slice(&app.0);
    key
}

/// The app of an address index key; `None` for any other key.
pub fn parse_addr_index_key(key: &[u8]) -> Option<(u32, AppSha)> {
    if key.len() != ADDR_INDEX_KEY_BYTES || key[0] != ADDR_INDEX_TAG {
        return None;
    }
    let ip = u32::from_be_bytes([key[1], key[2], key[3], key[4]]);
    Some((ip, AppSha(key[5..].try_into().ok()?)))
}

/// Bytes of an address key.
pub const ADDR_KEY_BYTES: usize = 1 + 32 + 4;
/// Bytes of an app total key.
pub const COUNT_KEY_BYTES: usize = 1 + 32;
/// Bytes of a flush's change key (the flush itself).
pub const FLUSH_KEY_BYTES: usize = 1 + 8;
/// Bytes of an app's change key.
pub const CHANGE_KEY_BYTES: usize = FLUSH_KEY_BYTES + 32;
/// Bytes of an address value.
pub const STATS_BYTES: usize = 16;

/// The key of one address of one app.
pub fn addr_key(app: &AppSha, ip: u32) -> [u8; ADDR_KEY_BYTES] {
    let mut key = [0u8; ADDR_KEY_BYTES];
    key[0] = ADDR_TAG;
    key[1..33].copy_from_slice(&app.0);
    key[33..].copy_from_slice(&ip.to_be_bytes());
    key
}

/// The prefix of every address key of `app`.
pub fn addr_prefix(app: &AppSha) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = ADDR_TAG;
    key[1..].copy_from_slice(&app.0);
    key
}

/// The key of `app`'s total.
pub fn count_key(app: &AppSha) -> [u8; COUNT_KEY_BYTES] {
    let mut key = [0u8; COUNT_KEY_BYTES];
    key[0] = COUNT_TAG;
    key[1..].copy_from_slice(&app.0);
    key
}

/// Splits an address key into app and address; `None` for any other key.
pub fn parse_addr_key(key: &[u8]) -> Option<(AppSha, u32)> {
    if key.len() != ADDR_KEY_BYTES || key[0] != ADDR_TAG {
        return None;
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(&key[1..33]);
    let ip = u32::from_be_bytes([key[33], key[34], key[35], key[36]]);
    Some((AppSha(sha), ip))
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

/// The change key of flush `epoch` itself; its value is the epoch of the flush shipped
/// before it to the same database, so a follower can tell that it missed flushes whose keys
/// expired. It sorts before the flush's app keys.
pub fn flush_key(epoch: u64) -> [u8; FLUSH_KEY_BYTES] {
    let mut key = [0u8; FLUSH_KEY_BYTES];
    key[0] = CHANGE_TAG;
    key[1..].copy_from_slice(&epoch.to_be_bytes());
    key
}

/// The change key naming `app` as changed by flush `epoch`. Change keys sort by epoch, so a
/// range scan from an epoch on returns the flushes in the order they were shipped.
pub fn change_key(epoch: u64, app: &AppSha) -> [u8; CHANGE_KEY_BYTES] {
    let mut key = [0u8; CHANGE_KEY_BYTES];
    key[..FLUSH_KEY_BYTES].copy_from_slice(&flush_key(epoch));
    key[FLUSH_KEY_BYTES..].copy_from_slice(&app.0);
    key
}

/// A change key taken apart: the flush's epoch, and the app it changed (`None` for the
/// flush's own key). `None` for any other key.
pub fn parse_change_key(key: &[u8]) -> Option<(u64, Option<AppSha>)> {
    if key.first() != Some(&CHANGE_TAG) || key.len() < FLUSH_KEY_BYTES {
        return None;
    }
    let epoch = u64::from_be_bytes(key[1..FLUSH_KEY_BYTES].try_into().ok()?);
    match key.len() {
        FLUSH_KEY_BYTES => Some((epoch, None)),
        CHANGE_KEY_BYTES => {
            let mut sha = [0u8; 32];
            sha.copy_from_slice(&key[FLUSH_KEY_BYTES..]);
            Some((epoch, Some(AppSha(sha))))
        }
        _ => None,
    }
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

/// The merge operator of every database: address values merge as [`AddrStats::merge`]
/// (sum of counts, earliest first, latest last), totals as sums. It is associative, as
/// SlateDB requires, and never fails on what this crate writes; a value of an unknown length
/// is an error, never a guess.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatsMerge;

impl StatsMerge {
    fn fold<'a>(
        key: &Bytes,
        values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Bytes, MergeOperatorError> {
        let bad = |what: &str| MergeOperatorError::Callback {
            message: format!("{what} under key of {} bytes", key.len()),
        };
        match key.first() {
            Some(&ADDR_TAG) => {
                let mut acc = AddrStats::default();
                for value in values {
                    acc.merge(&decode_stats(value).ok_or_else(|| bad("bad address value"))?);
                }
                Ok(Bytes::copy_from_slice(&encode_stats(&acc)))
            }
            Some(&COUNT_TAG) => {
                let mut total = 0u64;
                for value in values {
                    total += decode_u64(value).ok_or_else(|| bad("bad total value"))?;
                }
                Ok(Bytes::copy_from_slice(&total.to_le_bytes()))
            }
            _ => Err(bad("merge")),
        }
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
        if existing_value.is_none() && operands.is_empty() {
            return Err(MergeOperatorError::EmptyBatch);
        }
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

    #[test]
    fn keys_round_trip_and_sort_by_address() {
        let a = app(7);
        assert_eq!(
            parse_addr_key(&addr_key(&a, 0x0a000001)),
            Some((a, 0x0a000001))
        );
        assert_eq!(parse_count_key(&count_key(&a)), Some(a));
        assert!(addr_key(&a, 1) < addr_key(&a, 256));
        assert!(addr_key(&a, u32::MAX) < addr_key(&app(8), 0));
        assert!(addr_key(&a, 5).starts_with(&addr_prefix(&a)));
        assert_eq!(parse_addr_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_count_key(&addr_key(&a, 1)), None);
        assert_eq!(
            parse_addr_index_key(&addr_index_key(0x0a000001, &a)),
            Some((0x0a000001, a))
        );
        assert!(addr_index_key(1, &app(9)) < addr_index_key(2, &app(0)));
        assert_eq!(parse_addr_index_key(&addr_key(&a, 1)), None);
    }

    #[test]
    fn change_keys_round_trip_and_sort_by_epoch_flush_first() {
        let a = app(9);
        assert_eq!(parse_change_key(&flush_key(7)), Some((7, None)));
        assert_eq!(parse_change_key(&change_key(7, &a)), Some((7, Some(a))));
        assert!(flush_key(7)[..] < change_key(7, &app(0))[..]);
        assert!(change_key(7, &app(0xff))[..] < flush_key(8)[..]);
        assert!(change_key(255, &a)[..] < flush_key(256)[..]);
        assert_eq!(parse_change_key(&count_key(&a)), None);
        assert_eq!(parse_change_key(SHIPPED_EPOCH_KEY), None);
        assert_eq!(parse_change_key(&change_key(1, &a)[..20]), None);
    }

    #[test]
    fn merge_sums_counts_and_keeps_earliest_and_latest() {
        let key = Bytes::copy_from_slice(&addr_key(&app(1), 9));
        let v = |count, first, last| {
            Bytes::copy_from_slice(&encode_stats(&AddrStats {
                count,
                first_seen: first,
                last_seen: last,
            }))
        };
        let merged = StatsMerge
            .merge_batch(&key, Some(v(2, 100, 150)), &[v(3, 90, 120), v(1, 200, 200)])
            .unwrap();
        assert_eq!(
            decode_stats(&merged),
            Some(AddrStats {
                count: 6,
                first_seen: 90,
                last_seen: 200
            })
        );
        // Associative: pairwise gives the same.
        let left = StatsMerge
            .merge(&key, Some(v(2, 100, 150)), v(3, 90, 120))
            .unwrap();
        let both = StatsMerge.merge(&key, Some(left), v(1, 200, 200)).unwrap();
        assert_eq!(both, merged);

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
    }
}
