//! A synthetic CT study as DICOM Part 10 files, for image-transfer tests (C-STORE over TCP
//! 104/11112 through the shaped line), and a minimal reader to check what a receiver stored.
//!
//! Each slice is one file: 128-byte zero preamble, "DICM", the group 0002 file meta
//! information (explicit VR little endian, with its (0002,0000) group length), then a CT
//! Image Storage dataset in Explicit VR Little Endian (1.2.840.10008.1.2.1): patient
//! TEST^SHAPER, one study, one series, 16-bit allocated / 12 stored MONOCHROME2 pixels of a
//! water cylinder phantom with inserts and deterministic noise. The output is a function of
//! the arguments only (same spec, same bytes); UIDs are `2.25.<decimal>` (X.667), the decimal
//! being a 128-bit value hashed from the spec with UUID version 8 / variant bits set.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::rng::Rng;

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
/// Implementation class UID of this writer.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.302934617734651307146386880843414095876";
pub const IMPLEMENTATION_VERSION: &str = "SHAPER_TESTS_1";
pub const PATIENT_NAME: &str = "TEST^SHAPER";

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StudySpec {
    pub slices: u32,
    pub rows: u16,
    pub cols: u16,
    /// Distinguishes studies (UIDs, patient/accession ids); the default is 1.
    pub study: u32,
}

impl Default for StudySpec {
    fn default() -> Self {
        StudySpec {
            slices: 20,
            rows: 512,
            cols: 512,
            study: 1,
        }
    }
}

const PIXEL_SPACING_MM: f64 = 0.7;
const SLICE_THICKNESS_MM: f64 = 2.5;

/// FNV-1a over 128 bits, then xorshift-multiply rounds so that names differing in their
/// last byte give unrelated values (FNV alone changes only a few bit ranges).
fn hash128(data: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for &b in data {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    for _ in 0..3 {
        h ^= h >> 67;
        h = h.wrapping_mul(0x9E3779B97F4A7C15F39CC0605CEDC835);
        h ^= h >> 59;
    }
    h
}

/// A deterministic `2.25.<decimal>` UID named by `name` (at most 44 characters).
pub fn uid(name: &str) -> String {
    let mut v = hash128(name.as_bytes());
    // UUID version 8 (custom) and RFC 4122 variant, so the value is a well-formed UUID.
    v &= !(0xf << 76);
    v |= 0x8 << 76;
    v &= !(0x3 << 62);
    v |= 0x2 << 62;
    format!("2.25.{v}")
}

impl StudySpec {
    fn name(&self) -> String {
        format!(
            "shaper-tests synthetic CT study={} slices={} rows={} cols={}",
            self.study, self.slices, self.rows, self.cols
        )
    }
    pub fn study_uid(&self) -> String {
        uid(&format!("{} study", self.name()))
    }
    pub fn series_uid(&self) -> String {
        uid(&format!("{} series", self.name()))
    }
    pub fn frame_of_reference_uid(&self) -> String {
        uid(&format!("{} frame", self.name()))
    }
    /// SOP instance UID of slice `index` (0-based).
    pub fn sop_instance_uid(&self, index: u32) -> String {
        uid(&format!("{} instance {index}", self.name()))
    }
    /// File name of slice `index` (0-based) in the output directory.
    pub fn file_name(&self, index: u32) -> String {
        format!("CT{:04}.dcm", index + 1)
    }
    /// Bytes of pixel data per slice.
    pub fn pixel_bytes(&self) -> usize {
        self.rows as usize * self.cols as usize * 2
    }
}

/// VRs with a 2-byte reserved field and a 4-byte length in explicit VR encoding.
fn long_vr(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"SV"
            | b"UV"
    )
}

/// Writes one explicit VR little endian element; pads odd values (UI with NUL, OB with NUL,
/// text with space).
fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if matches!(vr, b"UI" | b"OB") { 0 } else { b' ' });
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if long_vr(vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&v);
}

