//! ipevent's store on S3-compatible object storage.
//!
//! Each receiver is the single writer of its own [SlateDB](https://slatedb.io) database at
//! `PREFIX/writers/<writer-id>/` in one bucket. Readers list `PREFIX/writers/`, open every
//! database read-only, scan the app's keys and merge them into the same per-address stats the
//! local tree's reader produces ([`ipevent_core::store::AppData`]), so the one classifier and
//! the one renderer print the same bytes.
//!
//! - [`codec`]: keys, values and the merge operator.
//! - [`Bucket`]: the connection (endpoint and credentials from the standard `AWS_*` variables
//!   only) and the read path ([`Bucket::read_app`], [`Bucket::list_apps`]).
//! - `changes`: what `watch --store` follows ([`Bucket`]'s
//!   [`Store::follow_changes`](ipevent_core::store::Store::follow_changes)): the apps each
//!   shipped flush changed, from the change keys the shipper writes with it.
//! - [`ShipDb`]: one writer's database: applies a flush's records and its epoch atomically.
//! - [`outbox`]: the receiver's local queue of flushes not yet shipped.
//! - [`shipper`]: the outbox a writer fills and the thread that ships it.
//! - [`Bucket::sync_all`], [`Bucket::reset`], [`Bucket::forget`]: read after write, reset
//!   and forgetting one app across hosts, through requests in the bucket that every
//!   receiver's shipper answers.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bucket;
mod changes;
mod cluster;
pub mod codec;
mod forget;
pub mod outbox;
mod outbox_writer;
mod ship;
pub mod shipper;

pub use bucket::{Bucket, StoreUrl};
pub use changes::LOOK_INTERVAL;
pub use cluster::{ClusterReset, ClusterSync, SyncRequest, ABANDONED_REQUEST};
pub use forget::{ClusterForget, MAX_APPS_PER_FORGET};
pub use ship::{ShipDb, CHANGE_HISTORY};

/// Errors of the object store path. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// `--store` is not `s3://BUCKET/PREFIX`.
    #[error("--store {0:?}: expected s3://BUCKET/PREFIX")]
    Url(String),
    /// The connection settings in the environment are incomplete or invalid.
    #[error("object store settings: {0}")]
    Config(String),
    /// A request to the object store failed.
    #[error("{action} {location}: {source}")]
    ObjectStore {
        /// What was being done.
        action: &'static str,
        /// The bucket path it was done to.
        location: String,
        /// The error.
        #[source]
        source: object_store::Error,
    },
    /// SlateDB failed.
    #[error("{action} database {location}: {source}")]
    Db {
        /// What was being done.
        action: &'static str,
        /// The database path.
        location: String,
        /// The error.
        #[source]
        source: slatedb::Error,
    },
    /// This writer was fenced: another process opened the same writer's database.
    #[error(
        "database {location} was taken over by another process with the same writer id; \
         this one stops shipping (give each receiver its own --writer-id)"
    )]
    Fenced {
        /// The database path.
        location: String,
    },
    /// Another data dir holds the lease on this writer id in the bucket.
    #[error(
        "writer id {writer_id} is in use in the bucket by another data dir ({holder}); \
         give this receiver another --writer-id, or remove {lease} if that receiver is gone for good"
    )]
    LeaseHeld {
        /// The writer id.
        writer_id: String,
        /// Who holds it (host and data dir, as the holder wrote it).
        holder: String,
        /// The lease object.
        lease: String,
    },
    /// A forget of the cluster holds this writer id's lease for a moment (it is removing an
    /// app from the database of a stopped writer): try again shortly.
    #[error("writer id {writer_id} is held for a moment by a forget of the cluster; trying again")]
    LeaseBusy {
        /// The writer id.
        writer_id: String,
    },
    /// A stored value is not what this build writes.
    #[error("database {location}: {what}")]
    Corrupt {
        /// The database path.
        location: String,
        /// What is wrong.
        what: String,
    },
    /// A local file operation failed.
    #[error(transparent)]
    Local(#[from] ipevent_core::store::StoreError),
}
