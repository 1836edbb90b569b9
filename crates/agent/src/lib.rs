//! pairvisor-agent (being built).
