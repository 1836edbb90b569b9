//! pairvisor-model (being built).
