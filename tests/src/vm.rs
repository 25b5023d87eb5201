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
    /// How qemu emulates the machine (the soak varies these to tell the emulator from the
    /// kernel and the product).
    pub emulation: Emulation,
}

/// qemu's CPU model, vCPU count and machine type for one VM. The default is what the VM
/// tier always ran: qemu's default CPU model (qemu64) and machine (pc), one vCPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Emulation {
    pub cpu: Option<String>,
    pub smp: u32,
    pub machine: Option<String>,
}

impl Default for Emulation {
    fn default() -> Self {
        Emulation {
            cpu: None,
            smp: 1,
            machine: None,
        }
    }
}

impl Emulation {
    /// The qemu arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["-smp".to_string(), self.smp.to_string()];
        if let Some(cpu) = &self.cpu {
            a.extend(["-cpu".to_string(), cpu.clone()]);
        }
        if let Some(m) = &self.machine {
            a.extend(["-machine".to_string(), m.clone()]);
        }
        a
    }

    /// A short label for tables: "qemu64/pc/1", "max/q35/2".
    pub fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.cpu.as_deref().unwrap_or("qemu64"),
            self.machine.as_deref().unwrap_or("pc"),
            self.smp
        )
    }
}

pub struct Vm {
    pub name: String,
    pub console: PathBuf,
    child: Child,
}

impl Vm {
    pub fn start(spec: VmSpec<'_>) -> Result<Vm> {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-nodefaults", "-no-reboot"])
            .args(spec.emulation.args())
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

/// Runs an mtools command (`mcopy`, `mdir`, ...) on the EFI partition of a copy of the
/// flashable disk (`gateway.img`: the partition starts at 1 MiB); its stdout.
pub fn mtools(tool: &str, disk: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .arg("-i")
        .arg(format!("{}@@1M", disk.display()))
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Gives a disk-booted gateway its two ports (virtio NICs, MACs 52:54:00:5e:`mac5`:00 and
/// :01) on UDP datagram sockets on 127.0.0.1 with nothing at the other end: the ports exist
/// and come up, no traffic leaves.
pub fn unconnected_nics(c: &mut Command, mac5: u8) -> Result<()> {
    let base = free_ports(4)?;
    for (i, port) in [base, base + 2].into_iter().enumerate() {
        c.arg("-netdev").arg(format!(
            "dgram,id=n{i},local.type=inet,local.host=127.0.0.1,local.port={port},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            port + 1
        ));
        c.arg("-device").arg(format!(
            "virtio-net-pci,netdev=n{i},mac=52:54:00:5e:{mac5:02x}:{i:02x}"
        ));
    }
    Ok(())
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

/// The first line of a kernel crash in a VM's console, if it has one: a panic, an oops, a
/// BUG, a double fault or general protection fault, a soft lockup.
pub fn crash_line(console: &str) -> Option<&str> {
    const SIGNS: &[&str] = &[
        "Kernel panic",
        "double fault",
        "general protection fault",
        "Oops",
        "BUG:",
        "Fatal exception",
        "soft lockup",
        "hung_task",
    ];
    console
        .lines()
        .find(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(str::trim)
}

/// The emulator's own fault, recognised by what no CPU can do: a double fault whose saved
/// RFLAGS has reserved bits set (22-63 are zero on every x86-64 CPU; qemu 7.2's TCG, which
/// computes flags lazily, pushed pointer-like values such as `715ada02` and `c15b5a02` in
/// every such crash seen, with or without the product in the VM). Returns the double fault
/// line and the flags. Anything else that crashes a kernel is not the emulator's.
pub fn emulator_fault(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    let at = lines.iter().position(|l| l.contains("double fault"))?;
    // The register dump follows within a few dozen lines; the first EFLAGS is the fault's.
    let flags = lines[at..lines.len().min(at + 40)]
        .iter()
        .find_map(|l| l.split("EFLAGS: ").nth(1))?
        .split_whitespace()
        .next()?;
    let v = u64::from_str_radix(flags, 16).ok()?;
    (v & !0x003f_ffff != 0).then(|| {
        format!(
            "{} with RFLAGS {flags} (reserved bits set: no CPU can, the emulator did)",
            lines[at].trim()
        )
    })
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
    files: &[(&str, &[u8], u32)],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_flags_in_a_double_fault_are_the_emulators() {
        // From the soak's server VM (no product code in it).
        let c = "[   30.775693] traps: PANIC: double fault, error_code: 0x0\n\
                 [   30.777308] Oops: double fault: 0000 [#1] PREEMPT SMP NOPTI\n\
                 [   30.778145] RIP: 0010:kmem_cache_alloc_node_noprof+0x70/0x330\n\
                 [   30.779291] RSP: 0018:ffffcb7f4064b740 EFLAGS: 715ada02\n";
        let f = emulator_fault(c).expect("recognised");
        assert!(f.contains("715ada02"), "{f}");
        assert!(crash_line(c).is_some());
        // A double fault with flags a CPU can hold (a stack overflow, say) is not.
        let real = c.replace("715ada02", "00010246");
        assert_eq!(emulator_fault(&real), None);
        // Nor is any other crash.
        assert_eq!(
            emulator_fault("BUG: kernel NULL pointer dereference\nRSP: 0018:x EFLAGS: 715ada02"),
            None
        );
        assert_eq!(emulator_fault("all quiet"), None);
    }
}
