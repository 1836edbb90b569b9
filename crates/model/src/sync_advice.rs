//! SPEC S9 — sync link advice.
//!
//! Replicating a write costs one round trip on the sync link. Whether a
//! faster sync link would help a storage group or a VM depends on how much
//! it writes and how large its writes are:
//!
//! | measure | unlikely | maybe | likely |
//! |---|---|---|---|
//! | write throughput (total) | < 35 MB/s | 35–50 MB/s | > 50 MB/s |
//! | average write size | < 8 KiB | 8–16 KiB | > 16 KiB |
//!
//! MB is 10^6 bytes, KiB is 1024 bytes; the bounds belong to "maybe".
//! The overall advice is the less optimistic of the two classifications:
//! a faster link only helps when the workload both moves a lot of data and
//! does so in writes large enough for bandwidth (not latency) to dominate.
//! Reads never cross the link and play no part.

use serde::{Deserialize, Serialize};

/// How likely a faster sync link is to speed up the measured writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Likelihood {
    /// A faster link is unlikely to help.
    Unlikely,
    /// A faster link may help.
    Maybe,
    /// A faster link is likely to help (about 2x with 10 Gb over 1 Gb).
    Likely,
}

/// Lower bound (inclusive) of "maybe" for write throughput, bytes/s.
pub const THROUGHPUT_MAYBE: f64 = 35_000_000.0;
/// Upper bound (inclusive) of "maybe" for write throughput, bytes/s.
pub const THROUGHPUT_LIKELY: f64 = 50_000_000.0;
/// Lower bound (inclusive) of "maybe" for the average write size, bytes.
pub const WRITE_SIZE_MAYBE: f64 = 8.0 * 1024.0;
/// Upper bound (inclusive) of "maybe" for the average write size, bytes.
pub const WRITE_SIZE_LIKELY: f64 = 16.0 * 1024.0;

fn classify(value: f64, maybe_from: f64, likely_above: f64) -> Likelihood {
    if value.is_nan() || value < maybe_from {
        Likelihood::Unlikely
    } else if value <= likely_above {
        Likelihood::Maybe
    } else {
        Likelihood::Likely
    }
}

/// Classifies a total write throughput in bytes per second.
pub fn classify_throughput(bytes_per_sec: f64) -> Likelihood {
    classify(bytes_per_sec, THROUGHPUT_MAYBE, THROUGHPUT_LIKELY)
}

/// Classifies an average write size in bytes.
pub fn classify_write_size(avg_bytes: f64) -> Likelihood {
    classify(avg_bytes, WRITE_SIZE_MAYBE, WRITE_SIZE_LIKELY)
}

/// The S9 advice for one storage group or VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncLinkAdvice {
    /// Classification by write throughput.
    pub by_throughput: Likelihood,
    /// Classification by average write size.
    pub by_write_size: Likelihood,
    /// The overall advice: the less optimistic of the two.
    pub overall: Likelihood,
}

/// Computes the S9 advice from a measured write throughput (bytes/s) and
/// average write size (bytes). With no writes at all (`avg_write_bytes`
/// of 0) the advice is "unlikely".
pub fn advise(write_bytes_per_sec: f64, avg_write_bytes: f64) -> SyncLinkAdvice {
    let by_throughput = classify_throughput(write_bytes_per_sec);
    let by_write_size = classify_write_size(avg_write_bytes);
    SyncLinkAdvice {
        by_throughput,
        by_write_size,
        overall: by_throughput.min(by_write_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Likelihood::*;

    const MB: f64 = 1_000_000.0;
    const KIB: f64 = 1024.0;

    #[test]
    fn throughput_table() {
        let table = [
            (0.0, Unlikely),
            (10.0 * MB, Unlikely),
            (34.999 * MB, Unlikely),
            (35.0 * MB, Maybe),
            (42.0 * MB, Maybe),
            (50.0 * MB, Maybe),
            (50.001 * MB, Likely),
            (120.0 * MB, Likely),
            (f64::NAN, Unlikely),
        ];
        for (value, expected) in table {
            assert_eq!(classify_throughput(value), expected, "{value} B/s");
        }
    }

    #[test]
    fn write_size_table() {
        let table = [
            (0.0, Unlikely),
            (512.0, Unlikely),
            (4.0 * KIB, Unlikely),
            (8.0 * KIB - 1.0, Unlikely),
            (8.0 * KIB, Maybe),
            (12.0 * KIB, Maybe),
            (16.0 * KIB, Maybe),
            (16.0 * KIB + 1.0, Likely),
            (1024.0 * KIB, Likely),
        ];
        for (value, expected) in table {
            assert_eq!(classify_write_size(value), expected, "{value} B");
        }
    }

    #[test]
    fn overall_is_the_less_optimistic() {
        let table = [
            // (throughput, avg size) -> overall
            (100.0 * MB, 64.0 * KIB, Likely),
            (100.0 * MB, 4.0 * KIB, Unlikely),
            (10.0 * MB, 1024.0 * KIB, Unlikely),
            (40.0 * MB, 64.0 * KIB, Maybe),
            (100.0 * MB, 12.0 * KIB, Maybe),
            (40.0 * MB, 12.0 * KIB, Maybe),
            (0.0, 0.0, Unlikely),
        ];
        for (tp, size, expected) in table {
            let a = advise(tp, size);
            assert_eq!(a.overall, expected, "{tp} B/s, {size} B");
            assert_eq!(a.by_throughput, classify_throughput(tp));
            assert_eq!(a.by_write_size, classify_write_size(size));
        }
    }

    #[test]
    fn serializes_snake_case() {
        let a = advise(60.0 * MB, 32.0 * KIB);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"by_throughput":"likely","by_write_size":"likely","overall":"likely"}"#
        );
    }
}
