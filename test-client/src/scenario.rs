//! Which apps exist in a run and which addresses each one talks to.
//!
//! Nothing here is stored per app: an app's SHA, its /28 and its outsiders are derived from
//! the run's seed and the app's index, so a run over a million apps needs no more memory than
//! a run over three, and the same seed always describes the same apps.

use std::fmt;
use std::net::Ipv4Addr;

use ipevent_core::AppSha;

/// Host addresses of a /28 (`.1` to `.14`; `.0` and `.15` are network and broadcast).
pub const HOSTS_PER_BLOCK: usize = 14;

/// Most addresses outside its /28 that one app talks to.
pub const MAX_OUTSIDERS: usize = 10;

/// Most distinct addresses one app talks to.
pub const MAX_ADDRS_PER_APP: usize = HOSTS_PER_BLOCK + MAX_OUTSIDERS;

/// Apps in the `lookout` scenario: one app and two more that send to the same addresses.
pub const LOOKOUT_APPS: u64 = 3;

/// Mask of a /28 network.
const BLOCK_MASK: u32 = !0xf;

// Domains keep the values derived from one seed independent of each other.
const DOMAIN_SHA: u64 = 0x5348_4132_3536_0001;
const DOMAIN_ADDRS: u64 = 0x4144_4452_5300_0002;

/// SplitMix64's finaliser: a bijective, well-mixing step, enough to derive independent
/// pseudo-random values from (seed, index) without keeping any state.
#[inline]
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A value derived from the seed, a domain and two keys.
#[inline]
fn derive(seed: u64, domain: u64, a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ domain) ^ a) ^ b)
}

/// The addresses one app talks to: the 14 hosts of its /28, then 1 to [`MAX_OUTSIDERS`]
/// addresses outside it. Index `j` in `0..len()` names one of them: hosts first.
///
/// Every outsider lies in its own /28, different from the app's, so that an outsider can
/// never make another block outweigh the app's own (contract 2 picks the block with the most
/// distinct hosts): what the app sends to its /28 is good and every outsider is bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrSet {
    /// Network address of the app's /28.
    pub block: u32,
    outsiders: [u32; MAX_OUTSIDERS],
    outsider_count: u8,
}

impl AddrSet {
    /// The address set with key `key` under `seed`.
    pub fn derive(seed: u64, key: u64) -> AddrSet {
        let h = derive(seed, DOMAIN_ADDRS, key, 0);
        // A first octet of 1..=223 other than 127: unicast addresses that look like the
        // internet rather than "this host" or multicast.
        let mut first_octet = 1 + (h % 223) as u32;
        if first_octet == 127 {
            first_octet = 128;
        }
        let low = ((h >> 8) as u32) & 0x00ff_fff0;
        let block = (first_octet << 24) | low;
        let outsider_count = 1 + ((h >> 40) % MAX_OUTSIDERS as u64) as u8;
        // Outsider j lies in the /28 `block + step * (j + 1)` (counted in /28s). An odd step
        // makes these ten multiples distinct and non-zero modulo 2^28, hence ten distinct
        // blocks, none of them the app's.
        let h2 = derive(seed, DOMAIN_ADDRS, key, 1);
        let step = (h2 as u32 | 1) & 0x0fff_ffff;
        let nibbles = derive(seed, DOMAIN_ADDRS, key, 2);
        let mut outsiders = [0u32; MAX_OUTSIDERS];
        for (j, slot) in outsiders.iter_mut().enumerate() {
            let offset = step.wrapping_mul(j as u32 + 1) & 0x0fff_ffff;
            let other_block = ((block >> 4).wrapping_add(offset) & 0x0fff_ffff) << 4;
            let low_nibble = ((nibbles >> (4 * j)) & 0xf) as u32;
            *slot = other_block | low_nibble;
        }
        AddrSet {
            block,
            outsiders,
            outsider_count,
        }
    }

    /// How many addresses: 14 hosts plus the outsiders.
    pub fn len(&self) -> usize {
        HOSTS_PER_BLOCK + usize::from(self.outsider_count)
    }

    /// Never empty (there are always 14 hosts); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of outsiders.
    pub fn outsider_count(&self) -> usize {
        usize::from(self.outsider_count)
    }

