//! Netlink client for the HTB class tree: creates, changes, reads and removes
//! the root qdisc, HTB classes and their leaf qdiscs, without running `tc`.
//!
//! Messages are built by hand as `TcMessage`s (netlink-packet-route 0.34 has
//! no HTB/bfifo/stab types); the option payloads come from
//! [`super::tc_encode`]. Every request is sent with `NLM_F_REQUEST|NLM_F_ACK`;
//! an error message with code 0 is the ACK. Kernel errors are mapped to
//! [`TcError::Kernel`] carrying the operation, interface, object, errno and
//! the kernel's extended-ack text when it gives one.

use std::fmt;
use std::num::NonZeroI32;

use futures::StreamExt;
use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkMessage, NetlinkPayload, Nla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::tc::{TcAttribute, TcMessage, TcOption, TcStats2, TcXstats};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket;

use super::tc_encode as enc;
pub use super::tc_encode::{
    fmt_handle, tc_handle, CakeFlowMode, HtbClassParams, HtbClassState, HtbGlob, HtbXstats, Leaf,
    LinkLayer, SizeSpec, Stab, TC_H_INGRESS, TC_H_ROOT,
};

mod error;
mod probe;
#[cfg(test)]
mod tests;

use error::{describe, parse_ext_ack};
pub use error::{TcError, TcOp};
#[cfg(test)]
use error::{NLMSGERR_ATTR_MSG, NLM_F_ACK_TLVS, NLM_F_CAPPED};
pub use probe::probe_qdisc_kinds;

/// A network interface as `ip link` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub is_up: bool,
    /// Operationally running (IFF_RUNNING: carrier and up).
    pub running: bool,
    /// ARPHRD_* link type (1 = Ethernet, 65534 = none (tun/wireguard),
    /// 512 = PPP, 772 = loopback, ...).
    pub arphrd: u16,
    /// Whether packets on this link carry an Ethernet-style L2 header that
    /// skb->len includes (Ethernet, loopback). False for IP-only links
    /// (tun, wireguard, PPP, GRE, ...), where overhead accounting must add
    /// the L2 framing itself.
    pub has_l2_header: bool,
}

/// Queue statistics of a qdisc or class (TCA_STATS2, TCA_STATS fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Bytes sent.
    pub bytes: u64,
    /// Packets sent (HTB counts GSO packets per segment).
    pub packets: u64,
    /// Packets dropped.
    pub drops: u32,
    /// Times the queue was over its limit / throttled.
    pub overlimits: u32,
    /// Requeues.
    pub requeues: u32,
    /// Bytes waiting in the queue.
    pub backlog_bytes: u32,
    /// Packets waiting in the queue.
    pub qlen: u32,
    /// Rate from the kernel's rate estimator in bits/s, if one is attached
    /// (see [`HtbClassParams::rate_estimator`]).
    pub rate_bps: Option<u64>,
    /// Packet rate from the rate estimator, if attached.
    pub rate_pps: Option<u64>,
}

/// A qdisc as dumped by RTM_GETQDISC (kept in the state file to restore it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QdiscInfo {
    /// Interface index.
    pub ifindex: u32,
    /// Kind (`htb`, `noqueue`, `fq_codel`, `mq`, ...).
    pub kind: String,
    /// Handle (`major << 16`), 0 for kernel-attached defaults.
    pub handle: u32,
    /// Parent: [`TC_H_ROOT`] for the root qdisc, a classid otherwise.
    pub parent: u32,
    /// The raw TCA_OPTIONS payload (what to send back to recreate it).
    pub options_raw: Vec<u8>,
    /// The raw TCA_STAB payload, if a size table is attached. The kernel
    /// reports only TCA_STAB_BASE; the table itself is recomputed on restore.
    pub stab_raw: Option<Vec<u8>>,
    /// Statistics.
    pub stats: QueueStats,
}

impl QdiscInfo {
    /// Whether this is the root qdisc.
    pub fn is_root(&self) -> bool {
        self.parent == TC_H_ROOT
    }

    /// The decoded HTB global options, for an HTB qdisc.
    pub fn htb(&self) -> Option<HtbGlob> {
        if self.kind == "htb" {
            HtbGlob::parse(&self.options_raw)
        } else {
            None
        }
    }