fn us(out: &mut Vec<u8>, group: u16, elem: u16, value: u16) {
    element(out, group, elem, b"US", &value.to_le_bytes());
}

fn text(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &str) {
    element(out, group, elem, vr, value.as_bytes());
}

/// A decimal string (DS, at most 16 characters) without a needless fraction.
fn ds(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    let s = if s == "-0" { "0" } else { s };
    s.to_string()
}

/// The stored pixel values (little endian u16, 0..=4095; HU = value - 1024) of slice
/// `index`: air outside a water cylinder, a bone ring, three inserts whose size changes
/// along z, and +-15 of deterministic noise inside the body.
pub fn pixel_data(spec: &StudySpec, index: u32) -> Vec<u8> {
    let (rows, cols) = (spec.rows as usize, spec.cols as usize);
    let mut out = Vec::with_capacity(rows * cols * 2);
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ ((spec.study as u64) << 32 | index as u64) | 1);
    let cx = cols as f64 / 2.0;
    let cy = rows as f64 / 2.0;
    let radius = 0.45 * cx.min(cy);
    let t = if spec.slices > 1 {
        index as f64 / (spec.slices - 1) as f64
    } else {
        0.5
    };
    let inserts = [
        (-0.45, -0.2, 0.12 + 0.08 * t, 1024 + 60), // soft tissue
        (0.4, -0.25, 0.15 - 0.07 * t, 1024 - 900), // lung
        (0.0, 0.45, 0.06 + 0.1 * (1.0 - t), 1024 + 900), // bone
    ];
    for y in 0..rows {
        for x in 0..cols {
            let dx = (x as f64 + 0.5 - cx) / radius;
            let dy = (y as f64 + 0.5 - cy) / radius;
            let r2 = dx * dx + dy * dy;
            let noise = rng.next_u64();
            let v: i32 = if r2 > 1.0 {
                (noise % 7) as i32 // air, a little noise
            } else if r2 > 0.90 {
                1024 + 700 // bone ring
            } else {
                let mut v = 1024;
                for &(ix, iy, ir, iv) in &inserts {
                    let (ex, ey) = (dx - ix, dy - iy);
                    if ex * ex + ey * ey < ir * ir {
                        v = iv;
                    }
                }
                v + (noise % 31) as i32 - 15
            };
            out.extend_from_slice(&(v.clamp(0, 4095) as u16).to_le_bytes());
        }
    }
    out
}

