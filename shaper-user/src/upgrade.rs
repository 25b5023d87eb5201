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

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::persist::{sync_dir, Writable};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};

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

// ---------------------------------------------------------------------------------------
// The upgrade file

/// What the signed header says about the image after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub image_id: String,
    pub version: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

impl Manifest {
    /// The signed text: `shaper-upgrade 1`, then `image_id`, `version`, `size`, `sha256`
    /// lines in this order. The file is this text, a `signature HEX` line (ed25519 over the
    /// text, 64 bytes in hex), then the image's bytes.
    pub fn text(&self) -> String {
        format!(
            "{MAGIC}\nimage_id {}\nversion {}\nsize {}\nsha256 {}\n",
            self.image_id,
            self.version,
            self.size,
            hex(&self.sha256)
        )
    }

    fn parse(text: &str) -> Result<Manifest> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            bail!("not a shaper upgrade file (no `{MAGIC}` line)");
        }
        let mut field = |key: &str| -> Result<String> {
            let l = lines
                .next()
                .ok_or_else(|| anyhow!("the manifest has no {key}"))?;
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| anyhow!("the manifest has `{l}` where {key} belongs"))
        };
        let image_id = field("image_id")?;
        let version = field("version")?;
        let size = field("size")?.parse().context("the manifest's size")?;
        let sha256 = unhex(&field("sha256")?)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| anyhow!("the manifest's sha256 is not 32 bytes of hex"))?;
        if lines.next().is_some() {
            bail!("the manifest has more lines than it should");
        }
        check_version_chars(&version)?;
        Ok(Manifest {
            image_id,
            version,
            size,
            sha256,
        })
    }
}

/// An upgrade file taken apart (nothing checked yet).
pub struct Parts<'a> {
    pub signed: &'a [u8],
    pub signature: [u8; 64],
    pub image: &'a [u8],
}

/// Splits an upgrade file into the signed manifest, its signature and the image.
pub fn parse(file: &[u8]) -> Result<Parts<'_>> {
    let head = &file[..file.len().min(MAX_HEADER)];
    let at = head
        .windows(11)
        .position(|w| w == b"\nsignature ")
        .ok_or_else(|| anyhow!("not a signed shaper upgrade file (no signature line)"))?;
    let signed = &file[..at + 1];
    let rest = &file[at + 11..];
    let end = rest
        .iter()
        .take(200)
        .position(|&b| b == b'\n')
        .ok_or_else(|| anyhow!("the signature line has no end"))?;
    let sig = std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(unhex)
        .and_then(|v| <[u8; 64]>::try_from(v).ok())
        .ok_or_else(|| anyhow!("the signature is not 64 bytes of hex"))?;
    Ok(Parts {
        signed,
        signature: sig,
        image: &rest[end + 1..],
    })
}

/// Checks the signature with `key`, then the image's size and hash against the signed
/// manifest. Returns the manifest and the image's bytes.
pub fn verify<'a>(file: &'a [u8], key: &VerifyingKey) -> Result<(Manifest, &'a [u8])> {
    let p = parse(file)?;
    let sig = Signature::from_bytes(&p.signature);
    key.verify_strict(p.signed, &sig).map_err(|_| {
        anyhow!("the signature does not match this box's update key: not signed by it, or altered")
    })?;
    let text = std::str::from_utf8(p.signed).context("the manifest is not text")?;
    let m = Manifest::parse(text)?;
    if p.image.len() as u64 != m.size {
        bail!(
            "the image is {} bytes, its signed manifest says {}: cut short or altered",
            p.image.len(),
            m.size
        );
    }
    let h: [u8; 32] = Sha256::digest(p.image).into();
    if h != m.sha256 {
        bail!("the image's SHA-256 is not the signed one: altered");
    }
    Ok((m, p.image))
}

/// An upgrade file for `image`, signed with the 32-byte ed25519 seed `seed`.
pub fn sign(image: &[u8], image_id: &str, version: &str, seed: &[u8; 32]) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    let m = Manifest {
        image_id: image_id.into(),
        version: version.into(),
        size: image.len() as u64,
        sha256: Sha256::digest(image).into(),
    };
    let text = m.text();
    let sig = ed25519_dalek::SigningKey::from_bytes(seed).sign(text.as_bytes());
    let mut out = text.into_bytes();
    out.extend_from_slice(format!("signature {}\n", hex(&sig.to_bytes())).as_bytes());
    out.extend_from_slice(image);
    out
}

/// A key file: 64 hex digits on the first line that is not empty or a `#` comment.
pub fn read_key(path: &Path) -> Result<VerifyingKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the update key {}", path.display()))?;
    parse_key(&text).with_context(|| format!("the update key {}", path.display()))
}

