//! What a tc netlink exchange reports when it fails: the operation ([`TcOp`]), the
//! error ([`TcError`]) with the kernel's errno, its extended-ack text and a hint.

use std::fmt;

use super::enc;

/// `NLM_F_CAPPED` on an error message: the original request is not echoed.
pub(super) const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an error message: extended-ack attributes follow.
pub(super) const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`.
pub(super) const NLMSGERR_ATTR_MSG: u16 = 1;

/// What was being done when an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcOp {
    /// Resolving or reading a network interface.
    GetLink,
    /// Dumping qdiscs.
    DumpQdiscs,
    /// Dumping classes.
    DumpClasses,
    /// Adding the HTB root qdisc (exclusive create).
    AddRoot,
    /// Replacing the root qdisc with HTB.
    ReplaceRoot,
    /// Creating an HTB class.
    CreateClass,
    /// Changing an existing HTB class in place.
    ChangeClass,
    /// Deleting a class.
    DeleteClass,
    /// Creating or replacing a leaf qdisc.
    PutLeaf,
    /// Deleting a (leaf) qdisc.
    DeleteQdisc,
    /// Deleting the root qdisc.
    DeleteRoot,
    /// Re-creating a recorded root qdisc.
    RestoreRoot,
}

impl fmt::Display for TcOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcOp::GetLink => "read",
            TcOp::DumpQdiscs | TcOp::DumpClasses => "list",
            TcOp::AddRoot => "add",
            TcOp::ReplaceRoot => "install (replace)",
            TcOp::CreateClass => "create",
            TcOp::ChangeClass => "change",
            TcOp::DeleteClass | TcOp::DeleteQdisc | TcOp::DeleteRoot => "delete",
            TcOp::PutLeaf => "set",
            TcOp::RestoreRoot => "restore",
        })
    }
}

/// Errors of the tc netlink module.
#[derive(thiserror::Error, Debug)]
pub enum TcError {
    /// The netlink route socket could not be opened or configured.
    #[error("cannot open a netlink route socket: {0}")]
    Connect(#[source] std::io::Error),
    /// The kernel refused a request.
    #[error("cannot {op} {object} on {iface}: {reason}")]
    Kernel {
        /// What was attempted.
        op: TcOp,
        /// `dev NAME (ifindex N)` or `ifindex N`.
        iface: String,
        /// The tc object, e.g. `class 1:10`, `qdisc 1: (htb)`.
        object: String,
        /// Positive errno (EEXIST = 17, ENOENT = 2, EINVAL = 22, ...).
        errno: i32,
        /// The kernel's extended-ack message, if it sent one.
        ext_ack: Option<String>,
        /// Human explanation: errno text, ext-ack text and a hint.
        reason: String,
    },
    /// The netlink connection failed (socket closed, task gone).
    #[error("cannot {op} {object} on {iface}: netlink transport failed: {detail}")]
    Transport {
        /// What was attempted.
        op: TcOp,
        /// The tc object.
        object: String,
        /// Interface label.
        iface: String,
        /// Details.
        detail: String,
    },
    /// The interface index does not exist (any more).
    #[error("network interface with index {ifindex} does not exist")]
    NoSuchInterface {
        /// The index asked for.
        ifindex: u32,
    },
    /// Parameters rejected before anything was sent to the kernel.
    #[error("invalid parameters for {object} on {iface}: {reason}")]
    InvalidParams {
        /// Interface label.
        iface: String,
        /// The tc object.
        object: String,
        /// Why.
        reason: String,
    },
    /// A class was to be created under a parent class that does not exist
    /// (HTB would otherwise silently make it a top-level class).
    #[error("cannot create HTB class {classid} on {iface}: parent class {parent} does not exist")]
    ParentMissing {
        /// Interface label.
        iface: String,
        /// The class to create, as `1:10`.
        classid: String,
        /// The missing parent, as `1:1`.
        parent: String,
    },
    /// The requested change cannot be made in place by this kernel.
    #[error("cannot {op} {object} on {iface}: {reason}")]
    Unsupported {
        /// What was attempted.
        op: TcOp,
        /// Interface label.
        iface: String,
        /// The tc object.
        object: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

impl TcError {
    /// The positive errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            TcError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub(super) fn errno_hint(op: TcOp, errno: i32) -> &'static str {
    match (errno, op) {
        (libc::EEXIST, _) => "it already exists",
        (libc::ENOENT, TcOp::ChangeClass | TcOp::DeleteClass) => "no such class",
        (libc::ENOENT, TcOp::CreateClass) => "the HTB qdisc it belongs to does not exist",
        (libc::ENOENT, TcOp::PutLeaf) => {
            "the parent class does not exist, or this kernel lacks the qdisc kind"
        }
        (libc::ENOENT, TcOp::AddRoot | TcOp::ReplaceRoot | TcOp::RestoreRoot) => {
            "this kernel lacks the qdisc kind"
        }
        (libc::ENOENT, _) => "it does not exist",
        (libc::EINVAL, _) => "the kernel rejected the parameters",
        (libc::EBUSY, _) => "it is in use: child classes or filters are still attached",
        (libc::EPERM | libc::EACCES, _) => "CAP_NET_ADMIN is required",
        (libc::ENODEV, _) => "the interface disappeared",
        (libc::EOPNOTSUPP, _) => "not supported by this kernel or device",
        (libc::ENOMEM | libc::ENOBUFS, _) => "the kernel ran out of memory",
        _ => "",
    }
}

pub(super) fn describe(op: TcOp, errno: i32, ext_ack: Option<&str>) -> String {
    let os = std::io::Error::from_raw_os_error(errno);
    let mut s = format!("{os}");
    if let Some(msg) = ext_ack {
        s.push_str(&format!("; kernel says: \"{msg}\""));
    }
    let hint = errno_hint(op, errno);
    if !hint.is_empty() {
        s.push_str(&format!(" ({hint})"));
    }
    s
}

/// Extract NLMSGERR_ATTR_MSG from an error message payload (everything after
/// the error code: the echoed request header or request, then TLVs).
pub(super) fn parse_ext_ack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    const NLMSG_HDRLEN: usize = 16;
    let off = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let orig_len = payload
            .get(0..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
        (orig_len + 3) & !3
    };
    let tlvs = payload.get(off..)?;
    enc::nlas(tlvs)
        .find(|(k, _)| *k == NLMSGERR_ATTR_MSG)
        .map(|(_, v)| {
            let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
            String::from_utf8_lossy(&v[..end]).into_owned()
        })
        .filter(|s| !s.is_empty())
}
