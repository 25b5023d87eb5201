//! Unit tests of the netlink client's pure parts.

use super::*;

#[test]
fn ext_ack_is_parsed_from_capped_error() {
    // 16-byte echoed header, then NLMSGERR_ATTR_MSG "Bad thing".
    let mut p = vec![0u8; 16];
    p[0] = 36; // original length (ignored when capped)
    let mut tlv = Vec::new();
    enc::put_nla(&mut tlv, NLMSGERR_ATTR_MSG, b"Bad thing\0");
    p.extend_from_slice(&tlv);
    assert_eq!(
        parse_ext_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &p).as_deref(),
        Some("Bad thing")
    );
    assert_eq!(parse_ext_ack(NLM_F_CAPPED, &p), None);
    // Uncapped: the original message (36 bytes) is echoed first.
    let mut q = vec![0u8; 36];
    q[0] = 36;
    q.extend_from_slice(&tlv);
    assert_eq!(
        parse_ext_ack(NLM_F_ACK_TLVS, &q).as_deref(),
        Some("Bad thing")
    );
    assert_eq!(parse_ext_ack(NLM_F_ACK_TLVS, &[1, 2]), None);
}

#[test]
fn errors_read_well() {
    let e = TcError::Kernel {
        op: TcOp::CreateClass,
        iface: "dev eth0 (ifindex 3)".into(),
        object: "HTB class 1:10 (parent 1:1)".into(),
        errno: libc::EEXIST,
        ext_ack: None,
        reason: describe(TcOp::CreateClass, libc::EEXIST, None),
    };
    let s = e.to_string();
    assert!(
        s.starts_with(
            "cannot create HTB class 1:10 (parent 1:1) on dev eth0 (ifindex 3): File exists"
        ),
        "{s}"
    );
    assert_eq!(e.errno(), Some(libc::EEXIST));
    let d = describe(
        TcOp::ReplaceRoot,
        libc::EINVAL,
        Some("Change operation not supported by specified qdisc"),
    );
    assert!(d.contains("kernel says"), "{d}");
}

/// Compile-time check: the futures can be spawned on a multi-threaded
/// runtime.
#[allow(dead_code)]
fn futures_are_send(tc: &Tc, p: &HtbClassParams, q: &QdiscInfo, l: &Leaf, s: &Stab) {
    fn send<T: Send>(_: T) {}
    send(Tc::connect());
    send(tc.ifindex("x"));
    send(tc.link_info(1));
    send(tc.qdiscs(1));
    send(tc.root_qdisc(1));
    send(tc.add_htb_root(1, 0x10000, 2, 10, Some(s), true));
    send(tc.put_htb_class(1, 0x10000, 0x10001, p, true));
    send(tc.delete_class(1, 0x10001));
    send(tc.put_leaf(1, 0x10001, 0x100000, l));
    send(tc.delete_root(1));
    send(tc.restore_root(1, q));
    send(tc.classes(1));
    send(probe_qdisc_kinds(&["htb"]));
}

#[test]
fn htb_restore_fixes_dumped_version() {
    // A dump reports version 0x30011; htb_init wants 3.
    let mut dumped = Vec::new();
    let mut glob = Vec::new();
    for v in [0x30011u32, 10, 2, 0, 7] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    enc::put_nla(&mut dumped, enc::TCA_HTB_INIT, &glob);
    enc::put_nla(
        &mut dumped,
        enc::TCA_HTB_DIRECT_QLEN,
        &1000u32.to_ne_bytes(),
    );
    let fixed = restorable_options("htb", &dumped);
    let g = HtbGlob::parse(&fixed);
    assert_eq!(
        g.map(|g| (g.version, g.defcls, g.rate2quantum, g.direct_qlen)),
        Some((3, 2, 10, Some(1000)))
    );
    assert_eq!(restorable_options("tbf", &[1, 2, 3, 4]), vec![1, 2, 3, 4]);
}

#[test]
fn raw_options_from_unknown_kind() {
    let raw = enc::encode_htb_qdisc(2, 10);
    let opts = vec![TcOption::Other(DefaultNla::new(
        enc::TCA_OPTIONS,
        raw.clone(),
    ))];
    assert_eq!(options_raw("htb", &opts), raw);
}
