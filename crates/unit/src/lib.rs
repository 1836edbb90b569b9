//! The unit layer: what turns two PMs (and an optional witness) into one
//! unit. Today: PM-to-PM health over two links with RTT measurement.
//! Leases, fencing, failover and maintenance workflows build on it and on
//! the replicated unit database (`pairvisor-unitdb`).

pub mod clock;
pub mod health;
pub mod lease;
pub mod service;
pub mod watchdog;

pub use clock::BootInstant;
pub use lease::{
    fence_partner, takeover_at, LeaseCheck, LeaseKeeper, LeaseStatus, PartnerFenced, VoterAnswer,
    VoterStatus,
};
pub use service::{PmAddresses, PmRecord, UnitConfig, UnitError, UnitService, UnitView};
