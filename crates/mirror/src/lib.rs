//! Pairvisor shared mirror: a synchronous replicated block device served to
//! QEMU over NBD (SPEC S1–S4, S9).
//!
//! * [`replica`] — one replica on disk: sparse data file, persistent dirty
//!   bitmap, metadata with generation identifiers and epoch.
//! * [`volume`] — the engine: primary/secondary roles, synchronous
//!   replication, degraded mode, resync, split brain, verify, statistics.
//! * [`nbd`] — the NBD server (and a small client for tests/benchmarks).
//! * [`repl`] — the authenticated replication protocol.
//! * [`control`] — the line-based JSON control protocol of `pv-mirror`.
//! * Pure logic with table-driven tests: [`genid`], [`region`],
//!   [`ratelimit`].
//!
//! See the crate's README.md for protocols and on-disk formats.

pub mod bufpool;
pub mod control;
pub mod genid;
pub mod locks;
pub mod lowat;
pub mod nbd;
pub mod ratelimit;
pub mod region;
pub mod repl;
pub mod replica;
pub mod sync;
pub mod vectored;
pub mod volume;

pub use replica::{CreateOptions, Decision, Replica};
pub use volume::{
    DegradedPredicate, Durability, PeerOutdater, Role, Status, Volume, VolumeOptions,
};
