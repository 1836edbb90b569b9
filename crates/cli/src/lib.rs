//! pairvisor-cli (being built).
