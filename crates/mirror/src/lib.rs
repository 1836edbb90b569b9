//! pairvisor-mirror (being built).
