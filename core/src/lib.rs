//! What every ipevent binary shares: the wire format ([`wire`]), the hash of an app file
//! ([`apk`]), the log block format ([`block`]), the store and its one reader and writer
//! ([`store`]), the receiver's journal ([`journal`]) and pending map ([`aggregate`]), the report
//! ([`report`]), the lookup by address ([`lookup`]), following the store for new bad
//! addresses ([`watch`]), the control channel ([`control`]), forgetting one app ([`forget`])
//! and finding the apps past retention ([`retention`]), the
//! receiver's counters ([`stats`]), sizing estimates ([`capacity`]), hex ([`hex`]), the
//! conformance vectors ([`testdata`]) and the batch socket calls ([`sys`]).
//!
//! There is one decoder, one classifier and one store reader; every binary uses these.
//!
//! Comments cite the contracts users rely on as "contract N": they are numbered in
//! ARCHITECTURE.md's invariants.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod aggregate;
pub mod apk;
pub mod block;
pub mod capacity;
pub mod control;
pub mod forget;
pub mod hex;
pub mod journal;
pub mod lookup;
pub mod privilege;
pub mod report;
pub mod retention;
pub mod stats;
pub mod store;
pub mod sys;
pub mod testdata;
pub mod watch;
pub mod wire;

pub use block::AddrStats;
pub use report::{classify, Report};
pub use store::DataDir;
pub use wire::{decode, AppSha, IpEvent, Reject};

/// The version all binaries report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default UDP listen address of the receiver (dual stack).
pub const DEFAULT_UDP_LISTEN: &str = "[::]:4002";
/// Default HTTP listen address of the API.
pub const DEFAULT_HTTP_LISTEN: &str = "[::]:4003";
/// Default data dir of every binary.
pub const DEFAULT_DATA_DIR: &str = "./ipevent-data";
