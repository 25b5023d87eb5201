//! `cargo xtask vm-test`: build the image and the testers' initramfs, then run the VM
//! tier's driver (`shaper-vm-test`) with the options below; and the A/B upgrade tests'
//! images it needs.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};

use crate::{bench::run_bin, build_release_shaper, image, step, workspace};

#[derive(clap::Args, Clone)]
pub(crate) struct VmOpts {
    /// Seconds of measured traffic per run.
    #[arg(long, default_value_t = 20)]
    pub(crate) seconds: u32,
    /// Profiles to run (default: all): adsl, fttc, efm, adsl-syncdrop.
    #[arg(long, value_delimiter = ',')]
    pub(crate) profiles: Vec<String>,
    /// Gateway modes to run (default: fifo and shaper, + autorate on adsl-syncdrop; with
    /// --soak: shaper, fifo, plain-htb-fq_codel): fifo, shaper, autorate, shaper-cake,
    /// plain-htb, plain-htb-fq_codel.
    #[arg(long)]
    pub(crate) modes: Option<String>,
    /// Fail unless the shaper beat the FIFO gateway on video delay and every transfer
    /// completed (what the test suite runs).
    #[arg(long)]
    pub(crate) assert: bool,
    /// Soak: run the profiles' modes this many rounds, interleaved, and count kernel
    /// crashes in every VM (consoles kept in target/vm-soak/soak/). Fails if a gateway
    /// crashed.
    #[arg(long, value_name = "ROUNDS")]
    pub(crate) soak: Option<u32>,
    /// qemu CPU model of the gateway VM (default: qemu's own, qemu64).
    #[arg(long)]
    pub(crate) gateway_cpu: Option<String>,
    /// vCPUs of the gateway VM.
    #[arg(long, default_value_t = 1)]
    pub(crate) gateway_smp: u32,
    /// qemu machine type of the gateway VM (default: pc).
    #[arg(long)]
    pub(crate) gateway_machine: Option<String>,
    /// Appended to the gateway VM's kernel command line.
    #[arg(long, default_value = "")]
    pub(crate) gateway_append: String,
    /// Also run the crash reproducer `shaper-sockchurn --rate N` in the gateway VM
    /// (AF_UNIX datagram sockets made and closed N times a second; 0: unbounded).
    #[arg(long, value_name = "RATE")]
    pub(crate) gateway_churn: Option<u32>,
    /// Boot every VM with this kernel from images/kernels.lock (the image built with it);
    /// results go to a folder named after it (target/vm-results-NAME).
    #[arg(long)]
    pub(crate) kernel: Option<String>,
    /// Profiles also run with the gateway as a transparent bridge (site.toml mode =
    /// "bridge"): FIFO bridge, then the shaper with its daemon killed mid-call.
    #[arg(long, value_delimiter = ',')]
    pub(crate) bridge: Vec<String>,
    /// Also the calls run: the gateway's per-call loss and jitter held against the
    /// receivers' at 0, 1 and 3 % loss, RTP and SRTP, twenty calls at once and a flood.
    #[arg(long)]
    pub(crate) calls: bool,
    /// Only the calls run (no profiles, no disk image).
    #[arg(long)]
    pub(crate) only_calls: bool,
}

impl VmOpts {
    pub(crate) fn new(seconds: u32, profiles: &[&str]) -> VmOpts {
        VmOpts {
            seconds,
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            modes: None,
            assert: false,
            soak: None,
            gateway_cpu: None,
            gateway_smp: 1,
            gateway_machine: None,
            gateway_append: String::new(),
            gateway_churn: None,
            kernel: None,
            bridge: Vec::new(),
            calls: false,
            only_calls: false,
        }
    }
}