    /// The decoded size-table base, if a stab is attached.
    pub fn stab(&self) -> Option<SizeSpec> {
        self.stab_raw.as_deref().and_then(SizeSpec::from_stab_attr)
    }
}

/// A class as dumped by RTM_GETTCLASS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassInfo {
    /// Interface index.
    pub ifindex: u32,
    /// Class id (e.g. 0x0001_0010 for 1:10).
    pub classid: u32,
    /// Parent classid; [`TC_H_ROOT`] for top-level classes (HTB reports
    /// them with parent `root`, not the qdisc handle).
    pub parent: u32,
    /// Kind of the owning qdisc (`htb`).
    pub kind: String,
    /// Handle of the leaf qdisc attached to this class (tcm_info), if any.
    pub leaf_handle: Option<u32>,
    /// Statistics.
    pub stats: QueueStats,
    /// Decoded HTB parameters as in effect in the kernel.
    pub htb: Option<HtbClassState>,
    /// HTB extended statistics (lends, borrows, tokens).
    pub htb_xstats: Option<HtbXstats>,
    /// The raw TCA_OPTIONS payload.
    pub options_raw: Vec<u8>,
}

/// Internal failure of one netlink exchange, before context is added.
enum NlFail {
    Errno { errno: i32, ext_ack: Option<String> },
    Transport(String),
}

/// Client for the kernel's traffic-control netlink API.
///
/// Holds an rtnetlink handle and the task driving its connection; dropping
/// the `Tc` stops that task.
pub struct Tc {
    handle: rtnetlink::Handle,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Drop for Tc {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

impl fmt::Debug for Tc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tc").finish_non_exhaustive()
    }
}

fn nla_value(n: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0u8; n.value_len()];
    n.emit_value(&mut v);
    v
}

/// Recover the raw TCA_OPTIONS payload from the crate's parsed form.
fn options_raw(kind: &str, opts: &[TcOption]) -> Vec<u8> {
    // For kinds the crate does not know it wraps the whole TCA_OPTIONS
    // attribute as one DefaultNla; for typed kinds (fq_codel, ingress) the
    // parsed options re-emit to the same bytes.
    if let [TcOption::Other(nla)] = opts {
        if nla.kind() & netlink_packet_core::NLA_TYPE_MASK == enc::TCA_OPTIONS
            && !matches!(kind, "fq_codel" | "ingress")
        {
            return nla_value(nla);
        }
    }
    let len = opts.buffer_len();
    let mut buf = vec![0u8; len];
    opts.emit(&mut buf);
    buf
}

struct ParsedTc {
    kind: String,
    options_raw: Vec<u8>,
    stab_raw: Option<Vec<u8>>,
    stats: QueueStats,
    xstats: Option<Vec<u8>>,
}

