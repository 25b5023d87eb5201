//! `Netns`: a uniquely named network namespace that removes itself (and the processes the
//! harness started in it) on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::util;

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `shp-<role>-<pid>-<counter>`, with `lo` up.
///
/// Commands run in it through `nsenter --net=/run/netns/NAME` (not `ip netns exec`, which
/// remounts /sys and so hides /sys/fs/bpf). Threads of the test process can join it with
/// [`Netns::spawn_thread`].
pub struct Netns {
    name: String,
    path: PathBuf,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("shp-{role}-{}-{n}", std::process::id());
        util::run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on Drop removes it, whatever fails next.
        let ns = Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind-mounted namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `nsenter --net=/run/netns/NAME PROG ARGS...`, ready to run.
    pub fn cmd<S: AsRef<std::ffi::OsStr>>(
        &self,
        prog: impl AsRef<std::ffi::OsStr>,
        args: &[S],
    ) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display())).arg(prog);
        c.args(args);
        c
    }

    /// Runs a program in the namespace to completion; fails unless it exits 0. Returns stdout.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, prog: &str, args: &[S]) -> Result<String> {
        util::run(&mut self.cmd(prog, args)).with_context(|| format!("in netns {}", self.name))
    }

    /// `ip ARGS` in the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.run("ip", args)
    }

    /// `sysctl -w KEY=VALUE` in the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Starts a background process in the namespace with stdio discarded; it is killed when
    /// the namespace is dropped (or by [`Netns::kill`]). Returns its pid.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(&self, prog: &str, args: &[S]) -> Result<u32> {
        let mut cmd = self.cmd(prog, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.spawn_cmd(cmd)
    }

    /// Like [`Netns::spawn`] for a prepared command (e.g. from [`Netns::cmd`]).
    pub fn spawn_cmd(&self, mut cmd: Command) -> Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning `{}` in {}", util::describe(&cmd), self.name))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Kills (SIGTERM, then SIGKILL after a grace period) and reaps one tracked process.
    pub fn kill(&self, pid: u32) {
        let child = {
            let mut kids = self.children.lock().unwrap_or_else(|e| e.into_inner());
            kids.iter()
                .position(|c| c.id() == pid)
                .map(|i| kids.swap_remove(i))
        };
        if let Some(child) = child {
            terminate(child);
        }
    }

    /// Moves the calling thread into this namespace. Only for threads the harness owns
    /// (setns(CLONE_NEWNET) changes the calling thread only; sockets it creates afterwards
    /// belong to this namespace and keep working from any thread).
    pub fn enter_current_thread(&self) -> Result<()> {
        let f =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        // SAFETY: f is an open namespace fd for the lifetime of the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!(
                "setns({}) failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Runs `f` on a new thread that has first entered this namespace.
    pub fn spawn_thread<T, F>(&self, f: F) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path.clone();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                let f_ns =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: f_ns is an open namespace fd for the lifetime of the call.
                if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns({name}) failed: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .expect("spawning a thread")
    }

    /// Runs `f` inside the namespace on a short-lived thread and returns its result; e.g. to
    /// create a socket that then lives in this namespace.
    pub fn within<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn_thread(f).join() {
            Ok(r) => r,
            Err(_) => bail!("thread inside {} panicked", self.name),
        }
    }

    /// Pids of all processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

fn terminate(mut child: Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for _ in 0..50 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Netns {
    fn drop(&mut self) {
        let kids = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for child in kids {
            terminate(child);
        }
        // Anything else still living in this (uniquely named, harness-made) namespace was
        // started by this harness too, e.g. an iperf3 client of a panicked test.
        let me = std::process::id() as i32;
        for pid in self.pids() {
            if pid != me {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}
