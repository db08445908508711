//! The datagram stream of a run: valid events sampled at random from the apps' addresses,
//! mixed with corrupted datagrams, built batch by batch into one reusable buffer.
//!
//! The stream depends only on the seed and the run's settings, never on timing, so the same
//! seed sends the same datagrams in the same order.

use ipevent_core::wire::{self, IpEvent, Reject};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::corrupt::{self, put_sha_field, put_valid, put_varint, CorruptKind, DATAGRAM_MAX_BYTES};
use crate::corrupt::{TAG_IP, TAG_UNKNOWN_VARINT};
use crate::scenario::{AddrSet, Apps, HOSTS_PER_BLOCK, MAX_ADDRS_PER_APP};

/// Most datagrams in one batch (one `sendmmsg` call); the kernel caps a call at 1024.
pub const BATCH_MAX_DATAGRAMS: usize = 1024;

/// The ways a valid event is encoded besides protoc's canonical form. The receiver must
/// accept them all (contract 1), so a share of the valid traffic uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The SHA in upper case (stored lower case).
    UpperSha,
    /// `ip` before `app_sha256`.
    FieldsReversed,
    /// An unknown varint field after the two known ones.
    UnknownField,
    /// The address as a six-byte, non-minimal varint.
    LongVarint,
    /// A decoy `ip` first; the last one wins.
    DuplicateField,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::UpperSha,
        Variant::FieldsReversed,
        Variant::UnknownField,
        Variant::LongVarint,
        Variant::DuplicateField,
    ];
}

/// What one datagram of a batch is, for the tally once the kernel has taken it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A valid event; `tracked` indexes [`Generator::tracked`] when the app is verified.
    Valid {
        /// Position of the app among the tracked apps.
        tracked: Option<u32>,
        /// Index of the address in the app's [`AddrSet`].
        addr: u8,
    },
    /// A corrupted datagram and the reason the receiver will refuse it.
    Corrupt {
        /// How it was broken.
        kind: CorruptKind,
        /// What `decode` says about it.
        reason: Reject,
    },
}

/// Up to [`BATCH_MAX_DATAGRAMS`] datagrams in one buffer allocated once.
pub struct Batch {
    buf: Vec<u8>,
    lens: Vec<u16>,
    slots: Vec<Slot>,
    len: usize,
}

impl Batch {
    /// Room for `capacity` datagrams of up to [`DATAGRAM_MAX_BYTES`] each.
    pub fn new(capacity: usize) -> Batch {
        assert!(
            (1..=BATCH_MAX_DATAGRAMS).contains(&capacity),
            "batch capacity"
        );
        Batch {
            buf: vec![0u8; capacity * DATAGRAM_MAX_BYTES],
            lens: vec![0; capacity],
            slots: vec![
                Slot::Valid {
                    tracked: None,
                    addr: 0
                };
                capacity
            ],
            len: 0,
        }
    }

    /// How many datagrams it can hold.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// How many datagrams it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// It holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Datagram `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        assert!(i < self.len);
        let start = i * DATAGRAM_MAX_BYTES;
        &self.buf[start..start + usize::from(self.lens[i])]
    }

    /// What datagram `i` is.
    pub fn slot(&self, i: usize) -> Slot {
        assert!(i < self.len);
        self.slots[i]
    }

    /// Points `refs[..len()]` at the datagrams, for `sendmmsg`, and returns that prefix.
    pub fn refs<'a, 'r>(&'a self, refs: &'r mut [&'a [u8]]) -> &'r [&'a [u8]] {
        for (i, r) in refs.iter_mut().take(self.len).enumerate() {
            *r = self.datagram(i);
        }
        &refs[..self.len]
    }
}

/// An app whose events are counted one by one so that its report can be checked.
#[derive(Clone, Debug)]
pub struct TrackedApp {
    /// The app's index in the run.
    pub index: u64,
    /// Its SHA.
    pub app: ipevent_core::AppSha,
    /// Its addresses.
    pub addrs: AddrSet,
    /// Hosts already put into a batch, one bit per host.
    hosts_generated: u16,
}

/// Settings of the stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// Seed of the whole run.
    pub seed: u64,
    /// Share of datagrams that are corrupted, 0 to 100.
    pub corrupt_pct: f64,
    /// Share of valid datagrams encoded in one of the non-canonical valid forms, 0 to 100.
    pub valid_variant_pct: f64,
}

