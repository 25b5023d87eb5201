//! "A box that survives anyway": boots the flashable gateway disk image under OVMF (UEFI
//! firmware with its own, persistent EFI variable store), makes its kernel panic from outside
//! (an NMI from the qemu monitor; the image sets `kernel.unknown_nmi_panic`, the way a
//! front-panel NMI button or a BMC's diagnostic interrupt forces a crash dump), and measures
//! how long the box takes to reboot by itself and shape again with the site's config; it also
//! checks that the crash record survived the reboot (pstore in EFI variables, saved by the
//! image's boot script onto the EFI partition) and that `shaper status` shows it.
//!
//! Software emulation only (`-accel tcg`), no network: the two NICs are UDP datagram sockets
//! on 127.0.0.1 with nothing at the other end. qemu is killed on every path (a Drop guard).

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::vm::{mtools, tail, unconnected_nics};

/// UEFI firmware (Debian's `ovmf`): code read-only, a private copy of the variable store.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

const SHAPING: &str = "shaper-image: shaping at ";
const PANIC: &str = "Kernel panic - not syncing";
const CRASHED: &str = "shaper-image: the previous boot crashed: ";
const EARLIER: &str = "shaper-image: last crash (an earlier boot): ";
const SITE_CONFIG: &str = "site shaper.toml from";
/// OVMF prints this on the serial port when it starts the boot loader: the reset happened.
const FIRMWARE_BOOT: &str = "BdsDxe: starting";
/// The boot script's first line, once per boot.
const BOOT_BANNER: &str = "shaper-image: shaper gateway";
/// busybox init's askfirst, then login's prompt.
const ACTIVATE: &str = "Please press Enter to activate this console.";
const PASSWORD_PROMPT: &str = "Password: ";
/// Root's console password on the test disks, and its hash (`busybox mkpasswd -m sha512`)
/// as the site folder's `console-password` carries it.
pub const CONSOLE_PASSWORD: &str = "shaper-lab";
pub const CONSOLE_PASSWORD_HASH: &str =
    "$6$labsaltlabsa$rnaACkZsmMCL2B11XPAvcOcr.1xtp/3g/HWEAf2OR.EpslPl0oOgLK.M9AwzJUFoEuKKmWOOb7VINrYApU19B/";

/// A site's config (a small ADSL surgery), different from the image's default so that
/// shaping with it shows the EFI partition was read after the reboot too.
pub const SITE_SHAPER_TOML: &str = r#"# panic-recovery test site: ADSL2+ 8/0.9 Mbit/s
[interfaces]
wan = "wan0"
lan = "lan0"

[upload]
rate = "850kbit"

[download]
rate = "7mbit"

[[class]]
name = "video"
priority = 0
guaranteed = "40%"

[[class]]
name = "default"
priority = 3
guaranteed = "60%"
default = true

[[rule]]
name = "consultation-media"
class = "video"
protocol = "udp"
dst_ports = ["3478-3481"]
"#;

/// What one panic and recovery measured.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Host wall time from starting qemu to the firmware starting the boot loader (what
    /// OVMF itself takes under emulation, for comparison with `panic_to_firmware`).
    pub firmware_start: Duration,
    /// Guest uptime at `shaping at` in the first boot.
    pub first_shaping_uptime_s: f64,
    /// Host wall time from sending `nmi` (or typing the sysrq) to the panic line.
    pub nmi_to_panic: Duration,
    /// Host wall time from the panic line on the console to the next boot's `shaping at`:
    /// the outage (panic=N wait, firmware, kernel, boot script, shaper).
    pub panic_to_shaping: Duration,
    /// Of which: from the panic line to the firmware starting the boot loader again
    /// (the crash record being written, the panic=N wait, the reset and the firmware).
    pub panic_to_firmware: Duration,
    /// Guest uptime at `shaping at` after the reboot (kernel start to shaping).
    pub shaping_uptime_s: f64,
    /// The panic line as the console showed it.
    pub panic_line: String,
    /// Text after "the previous boot crashed: " in the second boot, if it said so.
    pub crash_summary: Option<String>,
    /// Both boots read the site's shaper.toml from the EFI partition.
    pub site_config_both_boots: bool,
    /// The `last crash:` lines of `shaper status` run on the rebooted box's console.
    pub status_last_crash: Option<String>,
    /// /run/shaper/save-crash.log of the rebooted box (the boot script's steps, by uptime).
    pub save_crash_log: Option<String>,
    /// Folders under shaper/crash/ on the EFI partition after the run.
    pub esp_crash_dirs: Vec<String>,
    /// summary.txt of the newest of them.
    pub esp_summary: Option<String>,
    /// What a later clean reboot showed (with [`Options::clean_reboot`]).
    pub after_clean_reboot: Option<CleanReboot>,
    pub console: PathBuf,
}

