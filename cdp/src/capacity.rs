//! Link sizing for asynchronous replication: the seed's formula
//! `Z = 1.2 × SUM × 8 / (RPO − SUM / Y)` Mbit/s, where SUM is the MB
//! written per RPO period and Y the cache's write speed in MB/s: the
//! period's data must cross the link in the part of the period not spent
//! writing it to the cache, with 20 % headroom.

/// Why no bandwidth achieves the RPO.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum CapacityError {
    /// Writing one period's data to the cache takes the whole period or
    /// longer (RPO − SUM/Y ≤ 0): a faster cache or a longer RPO is needed.
    #[error("RPO {rpo_s} s too short: the cache needs {cache_s} s to absorb one period")]
    RpoTooShort {
        /// The RPO.
        rpo_s: f64,
        /// SUM / Y.
        cache_s: f64,
    },
    /// A negative, zero or non-finite input.
    #[error("Inputs must be positive and finite")]
    Input,
}

/// Required link bandwidth in Mbit/s for `sum_mb` MB written per RPO of
/// `rpo_s` seconds with a cache writing `cache_mb_s` MB/s.
pub fn required_mbit_s(sum_mb: f64, rpo_s: f64, cache_mb_s: f64) -> Result<f64, CapacityError> {
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if !ok(sum_mb) || !ok(rpo_s) || !ok(cache_mb_s) || rpo_s == 0.0 || cache_mb_s == 0.0 {
        return Err(CapacityError::Input);
    }
    let cache_s = sum_mb / cache_mb_s;
    let window = rpo_s - cache_s;
    if window <= 0.0 {
        return Err(CapacityError::RpoTooShort { rpo_s, cache_s });
    }
    Ok(1.2 * sum_mb * 8.0 / window)
}

/// The seed's journal sizing rule: average write rate × 3600 × retention
/// hours, in MB.
pub fn journal_mb(avg_write_mb_s: f64, retention_hours: f64) -> f64 {
    avg_write_mb_s * 3600.0 * retention_hours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_hand_computation() {
        // 300 MB per 30 s period, cache at 100 MB/s: 3 s to absorb,
        // 27 s to ship: 1.2 × 2400 / 27 ≈ 106.67 Mbit/s.
        let z = required_mbit_s(300.0, 30.0, 100.0).unwrap();
        assert!((z - 1.2 * 2400.0 / 27.0).abs() < 1e-9);
        // Nothing written: no bandwidth needed.
        assert_eq!(required_mbit_s(0.0, 1.0, 100.0).unwrap(), 0.0);
        assert_eq!(journal_mb(10.0, 2.0), 72_000.0);
    }

    #[test]
    fn impossible_rpo_and_bad_input_are_errors() {
        assert_eq!(
            required_mbit_s(100.0, 1.0, 100.0),
            Err(CapacityError::RpoTooShort {
                rpo_s: 1.0,
                cache_s: 1.0
            })
        );
        assert!(matches!(
            required_mbit_s(500.0, 1.0, 100.0),
            Err(CapacityError::RpoTooShort { .. })
        ));
        assert_eq!(required_mbit_s(-1.0, 1.0, 1.0), Err(CapacityError::Input));
        assert_eq!(required_mbit_s(1.0, 0.0, 1.0), Err(CapacityError::Input));
        assert_eq!(
            required_mbit_s(1.0, 1.0, f64::NAN),
            Err(CapacityError::Input)
        );
    }
}
