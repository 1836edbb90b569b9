//! Live-migration convergence analysis (SPEC M2, M3, M4).
//!
//! Pre-copy migration resends pages the guest dirties while memory is being
//! copied. It can only finish when the link carries pages faster than the
//! guest dirties them, and when what is left can be sent within the allowed
//! downtime. This module turns QEMU's figures into a verdict with the
//! numbers, and into the remedies that apply.

use serde::{Deserialize, Serialize};

/// The figures QEMU reports during a migration (or the pre-flight
/// measurement), in plain units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MigrationFigures {
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Measured transfer rate, bytes per second.
    pub bandwidth_bps: f64,
    /// Pages dirtied per second by the guest.
    pub dirty_pages_per_sec: f64,
    /// Guest page size, bytes.
    pub page_size: u64,
    /// Maximum downtime allowed, milliseconds.
    pub max_downtime_ms: u64,
}

/// Whether the migration will finish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The remaining data already fits in the downtime: it will switch over.
    Converging {
        /// Seconds until switch-over, roughly.
        eta_secs: f64,
        /// Expected downtime, ms.
        expected_downtime_ms: f64,
    },
    /// The dirty rate exceeds the bandwidth: it will never finish as is.
    NotConverging {
        /// Dirty rate, bytes/s.
        dirty_rate_bps: f64,
        /// Bandwidth, bytes/s.
        bandwidth_bps: f64,
        /// A human explanation with the numbers.
        explanation: String,
    },
    /// Not enough data yet (no bandwidth measured).
    Unknown,
}

/// Computes the verdict (M2): converging iff the bandwidth exceeds
/// `dirty pages/s × page size`; the ETA models the geometric shrinking of
/// the remaining set until it fits in the downtime.
pub fn convergence(f: MigrationFigures) -> Verdict {
    if f.bandwidth_bps <= 0.0 {
        return Verdict::Unknown;
    }
    let dirty = f.dirty_pages_per_sec * f.page_size as f64;
    let downtime_budget = f.bandwidth_bps * f.max_downtime_ms as f64 / 1000.0;
    let expected_downtime_ms = f.remaining_bytes as f64 / f.bandwidth_bps * 1000.0;
    if f.remaining_bytes as f64 <= downtime_budget {
        return Verdict::Converging {
            eta_secs: 0.0,
            expected_downtime_ms,
        };
    }
    if dirty >= f.bandwidth_bps {
        return Verdict::NotConverging {
            dirty_rate_bps: dirty,
            bandwidth_bps: f.bandwidth_bps,
            explanation: format!(
                "the guest dirties {:.1} MB/s ({:.0} pages/s × {} B) but the link carries {:.1} MB/s: \
                 memory is dirtied faster than it is sent, so the migration will never finish. \
                 Raise the maximum downtime, throttle the guest (auto-converge), switch to \
                 post-copy, or pause the VM and finish",
                dirty / 1e6,
                f.dirty_pages_per_sec,
                f.page_size,
                f.bandwidth_bps / 1e6
            ),
        };
    }
    // Each round sends what remains while the guest dirties dirty/bw of it
    // again: remaining shrinks by the ratio r = dirty/bw per round.
    let r = dirty / f.bandwidth_bps;
    let mut remaining = f.remaining_bytes as f64;
    let mut eta = 0.0;
    let mut rounds = 0;
    while remaining > downtime_budget && rounds < 1000 {
        eta += remaining / f.bandwidth_bps;
        remaining *= r;
        rounds += 1;
    }
    Verdict::Converging {
        eta_secs: eta,
        expected_downtime_ms: remaining / f.bandwidth_bps * 1000.0,
    }
}

/// The dirty rate to judge a running migration by, in bytes per second.
///
/// QEMU's live `dirty-pages-rate` counts *distinct* pages dirtied per pass
/// over memory, so a guest that keeps rewriting a working set W is reported
/// at about W ÷ pass time — at most the bandwidth when passes are long. It
/// therefore hides exactly the guests that cannot converge. The pre-flight
/// measurement (`calc-dirty-rate` over a short window, M4) has no such bias,
/// so the larger of the two is used.
pub fn effective_dirty_rate_bps(
    live_pages_per_sec: f64,
    page_size: u64,
    preflight_bps: Option<f64>,
) -> f64 {
    let live = live_pages_per_sec * page_size as f64;
    live.max(preflight_bps.unwrap_or(0.0))
}

/// The smallest downtime (ms) that would let the migration finish now, if
/// raising the maximum downtime is acceptable (M3 remedy).
pub fn downtime_needed_ms(f: MigrationFigures) -> f64 {
    if f.bandwidth_bps <= 0.0 {
        return f64::INFINITY;
    }
    f.remaining_bytes as f64 / f.bandwidth_bps * 1000.0
}

/// A remedy for a migration that does not converge (M3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// Raise the allowed maximum downtime.
    RaiseDowntime,
    /// Throttle the guest's vCPUs (auto-converge).
    AutoConverge,
    /// Switch to post-copy: always finishes; the guest is slow until its
    /// pages arrive, and a link failure kills the VM.
    PostCopy,
    /// Pause the VM and finish as a non-live migration.
    PauseAndFinish,
}

