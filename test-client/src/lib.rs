//! `ipevent-test-client`: fires realistic traffic, including corrupted datagrams, at one or
//! many receivers and checks that the service reports exactly what was sent.
//!
//! - [`scenario`]: which apps exist and which addresses each talks to, derived from the seed.
//! - [`corrupt`]: datagrams broken in one named way each, never valid.
//! - [`generate`]: the datagram stream, built batch by batch in one reusable buffer.
//! - [`send`]: `sendmmsg` to the targets with retries, and the rate limiter.
//! - [`verify`]: the service's reports (through `ipevent-query` or the API) against the sends.
//! - [`run`]: one run from first datagram to summary.
//! - [`summary`]: the run's result, as JSON and as text.
//!
//! Every datagram is checked with [`ipevent_core::wire::decode`], the receiver's own decoder,
//! so the client's expectations and the receiver's verdicts come from one place.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod corrupt;
pub mod generate;
pub mod run;
pub mod scenario;
pub mod send;
pub mod summary;
pub mod verify;
