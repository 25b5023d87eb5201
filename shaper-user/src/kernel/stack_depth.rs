//! The BPF object's stack, as Linux 6.1's verifier counts it (Debian 12's kernel, the
//! oldest the product loads on): each function's frame rounded up to 32 bytes (at least
//! 32, even for a frame of 0), summed along every chain of calls from a program's entry,
//! BPF-to-BPF calls and `bpf_loop` callbacks alike, at most 512 bytes
//! (`check_max_stack_depth`). A chain one byte over makes the kernel refuse the
//! classifier ("combined stack size of N calls is M. Too large"), which only the VM
//! tier's Debian 12 run would otherwise show, an hour into CI; the host's newer kernel
//! rounds to 16 and loads it. Read from the object the daemon embeds, not from a build
//! of its own.

use std::collections::{BTreeMap, BTreeSet};

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};

use super::bpf::OBJECT;

/// `MAX_BPF_STACK`.
const LIMIT: u64 = 512;

/// A function: its section and byte range there.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Func {
    /// Its section's index.
    section: usize,
    start: u64,
}

struct Analysis {
    names: BTreeMap<Func, String>,
    /// The deepest stack byte each function touches.
    depth: BTreeMap<Func, u64>,
    /// Calls and callback references each function makes.
    callees: BTreeMap<Func, BTreeSet<Func>>,
}

/// 6.1's rounding of one frame (`round_up(max_t(u32, stack_depth, 1), 32)`).
fn rounded(depth: u64) -> u64 {
    depth.max(1).div_ceil(32) * 32
}

fn analyse(elf: &[u8]) -> Analysis {
    let file = object::File::parse(elf).expect("the BPF object is an ELF file");
    let mut ranges: BTreeMap<Func, u64> = BTreeMap::new();
    let mut names = BTreeMap::new();
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(section) = sym.section_index().map(|s| s.0) else {
            continue;
        };
        let f = Func {
            section,
            start: sym.address(),
        };
        ranges.insert(f, sym.size());
        names.insert(f, sym.name().unwrap_or("?").to_string());
    }
    // The function whose range holds `at` in `section`.
    let owner = |section: usize, at: u64| {
        ranges
            .range(..=Func { section, start: at })
            .next_back()
            .filter(|(f, size)| f.section == section && at < f.start + **size)
            .map(|(f, _)| *f)
    };
    let mut depth = BTreeMap::new();
    let mut callees: BTreeMap<Func, BTreeSet<Func>> = BTreeMap::new();
    for section in file.sections() {
        let relocs: BTreeMap<u64, (usize, u64)> = section
            .relocations()
            .filter_map(|(at, r)| match r.target() {
                RelocationTarget::Symbol(i) => {
                    let s = file.symbol_by_index(i).ok()?;
                    Some((at, (s.section_index()?.0, s.address())))
                }
                RelocationTarget::Section(i) => Some((at, (i.0, 0))),
                _ => None,
            })
            .collect();
        let Ok(code) = section.data() else {
            continue;
        };
        for (&f, &size) in ranges.range(
            Func {
                section: section.index().0,
                start: 0,
            }..,
        ) {
            if f.section != section.index().0 {
                break;
            }
            let mut deepest = 0u64;
            // Registers holding the frame pointer plus an offset: r10 itself (read-only in
            // BPF), and copies of it moved on (`r1 = r10; r1 += -72`).
            let mut frame_ptr: [Option<i64>; 11] = [None; 11];
            frame_ptr[10] = Some(0);
            let mut at = f.start;
            while at + 8 <= f.start + size {
                let i = &code[at as usize..at as usize + 8];
                let (op, dst, src) = (i[0], i[1] & 0x0f, i[1] >> 4);
                let off = i16::from_le_bytes([i[2], i[3]]) as i64;
                let imm = i32::from_le_bytes([i[4], i[5], i[6], i[7]]) as i64;
                let class = op & 0x07;
                let mut touch = |o: i64| {
                    if o < 0 {
                        deepest = deepest.max(o.unsigned_abs());
                    }
                };
                let held = |r: u8| frame_ptr.get(r as usize).copied().flatten();
                // Loads (LDX: the base is src) and stores (ST, STX: the base is dst)
                // through the frame pointer or a register holding a stack address.
                let base = match class {
                    0x01 => held(src),
                    0x02 | 0x03 => held(dst),
                    _ => None,
                };
                if let Some(b) = base {
                    touch(b + off);
                }
                let d = dst as usize;
                match op {
                    // mov64 rd, rs
                    0xbf => frame_ptr[d] = held(src),
                    // add64 rd, imm
                    0x07 if d < 11 => {
                        if let Some(b) = frame_ptr[d] {
                            frame_ptr[d] = Some(b + imm);
                            touch(b + imm);
                        }
                    }
                    // A call: helpers clobber r0-r5.
                    0x85 => {
                        frame_ptr[..6].fill(None);
                        if src == 1 {
                            let target = match relocs.get(&at) {
                                Some(&(s, base)) => (s, base as i64 + (imm + 1) * 8),
                                None => (section.index().0, at as i64 + (imm + 1) * 8),
                            };
                            let callee = owner(target.0, target.1 as u64)
                                .unwrap_or_else(|| panic!("a call at {at:#x} to no function"));
                            callees.entry(f).or_default().insert(callee);
                        }
                    }
                    // ld_imm64: a function's address (a bpf_loop callback) when it is
                    // relocated against code.
                    0x18 => {
                        if d < 11 {
                            frame_ptr[d] = None;
                        }
                        if let Some(&(s, base)) = relocs.get(&at) {
                            let is_code = file
                                .section_by_index(SectionIndex(s))
                                .map(|s| s.kind() == object::SectionKind::Text)
                                .unwrap_or(false);
                            if is_code {
                                let callee =
                                    owner(s, (base as i64 + imm) as u64).unwrap_or_else(|| {
                                        panic!("a function reference at {at:#x} to no function")
                                    });
                                callees.entry(f).or_default().insert(callee);
                            }
                        }
                        at += 8;
                    }
                    _ => {
                        // Any other write to a register ends what it held.
                        let writes = matches!(class, 0x00 | 0x01 | 0x04 | 0x07);
                        if writes && d < 11 {
                            frame_ptr[d] = None;
                        }
                    }
                }
                at += 8;
            }
            depth.insert(f, deepest);
        }
    }
    Analysis {
        names,
        depth,
        callees,
    }
}

