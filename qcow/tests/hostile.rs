//! Hostile images: every one gets a clear error that names the file and the
//! problem, never a panic, and memory stays bounded (the header limits cap what
//! is ever allocated from a size read out of a file).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use chainvault_qcow::chain::read_header;
use chainvault_qcow::create::create;
use chainvault_qcow::{
    BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions, Image, OpenOptions,
};

fn new_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    create(
        &p,
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    p
}

fn overlay(dir: &Path, name: &str, backing: &str) -> PathBuf {
    let p = dir.join(name);
    create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            backing: Some(BackingSpec {
                name: backing.to_string(),
                format: BackingFormat::Qcow2,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    p
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(p: &Path) -> String {
    Image::open(p, &OpenOptions::default())
        .unwrap_err()
        .to_string()
}

fn read_err(p: &Path) -> String {
    let img = Image::open(p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap_err().to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn truncated_header() {
    let d = tempfile::tempdir().unwrap();
    let full = new_image(d.path(), "full.qcow2", 1 << 20);
    let bytes = std::fs::read(&full).unwrap();
    for len in [0usize, 4, 40, 71, 90, 103] {
        let p = d.path().join(format!("t{len}.qcow2"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        let e = open_err(&p);
        assert_mentions(&e, &[&format!("t{len}.qcow2")]);
        assert!(e.contains("shorter") || e.contains("magic"), "{e}");
    }
}

#[test]
fn l1_table_larger_than_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = new_image(d.path(), "l1.qcow2", 1 << 20);
    poke(&p, 36, &(1_000_000u32).to_be_bytes());
    assert_mentions(&open_err(&p), &["l1.qcow2", "L1 table", "past the end"]);
    // Larger than any sane L1 table: refused before anything is allocated.
    poke(&p, 36, &u32::MAX.to_be_bytes());
    assert_mentions(&open_err(&p), &["l1.qcow2", "l1_size"]);
}

#[test]
fn l2_offsets_past_the_end_or_unaligned() {
    let d = tempfile::tempdir().unwrap();
    let p = new_image(d.path(), "l2.qcow2", 1 << 20);
    let h = read_header(&p).unwrap();
    poke(
        &p,
        h.l1_table_offset,
        &((1u64 << 40) | (1 << 63)).to_be_bytes(),
    );
    assert_mentions(&read_err(&p), &["l2.qcow2", "L2 table", "past the end"]);
    poke(
        &p,
        h.l1_table_offset,
        &(0x10200u64 | (1 << 63)).to_be_bytes(),
    );
    assert_mentions(&read_err(&p), &["l2.qcow2", "not aligned"]);
}

#[test]
fn data_cluster_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    let p = new_image(d.path(), "data.qcow2", 1 << 20);
    {
        let img = Image::open(
            &p,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_at(&[7u8; 4096], 0).unwrap();
        img.flush().unwrap();
    }
    let h = read_header(&p).unwrap();
    let mut e = [0u8; 8];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut e, h.l1_table_offset)
        .unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    poke(&p, l2, &((1u64 << 44) | (1 << 63)).to_be_bytes());
    assert_mentions(&read_err(&p), &["data.qcow2", "past the end"]);
    poke(&p, l2, &(0x30200u64 | (1 << 63)).to_be_bytes());
    assert_mentions(&read_err(&p), &["data.qcow2", "not aligned"]);
}

#[test]
fn refcount_structures_past_the_end_or_unaligned() {
    let d = tempfile::tempdir().unwrap();
    let p = new_image(d.path(), "rc.qcow2", 1 << 20);
    let h = read_header(&p).unwrap();
    // Refcount table past the end of the file.
    let q = d.path().join("rt.qcow2");
    std::fs::copy(&p, &q).unwrap();
    poke(&q, 48, &(1u64 << 40).to_be_bytes());
    assert_mentions(
        &open_err(&q),
        &["rt.qcow2", "refcount table", "past the end"],
    );
    // Refcount table offset unaligned.
    poke(&q, 48, &0x10200u64.to_be_bytes());
    assert_mentions(
        &open_err(&q),
        &["rt.qcow2", "refcount_table_offset", "aligned"],
    );
    // A refcount block past the end: found when a write needs it.
    poke(&p, h.refcount_table_offset, &(1u64 << 40).to_be_bytes());
    let img = Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = img.write_at(&[1u8; 512], 0).unwrap_err().to_string();
    assert_mentions(&e, &["rc.qcow2", "refcount block", "past the end"]);
}

#[test]
fn refcount_overflow_is_reported_by_check() {
    // refcount_bits=1 and a data cluster referenced twice: the refcount cannot
    // represent 2. Our reader serves the data; check names the problem.
    let qi = Command::new("qemu-img").arg("--version").output();
    assert!(
        qi.is_ok(),
        "qemu-img is missing: install the Debian package qemu-utils"
    );
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ovf.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1"])
        .arg(&p)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 128k"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success());
    let h = read_header(&p).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, h.l1_table_offset).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    f.read_exact_at(&mut e, l2).unwrap();
    // Second guest cluster points at the first one's host cluster.
    f.write_all_at(&e, l2 + 8).unwrap();
    drop(f);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let r = chainvault_qcow::check::check(&p, &Default::default()).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
}

#[test]
fn backing_file_outside_the_allowed_root() {
    let d = tempfile::tempdir().unwrap();
    let inner = d.path().join("repo");
    std::fs::create_dir(&inner).unwrap();
    new_image(d.path(), "outside.qcow2", 1 << 20);
    let top = overlay(&inner, "top.qcow2", "../outside.qcow2");
    let e = Chain::open(&top, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["top.qcow2", "outside the allowed directory"]);
    // Widening the root lets it through.
    Chain::open(
        &top,
        &ChainOptions {
            root: Some(d.path().to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap();
    // Absolute names and symlinks are judged by where they really lead.
    let top2 = overlay(&inner, "abs.qcow2", "/etc/passwd");
    let e = Chain::open(&top2, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["abs.qcow2", "outside"]);
    std::os::unix::fs::symlink(d.path().join("outside.qcow2"), inner.join("link.qcow2")).unwrap();
    let top3 = overlay(&inner, "sym.qcow2", "link.qcow2");
    let e = Chain::open(&top3, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["sym.qcow2", "outside"]);
    // A missing backing file is named.
    let top4 = overlay(&inner, "missing.qcow2", "nope.qcow2");
    let e = Chain::open(&top4, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["missing.qcow2", "nope.qcow2"]);
}

#[test]
fn backing_cycle() {
    let d = tempfile::tempdir().unwrap();
    overlay(d.path(), "a.qcow2", "b.qcow2");
    // b does not exist yet when a is created; now make b point back at a.
    let b = overlay(d.path(), "b.qcow2", "a.qcow2");
    let e = Chain::open(&b, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["cycle"]);
    let selfref = overlay(d.path(), "self.qcow2", "self.qcow2");
    let e = Chain::open(&selfref, &ChainOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["self.qcow2", "cycle"]);
}

#[test]
fn chain_deeper_than_the_limit() {
    let d = tempfile::tempdir().unwrap();
    new_image(d.path(), "l0.qcow2", 1 << 20);
    for i in 1..=10 {
        overlay(
            d.path(),
            &format!("l{i}.qcow2"),
            &format!("l{}.qcow2", i - 1),
        );
    }
    let top = d.path().join("l10.qcow2");
    let c = Chain::open(
        &top,
        &ChainOptions {
            max_depth: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.layers().len(), 11);
    let e = Chain::open(
        &top,
        &ChainOptions {
            max_depth: 9,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&e, &["deeper than the limit of 9"]);
}

#[test]
fn garbage_never_panics() {
    // Random bytes after a valid header prefix, and random headers.
    use rand::{RngCore, SeedableRng};
    let d = tempfile::tempdir().unwrap();
    let base = new_image(d.path(), "base.qcow2", 4 << 20);
    {
        let img = Image::open(
            &base,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_at(&vec![3u8; 300_000], 1000).unwrap();
        img.flush().unwrap();
    }
    let good = std::fs::read(&base).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for i in 0..300 {
        let mut bytes = good.clone();
        let n = 1 + (i % 16);
        for _ in 0..n {
            let pos = (rng.next_u64() as usize)
                % bytes.len().min(if i % 2 == 0 { 4096 } else { usize::MAX });
            bytes[pos] = rng.next_u32() as u8;
        }
        let p = d.path().join("fuzz.qcow2");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(img) = Image::open(&p, &OpenOptions::default()) {
            let size = img.size().min(8 << 20);
            let mut buf = vec![0u8; size as usize];
            let _ = img.read_at(&mut buf, 0);
            let _ = img.block_status(0, size);
        }
        let _ = chainvault_qcow::check::check(&p, &Default::default());
    }
}
