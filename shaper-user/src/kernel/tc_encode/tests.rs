//! Unit tests of the tc encoders and decoders.

use super::*;

fn u32_at(b: &[u8], off: usize) -> u32 {
    rd_u32(b, off).unwrap_or(0xDEAD_BEEF)
}

#[test]
fn handles_format_like_tc() {
    assert_eq!(fmt_handle(tc_handle(1, 0x10)), "1:10");
    assert_eq!(fmt_handle(tc_handle(0x10, 0)), "10:");
    assert_eq!(fmt_handle(TC_H_ROOT), "root");
    assert_eq!(tc_handle(1, 0x20), 0x0001_0020);
}

#[test]
fn htb_glob_bytes() {
    let b = encode_htb_qdisc(2, 10);
    // NLA header: len 24, type TCA_HTB_INIT
    assert_eq!(b.len(), 24);
    assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 24);
    assert_eq!(u16::from_ne_bytes([b[2], b[3]]), TCA_HTB_INIT);
    assert_eq!(u32_at(&b, 4), 3); // version
    assert_eq!(u32_at(&b, 8), 10); // rate2quantum
    assert_eq!(u32_at(&b, 12), 2); // defcls
    assert_eq!(u32_at(&b, 16), 0); // debug
    assert_eq!(u32_at(&b, 20), 0); // direct_pkts
    let g = HtbGlob::parse(&b);
    assert_eq!(
        g,
        Some(HtbGlob {
            version: 3,
            rate2quantum: 10,
            defcls: 2,
            direct_pkts: 0,
            direct_qlen: None
        })
    );
}

#[test]
fn htb_opt_bytes() {
    let p = HtbClassParams {
        rate_bps: 1_000_000,
        ceil_bps: 5_000_000,
        prio: 2,
        quantum: 3000,
        burst_bytes: 15_000,
        cburst_bytes: 3_000,
        overhead: 20,
        mpu: 64,
        linklayer: LinkLayer::Atm,
        rate_estimator: false,
    };
    let b = encode_htb_class(&p);
    assert_eq!(b.len(), 4 + TC_HTB_OPT_LEN);
    assert_eq!(u16::from_ne_bytes([b[0], b[1]]) as usize, 4 + 44);
    assert_eq!(u16::from_ne_bytes([b[2], b[3]]), TCA_HTB_PARMS);
    let o = &b[4..];
    // rate spec
    assert_eq!(o[0], 3); // cell_log
    assert_eq!(o[1], 2); // ATM
    assert_eq!(u16::from_ne_bytes([o[2], o[3]]), 20); // overhead
    assert_eq!(i16::from_ne_bytes([o[4], o[5]]), -1); // cell_align
    assert_eq!(u16::from_ne_bytes([o[6], o[7]]), 64); // mpu
    assert_eq!(u32_at(o, 8), 125_000); // bytes/s
                                       // ceil spec
    assert_eq!(o[13], 2);
    assert_eq!(u32_at(o, 20), 625_000);
    // buffer: 15000 B at 125000 B/s = 120 ms = 1_875_000 ticks of 64 ns
    assert_eq!(u32_at(o, 24), 1_875_000);
    // cbuffer: 3000 B at 625000 B/s = 4.8 ms = 75_000 ticks
    assert_eq!(u32_at(o, 28), 75_000);
    assert_eq!(u32_at(o, 32), 3000); // quantum
    assert_eq!(u32_at(o, 36), 0); // level
    assert_eq!(u32_at(o, 40), 2); // prio

    let s = HtbClassState::parse(&b).expect("parse");
    assert_eq!(s.rate_bps, 1_000_000);
    assert_eq!(s.ceil_bps, 5_000_000);
    assert_eq!(s.burst_bytes, 15_000);
    assert_eq!(s.cburst_bytes, 3_000);
    assert_eq!(s.prio, 2);
    assert_eq!(s.linklayer, LinkLayer::Atm);
    assert_eq!((s.overhead, s.mpu), (20, 64));
}