fn parse_tc_attrs(attrs: &[TcAttribute]) -> ParsedTc {
    let kind = attrs
        .iter()
        .find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let mut p = ParsedTc {
        options_raw: Vec::new(),
        stab_raw: None,
        stats: QueueStats::default(),
        xstats: None,
        kind,
    };
    let mut have_stats2 = false;
    let mut pkt64 = None;
    for a in attrs {
        match a {
            TcAttribute::Options(opts) => p.options_raw = options_raw(&p.kind, opts),
            TcAttribute::Stab(b) => p.stab_raw = Some(b.clone()),
            TcAttribute::Stats2(list) => {
                have_stats2 = true;
                for s in list {
                    match s {
                        TcStats2::Basic(b) => {
                            p.stats.bytes = b.bytes;
                            p.stats.packets = u64::from(b.packets);
                        }
                        TcStats2::Queue(q) => {
                            p.stats.qlen = q.qlen;
                            p.stats.backlog_bytes = q.backlog;
                            p.stats.drops = q.drops;
                            p.stats.requeues = q.requeues;
                            p.stats.overlimits = q.overlimits;
                        }
                        TcStats2::App(x) => p.xstats = Some(xstats_bytes(x)),
                        TcStats2::Other(n) => {
                            let v = nla_value(n);
                            match n.kind() & netlink_packet_core::NLA_TYPE_MASK {
                                enc::TCA_STATS_RATE_EST if p.stats.rate_bps.is_none() => {
                                    if let (Some(bps), Some(pps)) = (rd32(&v, 0), rd32(&v, 4)) {
                                        p.stats.rate_bps = Some(u64::from(bps) * 8);
                                        p.stats.rate_pps = Some(u64::from(pps));
                                    }
                                }
                                enc::TCA_STATS_RATE_EST64 => {
                                    if let (Some(bps), Some(pps)) = (rd64(&v, 0), rd64(&v, 8)) {
                                        p.stats.rate_bps = Some(bps.saturating_mul(8));
                                        p.stats.rate_pps = Some(pps);
                                    }
                                }
                                enc::TCA_STATS_PKT64 => pkt64 = rd64(&v, 0),
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
            TcAttribute::Xstats(x) if p.xstats.is_none() => p.xstats = Some(xstats_bytes(x)),
            _ => {}
        }
    }
    if let Some(n) = pkt64 {
        p.stats.packets = n;
    }
    if !have_stats2 {
        if let Some(s) = attrs.iter().find_map(|a| match a {
            TcAttribute::Stats(s) => Some(*s),
            _ => None,
        }) {
            p.stats.bytes = s.bytes;
            p.stats.packets = u64::from(s.packets);
            p.stats.drops = s.drops;
            p.stats.overlimits = s.overlimits;
            p.stats.qlen = s.qlen;
            p.stats.backlog_bytes = s.backlog;
            if s.bps != 0 || s.pps != 0 {
                p.stats.rate_bps = Some(u64::from(s.bps) * 8);
                p.stats.rate_pps = Some(u64::from(s.pps));
            }
        }
    }
    p
}

fn xstats_bytes(x: &TcXstats) -> Vec<u8> {
    let mut v = vec![0u8; x.buffer_len()];
    x.emit(&mut v);
    v
}

fn rd32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn rd64(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_ne_bytes(a)
    })
}

fn tc_msg(ifindex: u32, handle: u32, parent: u32) -> Result<TcMessage, TcError> {
    let idx = i32::try_from(ifindex).map_err(|_| TcError::NoSuchInterface { ifindex })?;
    let mut m = TcMessage::with_index(idx);
    m.header.handle = handle.into();
    m.header.parent = parent.into();
    Ok(m)
}

fn options_attr(payload: Vec<u8>) -> TcAttribute {
    TcAttribute::Other(DefaultNla::new(enc::TCA_OPTIONS, payload))
}

impl Tc {
    /// Open a NETLINK_ROUTE socket (with extended acks enabled) and spawn its
    /// connection task on the current tokio runtime. Must be called from
    /// within a runtime with I/O enabled.
    pub async fn connect() -> Result<Tc, TcError> {
        let (mut conn, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(TcError::Connect)?;
        let sock = conn.socket_mut().socket_mut();
        if let Err(e) = sock.set_ext_ack(true) {
            log::debug!("netlink: cannot enable extended acks: {e}");
        }
        if let Err(e) = sock.set_cap_ack(true) {
            log::debug!("netlink: cannot enable capped acks: {e}");
        }
        let conn_task = tokio::spawn(conn);
        Ok(Tc { handle, conn_task })
    }

    /// Send one request expecting an ACK.
    async fn ack(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlFail> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.finalize();
        let mut h = self.handle.clone();
        let mut resp = h
            .request(req)
            .map_err(|e| NlFail::Transport(e.to_string()))?;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                return match e.code {
                    None => Ok(()),
                    Some(code) => Err(errno_fail(code, m.header.flags, &e.header)),
                };
            }
        }
        Ok(())
    }

    /// Send one dump (or get) request and collect the replies.
    async fn dump(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlFail> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.finalize();
        let mut h = self.handle.clone();
        let mut resp = h
            .request(req)
            .map_err(|e| NlFail::Transport(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(m) = resp.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(errno_fail(code, m.header.flags, &e.header));
                    }
                }
                NetlinkPayload::Overrun(_) => {
                    return Err(NlFail::Transport("netlink buffer overrun".into()))
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// `dev NAME (ifindex N)`, or `ifindex N` if the name cannot be read.
    async fn iface_label(&self, ifindex: u32) -> String {
        match self.get_link(ifindex).await {
            Ok(Some(l)) => format!("dev {} (ifindex {ifindex})", l.name),
            _ => format!("ifindex {ifindex}"),
        }
    }

    async fn fail(&self, op: TcOp, ifindex: u32, object: String, f: NlFail) -> TcError {
        let iface = self.iface_label(ifindex).await;
        match f {
            NlFail::Errno { errno, ext_ack } => {
                let reason = describe(op, errno, ext_ack.as_deref());
                log::debug!("tc: {op} {object} on {iface}: errno {errno}: {reason}");
                TcError::Kernel {
                    op,
                    iface,
                    object,
                    errno,
                    ext_ack,
                    reason,
                }
            }
            NlFail::Transport(detail) => TcError::Transport {
                op,
                object,
                iface,
                detail,
            },
        }
    }

    async fn invalid(&self, ifindex: u32, object: String, reason: String) -> TcError {
        TcError::InvalidParams {
            iface: self.iface_label(ifindex).await,
            object,
            reason,
        }
    }

    async fn get_link(&self, ifindex: u32) -> Result<Option<LinkInfo>, NlFail> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        match self.dump(RouteNetlinkMessage::GetLink(m), 0).await {
            Ok(v) => Ok(v.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(link_info_from(l)),
                _ => None,
            })),
            Err(NlFail::Errno { errno, .. }) if errno == libc::ENODEV => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Resolve an interface name to its index; `Ok(None)` if no such
    /// interface exists.
    pub async fn ifindex(&self, name: &str) -> Result<Option<u32>, TcError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Ok(None);
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.dump(RouteNetlinkMessage::GetLink(m), 0).await {
            Ok(v) => Ok(v.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(NlFail::Errno { errno, .. }) if errno == libc::ENODEV => Ok(None),
            Err(f) => Err(match f {
                NlFail::Errno { errno, ext_ack } => TcError::Kernel {
                    op: TcOp::GetLink,
                    iface: format!("dev {name}"),
                    object: "link".into(),
                    errno,
                    reason: describe(TcOp::GetLink, errno, ext_ack.as_deref()),
                    ext_ack,
                },
                NlFail::Transport(detail) => TcError::Transport {
                    op: TcOp::GetLink,
                    object: "link".into(),
                    iface: format!("dev {name}"),
                    detail,
                },
            }),
        }
    }

    /// Name, MTU, state and link type of an interface.
    /// [`TcError::NoSuchInterface`] if it does not exist.
    pub async fn link_info(&self, ifindex: u32) -> Result<LinkInfo, TcError> {
        match self.get_link(ifindex).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(TcError::NoSuchInterface { ifindex }),
            Err(NlFail::Errno { errno, ext_ack }) => Err(TcError::Kernel {
                op: TcOp::GetLink,
                iface: format!("ifindex {ifindex}"),
                object: "link".into(),
                errno,
                reason: describe(TcOp::GetLink, errno, ext_ack.as_deref()),
                ext_ack,
            }),
            Err(NlFail::Transport(detail)) => Err(TcError::Transport {
                op: TcOp::GetLink,
                object: "link".into(),
                iface: format!("ifindex {ifindex}"),
                detail,
            }),
        }
    }

    /// All qdiscs of an interface (root, leaves, ingress/clsact), with raw
    /// options, size table and statistics.
    pub async fn qdiscs(&self, ifindex: u32) -> Result<Vec<QdiscInfo>, TcError> {
        let m = tc_msg(ifindex, 0, 0)?;
        let replies = match self
            .dump(RouteNetlinkMessage::GetQueueDiscipline(m), NLM_F_DUMP)
            .await
        {
            Ok(r) => r,
            Err(f) => {
                return Err(self
                    .fail(TcOp::DumpQdiscs, ifindex, "qdiscs".into(), f)
                    .await)
            }
        };
        let mut out = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewQueueDiscipline(t) = r {
                // The qdisc dump covers every device: keep ours.
                if u32::try_from(t.header.index).ok() != Some(ifindex) {
                    continue;
                }
                let p = parse_tc_attrs(&t.attributes);
                out.push(QdiscInfo {
                    ifindex,
                    kind: p.kind,
                    handle: t.header.handle.into(),
                    parent: t.header.parent.into(),
                    options_raw: p.options_raw,
                    stab_raw: p.stab_raw,
                    stats: p.stats,
                });
            }
        }
        Ok(out)
    }

    /// The root qdisc of an interface (parent `root`), if the dump shows one.
    pub async fn root_qdisc(&self, ifindex: u32) -> Result<Option<QdiscInfo>, TcError> {
        Ok(self
            .qdiscs(ifindex)
            .await?
            .into_iter()
            .find(QdiscInfo::is_root))
    }

    /// Install HTB as the root qdisc: `tc qdisc {add|replace} dev X root
    /// handle H: [stab ...] htb default MINOR r2q R2Q`.
    ///
    /// * `handle` is a qdisc handle (`major << 16`, minor 0), e.g. 0x0001_0000.
    /// * `r2q` 0 means tc's default of 10.
    /// * `replace = false`: exclusive create; EEXIST if a root with a handle
    ///   exists (kernel defaults with handle 0 are replaced either way).
    /// * `replace = true`: replaces whatever root there is. If the root is
    ///   already HTB with this handle, the kernel cannot change HTB in place:
    ///   when default class and r2q are unchanged only the size table is
    ///   updated (set or removed) and the class tree is kept; otherwise
    ///   [`TcError::Unsupported`] is returned (delete the root and rebuild).
    pub async fn add_htb_root(
        &self,
        ifindex: u32,
        handle: u32,
        default_classid_minor: u32,
        r2q: u32,
        stab: Option<&Stab>,
        replace: bool,
    ) -> Result<(), TcError> {
        let object = format!("HTB root qdisc {}", fmt_handle(handle));
        if handle & 0xFFFF != 0 || handle == 0 || handle >> 16 == 0xFFFF {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    format!(
                        "qdisc handle {:#010x} must have a major in 1..=0xfffe and minor 0 (e.g. 0x00010000 for 1:)",
                        handle
                    ),
                )
                .await);
        }
        if default_classid_minor > 0xFFFF {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    format!("default class minor {default_classid_minor:#x} exceeds 0xffff"),
                )
                .await);
        }
        if let Some(s) = stab {
            if let Err(reason) = s.validate() {
                return Err(self.invalid(ifindex, object, reason).await);
            }
        }
        let r2q = if r2q == 0 { 10 } else { r2q };
        let op = if replace {
            TcOp::ReplaceRoot
        } else {
            TcOp::AddRoot
        };

        let mut m = tc_msg(ifindex, handle, TC_H_ROOT)?;
        m.attributes.push(TcAttribute::Kind("htb".into()));

        if replace {
            if let Some(cur) = self.root_qdisc(ifindex).await? {
                if cur.kind == "htb" && cur.handle == handle {
                    let same = cur
                        .htb()
                        .map(|g| g.defcls == default_classid_minor && g.rate2quantum == r2q)
                        .unwrap_or(false);
                    if !same {
                        return Err(TcError::Unsupported {
                            op,
                            iface: self.iface_label(ifindex).await,
                            object,
                            reason: "the root is already HTB with this handle but a different default class or r2q, and HTB cannot change those in place (the kernel has no HTB change operation); delete the root and rebuild the class tree".into(),
                        });
                    }
                    // Options omitted: only the size table is changed.
                    if let Some(s) = stab {
                        m.attributes.push(TcAttribute::Stab(s.encode()));
                    }
                    log::debug!(
                        "tc: root {} on ifindex {ifindex} already HTB with same options; updating size table only",
                        fmt_handle(handle)
                    );
                    return match self
                        .ack(
                            RouteNetlinkMessage::NewQueueDiscipline(m),
                            NLM_F_CREATE | NLM_F_REPLACE,
                        )
                        .await
                    {
                        Ok(()) => Ok(()),
                        Err(f) => Err(self.fail(op, ifindex, object, f).await),
                    };
                }
            }
        }

        m.attributes.push(options_attr(enc::encode_htb_qdisc(
            default_classid_minor,
            r2q,
        )));
        if let Some(s) = stab {
            m.attributes.push(TcAttribute::Stab(s.encode()));
        }
        let flags = if replace {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        match self
            .ack(RouteNetlinkMessage::NewQueueDiscipline(m), flags)
            .await
        {
            Ok(()) => {
                log::debug!(
                    "tc: {op} {} on ifindex {ifindex}: default {:x} r2q {r2q}",
                    fmt_handle(handle),
                    default_classid_minor
                );
                Ok(())
            }
            Err(f) => Err(self.fail(op, ifindex, object, f).await),
        }
    }

    /// Create (`create = true`: NEW|CREATE|EXCL, EEXIST if it exists) or
    /// change in place (`create = false`: ENOENT if it does not exist) an
    /// HTB class `classid` under `parent` (a classid, or the qdisc handle
    /// for a top-level class). Counters and the leaf qdisc survive a change.
    pub async fn put_htb_class(
        &self,
        ifindex: u32,
        parent: u32,
        classid: u32,
        p: &HtbClassParams,
        create: bool,
    ) -> Result<(), TcError> {
        let object = format!(
            "HTB class {} (parent {})",
            fmt_handle(classid),
            fmt_handle(parent)
        );
        if classid & 0xFFFF == 0 || classid >> 16 == 0 {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    format!("classid {:#010x} needs a non-zero major and minor", classid),
                )
                .await);
        }
        if parent >> 16 != classid >> 16 {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    "parent and class must belong to the same qdisc (same major)".into(),
                )
                .await);
        }
        if let Err(reason) = p.validate() {
            return Err(self.invalid(ifindex, object, reason).await);
        }
        // HTB quirk: a new class whose parent class does not exist is not
        // refused, it is silently created at the top level. Check first.
        if create && parent & 0xFFFF != 0 {
            let classes = self.classes(ifindex).await?;
            if !classes.iter().any(|c| c.classid == parent) {
                return Err(TcError::ParentMissing {
                    iface: self.iface_label(ifindex).await,
                    classid: fmt_handle(classid),
                    parent: fmt_handle(parent),
                });
            }
        }
        let mut m = tc_msg(ifindex, classid, parent)?;
        m.attributes.push(TcAttribute::Kind("htb".into()));
        m.attributes.push(options_attr(enc::encode_htb_class(p)));
        if p.rate_estimator {
            // 1 s interval, time constant 2^2 = 4 intervals.
            m.attributes
                .push(TcAttribute::Rate(enc::encode_estimator(0, 2)));
        }
        let (op, flags) = if create {
            (TcOp::CreateClass, NLM_F_CREATE | NLM_F_EXCL)
        } else {
            (TcOp::ChangeClass, 0)
        };
        match self
            .ack(RouteNetlinkMessage::NewTrafficClass(m), flags)
            .await
        {
            Ok(()) => {
                log::debug!(
                    "tc: {op} {} on ifindex {ifindex}: rate {} ceil {} prio {}",
                    fmt_handle(classid),
                    p.rate_bps,
                    p.effective_ceil_bps(),
                    p.prio
                );
                Ok(())
            }
            Err(f) => Err(self.fail(op, ifindex, object, f).await),
        }
    }

    /// Delete a class. Fails with EBUSY if it still has child classes or
    /// filters; its leaf qdisc goes with it.
    pub async fn delete_class(&self, ifindex: u32, classid: u32) -> Result<(), TcError> {
        let m = tc_msg(ifindex, classid, 0)?;
        match self.ack(RouteNetlinkMessage::DelTrafficClass(m), 0).await {
            Ok(()) => Ok(()),
            Err(f) => Err(self
                .fail(
                    TcOp::DeleteClass,
                    ifindex,
                    format!("class {}", fmt_handle(classid)),
                    f,
                )
                .await),
        }
    }

    /// Attach (or re-apply) the leaf qdisc `handle` under class
    /// `parent_classid`. Same handle and kind: parameters are changed in
    /// place; same handle but another kind: the old leaf is deleted first
    /// (the kernel cannot change a qdisc's kind); otherwise the new leaf
    /// replaces whatever the class had (CREATE|REPLACE).
    pub async fn put_leaf(
        &self,
        ifindex: u32,
        parent_classid: u32,
        handle: u32,
        leaf: &Leaf,
    ) -> Result<(), TcError> {
        let object = format!(
            "leaf qdisc {} ({}) under class {}",
            fmt_handle(handle),
            leaf.kind(),
            fmt_handle(parent_classid)
        );
        if handle & 0xFFFF != 0 || handle == 0 {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    format!(
                        "qdisc handle {:#010x} must have minor 0 (e.g. 0x00100000 for 10:)",
                        handle
                    ),
                )
                .await);
        }
        if let Err(reason) = leaf.validate() {
            return Err(self.invalid(ifindex, object, reason).await);
        }
        let existing = self
            .qdiscs(ifindex)
            .await?
            .into_iter()
            .find(|q| q.parent == parent_classid);
        if let Some(q) = existing {
            if q.handle == handle && q.kind != leaf.kind() {
                log::debug!(
                    "tc: leaf {} under {} is {}, replacing with {}",
                    fmt_handle(handle),
                    fmt_handle(parent_classid),
                    q.kind,
                    leaf.kind()
                );
                let del = tc_msg(ifindex, handle, parent_classid)?;
                if let Err(f) = self
                    .ack(RouteNetlinkMessage::DelQueueDiscipline(del), 0)
                    .await
                {
                    return Err(self.fail(TcOp::DeleteQdisc, ifindex, object, f).await);
                }
            }
        }
        let mut m = tc_msg(ifindex, handle, parent_classid)?;
        m.attributes.push(TcAttribute::Kind(leaf.kind().into()));
        m.attributes.push(options_attr(leaf.encode()));
        match self
            .ack(
                RouteNetlinkMessage::NewQueueDiscipline(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(f) => Err(self.fail(TcOp::PutLeaf, ifindex, object, f).await),
        }
    }

    /// Delete the root qdisc (`tc qdisc del dev X root`); the kernel then
    /// re-attaches its default. Nothing to delete (no root, or the root is
    /// a kernel default with handle 0) is `Ok`.
    pub async fn delete_root(&self, ifindex: u32) -> Result<(), TcError> {
        match self.root_qdisc(ifindex).await? {
            None => return Ok(()),
            Some(q) if q.handle == 0 => return Ok(()),
            Some(_) => {}
        }
        let m = tc_msg(ifindex, 0, TC_H_ROOT)?;
        match self
            .ack(RouteNetlinkMessage::DelQueueDiscipline(m), 0)
            .await
        {
            Ok(()) => Ok(()),
            Err(NlFail::Errno { errno, .. }) if errno == libc::ENOENT => Ok(()),
            Err(f) => Err(self
                .fail(TcOp::DeleteRoot, ifindex, "root qdisc".into(), f)
                .await),
        }
    }

    /// Delete the clsact qdisc (and with it every tc filter on its hooks).
    /// Not present is `Ok`.
    pub async fn delete_clsact(&self, ifindex: u32) -> Result<(), TcError> {
        let m = tc_msg(ifindex, 0xFFFF_0000, TC_H_INGRESS)?;
        match self
            .ack(RouteNetlinkMessage::DelQueueDiscipline(m), 0)
            .await
        {
            Ok(()) => Ok(()),
            Err(NlFail::Errno { errno, .. }) if errno == libc::ENOENT || errno == libc::EINVAL => {
                Ok(())
            }
            Err(f) => Err(self
                .fail(TcOp::DeleteQdisc, ifindex, "clsact qdisc".into(), f)
                .await),
        }
    }

    /// Put back a root qdisc recorded earlier with [`Tc::root_qdisc`]: its
    /// kind, handle, raw options and size table (the table is recomputed
    /// from the recorded base as iproute2 builds it). Kernel defaults
    /// (handle 0, or noqueue/pfifo_fast/mq/...) are restored by deleting our
    /// root so the kernel re-attaches its default. Only the root qdisc itself
    /// is restored, not classes, child qdiscs or filters it had.
    pub async fn restore_root(&self, ifindex: u32, q: &QdiscInfo) -> Result<(), TcError> {
        let object = format!("root qdisc {} ({})", fmt_handle(q.handle), q.kind);
        if q.parent != TC_H_ROOT {
            return Err(self
                .invalid(
                    ifindex,
                    object,
                    "the recorded qdisc is not a root qdisc".into(),
                )
                .await);
        }
        if q.handle == 0 || matches!(q.kind.as_str(), "noqueue" | "pfifo_fast") {
            log::debug!(
                "tc: restoring kernel default root ({}) on ifindex {ifindex} by deleting ours",
                q.kind
            );
            return self.delete_root(ifindex).await;
        }
        // Same handle as the current root: the kernel would try to change
        // it in place (and fail for another kind or HTB): delete first.
        if let Some(cur) = self.root_qdisc(ifindex).await? {
            if cur.handle == q.handle {
                self.delete_root(ifindex).await?;
            }
        }
        let mut m = tc_msg(ifindex, q.handle, TC_H_ROOT)?;
        m.attributes.push(TcAttribute::Kind(q.kind.clone()));
        let options = restorable_options(&q.kind, &q.options_raw);
        if !options.is_empty() {
            m.attributes.push(options_attr(options));
        }
        if let Some(spec) = q.stab() {
            let st = Stab::from_sizespec(&spec);
            let (recomputed, _) = st.compute();
            if recomputed != spec {
                log::warn!(
                    "tc: recorded size table on ifindex {ifindex} ({spec:?}) was not built the iproute2 way; restoring as {recomputed:?}"
                );
            }
            m.attributes.push(TcAttribute::Stab(st.encode()));
        }
        match self
            .ack(
                RouteNetlinkMessage::NewQueueDiscipline(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(f) => Err(self.fail(TcOp::RestoreRoot, ifindex, object, f).await),
        }
    }

    /// All classes of an interface with statistics; for HTB classes also
    /// the parameters in effect and lends/borrows/tokens.
    pub async fn classes(&self, ifindex: u32) -> Result<Vec<ClassInfo>, TcError> {
        let m = tc_msg(ifindex, 0, 0)?;
        let replies = match self
            .dump(RouteNetlinkMessage::GetTrafficClass(m), NLM_F_DUMP)
            .await
        {
            Ok(r) => r,
            Err(f) => {
                return Err(self
                    .fail(TcOp::DumpClasses, ifindex, "classes".into(), f)
                    .await)
            }
        };
        let mut out = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewTrafficClass(t) = r {
                if u32::try_from(t.header.index).ok() != Some(ifindex) {
                    continue;
                }
                let p = parse_tc_attrs(&t.attributes);
                let is_htb = p.kind == "htb";
                let info = t.header.info;
                out.push(ClassInfo {
                    ifindex,
                    classid: t.header.handle.into(),
                    parent: t.header.parent.into(),
                    htb: if is_htb {
                        HtbClassState::parse(&p.options_raw)
                    } else {
                        None
                    },
                    htb_xstats: if is_htb {
                        p.xstats.as_deref().and_then(HtbXstats::parse)
                    } else {
                        None
                    },
                    kind: p.kind,
                    leaf_handle: if info != 0 { Some(info) } else { None },
                    stats: p.stats,
                    options_raw: p.options_raw,
                });
            }
        }
        Ok(out)
    }
}

