//! Rule matching: each match field's bitmap id (protocol, DSCP, ports, LPM
//! address prefixes, addresses learned from DNS), and the scan for the first
//! set bit of their AND, a word per `bpf_loop` step (see `shaper_common` for
//! the bitmap scheme).

use aya_ebpf::{
    helpers::generated::bpf_loop,
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array,
    },
};
use shaper_common::*;

use crate::maps::{
    BITMAPS, DPORT_IDX, DSCP_IDX, DST4, DST6, LEARNED4, LEARNED6, PROTO_IDX, SPORT_IDX, SRC4, SRC6,
};
use crate::parse::Pkt;

#[inline(always)]
fn bitmap_id(map: &Array<u32>, index: u32, base: u32) -> u32 {
    match map.get(index) {
        Some(id) => *id ^ base,
        None => 0,
    }
}

#[inline(always)]
fn addr_id(
    v6: bool,
    addr: &[u8; 16],
    t4: &LpmTrie<[u8; 4], u32>,
    t6: &LpmTrie<[u8; 16], u32>,
    wild: u32,
) -> u32 {
    let hit = if v6 {
        t6.get(Key::new(128, *addr))
    } else {
        t4.get(Key::new(32, [addr[0], addr[1], addr[2], addr[3]]))
    };
    match hit {
        Some(id) => *id,
        None => wild,
    }
}

/// The WAN-side address's bitmap id: a learned host address first, then the
/// static prefixes.
#[inline(always)]
fn dst_id(cfg: &Config, pkt: &Pkt) -> u32 {
    if cfg.flags & CFG_HOSTS != 0 {
        // SAFETY: the value is copied out at once.
        let hit = unsafe {
            if pkt.v6 != 0 {
                LEARNED6.get(&pkt.dst).copied()
            } else {
                LEARNED4
                    .get(&[pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]])
                    .copied()
            }
        };
        if let Some(id) = hit {
            return id;
        }
    }
    addr_id(pkt.v6 != 0, &pkt.dst, &DST4, &DST6, cfg.wild_dst)
}

/// Index of the lowest set bit of a non-zero word, branch-free: the population
/// count of the bits below it. (BPF has no ctz instruction, and a branchy
/// version multiplies the states the verifier must walk after the scan.)
#[inline(always)]
fn lowest_bit(w: u64) -> u32 {
    let mut x = (w & w.wrapping_neg()).wrapping_sub(1);
    x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// State of the bitmap scan handed to the `bpf_loop` callback.
#[repr(C)]
struct Scan {
    ids: [u32; 6],
    rule: u32,
    _pad: u32,
}

/// One word of the AND of the six bitmaps; stops the loop at the first
/// non-zero word. Run through `bpf_loop` so the verifier checks it once,
/// whatever the number of words.
extern "C" fn scan_word(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the `Scan` on match_rule's stack, passed to bpf_loop.
    let s = unsafe { &mut *(ctx as *mut Scan) };
    let i = index as usize;
    let mut w = u64::MAX;
    let mut k = 0;
    while k < 6 {
        let Some(b) = BITMAPS.get(s.ids[k]) else {
            return 1;
        };
        let Some(x) = b.get(i) else { return 1 };
        w &= *x;
        k += 1;
    }
    if w != 0 {
        s.rule = (i as u32) * 64 + lowest_bit(w);
        return 1;
    }
    0
}

#[inline(always)]
pub(crate) fn match_rule(cfg: &Config, pkt: &Pkt, dir: u32) -> u32 {
    let mut scan = Scan {
        ids: [
            bitmap_id(&PROTO_IDX, dir * 256 + pkt.proto as u32, cfg.proto_base),
            bitmap_id(&DSCP_IDX, pkt.dscp as u32, cfg.dscp_base),
            bitmap_id(&SPORT_IDX, pkt.sport, cfg.sport_base),
            bitmap_id(&DPORT_IDX, pkt.dport, cfg.dport_base),
            addr_id(pkt.v6 != 0, &pkt.src, &SRC4, &SRC6, cfg.wild_src),
            dst_id(cfg, pkt),
        ],
        rule: NO_RULE,
        _pad: 0,
    };
    let nwords = if (cfg.nwords as usize) < BITMAP_WORDS {
        cfg.nwords
    } else {
        BITMAP_WORDS as u32
    };
    // SAFETY: bpf_loop calls scan_word with our stack struct as its context.
    unsafe {
        bpf_loop(
            nwords,
            scan_word as *mut core::ffi::c_void,
            &mut scan as *mut Scan as *mut core::ffi::c_void,
            0,
        );
    }
    scan.rule
}
