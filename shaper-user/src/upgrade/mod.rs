//! A/B firmware upgrades with Automatic Boot Assessment (systemd-boot 252 boot counting).
//!
//! The boot disk's EFI partition holds systemd-boot (EFI/BOOT/BOOTX64.EFI) and the unified
//! kernel images (UKIs) in EFI/Linux/, named `shaper-gateway-VERSION.efi`. `shaper upgrade
//! FILE` checks a signed upgrade file (see [`parse`]: a manifest signed with ed25519 that
//! carries the image's size and SHA-256, then the UKI), checks that the UKI is this
//! product's (PE sections `.linux`, `.initrd`, `.cmdline`, `.osrel` with the running image's
//! IMAGE_ID) and newer than the running one, and writes it beside the running image as
//! `shaper-gateway-VERSION+3.efi`: written under a name the boot loader ignores, synced,
//! read back from the disk and hashed again, then renamed and the folder synced. systemd-boot
//! sorts it first (same IMAGE_ID, higher IMAGE_VERSION) and counts its tries down in the file
//! name at each boot (`+3` -> `+2-1` -> `+1-2` -> `+0-3`); an entry with no tries left sorts
//! last, so the previous image boots again. The new system marks itself good (renames the
//! file to its name without the counter, as systemd-bless-boot does) once it has shaped with
//! the site's config for a while: images/rootfs/usr/libexec/shaper/boot-assess, which also
//! reboots a trial boot that never gets there.
//!
//! The running image is never overwritten or deleted; other images (an older one, a failed
//! trial, a half-written temporary) are deleted before a new one is written.

mod commands;
mod efi;
mod install;
mod order;
mod signed;
mod uki;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use self::commands::{healthy, mark_good, version_report};
pub use self::efi::{loader_path, loader_var, running_file};
pub use self::install::{install, Installed};
pub use self::order::{boot_order, entries, parse_counter, vercmp, Counted, Entry};
pub use self::signed::{hex, parse, parse_key, read_key, sign, unhex, verify, Manifest, Parts};
pub use self::uki::{
    file_os_release, parse_os_release, pe_sections, uki_os_release, Section, UKI_SECTIONS,
};

/// The first line of an upgrade file.
pub const MAGIC: &str = "shaper-upgrade 1";
/// Tries a new image gets (systemd-boot counts them down in its file name).
pub const TRIES: u32 = 3;
/// systemd's loader interface GUID: the suffix of its variables in efivarfs.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The UKIs' folder on the EFI partition.
pub const UKI_DIR: &str = "EFI/Linux";
/// What systemd-boot skips in EFI/Linux: the temporary a new image is written to.
const TMP_NAME: &str = ".tmp-upgrade.efi";
/// The longest manifest accepted (the signed header before the image).
const MAX_HEADER: usize = 4096;

/// Where things are on the box (tests point them elsewhere).
#[derive(Debug, Clone)]
pub struct Device {
    /// The boot disk's EFI partition, mounted read-only by the boot script.
    pub esp: PathBuf,
    /// efivarfs.
    pub efivars: PathBuf,
    /// The running image's os-release.
    pub os_release: PathBuf,
    /// The update signing key's public half, in the running image.
    pub key: PathBuf,
    /// Remount `esp` read-write for writes (false where it is not a mount point: tests).
    pub remount: bool,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            esp: "/boot/efi".into(),
            efivars: "/sys/firmware/efi/efivars".into(),
            os_release: "/etc/os-release".into(),
            key: "/etc/shaper/update-key.pub".into(),
            remount: true,
        }
    }
}
