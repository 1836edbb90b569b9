//! pairvisor-api (being built).