/// The whole Part 10 file of slice `index` (0-based).
pub fn ct_slice(spec: &StudySpec, index: u32) -> Vec<u8> {
    let sop_uid = spec.sop_instance_uid(index);

    let mut meta = Vec::new();
    element(&mut meta, 0x0002, 0x0001, b"OB", &[0, 1]);
    text(&mut meta, 0x0002, 0x0002, b"UI", CT_IMAGE_STORAGE);
    text(&mut meta, 0x0002, 0x0003, b"UI", &sop_uid);
    text(&mut meta, 0x0002, 0x0010, b"UI", EXPLICIT_VR_LITTLE_ENDIAN);
    text(&mut meta, 0x0002, 0x0012, b"UI", IMPLEMENTATION_CLASS_UID);
    text(&mut meta, 0x0002, 0x0013, b"SH", IMPLEMENTATION_VERSION);

    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    element(
        &mut file,
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    );
    file.extend_from_slice(&meta);

    let d = &mut file;
    let z = -(index as f64) * SLICE_THICKNESS_MM;
    let x0 = -(spec.cols as f64) * PIXEL_SPACING_MM / 2.0;
    let y0 = -(spec.rows as f64) * PIXEL_SPACING_MM / 2.0;
    let patient_id = format!("SHAPER{:04}", spec.study);
    // Elements in ascending tag order.
    text(d, 0x0008, 0x0005, b"CS", "ISO_IR 100");
    text(d, 0x0008, 0x0008, b"CS", "ORIGINAL\\PRIMARY\\AXIAL");
    text(d, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE);
    text(d, 0x0008, 0x0018, b"UI", &sop_uid);
    text(d, 0x0008, 0x0020, b"DA", "20240101");
    text(d, 0x0008, 0x0021, b"DA", "20240101");
    text(d, 0x0008, 0x0023, b"DA", "20240101");
    text(d, 0x0008, 0x0030, b"TM", "120000");
    text(d, 0x0008, 0x0031, b"TM", "120000");
    text(d, 0x0008, 0x0033, b"TM", "120000");
    text(d, 0x0008, 0x0050, b"SH", &patient_id);
    text(d, 0x0008, 0x0060, b"CS", "CT");
    text(d, 0x0008, 0x0070, b"LO", "shaper-tests");
    text(d, 0x0008, 0x0090, b"PN", "");
    text(d, 0x0008, 0x1030, b"LO", "Synthetic CT for shaper tests");
    text(d, 0x0008, 0x103E, b"LO", "Axial phantom");
    text(d, 0x0010, 0x0010, b"PN", PATIENT_NAME);
    text(d, 0x0010, 0x0020, b"LO", &patient_id);
    text(d, 0x0010, 0x0030, b"DA", "");
    text(d, 0x0010, 0x0040, b"CS", "O");
    text(d, 0x0018, 0x0050, b"DS", &ds(SLICE_THICKNESS_MM));
    text(d, 0x0018, 0x0060, b"DS", "120");
    text(d, 0x0020, 0x000D, b"UI", &spec.study_uid());
    text(d, 0x0020, 0x000E, b"UI", &spec.series_uid());
    text(d, 0x0020, 0x0010, b"SH", &spec.study.to_string());
    text(d, 0x0020, 0x0011, b"IS", "1");
    text(d, 0x0020, 0x0013, b"IS", &(index + 1).to_string());
    text(
        d,
        0x0020,
        0x0032,
        b"DS",
        &format!("{}\\{}\\{}", ds(x0), ds(y0), ds(z)),
    );
    text(d, 0x0020, 0x0037, b"DS", "1\\0\\0\\0\\1\\0");
    text(d, 0x0020, 0x0052, b"UI", &spec.frame_of_reference_uid());
    text(d, 0x0020, 0x1040, b"LO", "");
    text(d, 0x0020, 0x1041, b"DS", &ds(z));
    us(d, 0x0028, 0x0002, 1);
    text(d, 0x0028, 0x0004, b"CS", "MONOCHROME2");
    us(d, 0x0028, 0x0010, spec.rows);
    us(d, 0x0028, 0x0011, spec.cols);
    text(
        d,
        0x0028,
        0x0030,
        b"DS",
        &format!("{}\\{}", ds(PIXEL_SPACING_MM), ds(PIXEL_SPACING_MM)),
    );
    us(d, 0x0028, 0x0100, 16);
    us(d, 0x0028, 0x0101, 12);
    us(d, 0x0028, 0x0102, 11);
    us(d, 0x0028, 0x0103, 0);
    text(d, 0x0028, 0x1050, b"DS", "40");
    text(d, 0x0028, 0x1051, b"DS", "400");
    text(d, 0x0028, 0x1052, b"DS", "-1024");
    text(d, 0x0028, 0x1053, b"DS", "1");
    text(d, 0x0028, 0x1054, b"LO", "HU");
    element(d, 0x7FE0, 0x0010, b"OW", &pixel_data(spec, index));
    file
}