pub fn parse_key(text: &str) -> Result<VerifyingKey> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| anyhow!("no key"))?;
    let b = unhex(line)
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| anyhow!("not 32 bytes of hex"))?;
    VerifyingKey::from_bytes(&b).map_err(|e| anyhow!("not an ed25519 public key: {e}"))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The image: a PE file with the UKI's sections

/// A PE section: its name and where its bytes are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// The section table of a PE file (x86-64), from its first bytes (the headers).
pub fn pe_sections(head: &[u8]) -> Result<Vec<Section>> {
    let u16_at = |o: usize| -> Result<u16> {
        head.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| anyhow!("the PE header is cut short"))
    };
    let u32_at = |o: usize| -> Result<u32> {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| anyhow!("the PE header is cut short"))
    };
    if head.get(..2) != Some(b"MZ".as_slice()) {
        bail!("not an EFI executable (no MZ header)");
    }
    let pe = u32_at(0x3c)? as usize;
    if head.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
        bail!("not an EFI executable (no PE signature)");
    }
    if u16_at(pe + 4)? != 0x8664 {
        bail!("not an x86-64 EFI executable");
    }
    let n = u16_at(pe + 6)? as usize;
    let opt = u16_at(pe + 20)? as usize;
    let table = pe + 24 + opt;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let s = table + i * 40;
        let raw = head
            .get(s..s + 8)
            .ok_or_else(|| anyhow!("the PE section table is cut short"))?;
        let name = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        let vsize = u32_at(s + 8)?;
        let rsize = u32_at(s + 16)?;
        let offset = u32_at(s + 20)?;
        let size = if vsize == 0 { rsize } else { vsize.min(rsize) };
        v.push(Section {
            name,
            offset: offset.into(),
            size: size.into(),
        });
    }
    Ok(v)
}

/// The sections a UKI of this product has.
pub const UKI_SECTIONS: &[&str] = &[".osrel", ".cmdline", ".linux", ".initrd"];

/// Checks that `image` is a UKI (the sections above, inside the file) and returns its
/// os-release.
pub fn uki_os_release(image: &[u8]) -> Result<BTreeMap<String, String>> {
    let head = &image[..image.len().min(64 * 1024)];
    let sections = pe_sections(head)?;
    for want in UKI_SECTIONS {
        let s = sections
            .iter()
            .find(|s| s.name == *want)
            .ok_or_else(|| anyhow!("not a unified kernel image: no {want} section"))?;
        if s.size == 0 || s.offset + s.size > image.len() as u64 {
            bail!("the {want} section is empty or outside the file");
        }
    }
    let os = sections
        .iter()
        .find(|s| s.name == ".osrel")
        .ok_or_else(|| anyhow!("no .osrel"))?;
    let text = &image[os.offset as usize..(os.offset + os.size) as usize];
    Ok(parse_os_release(&String::from_utf8_lossy(text)))
}

/// The os-release of an installed UKI, reading only its headers and `.osrel`.
pub fn file_os_release(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f = fs::File::open(path)?;
    let mut head = vec![0u8; 4096];
    let n = read_up_to(&mut f, &mut head)?;
    head.truncate(n);
    let s = pe_sections(&head)?
        .into_iter()
        .find(|s| s.name == ".osrel")
        .ok_or_else(|| anyhow!("no .osrel section"))?;
    if s.size > 64 * 1024 {
        bail!(".osrel is too large");
    }
    f.seek(SeekFrom::Start(s.offset))?;
    let mut b = vec![0u8; s.size as usize];
    f.read_exact(&mut b)?;
    Ok(parse_os_release(&String::from_utf8_lossy(&b)))
}

fn read_up_to(f: &mut fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// os-release(5): KEY=value lines, values maybe quoted.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        let l = l.trim().trim_end_matches('\0');
        if l.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            m.insert(k.trim().to_string(), v.to_string());
        }
    }
    m
}

/// IMAGE_VERSION, else VERSION_ID (what systemd-boot orders by, near enough).
fn os_version(os: &BTreeMap<String, String>) -> Option<&str> {
    os.get("IMAGE_VERSION")
        .or_else(|| os.get("VERSION_ID"))
        .map(String::as_str)
}

/// IMAGE_ID, else ID (systemd-boot's sort key).
fn os_id(os: &BTreeMap<String, String>) -> Option<&str> {
    os.get("IMAGE_ID")
        .or_else(|| os.get("ID"))
        .map(String::as_str)
}