/// Why post-copy is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCopyPolicy {
    /// The VM is marked critical: never risk it on post-copy.
    pub vm_critical: bool,
    /// The link had failures recently.
    pub link_unstable: bool,
    /// Asked by a policy rather than an administrator.
    pub automatic: bool,
}

/// Checks whether post-copy may be used (M3: "never automatic when the VM is
/// marked critical or the link is unstable").
pub fn check_post_copy(p: PostCopyPolicy) -> Result<(), String> {
    if p.vm_critical {
        return Err(
            "post-copy is refused: the VM is marked critical, and a link failure during \
                    post-copy would kill it; use auto-converge or pause and finish"
                .into(),
        );
    }
    if p.link_unstable && p.automatic {
        return Err(
            "post-copy is never chosen automatically while the link is unstable; an \
                    administrator may still choose it"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(remaining_mb: f64, bw_mbps: f64, dirty_pages: f64) -> MigrationFigures {
        MigrationFigures {
            remaining_bytes: (remaining_mb * 1e6) as u64,
            bandwidth_bps: bw_mbps * 1e6,
            dirty_pages_per_sec: dirty_pages,
            page_size: 4096,
            max_downtime_ms: 300,
        }
    }

    #[test]
    fn verdict_table() {
        // (remaining MB, bandwidth MB/s, dirty pages/s, converges?)
        let cases = [
            (10.0, 100.0, 0.0, true),      // 10 MB at 100 MB/s = 100 ms ≤ 300 ms
            (500.0, 100.0, 1000.0, true),  // dirty 4 MB/s ≪ 100 MB/s
            (500.0, 10.0, 5000.0, false),  // dirty 20 MB/s > 10 MB/s
            (500.0, 20.48, 5000.0, false), // dirty == bandwidth: never
        ];
        for (rem, bw, dirty, converges) in cases {
            let v = convergence(fig(rem, bw, dirty));
            match (&v, converges) {
                (Verdict::Converging { .. }, true) | (Verdict::NotConverging { .. }, false) => {}
                _ => panic!("{rem} MB, {bw} MB/s, {dirty} p/s: {v:?}"),
            }
        }
    }

    #[test]
    fn not_converging_explains_with_numbers() {
        let v = convergence(fig(500.0, 10.0, 5000.0));
        let Verdict::NotConverging { explanation, .. } = v else {
            panic!()
        };
        assert!(explanation.contains("20.5 MB/s"), "{explanation}");
        assert!(explanation.contains("10.0 MB/s"), "{explanation}");
        assert!(explanation.contains("post-copy"));
    }

    #[test]
    fn eta_shrinks_geometrically() {
        let Verdict::Converging {
            eta_secs,
            expected_downtime_ms,
        } = convergence(fig(1000.0, 100.0, 12207.0))
        else {
            panic!()
        };
        // r = 0.5: 10 s + 5 s + 2.5 s + ... until ≤ 30 MB remain.
        assert!((19.0..20.0).contains(&eta_secs), "{eta_secs}");
        assert!(expected_downtime_ms <= 300.0);
        assert_eq!(convergence(fig(1.0, 0.0, 0.0)), Verdict::Unknown);
        assert!((downtime_needed_ms(fig(50.0, 100.0, 0.0)) - 500.0).abs() < 1e-6);
    }

    #[test]
    fn effective_rate_takes_the_unbiased_preflight_when_larger() {
        // Live: 491 pages/s × 4 KiB ≈ 2 MB/s (saturated); pre-flight 9 MB/s.
        let r = effective_dirty_rate_bps(491.0, 4096, Some(9e6));
        assert_eq!(r, 9e6);
        assert_eq!(
            effective_dirty_rate_bps(5000.0, 4096, Some(1e6)),
            5000.0 * 4096.0
        );
        assert_eq!(effective_dirty_rate_bps(10.0, 4096, None), 40960.0);
        let f = MigrationFigures {
            remaining_bytes: 71_602_176,
            bandwidth_bps: 4_022_100.0,
            dirty_pages_per_sec: r / 4096.0,
            page_size: 4096,
            max_downtime_ms: 300,
        };
        assert!(matches!(convergence(f), Verdict::NotConverging { .. }));
    }

    #[test]
    fn post_copy_policy() {
        let ok = PostCopyPolicy {
            vm_critical: false,
            link_unstable: false,
            automatic: true,
        };
        assert!(check_post_copy(ok).is_ok());
        assert!(check_post_copy(PostCopyPolicy {
            vm_critical: true,
            automatic: false,
            ..ok
        })
        .is_err());
        assert!(check_post_copy(PostCopyPolicy {
            link_unstable: true,
            ..ok
        })
        .is_err());
        assert!(check_post_copy(PostCopyPolicy {
            link_unstable: true,
            automatic: false,
            ..ok
        })
        .is_ok());
    }
}