/// After the recovery, a clean `reboot` typed on the console: the last crash must still be
/// shown (from the copy on the EFI partition), as an earlier boot's.
#[derive(Debug, Clone)]
pub struct CleanReboot {
    /// Text after "last crash (an earlier boot): " on the console at boot.
    pub console_line: Option<String>,
    /// The `last crash:` lines of `shaper status` after it.
    pub status_last_crash: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also reboot cleanly afterwards and check the crash is still shown.
    pub clean_reboot: bool,
    /// Panic from inside instead (`echo c > /proc/sysrq-trigger` typed on the console): a
    /// panic in process context, where the NMI's is in NMI context.
    pub sysrq: bool,
}

impl Recovery {
    /// Whether everything the feature promises happened.
    pub fn ok(&self) -> bool {
        let later = self.after_clean_reboot.as_ref().is_none_or(|c| {
            c.console_line.is_some()
                && c.status_last_crash
                    .as_deref()
                    .is_some_and(|s| s.contains("in an earlier boot"))
        });
        later
            && self.crash_summary.is_some()
            && self.site_config_both_boots
            && !self.esp_crash_dirs.is_empty()
            && self
                .status_last_crash
                .as_deref()
                .is_some_and(|s| s.contains("last crash: Kernel panic"))
    }

    pub fn report(&self) -> String {
        format!(
            "panic to shaping again: {:.1} s wall (panic to firmware {:.1} s; the rebooted kernel shaping at {:.2} s uptime); NMI to panic {:.2} s; first boot: firmware {:.1} s wall, shaping at {:.2} s uptime\n\
             panic: {}\n\
             next boot: {}\n\
             site config read in both boots: {}\n\
             shaper status: {}\n\
             save-crash steps (uptime, s): {}\n\
             on the EFI partition: shaper/crash/{}{}",
            self.panic_to_shaping.as_secs_f64(),
            self.panic_to_firmware.as_secs_f64(),
            self.shaping_uptime_s,
            self.nmi_to_panic.as_secs_f64(),
            self.firmware_start.as_secs_f64(),
            self.first_shaping_uptime_s,
            self.panic_line,
            self.crash_summary
                .as_deref()
                .map_or_else(|| "NO crash line".to_string(), |s| format!("{CRASHED}{s}")),
            self.site_config_both_boots,
            self.status_last_crash.as_deref().unwrap_or("NO last crash line"),
            self.save_crash_log
                .as_deref()
                .map_or_else(|| "-".to_string(), |l| l.replace('\n', "; ")),
            self.esp_crash_dirs.join(", shaper/crash/"),
            self.after_clean_reboot
                .as_ref()
                .map_or_else(String::new, |c| format!(
                    "\nafter a clean reboot: {}\nafter a clean reboot, shaper status: {}",
                    c.console_line
                        .as_deref()
                        .map_or_else(|| "NO last crash line".to_string(), |l| format!("{EARLIER}{l}")),
                    c.status_last_crash.as_deref().unwrap_or("NO last crash line")
                )),
        )
    }
}

