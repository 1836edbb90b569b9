//! Pairvisor's unit database (see README.md).

pub mod logic;
pub mod storage;
pub mod tls;
pub mod types;

pub use types::*;
