//! `cargo xtask image`: the command's options and the build (with
//! `--check-reproducible`, twice and compared); the image itself is built by image.rs.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{build_release_shaper, image, vm::image_dir, workspace};

/// The image command's options for A/B upgrades (images/README.md, "Upgrades").
#[derive(clap::Args, Clone, Default)]
pub(crate) struct ImageUpgradeOpts {
    /// Sign the image with this private key (a hex seed file, see --new-key): writes the
    /// upgrade file shaper-gateway-VERSION.upgrade next to gateway.img.
    #[arg(long, value_name = "KEY")]
    pub(crate) sign: Option<PathBuf>,
    /// The public update key the image trusts (default images/update-key.pub).
    #[arg(long, value_name = "PUB")]
    pub(crate) update_key: Option<PathBuf>,
    /// The image's version (IMAGE_VERSION; default the workspace's).
    #[arg(long, value_name = "VERSION")]
    pub(crate) image_version: Option<String>,
    /// Output folder (default target/images).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Make a new update key pair (KEY, private, and KEY.pub) and exit; build nothing.
    #[arg(long, value_name = "KEY")]
    pub(crate) new_key: Option<PathBuf>,
    /// (for the VM tier) Build the upgrade tests' images into DIR and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    pub(crate) upgrade_test: Option<PathBuf>,
}

pub(crate) fn image_cmd(
    relock: bool,
    allow_drift: bool,
    check_reproducible: bool,
    kernel: Option<String>,
    upgrade: ImageUpgradeOpts,
) -> Result<()> {
    let shaper = build_release_shaper()?;
    let d = image::Options::default();
    let opts = image::Options {
        relock,
        allow_drift,
        out: upgrade
            .out
            .clone()
            .unwrap_or_else(|| image_dir(kernel.as_deref())),
        kernel: kernel.clone(),
        version: upgrade.image_version.clone(),
        update_key: upgrade.update_key.clone().unwrap_or(d.update_key),
        sign: upgrade.sign.clone(),
        ..Default::default()
    };
    let img = image::build(&opts, &shaper)?;
    if check_reproducible {
        let again = image::Options {
            out: match &upgrade.out {
                Some(o) => PathBuf::from(format!("{}-again", o.display())),
                None => workspace().join("target/images-again"),
            },
            allow_drift,
            kernel,
            version: opts.version.clone(),
            update_key: opts.update_key.clone(),
            ..Default::default()
        };
        let img2 = image::build(&again, &shaper)?;
        let mut same = true;
        for (name, h) in &img.sha256 {
            let h2 = img2.sha256.get(name).map(String::as_str).unwrap_or("");
            let ok = h == h2;
            same &= ok;
            eprintln!(
                "{} {name}: {h} / {h2}",
                if ok { "same" } else { "DIFFERENT" }
            );
        }
        if !same {
            bail!("two builds from the same inputs differ");
        }
        eprintln!("==> reproducible: two builds gave identical bytes");
    }
    Ok(())
}
