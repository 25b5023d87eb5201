//! qemu machinery for the VM tier: software-emulated VMs (`-accel tcg`, never KVM: the
//! KVM device on these machines cannot run stock kernels), no network but point-to-point
//! links made of UDP datagram sockets on 127.0.0.1 (`-netdev dgram`), the host's file system
//! shared read-only over 9p for the tester VMs.
//!
//! Every VM is killed when its `Vm` is dropped, so a failing run leaves no qemu behind.

use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One end of a point-to-point link: this VM's UDP port and the peer's.
#[derive(Clone, Copy, Debug)]
pub struct LinkEnd {
    pub local: u16,
    pub remote: u16,
    /// Last byte of the NIC's MAC address (52:54:00:5e:00:xx).
    pub mac: u8,
}

/// A link between two VMs: returns the two ends.
pub fn link(a: u16, b: u16, mac_a: u8, mac_b: u8) -> (LinkEnd, LinkEnd) {
    (
        LinkEnd {
            local: a,
            remote: b,
            mac: mac_a,
        },
        LinkEnd {
            local: b,
            remote: a,
            mac: mac_b,
        },
    )
}

/// `n` consecutive free UDP ports on 127.0.0.1 (checked by binding them).
pub fn free_ports(n: u16) -> Result<u16> {
    let seed = std::process::id() as u16;
    for attempt in 0..200u16 {
        let base = 20_000 + (seed.wrapping_mul(31).wrapping_add(attempt * 97) % 20_000);
        let socks: Vec<_> = (0..n)
            .map(|i| UdpSocket::bind(("127.0.0.1", base + i)))
            .collect();
        if socks.iter().all(|s| s.is_ok()) {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free UDP ports on 127.0.0.1")
}

pub struct VmSpec<'a> {
    pub name: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: String,
    pub memory_mb: u32,
    pub nics: Vec<LinkEnd>,
    /// 9p shares: (host path, mount tag, read-only).
    pub shares: Vec<(PathBuf, &'a str, bool)>,
    /// The serial console goes to this file.
    pub console: PathBuf,
}

pub struct Vm {
    pub name: String,
    pub console: PathBuf,
    child: Child,
}

impl Vm {
    pub fn start(spec: VmSpec<'_>) -> Result<Vm> {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-smp", "1", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-m", &spec.memory_mb.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", spec.console.display()))
            .arg("-kernel")
            .arg(spec.kernel)
            .arg("-initrd")
            .arg(spec.initrd)
            .args(["-append", &spec.cmdline])
            .args(["-nic", "none"]);
        for (i, n) in spec.nics.iter().enumerate() {
            c.arg("-netdev").arg(format!(
                "dgram,id=n{i},local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
                n.local, n.remote
            ));
            c.arg("-device").arg(format!(
                "virtio-net-pci,netdev=n{i},mac=52:54:00:5e:00:{:02x}",
                n.mac
            ));
        }
        for (path, tag, ro) in &spec.shares {
            c.arg("-virtfs").arg(format!(
                "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
                path.display(),
                if *ro { ",readonly=on" } else { "" }
            ));
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = c
            .spawn()
            .with_context(|| format!("starting qemu for the {} VM", spec.name))?;
        Ok(Vm {
            name: spec.name.to_string(),
            console: spec.console,
            child,
        })
    }

    /// Whether qemu is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the VM to power itself off.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 100 ms until it is true, the timeout passes (error naming `what`) or a VM
/// dies (error with the tail of its console).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    vms: &mut [&mut Vm],
    mut f: impl FnMut() -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Ok(t0.elapsed());
        }
        for vm in vms.iter_mut() {
            if !vm.running() {
                bail!(
                    "the {} VM stopped while waiting for {what}; its console ends:\n{}",
                    vm.name,
                    tail(&vm.console_text(), 25)
                );
            }
        }
        if t0.elapsed() > timeout {
            let mut msg = format!("timed out after {timeout:?} waiting for {what}");
            for vm in vms.iter() {
                msg.push_str(&format!(
                    "\n--- {} console (tail) ---\n{}",
                    vm.name,
                    tail(&vm.console_text(), 15)
                ));
            }
            bail!(msg);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Appends a gzip'd newc cpio of `files` (path in the VM, contents, mode) to a copy of
/// `base`: the kernel unpacks concatenated archives in order, later files replacing earlier
/// ones, which is how a site's config reaches an unchanged firmware initramfs here.
pub fn initramfs_with_overlay(
    base: &Path,
    files: &[(&str, &str, u32)],
    work: &Path,
    out: &Path,
) -> Result<()> {
    let root = work.join("overlay");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for (path, text, mode) in files {
        let p = root.join(path.trim_start_matches('/'));
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(&p, text)?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
    }
    let cpio = work.join("overlay.cpio.gz");
    let script = format!(
        "cd '{}' && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -n > '{}'",
        root.display(),
        cpio.display()
    );
    let st = Command::new("sh").args(["-c", &script]).status()?;
    if !st.success() {
        bail!("building the overlay archive failed");
    }
    let mut bytes = fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    bytes.extend(fs::read(&cpio)?);
    fs::write(out, bytes)?;
    Ok(())
}