/// Turn dumped qdisc options into options the kernel accepts on create.
/// Dumps are mostly symmetric, except HTB: the dump reports `version` as
/// HTB_VER (0x30011, "ver 3.17") but `htb_init` only accepts 3.
fn restorable_options(kind: &str, raw: &[u8]) -> Vec<u8> {
    if kind == "htb" {
        if let Some(g) = HtbGlob::parse(raw) {
            let mut out = enc::encode_htb_qdisc(g.defcls, g.rate2quantum);
            if let Some(ql) = g.direct_qlen {
                enc::put_nla(&mut out, enc::TCA_HTB_DIRECT_QLEN, &ql.to_ne_bytes());
            }
            return out;
        }
    }
    raw.to_vec()
}

fn errno_fail(code: NonZeroI32, flags: u16, payload: &[u8]) -> NlFail {
    NlFail::Errno {
        errno: code.get().saturating_abs(),
        ext_ack: parse_ext_ack(flags, payload),
    }
}

fn link_info_from(l: LinkMessage) -> LinkInfo {
    let arphrd: u16 = l.header.link_layer_type.into();
    let mut name = String::new();
    let mut mtu = 0;
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    LinkInfo {
        ifindex: l.header.index,
        name,
        mtu,
        is_up: l.header.flags.contains(LinkFlags::Up),
        running: l.header.flags.contains(LinkFlags::Running),
        arphrd,
        // ARPHRD_ETHER (veth, bridges, VLANs, bonds, Wi-Fi) and loopback.
        has_l2_header: matches!(arphrd, 1 | 772),
    }
}
