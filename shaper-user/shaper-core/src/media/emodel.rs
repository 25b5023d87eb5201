//! A listening-quality estimate from what the gateway sees: ITU-T G.107's E-model in its
//! simplified form (the default values of G.107 Table 3, so R0 - Is = 93.2 and A = 0),
//! with packet loss through G.107's Ie,eff and delay through Id.
//!
//! What goes in, and what that leaves out:
//! - Loss is random loss (BurstR = 1) on a codec with packet-loss concealment: Ie = 0 and
//!   Bpl = 25.1, G.113 Appendix I's figures for G.711 with PLC. Opus and the video codecs
//!   conceal better; the estimate errs low for them.
//! - The gateway does not see mouth-to-ear delay. The delay term is what jitter adds on
//!   the receiver (a jitter buffer of twice the RFC 3550 jitter) plus 10 ms of packet
//!   time, as VoIP monitors commonly take it; a caller passing a measured one-way delay
//!   adds it.

/// G.107's R for `loss_pct` % random packet loss and `delay_ms` of one-way delay.
pub fn r_factor(loss_pct: f64, delay_ms: f64) -> f64 {
    const R0_MINUS_IS: f64 = 93.2;
    const BPL: f64 = 25.1;
    let ppl = loss_pct.clamp(0.0, 100.0);
    let d = delay_ms.max(0.0);
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ie_eff = 95.0 * ppl / (ppl + BPL);
    (R0_MINUS_IS - id - ie_eff).clamp(0.0, 100.0)
}

/// The delay [`r_factor`] takes for a stream with `jitter_ms` of RFC 3550 jitter, when
/// nothing else is known: a jitter buffer of twice the jitter plus 10 ms.
pub fn delay_from_jitter_ms(jitter_ms: f64) -> f64 {
    2.0 * jitter_ms.max(0.0) + 10.0
}

/// G.107 Annex B: the mean opinion score (1 to 4.5) an R gives.
pub fn mos(r: f64) -> f64 {
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_g107() {
        // No impairment beyond the defaults: R = 93.2, MOS 4.41 (G.107's reference).
        let r = r_factor(0.0, 0.0);
        assert!((r - 93.2).abs() < 1e-9);
        assert!((mos(r) - 4.41).abs() < 0.01, "{}", mos(r));
        // 1 % and 3 % random loss on G.711 with PLC: Ie,eff = 95 p / (p + 25.1).
        assert!((r_factor(1.0, 0.0) - (93.2 - 95.0 / 26.1)).abs() < 1e-9);
        assert!(r_factor(3.0, 0.0) < r_factor(1.0, 0.0));
        // Delay beyond 177.3 ms costs more per millisecond.
        let below = r_factor(0.0, 100.0) - r_factor(0.0, 150.0);
        let above = r_factor(0.0, 250.0) - r_factor(0.0, 300.0);
        assert!(above > below * 4.0, "{below} {above}");
        assert_eq!(mos(-3.0), 1.0);
        assert_eq!(mos(120.0), 4.5);
        assert!((delay_from_jitter_ms(5.0) - 20.0).abs() < 1e-9);
    }
}
