//! The image: a PE file with a unified kernel image's sections. Reads the PE section table,
//! checks that an image has the sections this product's UKIs have, and reads the
//! os-release in its `.osrel` section (from bytes in memory or from an installed file).

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

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
pub(super) fn os_version(os: &BTreeMap<String, String>) -> Option<&str> {
    os.get("IMAGE_VERSION")
        .or_else(|| os.get("VERSION_ID"))
        .map(String::as_str)
}

/// IMAGE_ID, else ID (systemd-boot's sort key).
pub(super) fn os_id(os: &BTreeMap<String, String>) -> Option<&str> {
    os.get("IMAGE_ID")
        .or_else(|| os.get("ID"))
        .map(String::as_str)
}
