//! pairvisor-store (being built).