/// Kills qemu however the run ends.
pub(crate) struct Qemu(pub(crate) Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Qemu {
    pub(crate) fn check_running(&mut self, console: &Path) -> Result<()> {
        if let Ok(Some(st)) = self.0.try_wait() {
            let mut err = String::new();
            if let Some(e) = self.0.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "qemu exited ({st}): {}\nconsole ends:\n{}",
                err.trim(),
                tail(&read_console(console), 30)
            );
        }
        Ok(())
    }
}

pub(crate) fn read_console(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// Polls the console every 50 ms until `f` finds something in the text from byte `from` on.
pub(crate) fn wait_for<T>(
    qemu: &mut Qemu,
    console: &Path,
    what: &str,
    timeout: Duration,
    from: usize,
    mut f: impl FnMut(&str) -> Option<T>,
) -> Result<(T, Instant)> {
    let t0 = Instant::now();
    loop {
        let text = read_console(console);
        if let Some(v) = text.get(from..).and_then(&mut f) {
            return Ok((v, Instant::now()));
        }
        qemu.check_running(console)?;
        if t0.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}; console ends:\n{}",
                tail(&text, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest uptime on the first `shaping at` line, and the byte offset after that line.
pub(crate) fn shaping_at(text: &str) -> Option<(f64, usize)> {
    let i = text.find(SHAPING)?;
    let rest = &text[i + SHAPING.len()..];
    let end = rest.find('\n')?;
    let v = rest[..end]
        .trim()
        .trim_end_matches(" s")
        .trim()
        .parse()
        .ok()?;
    Some((v, i + SHAPING.len() + end))
}

fn line_with<'a>(text: &'a str, needle: &str) -> Option<(&'a str, usize)> {
    let i = text.find(needle)?;
    let start = text[..i].rfind('\n').map_or(0, |n| n + 1);
    let end = text[i..].find('\n').map(|n| i + n)?;
    Some((text[start..end].trim(), end))
}

/// Sends one command on the qemu human monitor (a unix socket) and returns its answer.
fn monitor(sock: &Path, cmd: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to the qemu monitor {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    // The banner and the first prompt.
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&out).contains("(qemu)")
        && t0.elapsed() < Duration::from_secs(10)
    {
        if let Ok(n) = s.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
    }
    s.write_all(format!("{cmd}\n").as_bytes())?;
    out.clear();
    let t0 = Instant::now();
    while String::from_utf8_lossy(&out).matches("(qemu)").count() < 1
        && t0.elapsed() < Duration::from_secs(5)
    {
        if let Ok(n) = s.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A flashable disk booted under OVMF with a persistent variable store, its serial console
/// on a socket (logged to `console`, typed on with [`Console::type_line`]) and the qemu
/// monitor on `monitor`. Files live in `workdir`, emptied first; `prepare` edits the disk
/// copy (mtools) before qemu starts. qemu is killed when `qemu` drops.
pub(crate) struct BootedBox {
    // Declared before qemu: dropped (socket shut, reader joined) before qemu is killed.
    pub(crate) term: Console,
    pub(crate) qemu: Qemu,
    pub(crate) console: PathBuf,
    pub(crate) monitor: PathBuf,
    pub(crate) disk: PathBuf,
}

impl BootedBox {
    pub(crate) fn start(
        disk_image: &Path,
        workdir: &Path,
        mac5: u8,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<BootedBox> {
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                bail!("{f} is missing (apt-get install ovmf)");
            }
        }
        if workdir.exists() {
            fs::remove_dir_all(workdir)
                .with_context(|| format!("emptying {}", workdir.display()))?;
        }
        fs::create_dir_all(workdir)?;
        let workdir = workdir.canonicalize()?;
        let mon = workdir.join("monitor.sock");
        let ser = workdir.join("serial.sock");
        if ser.as_os_str().len() > 100 {
            bail!(
                "{} is too long a path for a unix socket: use a shorter work folder",
                ser.display()
            );
        }
        let disk = workdir.join("gateway.img");
        fs::copy(disk_image, &disk).with_context(|| format!("copying {}", disk_image.display()))?;
        let vars = workdir.join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars).context("copying the OVMF variable store")?;
        // The site's console password (without one the console is locked).
        let pw = workdir.join("console-password");
        fs::write(&pw, format!("{CONSOLE_PASSWORD_HASH}\n"))?;
        mtools(
            "mcopy",
            &disk,
            &[
                "-o",
                &pw.display().to_string(),
                "::/shaper/console-password",
            ],
        )
        .context("writing the console password into the EFI partition")?;
        prepare(&disk)?;
        let console = workdir.join("console.log");

        let mut c = Command::new("qemu-system-x86_64");
        // No -no-reboot: the guest's own reboot after the panic is the point.
        c.args(["-accel", "tcg", "-smp", "1", "-m", "512", "-nodefaults"])
            .args(["-display", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            // wait=on: the guest starts once the console's reader is connected (nothing lost).
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser0,path={},server=on,wait=on",
                ser.display()
            ))
            .args(["-serial", "chardev:ser0"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", mon.display()))
            .args(["-nic", "none"]);
        unconnected_nics(&mut c, mac5)?;
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut qemu = Qemu(c.spawn().context("starting qemu-system-x86_64")?);
        // Declared after qemu: dropped (socket shut, reader joined) before qemu is killed.
        let term = Console::connect(&ser, &console, &mut qemu)?;
        Ok(BootedBox {
            term,
            qemu,
            console,
            monitor: mon,
            disk,
        })
    }
}

/// The serial console: qemu's end is a unix socket; a thread copies everything the guest
/// prints into the console file (qemu's own logfile would drop output while no client is
/// connected), and `type_line` types on it (the first Enter activates busybox's askfirst
/// shell). Shuts the socket and joins the thread when dropped.
pub(crate) struct Console {
    writer: UnixStream,
    /// The console log, read to see when the box asks for its password.
    log: PathBuf,
    /// Boots whose console this has logged in on.
    logins: usize,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Console {
    pub(crate) fn connect(sock: &Path, log: &Path, qemu: &mut Qemu) -> Result<Console> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                    return Err(e).with_context(|| {
                        format!("connecting to the serial console {}", sock.display())
                    })
                }
                Err(_) => {
                    qemu.check_running(log)?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut file = fs::File::create(log)?;
        let mut rd = stream.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match rd.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if file.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        Ok(Console {
            writer: stream,
            log: log.to_path_buf(),
            logins: 0,
            reader: Some(reader),
        })
    }

    /// Types `line` and Enter. The console asks for root's password at each boot
    /// ([`CONSOLE_PASSWORD`], put on the disk by [`BootedBox::start`]): the first line typed
    /// in a boot logs in first.
    pub(crate) fn type_line(&mut self, line: &str) -> Result<()> {
        let count = |needle: &str| read_console(&self.log).matches(needle).count();
        let boots = count(BOOT_BANNER);
        if boots > self.logins {
            let t0 = Instant::now();
            while count(ACTIVATE) < boots {
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "the console never offered a login; it ends:\n{}",
                        tail(&read_console(&self.log), 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let asked = count(PASSWORD_PROMPT);
            self.writer.write_all(b"\r")?;
            let t0 = Instant::now();
            while count(PASSWORD_PROMPT) <= asked {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "the console did not ask for the password; it ends:\n{}",
                        tail(&read_console(&self.log), 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            self.writer
                .write_all(format!("{CONSOLE_PASSWORD}\r").as_bytes())?;
            std::thread::sleep(Duration::from_millis(1500));
            self.logins = boots;
        }
        self.writer.write_all(format!("{line}\r").as_bytes())?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// `mdir`/`mtype` on the disk copy's EFI partition (1 MiB in).
/// Boots a copy of `disk_image` (target/images/gateway.img) with [`SITE_SHAPER_TOML`] in its
/// EFI partition, waits for shaping, panics the kernel with an NMI, and waits for the box to
/// come back and shape again on its own. Files (disk copy, variable store, console log,
/// sockets) are in `workdir`, which is emptied first.
pub fn panic_recovery(disk_image: &Path, workdir: &Path) -> Result<Recovery> {
    panic_recovery_with(disk_image, workdir, &Options::default())
}

/// [`panic_recovery`], optionally followed by a clean reboot ([`Options`]).
pub fn panic_recovery_with(disk_image: &Path, workdir: &Path, opts: &Options) -> Result<Recovery> {
    let b = BootedBox::start(disk_image, workdir, 0x02, |disk| {
        let site = disk.with_file_name("shaper.toml");
        fs::write(&site, SITE_SHAPER_TOML)?;
        mtools(
            "mcopy",
            disk,
            &["-o", &site.display().to_string(), "::/shaper/shaper.toml"],
        )
        .context("writing the site config into the EFI partition")?;
        Ok(())
    })?;
    let (mut qemu, mut term, console, mon, disk) = (
        b.qemu,
        b.term,
        b.console.clone(),
        b.monitor.clone(),
        b.disk.clone(),
    );
    let t_start = Instant::now();

    let boot_timeout = Duration::from_secs(300);
    let (_, t_fw0) = wait_for(
        &mut qemu,
        &console,
        "the firmware to start the boot loader",
        boot_timeout,
        0,
        |t| t.contains(FIRMWARE_BOOT).then_some(()),
    )?;
    let ((first_shaping_uptime_s, first_end), _) = wait_for(
        &mut qemu,
        &console,
        "the first boot to shape",
        boot_timeout,
        0,
        shaping_at,
    )?;

    let t_nmi = if opts.sysrq {
        term.type_line("")?;
        term.type_line("")?;
        let t = Instant::now();
        term.type_line("echo c > /proc/sysrq-trigger")?;
        t
    } else {
        let answer = monitor(&mon, "nmi")?;
        if answer.contains("rror") {
            bail!("the qemu monitor refused `nmi`: {answer}");
        }
        Instant::now()
    };
    let ((panic_line, panic_end), t_panic) = wait_for(
        &mut qemu,
        &console,
        "the kernel to panic after the NMI",
        Duration::from_secs(60),
        first_end,
        |t| line_with(t, PANIC).map(|(l, e)| (l.to_string(), e)),
    )?;
    let panic_end = first_end + panic_end;
    let (_, t_firmware) = wait_for(
        &mut qemu,
        &console,
        "the firmware to boot again after the panic",
        boot_timeout,
        panic_end,
        |t| t.contains(FIRMWARE_BOOT).then_some(()),
    )?;
    let ((shaping_uptime_s, _), t_shaping) = wait_for(
        &mut qemu,
        &console,
        "the rebooted gateway to shape",
        boot_timeout,
        panic_end,
        shaping_at,
    )?;
    let text = read_console(&console);
    let first_boot = &text[..first_end.min(text.len())];
    let second_boot = text.get(panic_end..).unwrap_or_default();
    let crash_summary = line_with(second_boot, CRASHED)
        .map(|(l, _)| l.split(CRASHED).nth(1).unwrap_or_default().to_string());
    let site_config_both_boots =
        first_boot.contains(SITE_CONFIG) && second_boot.contains(SITE_CONFIG);

    // `shaper status` on the rebooted box's own console.
    let status_out = status_on_console(&mut term, &mut qemu, &console)?;
    let status_last_crash = last_crash_lines(&status_out);
    // The log's lines start with an uptime; the first one says "start".
    let save_crash_log = status_out
        .lines()
        .position(|l| l.ends_with(" start"))
        .map(|i| {
            status_out
                .lines()
                .skip(i)
                .take_while(|l| !l.contains("status-done"))
                .collect::<Vec<_>>()
                .join("\n")
        });

    let after_clean_reboot = if opts.clean_reboot {
        let before = read_console(&console).len();
        term.type_line("reboot")?;
        wait_for(
            &mut qemu,
            &console,
            "the firmware after a clean reboot",
            boot_timeout,
            before,
            |t| t.contains(FIRMWARE_BOOT).then_some(()),
        )?;
        wait_for(
            &mut qemu,
            &console,
            "shaping after a clean reboot",
            boot_timeout,
            before,
            shaping_at,
        )?;
        let text = read_console(&console);
        let console_line = line_with(text.get(before..).unwrap_or_default(), EARLIER)
            .map(|(l, _)| l.split(EARLIER).nth(1).unwrap_or_default().to_string());
        let out = status_on_console(&mut term, &mut qemu, &console)?;
        Some(CleanReboot {
            console_line,
            status_last_crash: last_crash_lines(&out),
        })
    } else {
        None
    };

    drop(term);
    drop(qemu);
    let listing = mtools("mdir", &disk, &["-b", "::/shaper/crash"]).unwrap_or_default();
    let mut esp_crash_dirs: Vec<String> = listing
        .lines()
        .filter_map(|l| l.trim_end_matches('/').rsplit('/').next())
        .filter(|n| !n.is_empty() && !n.starts_with('.'))
        .map(str::to_string)
        .collect();
    esp_crash_dirs.sort();
    let esp_summary = esp_crash_dirs.last().and_then(|d| {
        mtools(
            "mtype",
            &disk,
            &[&format!("::/shaper/crash/{d}/summary.txt")],
        )
        .ok()
    });
    if crash_summary.is_none() {
        eprintln!(
            "warning: the rebooted gateway did not say the previous boot crashed; its console:\n{}",
            tail(second_boot, 40)
        );
    }
    Ok(Recovery {
        firmware_start: t_fw0.saturating_duration_since(t_start),
        first_shaping_uptime_s,
        nmi_to_panic: t_panic.saturating_duration_since(t_nmi),
        panic_to_shaping: t_shaping.saturating_duration_since(t_panic),
        panic_to_firmware: t_firmware.saturating_duration_since(t_panic),
        shaping_uptime_s,
        panic_line,
        crash_summary,
        site_config_both_boots,
        status_last_crash,
        save_crash_log,
        esp_crash_dirs,
        esp_summary,
        after_clean_reboot,
        console,
    })
}

/// Runs `shaper status` (and shows save-crash's log) on the console; returns what the
/// console printed meanwhile.
fn status_on_console(term: &mut Console, qemu: &mut Qemu, console: &Path) -> Result<String> {
    let before = read_console(console).len();
    for l in [
        "",
        "",
        "shaper status --interval 0 | head -n 4; cat /run/shaper/save-crash.log; echo status-done",
    ] {
        term.type_line(l)?;
    }
    wait_for(
        qemu,
        console,
        "`shaper status` on the console",
        Duration::from_secs(60),
        before,
        |t| t.contains("\nstatus-done").then_some(()),
    )?;
    Ok(read_console(console)
        .get(before..)
        .unwrap_or_default()
        .to_string())
}

/// The `last crash:` line of `shaper status` and the indented lines after it.
fn last_crash_lines(status_out: &str) -> Option<String> {
    let i = status_out.find("last crash:")?;
    let mut lines = status_out[i..].lines();
    let mut v = vec![lines.next()?];
    v.extend(lines.take_while(|l| l.starts_with("  ")).take(2));
    Some(v.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shaping_and_panic_lines() {
        let t = "x\nshaper-image: shaping at 12.11 s\ny\n[   18.372113] Kernel panic - not syncing: NMI: Not continuing\nz\n";
        let (v, end) = shaping_at(t).expect("shaping");
        assert!((v - 12.11).abs() < 1e-9);
        let (l, _) = line_with(&t[end..], PANIC).expect("panic");
        assert_eq!(
            l,
            "[   18.372113] Kernel panic - not syncing: NMI: Not continuing"
        );
        assert!(shaping_at("shaper-image: shaping at 3").is_none());
    }
}