fn check_version_chars(v: &str) -> Result<()> {
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-~^".contains(&c))
    {
        bail!("version `{v}`: only letters, digits and . - ~ ^ are allowed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Versions and the boot loader's order

fn valid_version_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"~-^.".contains(&c)
}

/// systemd's `strverscmp_improved` (what systemd-boot 252 compares versions and entry ids
/// with): `~` sorts before anything (pre-releases), a `-` segment before a `.` one, numbers
/// numerically and newer than letters.
pub fn vercmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let (mut i, mut j) = (0usize, 0usize);
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    loop {
        while at(a, i) != 0 && !valid_version_char(at(a, i)) {
            i += 1;
        }
        while at(b, j) != 0 && !valid_version_char(at(b, j)) {
            j += 1;
        }
        for sep in [b'~', b'-', b'^', b'.'] {
            if sep == b'~' {
                if at(a, i) == b'~' || at(b, j) == b'~' {
                    let r = (at(a, i) != b'~').cmp(&(at(b, j) != b'~'));
                    if r != Ordering::Equal {
                        return r;
                    }
                    i += 1;
                    j += 1;
                }
                // The end of either string: the longer is newer.
                if at(a, i) == 0 || at(b, j) == 0 {
                    return a[i.min(a.len())..].cmp(&b[j.min(b.len())..]);
                }
                continue;
            }
            if at(a, i) == sep || at(b, j) == sep {
                let r = (at(a, i) != sep).cmp(&(at(b, j) != sep));
                if r != Ordering::Equal {
                    return r;
                }
                i += 1;
                j += 1;
            }
        }
        let (mut ii, mut jj) = (i, j);
        if at(a, i).is_ascii_digit() || at(b, j).is_ascii_digit() {
            while at(a, ii).is_ascii_digit() {
                ii += 1;
            }
            while at(b, jj).is_ascii_digit() {
                jj += 1;
            }
            let r = (ii != i).cmp(&(jj != j));
            if r != Ordering::Equal {
                return r;
            }
            while at(a, i) == b'0' && i < ii {
                i += 1;
            }
            while at(b, j) == b'0' && j < jj {
                j += 1;
            }
            let r = (ii - i).cmp(&(jj - j));
            if r != Ordering::Equal {
                return r;
            }
            let r = a[i..ii].cmp(&b[j..jj]);
            if r != Ordering::Equal {
                return r;
            }
        } else {
            while at(a, ii).is_ascii_alphabetic() {
                ii += 1;
            }
            while at(b, jj).is_ascii_alphabetic() {
                jj += 1;
            }
            let n = (ii - i).min(jj - j);
            let r = a[i..i + n].cmp(&b[j..j + n]);
            if r != Ordering::Equal {
                return r;
            }
            let r = (ii - i).cmp(&(jj - j));
            if r != Ordering::Equal {
                return r;
            }
        }
        i = ii;
        j = jj;
    }
}

/// A boot-counted file name taken apart: `NAME+LEFT[-DONE].efi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// The part before the last `+`.
    pub base: String,
    pub left: u32,
    pub done: u32,
    /// What follows the counter (`.efi`).
    pub suffix: String,
}

impl Counted {
    /// bless-boot's "good" name: the counter dropped.
    pub fn good_name(&self) -> String {
        format!("{}{}", self.base, self.suffix)
    }
}

/// Parses a boot counter the way systemd-boot and bless-boot do: the last `+`, digits,
/// optionally `-` and digits, directly before `.efi`. `None`: not counted.
pub fn parse_counter(name: &str) -> Option<Counted> {
    let dot = name.len().checked_sub(4)?;
    if !name[dot..].eq_ignore_ascii_case(".efi") {
        return None;
    }
    let stem = &name[..dot];
    let plus = stem.rfind('+')?;
    let counter = &stem[plus + 1..];
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (l, Some(d)),
        None => (counter, None),
    };
    let num = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some(Counted {
        base: stem[..plus].to_string(),
        left: num(left)?,
        done: match done {
            Some(d) => num(d)?,
            None => 0,
        },
        suffix: name[dot..].to_string(),
    })
}

/// An image in EFI/Linux as systemd-boot sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file name.
    pub file: String,
    /// IMAGE_ID (else ID) of its .osrel.
    pub sort_key: Option<String>,
    /// IMAGE_VERSION (else VERSION_ID).
    pub version: Option<String>,
    /// Tries left and done (None: not counted).
    pub counter: Option<(u32, u32)>,
}

impl Entry {
    fn id(&self) -> String {
        self.file.to_ascii_lowercase()
    }
}

/// systemd-boot 252's `config_entry_compare`: `Less` boots first.
pub fn boot_order(a: &Entry, b: &Entry) -> Ordering {
    let left = |e: &Entry| e.counter.map(|c| c.0);
    let r = (left(a) == Some(0)).cmp(&(left(b) == Some(0)));
    if r != Ordering::Equal {
        return r;
    }
    let r = a.sort_key.is_none().cmp(&b.sort_key.is_none());
    if r != Ordering::Equal {
        return r;
    }
    if let (Some(x), Some(y)) = (&a.sort_key, &b.sort_key) {
        let r = x.cmp(y);
        if r != Ordering::Equal {
            return r;
        }
        let r = vercmp(
            b.version.as_deref().unwrap_or(""),
            a.version.as_deref().unwrap_or(""),
        );
        if r != Ordering::Equal {
            return r;
        }
    }
    let r = vercmp(&b.id(), &a.id());
    if r != Ordering::Equal {
        return r;
    }
    match (a.counter, b.counter) {
        (Some((la, da)), Some((lb, db))) => lb.cmp(&la).then(da.cmp(&db)),
        _ => Ordering::Equal,
    }
}

