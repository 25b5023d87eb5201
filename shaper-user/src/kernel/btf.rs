//! Offsets of kernel struct members, read from the running kernel's BTF.
//!
//! A BPF tracing program that reads kernel structs with `bpf_probe_read_kernel`
//! needs the member offsets of *this* kernel, not of the headers it was built
//! against; we compute them in user space and hand them to the program. aya
//! parses BTF too, but keeps its type accessors crate-private, so this is a
//! small parser of the raw format (Documentation/bpf/btf.rst) that keeps just
//! what offsets and sizes need. Every read is bounds-checked: a truncated or
//! corrupt blob is an error, never a panic.

use anyhow::{anyhow, bail, Context as _, Result};

const MAGIC: u16 = 0xeb9f;
// BTF_KIND_*: the ones this module looks at by name.
const INT: u8 = 1;
const PTR: u8 = 2;
const ARRAY: u8 = 3;
const STRUCT: u8 = 4;
const UNION: u8 = 5;
const ENUM: u8 = 6;
const TYPEDEF: u8 = 8;
const VOLATILE: u8 = 9;
const CONST: u8 = 10;
const RESTRICT: u8 = 11;
const FLOAT: u8 = 16;
const TYPE_TAG: u8 = 18;
const ENUM64: u8 = 19;
/// Nesting bound: real kernels nest anonymous members a few levels deep, a
/// corrupt blob could loop forever.
const MAX_DEPTH: usize = 32;

/// What one BTF type says that offsets and sizes need.
struct Type {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    /// Size for INT/ENUM/STRUCT/UNION/FLOAT/ENUM64, referred type otherwise.
    size_or_type: u32,
    shape: Shape,
}

enum Shape {
    Other,
    /// INT encoding: `nr_bits` and the bit offset, nonzero for a bitfield in a
    /// struct without kind_flag.
    Int {
        bits: u32,
        offset: u32,
    },
    Array {
        elem: u32,
        nelems: u32,
    },
    /// STRUCT/UNION members: (name_off, type, offset field as stored).
    Record(Vec<(u32, u32, u32)>),
}

/// A member found by [`KernelBtf::find`]: bit offset from the outer struct,
/// bitfield size (0 if none), and its type.
struct Found {
    bit_offset: u32,
    bitfield: u32,
    ty: u32,
}

/// Byte offsets of kernel struct members, from BTF.
pub struct KernelBtf {
    /// Index i holds type id i + 1 (id 0 is void).
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// The `u32` at `pos` in host byte order, or an error if `data` is too short.
fn u32_at(data: &[u8], pos: usize) -> Result<u32> {
    let b = data
        .get(
            pos..pos
                .checked_add(4)
                .ok_or_else(|| anyhow!("BTF offset overflow"))?,
        )
        .ok_or_else(|| anyhow!("BTF truncated at byte {pos}"))?;
    Ok(u32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// The `start..start+len` section of `data`, or an error naming it.
fn section<'a>(data: &'a [u8], start: u32, len: u32, what: &str) -> Result<&'a [u8]> {
    let (start, len) = (start as usize, len as usize);
    start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| {
            anyhow!(
                "BTF {what} section ({len} bytes at {start}) runs past the end ({} bytes)",
                data.len()
            )
        })
}

