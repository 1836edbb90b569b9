//! pairvisor-hypervisor (being built).