/// Writes every slice into `dir` (created if missing); returns the paths in slice order.
pub fn write_study(dir: &Path, spec: &StudySpec) -> Result<Vec<PathBuf>> {
    ensure!(spec.slices > 0, "need at least one slice");
    ensure!(
        spec.rows > 0 && spec.cols > 0,
        "rows and cols must be positive"
    );
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    (0..spec.slices)
        .map(|i| {
            let path = dir.join(spec.file_name(i));
            fs::write(&path, ct_slice(spec, i))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// A top-level data element of a parsed file: tag and value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element<'a> {
    pub group: u16,
    pub elem: u16,
    pub value: &'a [u8],
}

/// Top-level elements of a Part 10 file (meta and dataset) in Explicit or Implicit VR Little
/// Endian — what storescp writes for uncompressed transfer syntaxes. Sequences must have a
/// defined length (their content is one opaque value); encapsulated or big-endian data is
/// refused.
pub fn parse_part10(file: &[u8]) -> Result<Vec<Element<'_>>> {
    ensure!(
        file.len() >= 132 && &file[128..132] == b"DICM",
        "no DICM prefix"
    );
    let mut out = Vec::new();
    let mut pos = 132;
    // Meta: explicit VR LE, group 0002 only.
    while pos + 4 <= file.len() && u16::from_le_bytes([file[pos], file[pos + 1]]) == 0x0002 {
        let (e, next) = read_element(file, pos, true)?;
        out.push(e);
        pos = next;
    }
    let ts = out
        .iter()
        .find(|e| (e.group, e.elem) == (0x0002, 0x0010))
        .map(|e| trim_value(e.value))
        .context("no transfer syntax (0002,0010)")?;
    let explicit = match ts.as_str() {
        EXPLICIT_VR_LITTLE_ENDIAN => true,
        IMPLICIT_VR_LITTLE_ENDIAN => false,
        other => bail!("unsupported transfer syntax {other}"),
    };
    while pos < file.len() {
        let (e, next) = read_element(file, pos, explicit)?;
        out.push(e);
        pos = next;
    }
    Ok(out)
}

fn read_element(file: &[u8], pos: usize, explicit: bool) -> Result<(Element<'_>, usize)> {
    let need = |n: usize| -> Result<()> {
        ensure!(pos + n <= file.len(), "truncated element at offset {pos}");
        Ok(())
    };
    need(8)?;
    let group = u16::from_le_bytes([file[pos], file[pos + 1]]);
    let elem = u16::from_le_bytes([file[pos + 2], file[pos + 3]]);
    let (len, start) = if explicit {
        let vr = [file[pos + 4], file[pos + 5]];
        if long_vr(&vr) {
            need(12)?;
            let l = u32::from_le_bytes(file[pos + 8..pos + 12].try_into().unwrap());
            (l, pos + 12)
        } else {
            (
                u16::from_le_bytes([file[pos + 6], file[pos + 7]]) as u32,
                pos + 8,
            )
        }
    } else {
        let l = u32::from_le_bytes(file[pos + 4..pos + 8].try_into().unwrap());
        (l, pos + 8)
    };
    ensure!(
        len != u32::MAX,
        "({group:04X},{elem:04X}) has undefined length (not supported)"
    );
    let end = start + len as usize;
    ensure!(
        end <= file.len(),
        "({group:04X},{elem:04X}) runs past the end"
    );
    Ok((
        Element {
            group,
            elem,
            value: &file[start..end],
        },
        end,
    ))
}

/// A text value without its padding (trailing NULs and spaces).
pub fn trim_value(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// SOP Instance UID (0008,0018) and pixel data (7FE0,0010) of a Part 10 file.
pub fn instance_and_pixels(file: &[u8]) -> Result<(String, &[u8])> {
    let elements = parse_part10(file)?;
    let find = |g: u16, e: u16| elements.iter().find(|x| (x.group, x.elem) == (g, e));
    let uid = find(0x0008, 0x0018).context("no SOP Instance UID (0008,0018)")?;
    let px = find(0x7FE0, 0x0010).context("no Pixel Data (7FE0,0010)")?;
    Ok((trim_value(uid.value), px.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> StudySpec {
        StudySpec {
            slices: 3,
            rows: 64,
            cols: 48,
            study: 7,
        }
    }

    #[test]
    fn uids_are_valid_and_distinct() {
        let s = small();
        let uids = [
            s.study_uid(),
            s.series_uid(),
            s.frame_of_reference_uid(),
            s.sop_instance_uid(0),
            s.sop_instance_uid(1),
            IMPLEMENTATION_CLASS_UID.to_string(),
        ];
        for u in &uids {
            assert!(u.len() <= 64, "{u}");
            assert!(u.starts_with("2.25."));
            let digits = &u[5..];
            assert!(digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'));
            // A 128-bit value.
            digits.parse::<u128>().unwrap();
        }
        let set: std::collections::HashSet<_> = uids.iter().collect();
        assert_eq!(set.len(), uids.len());
        assert_ne!(
            small().study_uid(),
            StudySpec {
                study: 8,
                ..small()
            }
            .study_uid()
        );
    }

    #[test]
    fn file_structure() {
        let s = small();
        let f = ct_slice(&s, 1);
        assert!(f[..128].iter().all(|&b| b == 0));
        assert_eq!(&f[128..132], b"DICM");
        // (0002,0000) UL 4 <len>, covering exactly the rest of group 0002.
        assert_eq!(&f[132..140], &[2, 0, 0, 0, b'U', b'L', 4, 0]);
        let glen = u32::from_le_bytes(f[140..144].try_into().unwrap()) as usize;
        let meta_end = 144 + glen;
        assert_eq!(u16::from_le_bytes([f[meta_end], f[meta_end + 1]]), 0x0008);
        let els = parse_part10(&f).unwrap();
        assert!(els[..6].iter().all(|e| e.group == 2));
        // Ascending tags, even lengths.
        for w in els.windows(2) {
            assert!((w[0].group, w[0].elem) < (w[1].group, w[1].elem));
        }
        assert!(els.iter().all(|e| e.value.len() % 2 == 0));
        let (uid, px) = instance_and_pixels(&f).unwrap();
        assert_eq!(uid, s.sop_instance_uid(1));
        assert_eq!(px.len(), s.pixel_bytes());
        assert_eq!(px, &pixel_data(&s, 1)[..]);
        let get = |g, e| {
            trim_value(
                els.iter()
                    .find(|x| (x.group, x.elem) == (g, e))
                    .unwrap()
                    .value,
            )
        };
        assert_eq!(get(0x0010, 0x0010), PATIENT_NAME);
        assert_eq!(get(0x0002, 0x0010), EXPLICIT_VR_LITTLE_ENDIAN);
        assert_eq!(get(0x0020, 0x0013), "2");
        assert_eq!(get(0x0020, 0x0032), "-16.8\\-22.4\\-2.5");
        assert_eq!(
            els.iter()
                .find(|x| (x.group, x.elem) == (0x0028, 0x0010))
                .unwrap()
                .value,
            &64u16.to_le_bytes()
        );
    }

    #[test]
    fn deterministic_and_in_range() {
        let s = small();
        assert_eq!(ct_slice(&s, 2), ct_slice(&s, 2));
        assert_ne!(pixel_data(&s, 0), pixel_data(&s, 2));
        let px = pixel_data(&s, 0);
        assert!(px
            .chunks(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) <= 4095));
    }

    #[test]
    fn ds_formatting() {
        assert_eq!(ds(2.5), "2.5");
        assert_eq!(ds(-179.2), "-179.2");
        assert_eq!(ds(0.0), "0");
        assert_eq!(ds(-0.0), "0");
        assert_eq!(ds(120.0), "120");
    }

    #[test]
    fn parser_rejects_garbage() {
        assert!(parse_part10(b"short").is_err());
        let mut f = ct_slice(&small(), 0);
        f.truncate(f.len() - 1);
        assert!(parse_part10(&f).is_err());
    }
}
