//! The lab's one percentile: **nearest rank**, `p` in percent (0..=100).
//!
//! The `p` percentile of `n` ascending values is the value at rank `ceil(p/100 * n)`
//! (1-based), clamped to `1..=n`: always one of the samples, never interpolated, so a p99
//! of 100 delays is the 99th smallest and p100 is the maximum. A tiny tolerance keeps a
//! rank that floating point puts a hair above a whole number (`99.9 / 100 * 1000`) on
//! that number. Every figure the lab reports (the video and RTP delays, the reload and
//! classifier times, the download benches and matrices, the VM tier, the CDF legends)
//! uses this definition; the delay line's [`Histogram`](crate::delayline::Histogram)
//! uses the same one over its 1 µs buckets.

use std::cmp::Ordering;
use std::time::Duration;

/// A value percentiles are taken of: totally ordered (an `f64` by [`f64::total_cmp`],
/// so a NaN sorts after every number and no sort panics).
pub trait Sample: Copy {
    fn order(&self, other: &Self) -> Ordering;
}

impl Sample for f64 {
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

macro_rules! ord_sample {
    ($($t:ty),*) => {
        $(impl Sample for $t {
            fn order(&self, other: &Self) -> Ordering {
                self.cmp(other)
            }
        })*
    };
}
ord_sample!(u32, u64, i64, usize, Duration);

/// Sorts `v` ascending (the order [`nearest_rank`] wants).
pub fn sort<T: Sample>(v: &mut [T]) {
    v.sort_unstable_by(T::order);
}

/// The nearest-rank percentile `p` (0..=100) of ascending `sorted`; `None` when empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0 * n as f64) - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// The nearest-rank percentile `p` (0..=100) of `values` in any order (a sorted copy);
/// `None` when empty.
pub fn percentile<T: Sample>(values: &[T], p: f64) -> Option<T> {
    let mut v = values.to_vec();
    sort(&mut v);
    nearest_rank(&v, p)
}

/// The nearest-rank median: the middle value of an odd count, the lower of the two middle
/// ones of an even count; `None` when empty.
pub fn median<T: Sample>(values: &[T]) -> Option<T> {
    percentile(values, 50.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 50.0), Some(50.0));
        assert_eq!(nearest_rank(&v, 99.0), Some(99.0));
        assert_eq!(nearest_rank(&v, 99.9), Some(100.0));
        assert_eq!(nearest_rank(&v, 100.0), Some(100.0));
        assert_eq!(nearest_rank(&v, 0.0), Some(1.0));
        assert_eq!(nearest_rank::<f64>(&[], 50.0), None);
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        // 99.9 % of 1,000 is rank 999, though 99.9 / 100 * 1000 is a hair above it.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&v, 99.9), Some(999));
    }

    #[test]
    fn unsorted_values_any_type() {
        assert_eq!(percentile(&[5u64, 1, 4, 2, 3], 50.0), Some(3));
        assert_eq!(median(&[4i64, 1, 3, 2]), Some(2));
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(percentile(&[d(9), d(1), d(5)], 99.0), Some(d(9)));
        assert_eq!(median(&[2.0, f64::NAN, 1.0]), Some(2.0));
        assert_eq!(median::<f64>(&[]), None);
    }
}
