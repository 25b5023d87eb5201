//! Small helpers the gateway tests share: writing a config, counting the TCX programs on
//! an interface, waiting for a condition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{tc::TcAttachType, SchedClassifier};

use crate::Netns;

/// Writes `text` to `dir/name` and returns the path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// TCX egress programs attached to `dev` in namespace `ns`.
pub fn tcx_programs(ns: &Netns, dev: &'static str) -> usize {
    ns.within(move || {
        let (_, progs) = SchedClassifier::query_tcx(dev, TcAttachType::Egress)?;
        Ok(progs.len())
    })
    .expect("query tcx")
}

/// Polls `f` every 20 ms until it holds; panics after `timeout`. Returns the wait.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// Gives a receiving socket `bytes` of buffer, past `rmem_max` (SO_RCVBUFFORCE; we are
/// root), so a receiver descheduled on a busy box does not drop what it is counting.
pub fn force_rcvbuf(sock: &std::net::UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt on an open socket with a valid int option.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
