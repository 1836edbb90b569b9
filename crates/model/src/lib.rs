//! The Pairvisor domain model: the SPEC's states, tables and rules as pure,
//! synchronous code. No I/O and no clocks — time is always a parameter — so
//! every rule is tested by tables taken straight from the specification.

pub mod admission;
pub mod fencing;
pub mod mac;
pub mod migration;
pub mod mtbf;
pub mod names;
pub mod placement;
pub mod pm;
pub mod power;
pub mod roles;
pub mod sync_advice;
pub mod throttle;
pub mod vm;
