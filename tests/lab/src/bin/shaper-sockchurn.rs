//! `shaper-sockchurn`: a reproducer for the VM tier's crash soak, not part of the product.
//!
//! The gateway kernel's double fault was seen in `kmem_cache_alloc_lru` under
//! `__sys_socket` for an AF_UNIX datagram socket made by the shaper process: glibc's
//! `if_nametoindex` opens one per call (`__opensock`), and the daemon's health check calls
//! it for each port every 250 ms. This does the same allocation with no BPF program, no
//! shaper and no qdisc change: `socket(AF_UNIX, SOCK_DGRAM)` + `close`, `--rate` times a
//! second (0: as fast as it can), until killed. Run on a FIFO gateway under the soak's
//! traffic, it tells whether the crash needs the product at all.

use std::time::{Duration, Instant};

fn main() {
    let mut rate: u64 = 1000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rate" => {
                rate = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("--rate needs a number (per second; 0: unbounded)");
                    std::process::exit(2)
                })
            }
            _ => {
                eprintln!("usage: shaper-sockchurn [--rate N]");
                std::process::exit(2)
            }
        }
    }
    let gap = (rate > 0).then(|| Duration::from_nanos(1_000_000_000 / rate));
    let t0 = Instant::now();
    let mut n: u64 = 0;
    loop {
        // SAFETY: socket/close on a descriptor this loop owns.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd >= 0 {
                libc::close(fd);
            }
        }
        n += 1;
        if n.is_multiple_of(100_000) {
            eprintln!(
                "shaper-sockchurn: {n} sockets in {:.0} s",
                t0.elapsed().as_secs_f64()
            );
        }
        if let Some(gap) = gap {
            let due = gap * u32::try_from(n).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}