/// Whether systemd-boot looks at a file in EFI/Linux.
fn loader_sees(name: &str) -> bool {
    !name.starts_with('.')
        && !name.starts_with("auto-")
        && name.len() > 4
        && name[name.len() - 4..].eq_ignore_ascii_case(".efi")
}

/// The images in `esp`/EFI/Linux, in the order systemd-boot tries them.
pub fn entries(esp: &Path) -> Result<Vec<Entry>> {
    let dir = esp.join(UKI_DIR);
    let mut v = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let file = e.file_name().to_string_lossy().into_owned();
        if !loader_sees(&file) {
            continue;
        }
        // systemd-boot 252 ignores a UKI without .osrel.
        let Ok(os) = file_os_release(&e.path()) else {
            continue;
        };
        if os_id(&os).is_none() && !os.contains_key("NAME") && !os.contains_key("PRETTY_NAME") {
            continue;
        }
        v.push(Entry {
            counter: parse_counter(&file).map(|c| (c.left, c.done)),
            sort_key: os_id(&os).map(str::to_string),
            version: os_version(&os).map(str::to_string),
            file,
        });
    }
    v.sort_by(boot_order);
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// The box: EFI variables, the running image

/// An EFI variable of systemd's loader interface as text (UTF-16LE after 4 attribute
/// bytes), None when it is not set.
pub fn loader_var(efivars: &Path, name: &str) -> Option<String> {
    let b = fs::read(efivars.join(format!("{name}-{LOADER_GUID}"))).ok()?;
    let data = b.get(4..)?;
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16_lossy(&units);
    Some(s.trim_end_matches('\0').to_string())
}

/// `\EFI\Linux\x+2-1.efi` -> `EFI/Linux/x+2-1.efi`.
pub fn loader_path(var: &str) -> String {
    var.replace('\\', "/").trim_start_matches('/').to_string()
}

/// A name in `dir` that equals `name` but for case (FAT ignores case; the loader's entry id
/// is lowercased).
fn find_nocase(dir: &Path, name: &str) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.eq_ignore_ascii_case(name))
}

/// The running image's file in EFI/Linux (as it is named now), if known.
pub fn running_file(b: &Device) -> Option<String> {
    let dir = b.esp.join(UKI_DIR);
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let name = p.rsplit('/').next().unwrap_or_default();
        if let Some(n) = find_nocase(&dir, name) {
            return Some(n);
        }
        // Marked good since it booted.
        return parse_counter(name).and_then(|c| find_nocase(&dir, &c.good_name()));
    }
    let sel = loader_var(&b.efivars, "LoaderEntrySelected")?;
    find_nocase(&dir, &sel)
}