#[test]
fn htb_64bit_rates() {
    let p = HtbClassParams {
        rate_bps: 40_000_000_000, // 5e9 B/s > u32::MAX
        ceil_bps: 0,
        burst_bytes: 100_000,
        ..Default::default()
    };
    let b = encode_htb_class(&p);
    let attrs: Vec<(u16, Vec<u8>)> = nlas(&b).map(|(k, v)| (k, v.to_vec())).collect();
    assert_eq!(attrs.len(), 3);
    assert_eq!(attrs[0].0, TCA_HTB_RATE64);
    assert_eq!(rd_u64(&attrs[0].1, 0), Some(5_000_000_000));
    assert_eq!(attrs[1].0, TCA_HTB_CEIL64);
    assert_eq!(attrs[2].0, TCA_HTB_PARMS);
    assert_eq!(u32_at(&attrs[2].1, 8), u32::MAX);
    let s = HtbClassState::parse(&b).expect("parse");
    assert_eq!(s.rate_bps, 40_000_000_000);
    assert_eq!(s.ceil_bps, 40_000_000_000);
}

#[test]
fn htb_validation() {
    let ok = HtbClassParams {
        rate_bps: 1000,
        ..Default::default()
    };
    assert!(ok.validate().is_ok());
    let bad = HtbClassParams {
        rate_bps: 2000,
        ceil_bps: 1000,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    let bad = HtbClassParams {
        rate_bps: 2000,
        prio: 8,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    assert!(HtbClassParams::default().validate().is_err());
}

#[test]
fn default_burst_matches_tc() {
    // tc class add ... htb rate 10mbit  => burst 1600b
    let p = HtbClassParams {
        rate_bps: 10_000_000,
        ..Default::default()
    };
    let s = HtbClassState::parse(&encode_htb_class(&p)).expect("parse");
    assert_eq!(s.burst_bytes, 1600);
    assert_eq!(s.cburst_bytes, 1600);
}

#[test]
fn stab_atm_overhead40_like_iproute2() {
    // tc qdisc add ... stab linklayer atm overhead 40 mpu 0 htb
    let st = Stab {
        linklayer: LinkLayer::Atm,
        overhead: 40,
        mpu: 0,
        mtu: 0,
        tsize: 0,
    };
    let (spec, table) = st.compute();
    assert_eq!(
        spec,
        SizeSpec {
            cell_log: 2,
            size_log: 0,
            cell_align: -1,
            overhead: 40,
            linklayer: 2,
            mpu: 0,
            mtu: 2047,
            tsize: 512
        }
    );
    assert_eq!(table.len(), 512);
    // entry i covers (i+1)<<2 bytes, rounded up to 48-byte cells of 53.
    assert_eq!(table[0], 53); // 4 B -> 1 cell
    assert_eq!(table[11], 53); // 48 B -> 1 cell
    assert_eq!(table[12], 106); // 52 B -> 2 cells
    assert_eq!(table[270], 1219); // 1084 B -> 23 cells
    assert_eq!(table[511], 2279); // 2048 B -> 43 cells

    // Measured on Linux 6.18: a 1042-byte frame counts as 1219 B.
    assert_eq!(st.packet_len(1042), 1219);
    // A 1500-byte IP packet + 14 Ethernet + 40: 1554 -> 33 cells.
    assert_eq!(st.packet_len(1514), 33 * 53);
    // Beyond the table: extrapolated.
    assert!(st.packet_len(3000) > st.packet_len(2000));

    let enc = st.encode();
    let attrs: Vec<(u16, usize)> = nlas(&enc).map(|(k, v)| (k, v.len())).collect();
    assert_eq!(attrs, vec![(TCA_STAB_BASE, 24), (TCA_STAB_DATA, 1024)]);
    assert_eq!(SizeSpec::from_stab_attr(&enc), Some(spec));
    // Round trip from what the kernel reports (base only).
    assert_eq!(Stab::from_sizespec(&spec).compute(), (spec, table));
}

#[test]
fn stab_ethernet_overhead_only_has_no_table() {
    let st = Stab {
        linklayer: LinkLayer::Ethernet,
        overhead: 4,
        ..Default::default()
    };
    let (spec, table) = st.compute();
    assert!(table.is_empty());
    assert_eq!(spec.tsize, 0);
    assert_eq!(spec.mtu, 0);
    assert_eq!(spec.overhead, 4);
    assert_eq!(st.packet_len(100), 104);
    let enc = st.encode();
    assert_eq!(enc.len(), 4 + 24);
}

#[test]
fn stab_size_log_grows_for_large_cells() {
    // mtu 65535 with tsize 16: cells of 4096 bytes -> sizes up to 65536
    // need size_log 1, as in iproute2.
    let st = Stab {
        linklayer: LinkLayer::Ethernet,
        overhead: 0,
        mpu: 64,
        mtu: 65535,
        tsize: 16,
    };
    let (spec, table) = st.compute();
    assert_eq!(spec.cell_log, 12);
    assert_eq!(spec.size_log, 1);
    assert_eq!(table[15], 32768);
    assert_eq!(table[0], 2048);
}

#[test]
fn fifo_and_fq_codel_and_cake_options() {
    assert_eq!(
        Leaf::Bfifo {
            limit_bytes: 30_000
        }
        .encode(),
        30_000u32.to_ne_bytes().to_vec()
    );
    let f = Leaf::FqCodel {
        limit_packets: 1000,
        target_us: 5000,
        interval_us: 100_000,
        ecn: true,
        quantum: Some(300),
    }
    .encode();
    let a: Vec<(u16, u32)> = nlas(&f).map(|(k, v)| (k, u32_at(v, 0))).collect();
    assert_eq!(
        a,
        vec![
            (TCA_FQ_CODEL_LIMIT, 1000),
            (TCA_FQ_CODEL_TARGET, 5000),
            (TCA_FQ_CODEL_INTERVAL, 100_000),
            (TCA_FQ_CODEL_ECN, 1),
            (TCA_FQ_CODEL_QUANTUM, 300)
        ]
    );
    let c = Leaf::Cake {
        flow_mode: CakeFlowMode::TripleIsolate,
        nat: false,
        ack_filter: true,
    }
    .encode();
    let a: Vec<(u16, usize)> = nlas(&c).map(|(k, v)| (k, v.len())).collect();
    assert_eq!(
        a,
        vec![
            (TCA_CAKE_BASE_RATE64, 8),
            (TCA_CAKE_DIFFSERV_MODE, 4),
            (TCA_CAKE_FLOW_MODE, 4),
            (TCA_CAKE_ACK_FILTER, 4)
        ]
    );
    let flow = nlas(&c)
        .find(|(k, _)| *k == TCA_CAKE_FLOW_MODE)
        .map(|(_, v)| u32_at(v, 0));
    assert_eq!(flow, Some(7));
}

#[test]
fn nla_iterator_is_robust() {
    assert_eq!(nlas(&[]).count(), 0);
    assert_eq!(nlas(&[1, 2, 3]).count(), 0);
    // claims 200 bytes but has 8
    assert_eq!(nlas(&[200, 0, 1, 0, 0, 0, 0, 0]).count(), 0);
    assert!(HtbClassState::parse(&[8, 0, 1, 0, 1, 2, 3, 4]).is_none());
    assert!(HtbXstats::parse(&[0; 19]).is_none());
}

#[test]
fn xmit_ticks_rounds_up() {
    assert_eq!(xmit_ticks(125_000, 1600), 200_000);
    // 1 Gbit/s, 1600 B = 12.8 us = 200 ticks exactly
    assert_eq!(xmit_ticks(125_000_000, 1600), 200);
    assert_eq!(xmit_ticks(125_000_000, 1601), 201);
    assert_eq!(xmit_ticks(0, 1), u32::MAX);
    assert_eq!(ticks_to_bytes(125_000_000, 200), 1600);
}
