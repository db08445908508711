//! Shipping to the bucket (`--store s3://...`): the outbox each flush fills and the shipper
//! thread, shared with the API (see [`ipevent_store_s3::shipper`]).

pub use ipevent_store_s3::shipper::*;
