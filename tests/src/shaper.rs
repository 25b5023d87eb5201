//! Drives the product binary (`shaper check|apply|status --json|remove`) inside the gateway
//! namespace, with per-test pin and run directories so runs never share state.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::util;

static SHAPER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where the product keeps its pins; the harness mounts bpffs here if it is missing.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Output of one product command.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn into_tuple(self) -> (ExitStatus, String, String) {
        (self.status, self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// The product binary, run in one namespace with its own state directories.
///
/// The binary is `$SHAPER_BIN`, else `<workspace>/target/debug/shaper`. Each driver passes
/// `SHAPER_BPFFS=/sys/fs/bpf/shaper-test-<pid>-<n>` and `SHAPER_RUN=/run/shaper-test-<pid>-<n>`
/// to the binary (override with [`Shaper::with_dirs`]); dropping the driver runs `remove` if
/// an `apply` was not undone, then deletes both directories (which unpins whatever is left).
pub struct Shaper<'a> {
    ns: &'a Netns,
    bin: PathBuf,
    bpffs_dir: PathBuf,
    run_dir: PathBuf,
    applied: bool,
    /// More environment for every command (e.g. `SHAPER_ATTACH=netlink`).
    env: Vec<(String, String)>,
}

impl<'a> Shaper<'a> {
    /// `$SHAPER_BIN` or `<workspace>/target/debug/shaper`.
    pub fn binary_path() -> PathBuf {
        match std::env::var_os("SHAPER_BIN") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target/debug/shaper"),
        }
    }

    /// A driver for the binary in `ns` (normally the topology's `gw`). Fails, saying how to
    /// build it, when the binary is missing; mounts bpffs at /sys/fs/bpf if it is not.
    pub fn new(ns: &'a Netns) -> Result<Self> {
        let bin = Self::binary_path();
        if !bin.is_file() {
            bail!(
                "shaper binary not found at {} (build it with `cargo build -p shaper-user`, or set SHAPER_BIN)",
                bin.display()
            );
        }
        ensure_bpffs()?;
        let n = SHAPER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("shaper-test-{}-{n}", std::process::id());
        Self::with_dirs(
            ns,
            bin,
            Path::new(BPFFS_ROOT).join(&tag),
            Path::new("/run").join(&tag),
        )
    }

    /// A driver with explicit binary and state directories (created if missing).
    pub fn with_dirs(
        ns: &'a Netns,
        bin: PathBuf,
        bpffs_dir: PathBuf,
        run_dir: PathBuf,
    ) -> Result<Self> {
        for d in [&bpffs_dir, &run_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Shaper {
            ns,
            bin,
            bpffs_dir,
            run_dir,
            applied: false,
            env: Vec::new(),
        })
    }

    /// Sets `key=value` in the environment of every later command.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The command `shaper ARGS` in the namespace with the state-directory variables set.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = self.ns.cmd(&self.bin, args);
        c.env("SHAPER_BPFFS", &self.bpffs_dir)
            .env("SHAPER_RUN", &self.run_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<CmdOutput> {
        let mut cmd = self.command(args);
        let out = util::output(&mut cmd)?;
        Ok(CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn exec_ok<S: AsRef<OsStr>>(&self, what: &str, args: &[S]) -> Result<CmdOutput> {
        let out = self.exec(args)?;
        if !out.status.success() {
            bail!("`shaper {what}` failed: {out}");
        }
        Ok(out)
    }

    /// `shaper check CONFIG`, whatever its exit status.
    pub fn check(&self, config: &Path) -> Result<CmdOutput> {
        self.exec(&[OsStr::new("check"), config.as_os_str()])
    }

    /// `shaper apply CONFIG`; fails unless it exits 0.
    pub fn apply(&mut self, config: &Path) -> Result<CmdOutput> {
        // Mark first: a half-done apply must be removed too.
        self.applied = true;
        self.exec_ok("apply", &[OsStr::new("apply"), config.as_os_str()])
    }

    /// `shaper remove`; fails unless it exits 0.
    pub fn remove(&mut self) -> Result<CmdOutput> {
        let out = self.exec_ok("remove", &["remove"])?;
        self.applied = false;
        Ok(out)
    }

    /// `shaper status --json`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.exec_ok("status --json", &["status", "--json"])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("`shaper status --json` printed no JSON: {}", out.stdout))
    }

    /// Entries left under the pin directory (should be none after remove or a failed check).
    pub fn leftover_pins(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.bpffs_dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p.clone());
                }
                found.push(p);
            }
        }
        found
    }
}

impl Drop for Shaper<'_> {
    fn drop(&mut self) {
        if self.applied {
            match self.exec(&["remove"]) {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!("warning: cleanup `shaper remove` failed: {o}"),
                Err(e) => eprintln!("warning: cleanup `shaper remove`: {e:#}"),
            }
        }
        // Removing pin files unpins (and so detaches) whatever the product left behind.
        for d in [&self.bpffs_dir, &self.run_dir] {
            if let Err(e) = std::fs::remove_dir_all(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("warning: removing {}: {e}", d.display());
                }
            }
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (fresh machines lack it).
pub fn ensure_bpffs() -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _src = f.next();
        f.next() == Some(BPFFS_ROOT) && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    eprintln!("note: bpffs not mounted at {BPFFS_ROOT}; mounting it");
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]))?;
    Ok(())
}

/// `shaper run CONFIG` in the gateway namespace (as on the box), its stderr in a file;
/// [`Daemon::stop`] or drop sends SIGTERM (the daemon removes its shaping), then SIGKILL.
pub struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon, `RUST_LOG` set to `rust_log`; returns at once.
    pub fn spawn(shaper: &Shaper, config: &Path, log: PathBuf, rust_log: &str) -> Result<Daemon> {
        let child = shaper
            .command(&[OsStr::new("run"), config.as_os_str()])
            .env("RUST_LOG", rust_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).context("daemon log file")?)
            .spawn()
            .context("starting `shaper run`")?;
        Ok(Daemon { child, log })
    }

    /// Starts the daemon and waits (up to 20 s) until `shaper status` answers.
    pub fn start(shaper: &Shaper, config: &Path, log: PathBuf, rust_log: &str) -> Result<Daemon> {
        let mut d = Self::spawn(shaper, config, log, rust_log)?;
        let t0 = std::time::Instant::now();
        while shaper.status_json().is_err() {
            if let Some(st) = d.exited() {
                bail!("`shaper run` exited ({st}) before applying:\n{}", d.log());
            }
            if t0.elapsed() > std::time::Duration::from_secs(20) {
                bail!("`shaper run` did not apply within 20 s:\n{}", d.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(d)
    }

    /// The daemon's process id (nsenter execs shaper: the same process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM and wait (20 s, then SIGKILL and an error); returns the exit status and the
    /// log.
    pub fn stop(mut self) -> Result<(ExitStatus, String)> {
        let status = self.terminate()?;
        Ok((status, self.log()))
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        // SAFETY: signalling our own child (nsenter execs shaper: same pid).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if t0.elapsed() > std::time::Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "`shaper run` did not stop within 20 s of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
    }
}
