//! Which apps talked to an address (or to any address of a CIDR block), and whether it is
//! bad for each: `ipevent-query ip` and `GET /ips/:addr`.
//!
//! The store names the apps that may hold a matching address ([`Store::apps_with_address`]:
//! the file tree's address index, [`crate::store::addr_index`]); the lookup reads each of
//! them through the one reader and classifies it with the one classifier, keeping the apps
//! that do hold one. A store without an index for some of its data makes it read every
//! app. `bench/` records what it costs.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::Serialize;

use crate::report::{classify, rfc3339};
use crate::store::{Store, StoreError};
use crate::wire::AppSha;

/// An IPv4 address or CIDR block: `185.220.101.7` or `185.220.101.0/24`. Bits of the
/// address past the prefix are ignored (`10.0.0.7/24` is `10.0.0.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The first address of the block.
    pub net: u32,
    /// The prefix length, 0 to 32 (32 for a single address).
    pub prefix: u8,
}

/// Why text is not an address or CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 address or CIDR block (a.b.c.d or a.b.c.d/0-32)")]
pub struct CidrError(pub String);

impl Cidr {
    /// The mask of the prefix.
    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The first and last address of the block.
    pub fn range(self) -> (u32, u32) {
        (self.net, self.net | !self.mask())
    }

    /// Whether `ip` lies in the block.
    pub fn contains(self, ip: u32) -> bool {
        ip & self.mask() == self.net
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(text.to_string());
        let (addr, prefix) = match text.split_once('/') {
            None => (text, 32),
            Some((addr, prefix)) => {
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                (addr, prefix.parse::<u8>().map_err(|_| bad())?)
            }
        };
        if prefix > 32 {
            return Err(bad());
        }
        let ip = u32::from(addr.parse::<Ipv4Addr>().map_err(|_| bad())?);
        let mut cidr = Cidr { net: ip, prefix };
        cidr.net = ip & cidr.mask();
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 32 {
            write!(f, "{}", Ipv4Addr::from(self.net))
        } else {
            write!(f, "{}/{}", Ipv4Addr::from(self.net), self.prefix)
        }
    }
}

/// One app that talked to the address (or block).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppHit {
    /// The app.
    pub app_sha256: String,
    /// Its events to the matching addresses.
    pub count: u64,
    /// Whether its report classifies every matching address as good.
    pub good: bool,
    /// Earliest arrival at a matching address (RFC 3339, UTC).
    pub first_seen: String,
    /// Latest arrival at a matching address (RFC 3339, UTC).
    pub last_seen: String,
}

/// The answer: the address or block asked about and the apps, most events first (ties by
/// SHA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddressReport {
    /// The address, or the block as `net/prefix`.
    pub ip: String,
    /// The apps that talked to it.
    pub apps: Vec<AppHit>,
}

/// What a lookup found, and the apps it could not read (with why), which it left out.
#[derive(Debug)]
pub struct Lookup {
    /// The answer.
    pub report: AddressReport,
    /// Apps that could not be read, left out of the answer.
    pub unreadable: Vec<(AppSha, String)>,
}

/// Every app of `store` with an address in `cidr`, classified by its full report.
pub fn apps_by_address(store: &(impl Store + ?Sized), cidr: Cidr) -> Result<Lookup, StoreError> {
    let candidates = match store.apps_with_address(cidr)? {
        Some(mut apps) => {
            apps.sort_unstable();
            apps.dedup();
            apps
        }
        None => store.list_apps()?.into_iter().map(|l| l.app).collect(),
    };
    let mut hits = Vec::new();
    let mut unreadable = Vec::new();
    store.read_apps(&candidates, &mut |app, read| match read {
        Ok(Some(data)) => hits.extend(hit(app, &data.addrs, cidr)),
        Ok(None) => {}
        Err(e) => unreadable.push((*app, e.to_string())),
    })?;
    hits.sort_by(|a: &AppHit, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.app_sha256.cmp(&b.app_sha256))
    });
    Ok(Lookup {
        report: AddressReport {
            ip: cidr.to_string(),
            apps: hits,
        },
        unreadable,
    })
}

/// The app's hit for `cidr`, if any of its addresses lies in it.
fn hit(app: &AppSha, addrs: &[(u32, crate::AddrStats)], cidr: Cidr) -> Option<AppHit> {
    let matching: Vec<_> = addrs.iter().filter(|(ip, _)| cidr.contains(*ip)).collect();
    if matching.is_empty() {
        return None;
    }
    let report = classify(addrs);
    Some(AppHit {
        app_sha256: app.to_hex(),
        count: matching.iter().map(|(_, s)| s.count).sum(),
        good: matching
            .iter()
            .all(|(ip, _)| report.good.binary_search(ip).is_ok()),
        first_seen: rfc3339(matching.iter().map(|(_, s)| s.first_seen).min()?),
        last_seen: rfc3339(matching.iter().map(|(_, s)| s.last_seen).max()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_blocks() {
        let one: Cidr = "185.220.101.7".parse().unwrap();
        assert_eq!(one.to_string(), "185.220.101.7");
        assert!(one.contains(u32::from(Ipv4Addr::new(185, 220, 101, 7))));
        assert!(!one.contains(u32::from(Ipv4Addr::new(185, 220, 101, 8))));
        let block: Cidr = "185.220.101.7/24".parse().unwrap();
        assert_eq!(block.to_string(), "185.220.101.0/24");
        assert!(block.contains(u32::from(Ipv4Addr::new(185, 220, 101, 255))));
        assert!(!block.contains(u32::from(Ipv4Addr::new(185, 220, 102, 0))));
        let all: Cidr = "1.2.3.4/0".parse().unwrap();
        assert_eq!(all.to_string(), "0.0.0.0/0");
        assert!(all.contains(u32::MAX));
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4/",
            "1.2.3.4/33",
            "1.2.3.4/+1",
            "x/8",
            "1.2.3.4/8/8",
            "::1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