/// Produces the stream of datagrams of one run.
pub struct Generator {
    rng: StdRng,
    apps: Apps,
    corrupt_fraction: f64,
    variant_fraction: f64,
    tracked: Vec<TrackedApp>,
}

impl Generator {
    /// A generator for `apps`, tracking the apps with indices `tracked` (any order, no
    /// repeats).
    pub fn new(apps: Apps, config: StreamConfig, tracked: &[u64]) -> Generator {
        assert!((0.0..=100.0).contains(&config.corrupt_pct), "corrupt_pct");
        assert!(
            (0.0..=100.0).contains(&config.valid_variant_pct),
            "valid_variant_pct"
        );
        let mut tracked: Vec<TrackedApp> = tracked
            .iter()
            .map(|&index| TrackedApp {
                index,
                app: apps.sha(index),
                addrs: apps.addrs(index),
                hosts_generated: 0,
            })
            .collect();
        tracked.sort_by_key(|t| t.index);
        tracked.dedup_by_key(|t| t.index);
        Generator {
            rng: StdRng::seed_from_u64(config.seed),
            apps,
            corrupt_fraction: config.corrupt_pct / 100.0,
            variant_fraction: config.valid_variant_pct / 100.0,
            tracked,
        }
    }

    /// The tracked apps, ordered by index; [`Slot::Valid::tracked`] indexes this.
    pub fn tracked(&self) -> &[TrackedApp] {
        &self.tracked
    }

    /// Replaces the batch's content with the next `n` datagrams (`n` at most its capacity).
    pub fn fill(&mut self, batch: &mut Batch, n: usize) {
        assert!(n <= batch.capacity());
        for i in 0..n {
            let start = i * DATAGRAM_MAX_BYTES;
            let out = &mut batch.buf[start..start + DATAGRAM_MAX_BYTES];
            let (len, slot) = self.next(out);
            batch.lens[i] = len as u16;
            batch.slots[i] = slot;
        }
        batch.len = n;
    }

    /// Writes the next datagram into `out`.
    fn next(&mut self, out: &mut [u8]) -> (usize, Slot) {
        let app = self.rng.gen_range(0..self.apps.count());
        let addrs = self.apps.addrs(app);
        if self.rng.gen_bool(self.corrupt_fraction) {
            let j = self.rng.gen_range(0..addrs.len());
            let event = IpEvent {
                app: self.apps.sha(app),
                ip: addrs.addr(j),
            };
            let kind = CorruptKind::ALL[self.rng.gen_range(0..CorruptKind::COUNT)];
            let (len, reason) = corrupt::corrupt(kind, &event, &mut self.rng, out);
            return (len, Slot::Corrupt { kind, reason });
        }
        let tracked = self.tracked.binary_search_by_key(&app, |t| t.index).ok();
        let j = match tracked {
            // Until two distinct hosts of a tracked app are out, send it only hosts: then
            // its own /28 always has the most distinct hosts, and the report's good list is
            // exactly the hosts sent however few events the app gets.
            Some(t) if self.tracked[t].hosts_generated.count_ones() < 2 => {
                self.rng.gen_range(0..HOSTS_PER_BLOCK)
            }
            _ => self.rng.gen_range(0..addrs.len()),
        };
        if let Some(t) = tracked {
            if AddrSet::is_host(j) {
                self.tracked[t].hosts_generated |= 1 << j;
            }
        }
        let event = IpEvent {
            app: self.apps.sha(app),
            ip: addrs.addr(j),
        };
        let variant = if self.variant_fraction > 0.0 && self.rng.gen_bool(self.variant_fraction) {
            Some(Variant::ALL[self.rng.gen_range(0..Variant::ALL.len())])
        } else {
            None
        };
        let len = encode_valid(&event, variant, &mut self.rng, out);
        // An encoding bug here would silently skew every expected count.
        assert_eq!(
            wire::decode(&out[..len]),
            Ok(event),
            "valid datagram ({variant:?}) does not decode"
        );
        debug_assert!(j < MAX_ADDRS_PER_APP);
        (
            len,
            Slot::Valid {
                tracked: tracked.map(|t| t as u32),
                addr: j as u8,
            },
        )
    }
}