    /// Address `j` (`j < len()`).
    #[inline]
    pub fn addr(&self, j: usize) -> u32 {
        if j < HOSTS_PER_BLOCK {
            self.block + 1 + j as u32
        } else {
            self.outsiders[j - HOSTS_PER_BLOCK]
        }
    }

    /// Address `j` is one of the 14 hosts of the app's /28.
    #[inline]
    pub fn is_host(j: usize) -> bool {
        j < HOSTS_PER_BLOCK
    }

    /// The /28 as `a.b.c.d/28`.
    pub fn block_cidr(&self) -> String {
        format!("{}/28", Ipv4Addr::from(self.block))
    }
}

/// Which apps a run sends for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Three apps sending to the same /28 and outsiders.
    Lookout,
    /// `apps` apps, each with its own /28 and outsiders.
    Random {
        /// Number of apps.
        apps: u64,
    },
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Lookout => f.write_str("lookout"),
            Scenario::Random { .. } => f.write_str("random"),
        }
    }
}

/// The apps of one run, derived on demand from the seed.
#[derive(Clone, Copy, Debug)]
pub struct Apps {
    seed: u64,
    scenario: Scenario,
    /// The lookout scenario's one address set, derived once.
    shared: AddrSet,
}

impl Apps {
    /// The apps of `scenario` under `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Apps {
        assert!(
            !matches!(scenario, Scenario::Random { apps: 0 }),
            "a random scenario needs at least one app"
        );
        Apps {
            seed,
            scenario,
            shared: AddrSet::derive(seed, u64::MAX),
        }
    }

    /// The scenario.
    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// Number of apps.
    pub fn count(&self) -> u64 {
        match self.scenario {
            Scenario::Lookout => LOOKOUT_APPS,
            Scenario::Random { apps } => apps,
        }
    }

    /// The SHA of app `index`: 32 bytes derived from the seed, so every seed makes new apps.
    #[inline]
    pub fn sha(&self, index: u64) -> AppSha {
        let mut bytes = [0u8; 32];
        for (w, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&derive(self.seed, DOMAIN_SHA, index, w as u64).to_le_bytes());
        }
        AppSha(bytes)
    }

    /// The addresses app `index` talks to.
    #[inline]
    pub fn addrs(&self, index: u64) -> AddrSet {
        match self.scenario {
            Scenario::Lookout => self.shared,
            Scenario::Random { .. } => AddrSet::derive(self.seed, index),
        }
    }
}

/// True when `ip` is in the /28 whose network address is `block`.
pub fn in_block(ip: u32, block: u32) -> bool {
    ip & BLOCK_MASK == block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outsiders_are_outside_and_in_distinct_blocks() {
        for seed in 0..200u64 {
            for key in 0..50u64 {
                let set = AddrSet::derive(seed, key);
                assert!((1..=MAX_OUTSIDERS).contains(&set.outsider_count()));
                assert_eq!(set.block & 0xf, 0);
                let mut blocks = vec![set.block];
                for j in 0..set.len() {
                    let ip = set.addr(j);
                    if AddrSet::is_host(j) {
                        assert!(in_block(ip, set.block));
                        assert!(matches!(ip & 0xf, 1..=14));
                    } else {
                        assert!(
                            !blocks.contains(&(ip & BLOCK_MASK)),
                            "seed {seed} key {key} j {j}"
                        );
                        blocks.push(ip & BLOCK_MASK);
                    }
                }
            }
        }
    }

    #[test]
    fn apps_are_stable_per_seed_and_differ_across_seeds() {
        let a = Apps::new(Scenario::Random { apps: 1_000_000 }, 7);
        let b = Apps::new(Scenario::Random { apps: 1_000_000 }, 7);
        let c = Apps::new(Scenario::Random { apps: 1_000_000 }, 8);
        assert_eq!(a.sha(999_999), b.sha(999_999));
        assert_eq!(a.addrs(12), b.addrs(12));
        assert_ne!(a.sha(0), c.sha(0));
        assert_ne!(a.sha(0), a.sha(1));
        assert_ne!(a.addrs(0), a.addrs(1));
    }

    #[test]
    fn lookout_apps_share_addresses_but_not_shas() {
        let apps = Apps::new(Scenario::Lookout, 3);
        assert_eq!(apps.count(), 3);
        assert_eq!(apps.addrs(0), apps.addrs(2));
        assert_ne!(apps.sha(0), apps.sha(1));
        assert_ne!(apps.sha(1), apps.sha(2));
    }
}
