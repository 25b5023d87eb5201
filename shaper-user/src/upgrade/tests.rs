//! Unit tests: signing and verifying, keys, PE sections and the UKI check, version
//! comparison, boot counters and boot order, EFI variables, and install and mark-good on a
//! folder standing in for the EFI partition.

use super::*;
use ed25519_dalek::VerifyingKey;
use std::cmp::Ordering;
use std::fs;

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
    let root = std::env::temp_dir().join(format!("shaper-upgrade-install-{}", std::process::id()));
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