/// Encodes `event` canonically or in `variant`'s form.
fn encode_valid(
    event: &IpEvent,
    variant: Option<Variant>,
    rng: &mut impl Rng,
    out: &mut [u8],
) -> usize {
    let Some(variant) = variant else {
        return put_valid(event, out);
    };
    match variant {
        Variant::UpperSha => {
            let len = put_valid(event, out);
            out[2..2 + wire::SHA_HEX_LEN].make_ascii_uppercase();
            len
        }
        Variant::FieldsReversed => {
            let mut pos = 0;
            out[pos] = TAG_IP;
            pos += 1;
            put_varint(out, &mut pos, u64::from(event.ip));
            put_sha_field(event, out, &mut pos);
            pos
        }
        Variant::UnknownField => {
            let mut pos = put_valid(event, out);
            out[pos] = TAG_UNKNOWN_VARINT;
            pos += 1;
            put_varint(out, &mut pos, rng.gen());
            pos
        }
        Variant::LongVarint => {
            let mut pos = 0;
            put_sha_field(event, out, &mut pos);
            out[pos] = TAG_IP;
            pos += 1;
            // Five 7-bit groups hold the 32 bits; a sixth, empty group makes it non-minimal.
            let mut value = event.ip;
            for _ in 0..5 {
                out[pos] = (value as u8 & 0x7f) | 0x80;
                value >>= 7;
                pos += 1;
            }
            out[pos] = 0;
            pos + 1
        }
        Variant::DuplicateField => {
            out[0] = TAG_IP;
            let mut pos = 1;
            put_varint(out, &mut pos, u64::from(rng.gen::<u32>()));
            let mut canonical = [0u8; wire::ENCODED_MAX_BYTES];
            let len = wire::encode(event, &mut canonical);
            out[pos..pos + len].copy_from_slice(&canonical[..len]);
            pos + len
        }
    }
}

/// What the kernel took, counted as the sender confirms each datagram.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Datagrams sent.
    pub sent: u64,
    /// Bytes sent (UDP payload).
    pub bytes: u64,
    /// Valid events sent, all apps.
    pub valid: u64,
    /// Corrupted datagrams sent.
    pub corrupted: u64,
    /// Corrupted datagrams per [`CorruptKind::index`].
    pub by_kind: [u64; CorruptKind::COUNT],
    /// Corrupted datagrams per [`Reject::index`]: what the receiver should count.
    pub by_reason: [u64; Reject::COUNT],
    /// Per tracked app, events sent per address index.
    pub tracked_sent: Vec<[u64; MAX_ADDRS_PER_APP]>,
}

impl Tally {
    /// An empty tally for `tracked_apps` tracked apps.
    pub fn new(tracked_apps: usize) -> Tally {
        Tally {
            sent: 0,
            bytes: 0,
            valid: 0,
            corrupted: 0,
            by_kind: [0; CorruptKind::COUNT],
            by_reason: [0; Reject::COUNT],
            tracked_sent: vec![[0; MAX_ADDRS_PER_APP]; tracked_apps],
        }
    }