fn read_os_release(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(parse_os_release(
        &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// The EFI partition remounted read-write until the guard drops (none where the device
/// is a plain folder, as in tests).
fn writable(b: &Device) -> Result<Option<Writable>> {
    if b.remount {
        Writable::remount(&b.esp).map(Some)
    } else {
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------
// The commands

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    pub file: String,
    pub version: String,
    pub removed: Vec<String>,
}

/// `shaper upgrade FILE`: everything is checked before anything is written.
pub fn install(b: &Device, file: &Path) -> Result<Installed> {
    let bytes = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let key = read_key(&b.key)?;
    let (m, image) = verify(&bytes, &key).context("refused")?;
    let os = uki_os_release(image).context("refused")?;
    let running_os = read_os_release(&b.os_release)?;
    let my_id = os_id(&running_os).ok_or_else(|| anyhow!("the running image has no IMAGE_ID"))?;
    let my_version = os_version(&running_os).unwrap_or("");
    if m.image_id != my_id || os_id(&os) != Some(my_id) {
        bail!(
            "refused: an image of `{}` (its .osrel says `{}`), this box runs `{my_id}`",
            m.image_id,
            os_id(&os).unwrap_or("none")
        );
    }
    if os_version(&os) != Some(m.version.as_str()) {
        bail!(
            "refused: the manifest says version {}, the image's .osrel {}",
            m.version,
            os_version(&os).unwrap_or("none")
        );
    }
    if vercmp(&m.version, my_version) != Ordering::Greater {
        bail!(
            "refused: version {} is not newer than the running {my_version}",
            m.version
        );
    }
    let dir = b.esp.join(UKI_DIR);
    if !dir.is_dir() {
        bail!(
            "{} is missing: the boot disk is not mounted there, or this box does not boot through systemd-boot (an image from before A/B upgrades: reflash it)",
            dir.display()
        );
    }
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let good = parse_counter(p.rsplit('/').next().unwrap_or_default())
            .map(|c| c.good_name())
            .unwrap_or_default();
        if find_nocase(&dir, &good).is_none() {
            bail!(
                "the running image ({p}) is on trial and not marked good yet: the image it would fall back to must stay; try again once it is (`shaper version`)"
            );
        }
    }
    let running = running_file(b);
    let Some(running) = running else {
        bail!(
            "cannot tell which image in {} is running (no LoaderEntrySelected): nothing written",
            dir.display()
        );
    };
    let target = format!("{my_id}-{}+{TRIES}.efi", m.version);

    // Space: what is there besides the running image goes first.
    let mut doomed = Vec::new();
    for e in fs::read_dir(&dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if !n.eq_ignore_ascii_case(&running) {
            doomed.push(n);
        }
    }
    doomed.sort();
    let freed: u64 = doomed
        .iter()
        .filter_map(|n| fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    let free = free_bytes(&dir)?;
    if free + freed < m.size + (1 << 20) {
        bail!(
            "the EFI partition has {} MiB free (with the other images gone), the image needs {} MiB",
            (free + freed) >> 20,
            (m.size >> 20) + 1
        );
    }

    let _rw = writable(b)?;
    for n in &doomed {
        println!("shaper: upgrade: removing {UKI_DIR}/{n} (not the running image)");
        fs::remove_file(dir.join(n)).with_context(|| format!("removing {n}"))?;
    }
    if !doomed.is_empty() {
        sync_dir(&dir)?;
    }
    let tmp = dir.join(TMP_NAME);
    println!(
        "shaper: upgrade: writing {} bytes to {UKI_DIR}/{TMP_NAME}",
        image.len()
    );
    let _ = std::io::stdout().flush();
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for chunk in image.chunks(1 << 20) {
            f.write_all(chunk)?;
        }
        f.sync_all().context("syncing the new image")?;
        // Drop it from the page cache so the read-back comes from the disk.
        // SAFETY: a valid, open file descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    println!("shaper: upgrade: written and synced; reading it back");
    let mut f = fs::File::open(&tmp)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let back: [u8; 32] = h.finalize().into();
    if n != m.size || back != m.sha256 {
        let _ = fs::remove_file(&tmp);
        bail!(
            "the image read back from the EFI partition differs from the signed one: not installed"
        );
    }
    fs::rename(&tmp, dir.join(&target)).context("renaming the new image into place")?;
    sync_dir(&dir)?;
    println!("shaper: upgrade: installed {UKI_DIR}/{target} ({TRIES} tries); it boots at the next reboot");
    Ok(Installed {
        file: target,
        version: m.version,
        removed: doomed,
    })
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context("statvfs");
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// `shaper upgrade --mark-good`: the running trial image becomes good (bless-boot's rename).
/// Returns what was done, in words.
pub fn mark_good(b: &Device) -> Result<String> {
    let Some(var) = loader_var(&b.efivars, "LoaderBootCountPath") else {
        return Ok("not a counted boot: nothing to mark".into());
    };
    let rel = loader_path(&var);
    let (folder, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
    let c = parse_counter(name)
        .ok_or_else(|| anyhow!("LoaderBootCountPath {var} has no boot counter"))?;
    let dir = b.esp.join(folder);
    let good = c.good_name();
    if find_nocase(&dir, &good).is_some() {
        return Ok(format!("{folder}/{good} is marked good already"));
    }
    let Some(now) = find_nocase(&dir, name) else {
        bail!("{rel} is not on {}", b.esp.display());
    };
    let _rw = writable(b)?;
    fs::rename(dir.join(&now), dir.join(&good))
        .with_context(|| format!("renaming {folder}/{now} to {good}"))?;
    sync_dir(&dir)?;
    Ok(format!("marked good: {folder}/{now} -> {good}"))
}

/// `shaper upgrade --healthy`: the daemon runs and shapes with the site's config (the
/// boot disk's shaper/shaper.toml when there is one).
pub fn healthy(b: &Device, paths: &crate::apply::Paths) -> Result<()> {
    let daemon = fs::read_dir("/proc")?
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let args: Vec<&[u8]> = c.split(|&x| x == 0).collect();
            args.len() >= 2 && args[0].ends_with(b"shaper") && args[1] == b"run".as_slice()
        });
    if !daemon {
        bail!("the shaper daemon is not running");
    }
    let state = crate::apply::State::load(paths)?.ok_or_else(|| anyhow!("nothing is applied"))?;
    let site = b.esp.join("shaper/shaper.toml");
    if let Ok(text) = fs::read_to_string(&site) {
        if text != state.config_text {
            bail!("the applied config is not the site's {}", site.display());
        }
    }
    Ok(())
}

/// `shaper version`.
pub fn version_report(b: &Device) -> String {
    let mut out = String::new();
    let os = read_os_release(&b.os_release).unwrap_or_default();
    let running = running_file(b);
    out.push_str(&format!(
        "running: {} {} (shaper {}){}\n",
        os_id(&os).unwrap_or("?"),
        os_version(&os).unwrap_or("?"),
        env!("CARGO_PKG_VERSION"),
        running
            .as_deref()
            .map_or_else(String::new, |r| format!(", from {UKI_DIR}/{r}"))
    ));
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let good = parse_counter(p.rsplit('/').next().unwrap_or_default()).map(|c| c.good_name());
        let marked = good.is_some_and(|g| find_nocase(&b.esp.join(UKI_DIR), &g).is_some());
        out.push_str(&if marked {
            "  a trial boot, marked good since\n".to_string()
        } else {
            format!("  on trial ({p}): marked good once shaping has held, else the box reboots and the boot loader counts a failed try\n")
        });
    }
    match entries(&b.esp) {
        Ok(list) => {
            out.push_str(&format!(
                "installed ({} on the boot disk, in boot order):\n",
                b.esp.join(UKI_DIR).display()
            ));
            for e in &list {
                let state = match e.counter {
                    None => "good".to_string(),
                    Some((0, d)) => format!("failed: no tries left after {d} boots"),
                    Some((l, 0)) => format!("new: {l} tries left"),
                    Some((l, d)) => format!("on trial: {l} tries left, {d} done"),
                };
                let mark = if running
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(&e.file))
                {
                    " (running)"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "  {:<36} {:<12} {state}{mark}\n",
                    e.file,
                    e.version.as_deref().unwrap_or("?")
                ));
            }
            match list.first() {
                Some(e) => out.push_str(&format!(
                    "boots next: {} {}\n",
                    e.file,
                    e.version.as_deref().unwrap_or("?")
                )),
                None => out.push_str("boots next: nothing in EFI/Linux\n"),
            }
            if loader_var(&b.efivars, "LoaderEntryOneShot").is_some()
                || loader_var(&b.efivars, "LoaderEntryDefault").is_some()
            {
                out.push_str("  (an EFI variable LoaderEntryOneShot/LoaderEntryDefault may choose another)\n");
            }
        }
        Err(e) => out.push_str(&format!(
            "installed: unknown ({e:#}; the boot disk is not mounted at {})\n",
            b.esp.display()
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7; 32];

    fn key() -> VerifyingKey {
        ed25519_dalek::SigningKey::from_bytes(&SEED).verifying_key()
    }

    /// A minimal PE file with the given sections (content after the headers).
    pub(crate) fn fake_uki(osrel: &str, sections: &[&str]) -> Vec<u8> {
        let mut f = vec![0u8; 0x400];
        f[0..2].copy_from_slice(b"MZ");
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f[0x80..0x84].copy_from_slice(b"PE\0\0");
        f[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
        f[0x86..0x88].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        let opt = 240u16;
        f[0x94..0x96].copy_from_slice(&opt.to_le_bytes());
        let table = 0x80 + 24 + opt as usize;
        for (i, name) in sections.iter().enumerate() {
            let data: Vec<u8> = if *name == ".osrel" {
                osrel.as_bytes().to_vec()
            } else {
                vec![0xab; 16]
            };
            let off = f.len() as u32;
            let s = table + i * 40;
            f[s..s + name.len()].copy_from_slice(name.as_bytes());
            f[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            f[s + 16..s + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
            f[s + 20..s + 24].copy_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&data);
        }
        f
    }

    const OSREL: &str = "NAME=\"shaper gateway\"\nIMAGE_ID=shaper-gateway\nIMAGE_VERSION=0.2.0\n";

    #[test]
    fn a_signed_file_verifies_and_any_change_is_refused() {
        let img = fake_uki(OSREL, UKI_SECTIONS);
        let f = sign(&img, "shaper-gateway", "0.2.0", &SEED);
        let (m, body) = verify(&f, &key()).expect("verifies");
        assert_eq!(m.version, "0.2.0");
        assert_eq!(body, img.as_slice());
        // A flipped bit in the image, in the manifest, in the signature; cut short; extended.
        for at in [f.len() - 1, 30, f.len() - img.len() - 10] {
            let mut t = f.clone();
            t[at] ^= 1;
            assert!(verify(&t, &key()).is_err(), "flipped byte {at} accepted");
        }
        assert!(verify(&f[..f.len() - 1], &key()).is_err());
        let mut t = f.clone();
        t.push(0);
        assert!(verify(&t, &key()).is_err());
        // Another key.
        let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        let e = verify(&f, &other).unwrap_err().to_string();
        assert!(e.contains("signature"), "{e}");
        // Unsigned: the bare image.
        assert!(verify(&img, &key()).is_err());
    }

    #[test]
    fn keys_parse_from_hex_with_comments() {
        let pk = hex(key().as_bytes());
        assert_eq!(
            parse_key(&format!("# dev key\n\n{pk}\n")).expect("key"),
            key()
        );
        assert!(parse_key("xyz").is_err());
        assert!(parse_key(&pk[..62]).is_err());
    }

    #[test]
    fn pe_sections_and_uki_check() {
        let img = fake_uki(OSREL, UKI_SECTIONS);
        let s = pe_sections(&img).expect("pe");
        assert_eq!(
            s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            UKI_SECTIONS
        );
        let os = uki_os_release(&img).expect("uki");
        assert_eq!(os["IMAGE_ID"], "shaper-gateway");
        assert_eq!(os["NAME"], "shaper gateway");
        let no_initrd = fake_uki(OSREL, &[".osrel", ".cmdline", ".linux"]);
        assert!(uki_os_release(&no_initrd)
            .unwrap_err()
            .to_string()
            .contains(".initrd"));
        assert!(pe_sections(b"not a pe file at all").is_err());
        let mut cut = img.clone();
        cut.truncate(cut.len() - 4);
        assert!(uki_os_release(&cut).is_err());
    }

    #[test]
    fn versions_compare_as_systemd_does() {
        use Ordering::*;
        for (a, b, o) in [
            ("0.1.0", "0.1.0", Equal),
            ("0.1.1", "0.1.0", Greater),
            ("0.1.0.1", "0.1.0", Greater),
            ("0.10.0", "0.9.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0-2", "1.0.1", Less),
            ("1.0a", "1.0", Greater),
            ("1.0", "1.0a", Less),
            ("007", "7", Equal),
            ("2", "10", Less),
            ("1.0^1", "1.0", Greater),
        ] {
            assert_eq!(vercmp(a, b), o, "{a} vs {b}");
            assert_eq!(vercmp(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn bless_boot_names() {
        let c = parse_counter("shaper-gateway-0.2.0+2-1.efi").expect("counted");
        assert_eq!((c.left, c.done), (2, 1));
        assert_eq!(c.good_name(), "shaper-gateway-0.2.0.efi");
        let c = parse_counter("fw+3.efi").expect("counted");
        assert_eq!((c.left, c.done, c.good_name().as_str()), (3, 0, "fw.efi"));
        let c = parse_counter("a+b+0-3.EFI").expect("last +");
        assert_eq!((c.base.as_str(), c.left, c.done), ("a+b", 0, 3));
        for n in [
            "fw.efi",
            "fw+.efi",
            "fw+3x.efi",
            "fw+3-.efi",
            "fw+3.conf",
            "fw+-1.efi",
        ] {
            assert_eq!(parse_counter(n), None, "{n}");
        }
        assert_eq!(
            loader_path("\\EFI\\Linux\\fw+2-1.efi"),
            "EFI/Linux/fw+2-1.efi"
        );
    }

    fn entry(file: &str, version: &str) -> Entry {
        Entry {
            file: file.into(),
            sort_key: Some("shaper-gateway".into()),
            version: Some(version.into()),
            counter: parse_counter(file).map(|c| (c.left, c.done)),
        }
    }

    #[test]
    fn boot_order_tries_the_new_image_then_falls_back() {
        let old = entry("shaper-gateway-0.1.0.efi", "0.1.0");
        let order = |mut v: Vec<Entry>| {
            v.sort_by(boot_order);
            v[0].file.clone()
        };
        for n in ["+3", "+2-1", "+1-2"] {
            let new = entry(&format!("shaper-gateway-0.2.0{n}.efi"), "0.2.0");
            assert_eq!(order(vec![old.clone(), new.clone()]), new.file);
        }
        let spent = entry("shaper-gateway-0.2.0+0-3.efi", "0.2.0");
        assert_eq!(order(vec![spent, old.clone()]), old.file);
        // Blessed: by version.
        let good = entry("shaper-gateway-0.2.0.efi", "0.2.0");
        assert_eq!(order(vec![old.clone(), good.clone()]), good.file);
        // No sort key goes after those with one.
        let mut bare = entry("zzz.efi", "9");
        bare.sort_key = None;
        assert_eq!(order(vec![bare, old.clone()]), old.file);
    }

    #[test]
    fn efi_variables_read_as_text() {
        let d = std::env::temp_dir().join(format!("shaper-upgrade-test-{}", std::process::id()));
        fs::create_dir_all(&d).expect("dir");
        let mut b = vec![6, 0, 0, 0];
        for u in "\\EFI\\Linux\\fw+2-1.efi\0".encode_utf16() {
            b.extend_from_slice(&u.to_le_bytes());
        }
        fs::write(d.join(format!("LoaderBootCountPath-{LOADER_GUID}")), b).expect("write");
        assert_eq!(
            loader_var(&d, "LoaderBootCountPath").as_deref(),
            Some("\\EFI\\Linux\\fw+2-1.efi")
        );
        assert_eq!(loader_var(&d, "LoaderEntrySelected"), None);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn install_and_mark_good_on_a_folder() {
        let root =
            std::env::temp_dir().join(format!("shaper-upgrade-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let esp = root.join("esp");
        let vars = root.join("vars");
        fs::create_dir_all(esp.join(UKI_DIR)).expect("dir");
        fs::create_dir_all(&vars).expect("dir");
        let old_os = "IMAGE_ID=shaper-gateway\nIMAGE_VERSION=0.1.0\n";
        fs::write(
            esp.join(UKI_DIR).join("shaper-gateway-0.1.0.efi"),
            fake_uki(old_os, UKI_SECTIONS),
        )
        .expect("old");
        fs::write(esp.join(UKI_DIR).join(".tmp-upgrade.efi"), b"half").expect("tmp");
        fs::write(root.join("os-release"), old_os).expect("os");
        fs::write(root.join("key.pub"), hex(key().as_bytes())).expect("key");
        let setvar = |name: &str, v: &str| {
            let mut b = vec![6, 0, 0, 0];
            for u in format!("{v}\0").encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            fs::write(vars.join(format!("{name}-{LOADER_GUID}")), b).expect("var");
        };
        setvar("LoaderEntrySelected", "shaper-gateway-0.1.0.efi");
        let bx = Device {
            esp: esp.clone(),
            efivars: vars.clone(),
            os_release: root.join("os-release"),
            key: root.join("key.pub"),
            remount: false,
        };
        // Refused: unsigned, tampered, same version, another product. Nothing written.
        let img = fake_uki(OSREL, UKI_SECTIONS);
        let good = sign(&img, "shaper-gateway", "0.2.0", &SEED);
        let listing = || {
            let mut v: Vec<String> = fs::read_dir(esp.join(UKI_DIR))
                .expect("ls")
                .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let before = listing();
        let mut tampered = good.clone();
        let n = tampered.len();
        tampered[n - 3] ^= 0x10;
        let same = sign(
            &fake_uki(old_os, UKI_SECTIONS),
            "shaper-gateway",
            "0.1.0",
            &SEED,
        );
        let other = sign(
            &fake_uki("IMAGE_ID=other\nIMAGE_VERSION=0.2.0\n", UKI_SECTIONS),
            "other",
            "0.2.0",
            &SEED,
        );
        for (what, bytes) in [
            ("unsigned", img.clone()),
            ("tampered", tampered),
            ("same", same),
            ("other", other),
        ] {
            let p = root.join(what);
            fs::write(&p, bytes).expect("write");
            assert!(install(&bx, &p).is_err(), "{what} installed");
            assert_eq!(listing(), before, "{what} changed the partition");
        }
        let p = root.join("good");
        fs::write(&p, &good).expect("write");
        let i = install(&bx, &p).expect("installs");
        assert_eq!(i.file, "shaper-gateway-0.2.0+3.efi");
        assert_eq!(
            listing(),
            vec!["shaper-gateway-0.1.0.efi", "shaper-gateway-0.2.0+3.efi"]
        );
        assert_eq!(
            fs::read(esp.join(UKI_DIR).join(&i.file)).expect("read"),
            img
        );
        let e = entries(&esp).expect("entries");
        assert_eq!(e[0].file, "shaper-gateway-0.2.0+3.efi");
        // The loader boots it (renaming it +2-1); marking good drops the counter.
        fs::rename(
            esp.join(UKI_DIR).join("shaper-gateway-0.2.0+3.efi"),
            esp.join(UKI_DIR).join("shaper-gateway-0.2.0+2-1.efi"),
        )
        .expect("rename");
        setvar(
            "LoaderBootCountPath",
            "\\EFI\\Linux\\shaper-gateway-0.2.0+2-1.efi",
        );
        assert_eq!(
            running_file(&bx).as_deref(),
            Some("shaper-gateway-0.2.0+2-1.efi")
        );
        // On trial: no upgrade on top of it.
        assert!(install(&bx, &p).is_err());
        let said = mark_good(&bx).expect("marks");
        assert!(said.contains("marked good"), "{said}");
        assert_eq!(
            listing(),
            vec!["shaper-gateway-0.1.0.efi", "shaper-gateway-0.2.0.efi"]
        );
        assert!(mark_good(&bx).expect("again").contains("already"));
        assert_eq!(
            running_file(&bx).as_deref(),
            Some("shaper-gateway-0.2.0.efi")
        );
        let _ = fs::remove_dir_all(&root);
    }
}
