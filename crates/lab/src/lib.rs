//! The lab: a unit on one machine for demos, tests and benchmarks.
//!
//! As root, each PM and the witness get their own network namespace, so that
//! links can really be cut:
//!
//! ```text
//!   ns <p>-a (pm-a)                    ns <p>-b (pm-b)
//!     <p>ap 10.<n>.1.1  ── private ──  <p>bp 10.<n>.1.2      (direct veth pair)
//!     <p>ab 10.<n>.2.1 ─┐           ┌─ <p>bb 10.<n>.2.2
//!                       └─ bridge <p>br 10.<n>.2.254 (host side) ─┐
//!   ns <p>-w (witness)                                            │
//!     <p>wb 10.<n>.2.3 ───────────────────────────────────────────┘
//! ```
//!
//! The private link carries PM-to-PM heartbeats and replication; the
//! business network carries the management API, the second heartbeat and the
//! witness. The host reaches every API through the bridge. `<p>` is a short
//! prefix so that several labs (parallel tests) can coexist, and `<n>`
//! (100..=199) keeps their address ranges apart; the addresses exist only
//! inside namespaces the lab made.

pub mod bench;
pub mod lab;
pub mod netns;

pub use bench::BenchOptions;
pub use lab::{LabError, LabState, UpOptions};
pub use netns::{Link, NetError, Topology};
