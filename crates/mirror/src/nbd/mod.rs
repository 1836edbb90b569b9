//! NBD (Network Block Device) protocol: the fixed newstyle handshake and the
//! transmission phase, as specified in the NBD project's `doc/proto.md`.
//!
//! [`server`] exports a [`crate::volume::Volume`] to QEMU and other clients;
//! [`client`] is a small pipelining client used by tests and the benchmark.

pub mod client;
pub mod proto;
pub mod server;