impl Analysis {
    /// The deepest chain from `f`: its 6.1-rounded sum and the functions on it.
    fn chain(&self, f: Func, on: &mut Vec<Func>) -> (u64, Vec<String>) {
        assert!(!on.contains(&f), "recursion through {}", self.names[&f]);
        on.push(f);
        let mut best = (0, Vec::new());
        for &c in self.callees.get(&f).into_iter().flatten() {
            let sub = self.chain(c, on);
            if sub.0 > best.0 {
                best = sub;
            }
        }
        on.pop();
        let own = rounded(self.depth[&f]);
        let mut names = vec![format!("{} ({})", self.names[&f], self.depth[&f])];
        names.extend(best.1);
        (own + best.0, names)
    }

    fn entries(&self) -> Vec<Func> {
        self.names
            .iter()
            .filter(|(_, n)| n.starts_with("shaper_"))
            .map(|(f, _)| *f)
            .collect()
    }
}

/// Every program's deepest chain of frames fits 6.1's 512 bytes. Checked against the
/// verifier: a build whose measurement subprogram's frame was 168 bytes, which 6.1
/// refused ("combined stack size of 3 calls is 544. Too large"; its frames "312+0+16+0+
/// 40+168+112+40"), fails here with the same 544: the classifier (312), the subprogram
/// (168) and the `memmove` it calls (0), rounded to 320 + 192 + 32.
#[test]
fn every_program_fits_the_6_1_verifiers_stack() {
    let a = analyse(OBJECT);
    let entries = a.entries();
    let names: Vec<&str> = entries.iter().map(|f| a.names[f].as_str()).collect();
    assert!(
        names.contains(&"shaper_classify") && names.contains(&"shaper_media_drops"),
        "programs found: {names:?}"
    );
    for f in entries {
        let (total, chain) = a.chain(f, &mut Vec::new());
        println!("{total:>4} bytes: {}", chain.join(" -> "));
        assert!(
            total <= LIMIT,
            "{}'s deepest chain of frames is {total} bytes as Linux 6.1 rounds them (each \
             frame up to 32), over its {LIMIT}: {}",
            a.names[&f],
            chain.join(" -> ")
        );
    }
    // The classifier calls into the measurement and the window clamp's callbacks: if
    // those edges went unseen, the sum above would be the classifier's frame alone.
    let classify = a
        .names
        .iter()
        .find(|(_, n)| n.as_str() == "shaper_classify")
        .map(|(f, _)| *f)
        .expect("shaper_classify");
    let called: Vec<&str> = a.callees[&classify]
        .iter()
        .map(|f| a.names[f].as_str())
        .collect();
    assert!(
        called.iter().any(|n| n.contains("media_sub"))
            && called.iter().any(|n| n.contains("clamp_cb")),
        "the classifier's calls found: {called:?}"
    );
}

/// The rounding: a frame of 0 still costs 32 (memset's, under a subprogram).
#[test]
fn frames_round_as_6_1_rounds_them() {
    assert_eq!(rounded(0), 32);
    assert_eq!(rounded(12), 32);
    assert_eq!(rounded(160), 160);
    assert_eq!(rounded(168), 192);
    assert_eq!(rounded(312), 320);
}
