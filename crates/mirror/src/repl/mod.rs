//! Replication between the two replicas of a volume: wire protocol,
//! authentication, and the primary's link to its partner.

pub mod link;
pub mod proto;
