//! Versions and the boot loader's order: systemd's version comparison, boot counters in
//! file names (`NAME+LEFT[-DONE].efi`), and the order in which systemd-boot 252 tries the
//! images in EFI/Linux.

use anyhow::{Context as _, Result};
use std::cmp::Ordering;
use std::fs;
use std::path::Path;

use super::uki::{file_os_release, os_id, os_version};
use super::UKI_DIR;

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
