//! The signed upgrade file: its manifest (image id, version, size and SHA-256 of the image),
//! the ed25519 signature over it and the image after it; taking a file apart ([`parse`]),
//! checking it against the update key ([`verify`]), making one ([`sign`]), reading keys and
//! the hex they are written in.

use anyhow::{anyhow, bail, Context as _, Result};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};
use std::fs;
use std::path::Path;

use super::{MAGIC, MAX_HEADER};

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