/// The VM tier (`shaper-vm-test`): the comparison tables by default; with `modes`, those
/// gateways only (the download bench), written to target/vm-bench; with `soak`, the crash
/// soak, written to target/vm-soak.
pub(crate) fn vm_test(o: &VmOpts) -> Result<()> {
    let shaper = build_release_shaper()?;
    let images = image_dir(o.kernel.as_deref());
    let opts = image::Options {
        allow_drift: true,
        out: images.clone(),
        kernel: o.kernel.clone(),
        ..Default::default()
    };
    let img = image::build(&opts, &shaper)?;
    let tester = images.join("tester-initramfs.cpio.gz");
    step("tester initramfs for the client and server VMs");
    image::build_tester_initramfs(&img, &tester)?;
    let mut out = if o.soak.is_some() {
        "target/vm-soak"
    } else if o.modes.is_some() {
        "target/vm-bench"
    } else {
        "target/vm-results"
    }
    .to_string();
    if let Some(k) = &o.kernel {
        out = format!("{out}-{k}");
    }
    let mut args = vec![
        "--kernel".to_string(),
        img.kernel.display().to_string(),
        "--gateway-initramfs".into(),
        img.initramfs.display().to_string(),
        "--tester-initramfs".into(),
        tester.display().to_string(),
        "--seconds".into(),
        o.seconds.to_string(),
        "--out".into(),
        workspace().join(out).display().to_string(),
        "--gateway-smp".into(),
        o.gateway_smp.to_string(),
    ];
    if !o.profiles.is_empty() {
        args.push("--profiles".into());
        args.push(o.profiles.join(","));
    }
    if o.modes.is_none() && o.soak.is_none() && !o.only_calls {
        args.push("--disk".into());
        args.push(images.join("gateway.img").display().to_string());
        // The A/B upgrade tests' images (their own key, versions and folder).
        if o.kernel.is_none() {
            let up = workspace().join("target/images-upgrade");
            upgrade_images(&shaper, &up)?;
            args.push("--upgrade-images".into());
            args.push(up.display().to_string());
        }
    }
    for (flag, v) in [
        ("--modes", &o.modes),
        ("--gateway-cpu", &o.gateway_cpu),
        ("--gateway-machine", &o.gateway_machine),
    ] {
        if let Some(v) = v {
            args.push(flag.into());
            args.push(v.clone());
        }
    }
    for (flag, v) in [("--soak", o.soak), ("--gateway-churn", o.gateway_churn)] {
        if let Some(v) = v {
            args.push(flag.into());
            args.push(v.to_string());
        }
    }
    if !o.gateway_append.is_empty() {
        args.push("--gateway-append".into());
        args.push(o.gateway_append.clone());
    }
    if !o.bridge.is_empty() {
        args.push("--bridge-profiles".into());
        args.push(o.bridge.join(","));
    }
    for (flag, on) in [
        ("--assert", o.assert),
        ("--calls", o.calls),
        ("--only-calls", o.only_calls),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    run_bin("shaper-vm-test", &args)
}

/// The VM tier's A/B upgrade images (tests/src/upgrade.rs) in `dir`: a key pair made there
/// (test-key, test-key.pub: never the committed one), and three images trusting it: old/
/// (the workspace's version V, the disk to start from), good/ (V.1) and bad/ (V.2, whose
/// shaper exits at once), the last two signed. The boot assessment's times are shortened
/// on their command line: marked good after 5 s of shaping, else rebooted at 30 s of uptime
/// (15 s for the bad image, which never shapes: each of its three tries costs that plus a
/// reboot). Built side by side (the packages are in the cache by then: vm-test builds
/// target/images first). `versions` lists the three versions.
pub(crate) fn upgrade_images(shaper: &Path, dir: &Path) -> Result<()> {
    let key = dir.join("test-key");
    if !key.exists() {
        image::new_key(&key)?;
    }
    let public = dir.join("test-key.pub");
    let v = env!("CARGO_PKG_VERSION");
    let versions = [v.to_string(), format!("{v}.1"), format!("{v}.2")];
    step("upgrade test images: old, good, bad");
    std::thread::scope(|s| {
        let jobs: Vec<_> = [
            ("old", &versions[0], false, false, 30),
            ("good", &versions[1], true, false, 30),
            ("bad", &versions[2], true, true, 15),
        ]
        .into_iter()
        .map(|(name, version, sign, broken, bad_after)| {
            let opts = image::Options {
                allow_drift: true,
                out: dir.join(name),
                version: Some(version.clone()),
                update_key: public.clone(),
                sign: sign.then(|| key.clone()),
                extra_cmdline: format!("shaper.good_after=5 shaper.bad_after={bad_after}"),
                break_shaper: broken,
                ..Default::default()
            };
            s.spawn(move || {
                image::build(&opts, shaper)
                    .map(|_| ())
                    .with_context(|| format!("the upgrade test image {name}"))
            })
        })
        .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().map_err(|_| anyhow!("an image build panicked"))?)
    })?;
    std::fs::write(dir.join("versions"), versions.join(" ") + "\n")?;
    Ok(())
}

/// The image's output folder: target/images, or target/images-NAME for another kernel.
pub(crate) fn image_dir(kernel: Option<&str>) -> PathBuf {
    workspace().join(match kernel {
        Some(k) => format!("target/images-{k}"),
        None => "target/images".to_string(),
    })
}