    /// Counts one datagram the kernel took.
    #[inline]
    pub fn record(&mut self, slot: Slot, len: usize) {
        self.sent += 1;
        self.bytes += len as u64;
        match slot {
            Slot::Valid { tracked, addr } => {
                self.valid += 1;
                if let Some(t) = tracked {
                    self.tracked_sent[t as usize][usize::from(addr)] += 1;
                }
            }
            Slot::Corrupt { kind, reason } => {
                self.corrupted += 1;
                self.by_kind[kind.index()] += 1;
                self.by_reason[reason.index()] += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn config(seed: u64, corrupt_pct: f64) -> StreamConfig {
        StreamConfig {
            seed,
            corrupt_pct,
            valid_variant_pct: 20.0,
        }
    }

    #[test]
    fn every_valid_variant_decodes_to_the_event() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut out = [0u8; DATAGRAM_MAX_BYTES];
        for _ in 0..1000 {
            let event = IpEvent {
                app: ipevent_core::AppSha(rng.gen()),
                ip: rng.gen(),
            };
            for variant in Variant::ALL {
                let len = encode_valid(&event, Some(variant), &mut rng, &mut out);
                assert_eq!(wire::decode(&out[..len]), Ok(event), "{variant:?}");
            }
        }
    }

    #[test]
    fn the_stream_is_a_function_of_the_seed() {
        let apps = Apps::new(Scenario::Random { apps: 1000 }, 5);
        let run = |seed| {
            let mut generator = Generator::new(apps, config(seed, 30.0), &[1, 2]);
            let mut batch = Batch::new(64);
            let mut all = Vec::new();
            for _ in 0..10 {
                generator.fill(&mut batch, 64);
                for i in 0..batch.len() {
                    all.push(batch.datagram(i).to_vec());
                }
            }
            all
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn tallies_match_what_decode_says_about_each_datagram() {
        let apps = Apps::new(Scenario::Lookout, 77);
        let mut generator = Generator::new(apps, config(77, 40.0), &[0, 1, 2]);
        let mut tally = Tally::new(3);
        let mut batch = Batch::new(256);
        let mut valid_per_app = [0u64; 3];
        let mut reasons = [0u64; Reject::COUNT];
        for _ in 0..40 {
            generator.fill(&mut batch, 256);
            for i in 0..batch.len() {
                let bytes = batch.datagram(i);
                tally.record(batch.slot(i), bytes.len());
                match wire::decode(bytes) {
                    Ok(event) => {
                        let t = generator
                            .tracked()
                            .iter()
                            .position(|t| t.app == event.app)
                            .unwrap();
                        valid_per_app[t] += 1;
                        let Slot::Valid { tracked, addr } = batch.slot(i) else {
                            panic!("valid datagram tallied as corrupt")
                        };
                        assert_eq!(tracked, Some(t as u32));
                        assert_eq!(
                            generator.tracked()[t].addrs.addr(usize::from(addr)),
                            event.ip
                        );
                    }
                    Err(reason) => reasons[reason.index()] += 1,
                }
            }
        }
        assert_eq!(tally.sent, 40 * 256);
        assert_eq!(tally.by_reason, reasons);
        for (t, sent) in tally.tracked_sent.iter().enumerate() {
            assert_eq!(sent.iter().sum::<u64>(), valid_per_app[t]);
        }
        // 40 % of 10240 datagrams: every kind shows up.
        assert!(tally.by_kind.iter().all(|&n| n > 0), "{:?}", tally.by_kind);
        assert_eq!(tally.valid + tally.corrupted, tally.sent);
    }

    #[test]
    fn a_tracked_app_sends_two_hosts_before_any_outsider() {
        for seed in 0..200u64 {
            let apps = Apps::new(Scenario::Random { apps: 3 }, seed);
            let mut generator = Generator::new(apps, config(seed, 0.0), &[0, 1, 2]);
            let mut batch = Batch::new(32);
            generator.fill(&mut batch, 32);
            let mut hosts: [Vec<u8>; 3] = Default::default();
            for i in 0..batch.len() {
                let Slot::Valid {
                    tracked: Some(t),
                    addr,
                } = batch.slot(i)
                else {
                    panic!("untracked or corrupt slot with corrupt_pct 0")
                };
                let seen = &mut hosts[t as usize];
                if !AddrSet::is_host(usize::from(addr)) {
                    assert!(
                        seen.len() >= 2,
                        "seed {seed}: outsider after hosts {seen:?}"
                    );
                } else if !seen.contains(&addr) {
                    seen.push(addr);
                }
            }
        }
    }
}
