//! The lab's one seeded pseudo-random generator: small, fast, reproducible from its seed,
//! and not for anything that needs real randomness.
//!
//! One type, [`Rng`], with three algorithms behind it, because sequences that tests and
//! published figures were made with must not change: a seed names the same sequence it
//! always did.
//!
//! - [`Rng::new`]: xorshift64* (Vigna 2016), the default: web-like churn's arrivals and
//!   sizes (`churn.rs`), the synthetic CT slices' noise (`dicom.rs`).
//! - [`Rng::xorshift64`]: Marsaglia's xorshift64 (shifts 13, 7, 17), whose output is its
//!   state: `shaper-soak`'s frames and the QUIC-shaped Initials' bytes.
//! - [`Rng::splitmix64`]: SplitMix64 (Steele, Lea and Flood 2014), for a seed taken from a
//!   clock (any value, 0 included): the delay line's jitter samples.

/// A seeded pseudo-random generator; see the module documentation for the algorithms.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    algorithm: Algorithm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    XorShift64Star,
    XorShift64,
    SplitMix64,
}

impl Rng {
    /// xorshift64* from `seed` (0, which the xorshifts never leave, is taken as 1).
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed.max(1),
            algorithm: Algorithm::XorShift64Star,
        }
    }

    /// xorshift64 (13, 7, 17) from `seed` (0 is taken as 1): each output is the new state.
    pub fn xorshift64(seed: u64) -> Rng {
        Rng {
            state: seed.max(1),
            algorithm: Algorithm::XorShift64,
        }
    }

    /// SplitMix64 from `seed` (any value).
    pub fn splitmix64(seed: u64) -> Rng {
        Rng {
            state: seed,
            algorithm: Algorithm::SplitMix64,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        match self.algorithm {
            Algorithm::XorShift64Star => {
                let mut x = self.state;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.state = x;
                x.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            Algorithm::XorShift64 => {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                x
            }
            Algorithm::SplitMix64 => {
                self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }
        }
    }

    /// In `0..n` (`n` > 0), as the next value modulo `n`: the bias is at most `n / 2^64`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `v` (not empty), as `v[below(len)]`.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    /// The low byte of the next value.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// `n` bytes, one value each.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// Up to `n - 1` bytes (the length drawn first).
    pub fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) as usize;
        self.bytes(len)
    }

    /// Uniform in (0, 1] (53 bits).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Exponential with mean `mean`.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }

    /// Pareto with shape `alpha` and scale (minimum) `xm`.
    pub fn pareto(&mut self, alpha: f64, xm: f64) -> f64 {
        xm / self.unit().powf(1.0 / alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first3(mut r: Rng) -> [u64; 3] {
        [r.next_u64(), r.next_u64(), r.next_u64()]
    }

    /// The sequences are pinned: churn rows, CT slices, soak runs and published figures
    /// were made with them.
    #[test]
    fn sequences_are_the_published_algorithms() {
        assert_eq!(
            first3(Rng::new(1)),
            [
                0x47e4_ce4b_896c_dd1d,
                0xabcf_a6a8_e079_651d,
                0xb9d1_0d8f_eb73_1f57
            ]
        );
        assert_eq!(
            first3(Rng::xorshift64(1)),
            [0x4082_2041, 0x1000_4106_0c01_1441, 0x9b1e_842f_6e86_2629]
        );
        // SplitMix64's reference output for seed 0.
        assert_eq!(
            first3(Rng::splitmix64(0)),
            [
                0xe220_a839_7b1d_cdaf,
                0x6e78_9e6a_a1b9_65f4,
                0x06c4_5d18_8009_454f
            ]
        );
        // Zero seeds of the xorshifts would stick at zero.
        assert_eq!(first3(Rng::new(0)), first3(Rng::new(1)));
        assert_eq!(first3(Rng::xorshift64(0)), first3(Rng::xorshift64(1)));
    }

    #[test]
    fn helpers_stay_in_range() {
        let mut r = Rng::xorshift64(0x1357_9bdf_2468_ace0);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            let u = r.unit();
            assert!(u > 0.0 && u <= 1.0, "{u}");
            assert!(r.bytes_below(5).len() < 5);
        }
        assert!(*r.pick(&[3, 4]) >= 3);
        assert!(!(0..1000).any(|_| r.chance(0)));
        assert!((0..1000).all(|_| r.chance(100)));
    }
}
