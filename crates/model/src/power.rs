//! Power: the UPS battery calculator (SPEC P2) and link latency advice (U7).

/// Minutes of UPS needed: 2 (ride through) + 3 (shut down VMs) + 2 (shut
/// down PMs) + total VM memory in GiB ÷ 2 (migration), rounded up.
pub fn battery_minutes(total_vm_memory_mib: u64) -> u64 {
    let gib = total_vm_memory_mib.div_ceil(1024);
    2 + 3 + 2 + gib.div_ceil(2)
}

/// U7: the private and sync links must stay below 10 ms round trip.
pub const MAX_LINK_RTT_MS: f64 = 10.0;

/// The U7 warning for a measured round-trip time, if it applies.
pub fn rtt_warning(link: &str, rtt_ms: f64) -> Option<String> {
    (rtt_ms > MAX_LINK_RTT_MS).then(|| {
        format!(
            "link '{link}' round trip is {rtt_ms:.1} ms, above the {MAX_LINK_RTT_MS} ms the unit \
             needs (about 1 ms per 100 miles of fibre and per non-routed switch): writes and \
             migrations will be slow; shorten the path or use a faster link"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn battery_table() {
        // SPEC P2's example: 8 GiB of VMs → 2+3+2+4 = 11 min.
        for (mib, minutes) in [(8192, 11), (0, 7), (1024, 8), (3 * 1024, 9), (8193, 12)] {
            assert_eq!(battery_minutes(mib), minutes, "{mib} MiB");
        }
    }

    #[test]
    fn rtt_table() {
        assert!(rtt_warning("private", 0.4).is_none());
        assert!(rtt_warning("private", 10.0).is_none());
        assert!(rtt_warning("sync", 10.5).unwrap().contains("10.5 ms"));
    }
}