impl KernelBtf {
    /// The running kernel's BTF, which `CONFIG_DEBUG_INFO_BTF` kernels expose.
    pub fn from_sys_fs() -> Result<Self> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(PATH)
            .with_context(|| format!("reading {PATH} (kernel without CONFIG_DEBUG_INFO_BTF?)"))?;
        Self::parse(&data).with_context(|| format!("parsing {PATH}"))
    }

    /// Raw BTF bytes in host byte order (what the kernel exports).
    pub fn parse(data: &[u8]) -> Result<Self> {
        let magic = data.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        match magic {
            Some(MAGIC) => {}
            Some(m) if m == MAGIC.swap_bytes() => {
                bail!("BTF is in the other byte order, not supported")
            }
            Some(m) => bail!("not BTF: magic {m:#06x}, want {MAGIC:#06x}"),
            None => bail!("BTF truncated: {} bytes", data.len()),
        }
        let hdr_len = u32_at(data, 4)?;
        let [type_off, type_len, str_off, str_len] = [8, 12, 16, 20].map(|p| u32_at(data, p));
        let body = data
            .get(hdr_len as usize..)
            .ok_or_else(|| anyhow!("BTF header length {hdr_len} past the end"))?;
        let tsec = section(body, type_off?, type_len?, "type")?;
        let strings = section(body, str_off?, str_len?, "string")?.to_vec();

        let mut types = Vec::new();
        let mut pos = 0;
        while pos < tsec.len() {
            let id = types.len() + 1;
            let name_off = u32_at(tsec, pos)?;
            let info = u32_at(tsec, pos + 4)?;
            let size_or_type = u32_at(tsec, pos + 8)?;
            pos += 12;
            let (vlen, kind) = ((info & 0xffff) as usize, ((info >> 24) & 0x1f) as u8);
            let (shape, extra) = match kind {
                INT => {
                    let enc = u32_at(tsec, pos)?;
                    (
                        Shape::Int {
                            bits: enc & 0xff,
                            offset: (enc >> 16) & 0xff,
                        },
                        4,
                    )
                }
                ARRAY => (
                    Shape::Array {
                        elem: u32_at(tsec, pos)?,
                        nelems: u32_at(tsec, pos + 8)?,
                    },
                    12,
                ),
                STRUCT | UNION => {
                    let members = (0..vlen)
                        .map(|i| {
                            let p = pos + i * 12;
                            Ok((u32_at(tsec, p)?, u32_at(tsec, p + 4)?, u32_at(tsec, p + 8)?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (Shape::Record(members), vlen * 12)
                }
                ENUM | 13 => (Shape::Other, vlen * 8), // FUNC_PROTO
                14 | 17 => (Shape::Other, 4),          // VAR, DECL_TAG
                15 | ENUM64 => (Shape::Other, vlen * 12), // DATASEC
                PTR | 7 | TYPEDEF..=12 | FLOAT | TYPE_TAG => (Shape::Other, 0), // FWD, FUNC
                k => bail!("BTF type {id} has unknown kind {k}"),
            };
            // Check every name offset once here, so `name` cannot go out of
            // bounds later (offset 0, the empty name, is fine even without strings).
            if name_off as usize >= strings.len().max(1) {
                bail!("BTF type {id} name offset {name_off} is outside the string section");
            }
            if let Shape::Record(ms) = &shape {
                if let Some((off, _, _)) = ms.iter().find(|m| m.0 as usize >= strings.len().max(1))
                {
                    bail!("BTF type {id} member name offset {off} is outside the string section");
                }
            }
            pos += extra;
            if pos > tsec.len() {
                bail!("BTF truncated inside type {id}");
            }
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 != 0,
                size_or_type,
                shape,
            });
        }
        Ok(Self { types, strings })
    }

    /// The NUL-terminated string at `off` (validated by `parse`).
    fn name(&self, off: u32) -> &[u8] {
        let s = &self.strings[off as usize..];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn ty(&self, id: u32) -> Result<&Type> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.types.get(i))
            .ok_or_else(|| anyhow!("BTF type id {id} does not exist"))
    }

    /// `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Result<(u32, &Type)> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = t.size_or_type,
                _ => return Ok((id, t)),
            }
        }
        bail!("BTF type {id}: typedef chain too long")
    }

    /// `member` in the struct or union `id`, looking inside anonymous members.
    fn find(&self, id: u32, member: &str, depth: usize) -> Result<Option<Found>> {
        let t = self.ty(id)?;
        let Shape::Record(members) = &t.shape else {
            return Ok(None);
        };
        if depth > MAX_DEPTH {
            bail!("BTF type {id}: anonymous members nested too deep");
        }
        for &(name_off, ty, off) in members {
            let (bit_offset, bitfield) = if t.kind_flag {
                (off & 0xff_ffff, off >> 24)
            } else {
                (off, 0)
            };
            let name = self.name(name_off);
            if name == member.as_bytes() {
                return Ok(Some(Found {
                    bit_offset,
                    bitfield,
                    ty,
                }));
            }
            if name.is_empty() {
                let (inner, _) = self.resolve(ty)?;
                if let Some(f) = self.find(inner, member, depth + 1)? {
                    return Ok(Some(Found {
                        bit_offset: bit_offset + f.bit_offset,
                        ..f
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The first complete struct called `name` and its `member`.
    fn member(&self, name: &str, member: &str) -> Result<Found> {
        let id = (1..=self.types.len() as u32)
            .find(|&id| {
                let t = &self.types[id as usize - 1];
                t.kind == STRUCT
                    && matches!(&t.shape, Shape::Record(m) if !m.is_empty())
                    && self.name(t.name_off) == name.as_bytes()
            })
            .ok_or_else(|| anyhow!("kernel BTF has no struct {name}"))?;
        self.find(id, member, 0)?
            .ok_or_else(|| anyhow!("kernel struct {name} has no member {member}"))
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct/union members as C's offsetof does. Bitfields and members not
    /// on a byte boundary have no byte offset and are errors.
    pub fn offset(&self, name: &str, member: &str) -> Result<u32> {
        let f = self.member(name, member)?;
        // Structs without kind_flag keep bitfield layout in the INT type.
        let int_bitfield = match self.resolve(f.ty)?.1 {
            Type {
                shape: Shape::Int { bits, offset },
                size_or_type,
                ..
            } => *offset != 0 || *bits != 8 * size_or_type,
            _ => false,
        };
        if f.bitfield != 0 || int_bitfield {
            bail!("{name}.{member} is a bitfield, it has no byte offset");
        }
        if f.bit_offset % 8 != 0 {
            bail!(
                "{name}.{member} is at bit {}, not on a byte boundary",
                f.bit_offset
            );
        }
        Ok(f.bit_offset / 8)
    }

    /// Size in bytes of the member's type (after resolving typedef/const/
    /// volatile/restrict/type_tag); pointers are 8.
    pub fn member_size(&self, name: &str, member: &str) -> Result<u32> {
        let f = self.member(name, member)?;
        self.size(f.ty, 0)
            .with_context(|| format!("size of {name}.{member}"))
    }

    fn size(&self, id: u32, depth: usize) -> Result<u32> {
        let (id, t) = self.resolve(id)?;
        match (t.kind, &t.shape) {
            (PTR, _) => Ok(8),
            (_, Shape::Array { .. }) if depth > MAX_DEPTH => {
                bail!("BTF array type {id} nested too deep")
            }
            (_, Shape::Array { elem, nelems }) => self
                .size(*elem, depth + 1)?
                .checked_mul(*nelems)
                .ok_or_else(|| anyhow!("BTF array type {id} too large")),
            (INT | STRUCT | UNION | ENUM | FLOAT | ENUM64, _) => Ok(t.size_or_type),
            (k, _) => bail!("BTF type {id} (kind {k}) has no size"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::process::Command;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    /// One type as `bpftool btf dump format raw` prints it.
    #[derive(Default)]
    struct Raw {
        kind: String,
        name: String,
        size: Option<u32>,
        ty: Option<u32>,
        nelems: Option<u32>,
        /// (name, type, bit offset, bitfield size)
        members: Vec<(String, u32, u32, u32)>,
    }

    /// `key=value` from the tokens of one bpftool line.
    fn field(rest: &str, key: &str) -> Option<u32> {
        rest.split_whitespace()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    }

    /// Parses bpftool's raw dump: `[id] KIND 'name' k=v...` lines, member
    /// lines (tab, `'name' type_id= bits_offset= [bitfield_size=]`) under
    /// STRUCT and UNION. Index i is type id i.
    fn bpftool_types() -> Option<Vec<Raw>> {
        let out = match Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
        {
            Ok(o) if o.status.success() => o.stdout,
            other => {
                eprintln!("bpftool unavailable ({other:?}), skipping the cross-check");
                return None;
            }
        };
        let mut types = vec![Raw::default()];
        for line in String::from_utf8(out)
            .expect("bpftool output is UTF-8")
            .lines()
        {
            let quoted = |l: &str| {
                let (_, r) = l.split_once('\'').expect("quoted name");
                let (n, rest) = r.split_once('\'').expect("closing quote");
                (n.to_string(), rest.to_string())
            };
            if let Some(m) = line.strip_prefix('\t') {
                let t = types.last_mut().unwrap();
                if t.kind == "STRUCT" || t.kind == "UNION" {
                    let (name, rest) = quoted(m);
                    let name = if name == "(anon)" {
                        String::new()
                    } else {
                        name
                    };
                    let f = |k| field(&rest, k);
                    t.members.push((
                        name,
                        f("type_id").unwrap(),
                        f("bits_offset").unwrap(),
                        f("bitfield_size").unwrap_or(0),
                    ));
                }
            } else if let Some(l) = line.strip_prefix('[') {
                let (id, l) = l.split_once("] ").expect("type id");
                assert_eq!(
                    id.parse::<usize>().unwrap(),
                    types.len(),
                    "bpftool ids are contiguous"
                );
                let (kind, l) = l.split_once(' ').expect("kind");
                let (name, rest) = quoted(l);
                let f = |k| field(&rest, k);
                types.push(Raw {
                    kind: kind.into(),
                    name,
                    size: f("size"),
                    ty: f("type_id"),
                    nelems: f("nr_elems"),
                    members: vec![],
                });
            }
        }
        Some(types)
    }

    fn raw_resolve(types: &[Raw], mut id: u32) -> &Raw {
        while ["TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"]
            .contains(&types[id as usize].kind.as_str())
        {
            id = types[id as usize].ty.unwrap();
        }
        &types[id as usize]
    }

    fn raw_size(types: &[Raw], id: u32) -> u32 {
        let t = raw_resolve(types, id);
        match t.kind.as_str() {
            "PTR" => 8,
            "ARRAY" => t.nelems.unwrap() * raw_size(types, t.ty.unwrap()),
            _ => t.size.unwrap(),
        }
    }

    /// Every member reachable through anonymous members of `t`, first
    /// occurrence of a name winning as in C: (name, bit offset, bitfield, type).
    fn raw_flatten(types: &[Raw], t: &Raw, base: u32, out: &mut Vec<(String, u32, u32, u32)>) {
        for (name, ty, off, bf) in &t.members {
            if name.is_empty() {
                raw_flatten(types, raw_resolve(types, *ty), base + off, out);
            } else if !out.iter().any(|m| &m.0 == name) {
                out.push((name.clone(), base + off, *bf, *ty));
            }
        }
    }

    /// The first complete struct `name` in bpftool's dump, flattened.
    fn raw_struct(types: &[Raw], name: &str) -> Vec<(String, u32, u32, u32)> {
        let t = types
            .iter()
            .find(|t| t.kind == "STRUCT" && t.name == name && !t.members.is_empty())
            .unwrap();
        let mut out = vec![];
        raw_flatten(types, t, 0, &mut out);
        out
    }

    #[test]
    fn running_kernel_matches_bpftool() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("{VMLINUX} absent, skipping");
            return;
        }
        let btf = KernelBtf::from_sys_fs().unwrap();
        let wanted = [
            ("sk_buff", "dev", 8),
            ("sk_buff", "head", 8),
            ("sk_buff", "network_header", 2),
            ("sk_buff", "transport_header", 2),
            ("sk_buff", "priority", 4),
            ("sk_buff", "len", 4),
            ("net_device", "ifindex", 4),
        ];
        // Structural facts that hold on any kernel.
        let sk_buff_size = btf
            .types
            .iter()
            .find(|t| {
                t.kind == STRUCT
                    && btf.name(t.name_off) == b"sk_buff"
                    && matches!(&t.shape, Shape::Record(m) if !m.is_empty())
            })
            .unwrap()
            .size_or_type;
        let mut seen = HashSet::new();
        for (s, m, size) in wanted {
            let off = btf.offset(s, m).unwrap();
            assert_eq!(btf.member_size(s, m).unwrap(), size, "{s}.{m} size");
            eprintln!("{s}.{m}: offset {off}, size {size}");
            if s == "sk_buff" {
                assert!(
                    off + size <= sk_buff_size,
                    "{s}.{m} at {off} past sk_buff's {sk_buff_size} bytes"
                );
                assert!(seen.insert(off), "{s}.{m} at {off} collides");
            }
        }
        assert!(btf
            .offset("sk_buff", "cloned")
            .unwrap_err()
            .to_string()
            .contains("bitfield"));
        assert!(btf.offset("sk_buff", "no_such_member").is_err());
        assert!(btf.offset("no_such_struct", "len").is_err());

        let Some(types) = bpftool_types() else { return };
        let mut checked = 0;
        for s in ["sk_buff", "net_device"] {
            for (m, bits, bitfield, ty) in raw_struct(&types, s) {
                let ours = btf.offset(s, &m);
                if bitfield != 0 || bits % 8 != 0 {
                    assert!(
                        ours.is_err(),
                        "{s}.{m}: bpftool says bit {bits} bitfield {bitfield}, we said {ours:?}"
                    );
                    continue;
                }
                assert_eq!(ours.unwrap(), bits / 8, "{s}.{m} offset");
                assert_eq!(
                    btf.member_size(s, &m).unwrap(),
                    raw_size(&types, ty),
                    "{s}.{m} size"
                );
                checked += 1;
            }
        }
        for (s, m, _) in wanted {
            assert!(
                raw_struct(&types, s).iter().any(|r| r.0 == m),
                "bpftool lacks {s}.{m}"
            );
        }
        assert!(checked > 100, "only {checked} members cross-checked");
    }

    /// Builds a raw BTF blob: types and strings, header in front.
    #[derive(Default)]
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn str(&mut self, s: &str) -> u32 {
            if self.strings.is_empty() {
                self.strings.push(0);
            }
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn words(&mut self, w: &[u32]) {
            w.iter()
                .for_each(|w| self.types.extend_from_slice(&w.to_ne_bytes()));
        }
        fn ty(&mut self, name: &str, kind: u8, kind_flag: bool, vlen: u32, size_or_type: u32) {
            let n = self.str(name);
            self.words(&[
                n,
                (kind_flag as u32) << 31 | (kind as u32) << 24 | vlen,
                size_or_type,
            ]);
        }
        fn member(&mut self, name: &str, ty: u32, offset: u32) {
            let n = self.str(name);
            self.words(&[n, ty, offset]);
        }
        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC.to_ne_bytes());
            b.extend_from_slice(&[1, 0]);
            let tl = self.types.len() as u32;
            for w in [24, 0, tl, tl, self.strings.len() as u32] {
                b.extend_from_slice(&u32::to_ne_bytes(w));
            }
            b.extend_from_slice(&self.types);
            b.extend_from_slice(&self.strings);
            b
        }
    }

    /// struct outer;  /* forward declaration, must be skipped */
    /// typedef int myint;
    /// struct outer {                      /* kind_flag set */
    ///     int a;                          /* 0 */
    ///     union { struct { int x; myint y; }; int z; };   /* 8: x 8, y 12, z 8 */
    ///     int flag : 3;                   /* bit 128 */
    ///     const myint tdm;                /* 20 */
    ///     int *p;                         /* 24 */
    /// };
    /// struct plain { int q : 3 (INT encoding); int odd @ bit 36; };
    fn tiny() -> Blob {
        let mut b = Blob::default();
        b.ty("outer", STRUCT, false, 0, 0); // 1: forward
        b.ty("int", INT, false, 0, 4); // 2
        b.words(&[32]);
        b.ty("myint", TYPEDEF, false, 0, 2); // 3
        b.ty("", STRUCT, false, 2, 8); // 4
        b.member("x", 2, 0);
        b.member("y", 3, 32);
        b.ty("", UNION, false, 2, 8); // 5
        b.member("", 4, 0);
        b.member("z", 2, 0);
        b.ty("", CONST, false, 0, 3); // 6
        b.ty("", PTR, false, 0, 2); // 7
        b.ty("outer", STRUCT, true, 5, 32); // 8
        b.member("a", 2, 0);
        b.member("", 5, 64);
        b.member("flag", 2, 3 << 24 | 128);
        b.member("tdm", 6, 160);
        b.member("p", 7, 192);
        b.ty("int3", INT, false, 0, 4); // 9: 3-bit int at bit 0
        b.words(&[3]);
        b.ty("plain", STRUCT, false, 2, 8); // 10
        b.member("q", 9, 0);
        b.member("odd", 2, 36);
        b
    }

    #[test]
    fn tiny_blob() {
        let btf = KernelBtf::parse(&tiny().bytes()).unwrap();
        let off = |m| btf.offset("outer", m).unwrap();
        assert_eq!(
            [off("a"), off("x"), off("y"), off("z"), off("tdm"), off("p")],
            [0, 8, 12, 8, 20, 24]
        );
        let size = |m| btf.member_size("outer", m).unwrap();
        assert_eq!([size("a"), size("y"), size("tdm"), size("p")], [4, 4, 4, 8]);

        let err = |s, m| btf.offset(s, m).unwrap_err().to_string();
        assert!(
            err("outer", "flag").contains("outer.flag is a bitfield"),
            "{}",
            err("outer", "flag")
        );
        assert!(
            err("plain", "q").contains("plain.q is a bitfield"),
            "{}",
            err("plain", "q")
        );
        assert!(
            err("plain", "odd").contains("not on a byte boundary"),
            "{}",
            err("plain", "odd")
        );
        assert_eq!(
            err("outer", "nope"),
            "kernel struct outer has no member nope"
        );
        assert_eq!(err("inner", "x"), "kernel BTF has no struct inner");
        assert!(btf.member_size("outer", "nope").is_err());
    }

    #[test]
    fn bad_blobs_are_errors() {
        let good = tiny().bytes();
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        let e = KernelBtf::parse(&bad).err().unwrap().to_string();
        assert!(e.contains("not BTF: magic"), "{e}");
        // Every truncation fails cleanly.
        for n in 0..good.len() {
            assert!(KernelBtf::parse(&good[..n]).is_err(), "{n} bytes parsed");
        }
        // A consistent header whose type section ends inside a type.
        let mut short = good.clone();
        let tl = u32_at(&short, 12).unwrap() - 4;
        short[12..16].copy_from_slice(&tl.to_ne_bytes());
        let e = KernelBtf::parse(&short).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
        // An unknown kind.
        let mut b = tiny();
        b.ty("", 31, false, 0, 0);
        let e = KernelBtf::parse(&b.bytes()).err().unwrap().to_string();
        assert!(e.contains("unknown kind 31"), "{e}");
        // A member whose type id does not exist.
        let mut b = tiny();
        b.ty("broken", STRUCT, false, 1, 4);
        b.member("", 999, 0);
        let btf = KernelBtf::parse(&b.bytes()).unwrap();
        assert!(btf.offset("broken", "x").is_err());
    }
}
