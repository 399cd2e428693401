//! `check` against `qemu-img check`, on images made by QEMU and damaged on
//! purpose. For every image, clean or damaged, our exit code must be the one
//! qemu-img check gives (0 clean, 1 check not completed, 2 corrupt, 3 leaks),
//! and damaged images must land in the class the damage belongs to.
//!
//! Needs `qemu-img` and `qemu-io` (Debian package qemu-utils).

mod common_check;

use std::path::{Path, PathBuf};
use std::process::Command;

use chainvault_qcow::check::{check, CheckOptions};
use common_check::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("check-vs-qemu")
        .tempdir()
        .unwrap()
}

/// A 64 MiB image with data, zero clusters (plain and preallocated) and a gap.
fn make_std(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        p.to_str().unwrap(),
        "64M",
    ]);
    qemu_io(
        &p,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 192k",
            "write -z 4M 64k",
            "write -z 64k 64k",
            "write -P 0x11 40M 4k",
        ],
    );
    p
}

fn make_compressed(dir: &Path, name: &str, compression: &str) -> PathBuf {
    let src = make_std(dir, &format!("{name}.src"), "cluster_size=65536");
    let p = dir.join(name);
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={compression}"),
        src.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    p
}

fn make_extended(dir: &Path, name: &str, cluster: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("extended_l2=on,cluster_size={cluster}"),
        p.to_str().unwrap(),
        "64M",
    ]);
    qemu_io(
        &p,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x22 2052k 4k",
            "write -P 0x33 5M 8k",
            "write -z 5M 2k",
            "write -z 9M 4k",
        ],
    );
    p
}

fn make_snapshots(dir: &Path, name: &str) -> PathBuf {
    let p = make_std(dir, name, "cluster_size=65536");
    qemu_img(&["snapshot", "-c", "first", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x77 0 128k", "write -P 0x78 20M 64k"]);
    qemu_img(&["snapshot", "-c", "second", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x79 64k 64k"]);
    p
}

fn make_bitmaps(dir: &Path, name: &str) -> PathBuf {
    let p = make_std(dir, name, "cluster_size=65536");
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", p.to_str().unwrap(), "fine"]);
    // Writes with the bitmaps enabled make them dirty, so they get data clusters.
    qemu_io(&p, &["write -P 0x44 0 64k", "write -P 0x45 30M 1M"]);
    p
}

#[test]
fn clean_images_agree_with_qemu() {
    require_qemu();
    let d = tmp();
    let dir = d.path();
    let mut images = Vec::new();
    for cs in ["512", "4096", "65536", "2M"] {
        images.push(make_std(
            dir,
            &format!("cs{cs}.qcow2"),
            &format!("cluster_size={cs}"),
        ));
    }
    for bits in [1, 2, 4, 8, 32, 64] {
        images.push(make_std(
            dir,
            &format!("rc{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
        ));
    }
    images.push(make_std(dir, "v2.qcow2", "compat=0.10"));
    images.push(make_std(dir, "prealloc.qcow2", "preallocation=metadata"));
    images.push(make_std(dir, "lazy.qcow2", "lazy_refcounts=on"));
    images.push(make_extended(dir, "ext64k.qcow2", "64k"));
    images.push(make_extended(dir, "ext128k.qcow2", "128k"));
    images.push(make_compressed(dir, "deflate.qcow2", "zlib"));
    images.push(make_compressed(dir, "zstd.qcow2", "zstd"));
    images.push(make_snapshots(dir, "snap.qcow2"));
    // Snapshots in a version 2 image, and in an extended-L2 image with a bitmap.
    let v2 = make_std(dir, "v2snap.qcow2", "compat=0.10");
    qemu_img(&["snapshot", "-c", "s", v2.to_str().unwrap()]);
    qemu_io(&v2, &["write -P 0x5a 0 64k"]);
    images.push(v2);
    let ext = make_extended(dir, "extsnap.qcow2", "64k");
    qemu_img(&["snapshot", "-c", "s", ext.to_str().unwrap()]);
    qemu_img(&["bitmap", "--add", ext.to_str().unwrap(), "b"]);
    qemu_io(&ext, &["write -P 0x5b 4k 4k", "write -z 1M 32k"]);
    images.push(ext);
    images.push(make_bitmaps(dir, "bitmaps.qcow2"));

    // A backing chain: base with data, overlay with a few writes.
    let base = make_std(dir, "base.qcow2", "cluster_size=65536");
    let ov = dir.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        ov.to_str().unwrap(),
    ]);
    qemu_io(&ov, &["write -P 0x99 512k 8k", "write -z 8M 64k"]);
    images.push(ov);

    // An image created by chainvault itself.
    let ours = dir.join("chainvault.qcow2");
    chainvault_qcow::create::create(
        &ours,
        &chainvault_qcow::CreateOptions {
            size: 256 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    qemu_io(&ours, &["write -P 0x12 1M 1M"]);
    images.push(ours);

    for p in &images {
        let what = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(assert_same_class(p, &what), 0, "{what} should be clean");
        // The statistics match qemu-img check --output=json.
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", "--output=json"])
            .arg(p)
            .output()
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let r = check(p, &CheckOptions::default()).unwrap();
        let field = |k: &str| j.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(
            r.image_end_offset,
            field("image-end-offset"),
            "{what}: image end offset"
        );
        assert_eq!(
            r.total_clusters,
            field("total-clusters"),
            "{what}: total clusters"
        );
        assert_eq!(
            r.allocated_clusters,
            field("allocated-clusters"),
            "{what}: allocated clusters"
        );
        assert_eq!(
            r.fragmented_clusters,
            field("fragmented-clusters"),
            "{what}: fragmented clusters"
        );
        assert_eq!(
            r.compressed_clusters,
            field("compressed-clusters"),
            "{what}: compressed clusters"
        );
        assert!(r.problems.is_empty(), "{what}: {:?}", r.problems);
    }
    // The stats are not trivially zero.
    let r = check(&dir.join("deflate.qcow2"), &CheckOptions::default()).unwrap();
    assert!(r.compressed_clusters > 0 && r.allocated_clusters > 0);
    let r = check(&dir.join("snap.qcow2"), &CheckOptions::default()).unwrap();
    assert!(
        r.summary().contains("No errors were found on the image."),
        "{}",
        r.summary()
    );
}

/// A damage to apply to a copy of a base image, and the class qemu-img check
/// gives the result.
struct Case {
    name: &'static str,
    base: &'static str,
    expect: i32,
    damage: fn(&Img),
}

fn data_entry(img: &Img) -> (u64, u64, u64, u64, u64) {
    img.mapped_entries(false)
        .into_iter()
        .find(|e| e.4 & 1 == 0 || img.extended_l2())
        .expect("image has a data cluster")
}

fn damages() -> Vec<Case> {
    vec![
        // Leaks.
        Case {
            name: "leak: refcount table cluster counted twice",
            base: "std",
            expect: 3,
            damage: |i| {
                let c = i.rt_off / i.cs;
                i.set_refcount(c, i.refcount(c) + 1);
            },
        },
        Case {
            name: "leak: header cluster counted twice",
            base: "std",
            expect: 3,
            damage: |i| i.set_refcount(0, 2),
        },
        Case {
            name: "leak: unused cluster appended with refcount 1",
            base: "std",
            expect: 3,
            damage: |i| {
                let len = i.len().next_multiple_of(i.cs);
                i.set_len(len + i.cs);
                i.set_refcount(len / i.cs, 1);
            },
        },
        Case {
            name: "leak: bitmap directory counted twice",
            base: "bitmaps",
            expect: 3,
            damage: |i| {
                let (_, _, _, dir) = i.bitmaps_ext().unwrap();
                let c = dir / i.cs;
                i.set_refcount(c, i.refcount(c) + 1);
            },
        },
        Case {
            name: "leak: snapshot table counted twice",
            base: "snap",
            expect: 3,
            damage: |i| {
                let c = i.snapshots_off / i.cs;
                i.set_refcount(c, i.refcount(c) + 1);
            },
        },
        Case {
            name: "leak: refcount 1 leaks on a 1-bit image",
            base: "rc1",
            expect: 3,
            damage: |i| {
                let len = i.len().next_multiple_of(i.cs);
                i.set_len(len + 2 * i.cs);
                i.set_refcount(len / i.cs + 1, 1);
            },
        },
        Case {
            name: "leak: 64-bit refcounts",
            base: "rc64",
            expect: 3,
            damage: |i| {
                let c = i.l1_off / i.cs;
                i.set_refcount(c, 1 << 40);
            },
        },
        Case {
            name: "leak: compressed image",
            base: "zstd",
            expect: 3,
            damage: |i| {
                let c = i.l1_off / i.cs;
                i.set_refcount(c, i.refcount(c) + 1);
            },
        },
        // A leaked data cluster also has a wrong COPIED flag: a corruption.
        Case {
            name: "data cluster refcount raised (leak + COPIED mismatch)",
            base: "std",
            expect: 2,
            damage: |i| {
                let c = (data_entry(i).4 & OFFSET_MASK) / i.cs;
                i.set_refcount(c, 2);
            },
        },
        // Refcounts too low.
        Case {
            name: "refcount of a data cluster zeroed",
            base: "std",
            expect: 2,
            damage: |i| {
                let c = (data_entry(i).4 & OFFSET_MASK) / i.cs;
                i.set_refcount(c, 0);
            },
        },
        Case {
            name: "refcount of an L2 table zeroed",
            base: "std",
            expect: 2,
            damage: |i| i.set_refcount(i.first_l2().1 / i.cs, 0),
        },
        Case {
            name: "refcount of the L1 table zeroed",
            base: "std",
            expect: 2,
            damage: |i| i.set_refcount(i.l1_off / i.cs, 0),
        },
        Case {
            name: "refcount of a compressed cluster zeroed",
            base: "deflate",
            expect: 2,
            damage: |i| {
                let e = i.mapped_entries(true)[0].4;
                let x = 62 - (i.cluster_bits - 8);
                let off = e & ((1u64 << x) - 1);
                i.set_refcount(off / i.cs, 0);
            },
        },
        Case {
            name: "refcount of a snapshot-only L2 table zeroed",
            base: "snap",
            expect: 2,
            damage: |i| {
                let sn = i.snapshot_entry_at(0);
                let l1 = i.u64(sn);
                let l2 = i.u64(l1) & OFFSET_MASK;
                i.set_refcount(l2 / i.cs, 0);
            },
        },
        Case {
            name: "refcount of a bitmap data cluster zeroed",
            base: "bitmaps",
            expect: 2,
            damage: |i| {
                let (_, _, _, dir) = i.bitmaps_ext().unwrap();
                let table = i.u64(dir);
                let size = i.u32(dir + 8) as u64;
                let data = (0..size)
                    .map(|k| i.u64(table + 8 * k) & OFFSET_MASK)
                    .find(|&o| o != 0)
                    .unwrap();
                i.set_refcount(data / i.cs, 0);
            },
        },
        // COPIED flags.
        Case {
            name: "COPIED cleared on an L2 entry",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                i.set_u64(at, raw & !COPIED);
            },
        },
        Case {
            name: "COPIED cleared on an L1 entry",
            base: "std",
            expect: 2,
            damage: |i| {
                let (idx, _) = i.first_l2();
                let at = i.l1_entry_at(idx);
                i.set_u64(at, i.u64(at) & !COPIED);
            },
        },
        Case {
            name: "COPIED set on a compressed entry",
            base: "deflate",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = i.mapped_entries(true)[0];
                i.set_u64(at, raw | COPIED);
            },
        },
        // Alignment and reserved bits.
        Case {
            name: "L2 table offset in L1 not cluster-aligned",
            base: "std",
            expect: 2,
            damage: |i| {
                let (idx, _) = i.first_l2();
                let at = i.l1_entry_at(idx);
                i.set_u64(at, i.u64(at) + 0x200);
            },
        },
        Case {
            name: "data cluster offset not cluster-aligned",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                i.set_u64(at, raw + 0x1000);
            },
        },
        Case {
            name: "reserved bit set in an L2 entry",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                i.set_u64(at, raw | 0x2);
            },
        },
        Case {
            name: "reserved bit set in an L1 entry",
            base: "std",
            expect: 2,
            damage: |i| {
                let (idx, _) = i.first_l2();
                let at = i.l1_entry_at(idx);
                i.set_u64(at, i.u64(at) | 0x100);
            },
        },
        Case {
            name: "reserved bit set in a refcount table entry",
            base: "std",
            expect: 2,
            damage: |i| {
                let at = i.reftable_entry_at(0);
                i.set_u64(at, i.u64(at) | 0x1);
            },
        },
        // References past the end of the file.
        Case {
            name: "L2 entry pointing past the end of the file",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                let past = i.len().next_multiple_of(i.cs) + 16 * i.cs;
                i.set_u64(at, (raw & !OFFSET_MASK) | past);
            },
        },
        Case {
            name: "L2 entry pointing at the cluster just past the end",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                let past = i.len().next_multiple_of(i.cs);
                i.set_u64(at, (raw & !OFFSET_MASK) | past);
            },
        },
        Case {
            name: "L2 entry pointing far past the end (2^55)",
            base: "std",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = data_entry(i);
                i.set_u64(at, (raw & !OFFSET_MASK) | (1u64 << 55));
            },
        },
        Case {
            name: "L1 entry pointing past the end of the file",
            base: "std",
            expect: 2,
            damage: |i| {
                let (idx, _) = i.first_l2();
                let past = i.len().next_multiple_of(i.cs) + 4 * i.cs;
                i.set_u64(i.l1_entry_at(idx), COPIED | past);
            },
        },
        Case {
            name: "file truncated before its last data cluster",
            base: "std",
            expect: 2,
            damage: |i| {
                let len = i.len();
                i.set_len(len - 2 * i.cs);
            },
        },
        Case {
            name: "compressed cluster past the end of the file",
            base: "deflate",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, raw) = i.mapped_entries(true)[0];
                let x = 62 - (i.cluster_bits - 8);
                let mask = (1u64 << x) - 1;
                let past = i.len().next_multiple_of(i.cs) + 8 * i.cs;
                i.set_u64(at, (raw & !mask) | past);
            },
        },
        // Double references and overflow.
        Case {
            name: "data cluster referenced by two L2 entries",
            base: "std",
            expect: 2,
            damage: |i| {
                let e = i.mapped_entries(false);
                let (_, _, _, _, first) = e[0];
                let (_, _, _, at, _) = e[3];
                i.set_u64(at, first);
            },
        },
        Case {
            name: "refcount overflow: two references with 1-bit refcounts",
            base: "rc1",
            expect: 2,
            damage: |i| {
                let e = i.mapped_entries(false);
                let (_, _, _, _, first) = e[0];
                let (_, _, _, at, _) = e[2];
                i.set_u64(at, first);
            },
        },
        Case {
            name: "refcount overflow: three references with 1-bit refcounts",
            base: "rc1",
            expect: 2,
            damage: |i| {
                let e = i.mapped_entries(false);
                let (_, _, _, _, first) = e[0];
                for k in [2, 5] {
                    i.set_u64(e[k].3, first);
                }
            },
        },
        Case {
            name: "refcount block shared with the L1 table",
            base: "std",
            expect: 2,
            damage: |i| {
                let at = i.reftable_entry_at(1);
                i.set_u64(at, i.l1_off);
            },
        },
        // Refcount structures.
        Case {
            name: "refcount block offset past the end of the file",
            base: "std",
            expect: 2,
            damage: |i| {
                let past = i.len().next_multiple_of(i.cs) + 10 * i.cs;
                i.set_u64(i.reftable_entry_at(0), past);
            },
        },
        Case {
            name: "refcount block offset not cluster-aligned",
            base: "std",
            expect: 1,
            damage: |i| {
                let at = i.reftable_entry_at(0);
                i.set_u64(at, i.u64(at) + 0x200);
            },
        },
        // Extended L2.
        Case {
            name: "extended L2: subcluster both allocated and zero",
            base: "ext",
            expect: 2,
            damage: |i| {
                let (_, _, _, at, _) = data_entry(i);
                let bm = i.u64(at + 8);
                i.set_u64(at + 8, bm | ((bm & 0xffff_ffff) << 32));
            },
        },
        Case {
            name: "extended L2: allocated subclusters without a host cluster",
            base: "ext",
            expect: 2,
            damage: |i| {
                let (_, l2, _, _, _) = data_entry(i);
                let free = (0..i.l2_entries())
                    .map(|j| i.l2_entry_at(l2, j))
                    .find(|&a| i.u64(a) == 0)
                    .unwrap();
                i.set_u64(free + 8, 0x1);
            },
        },
        Case {
            name: "extended L2: compressed entry with a subcluster bitmap",
            base: "ext",
            expect: 2,
            damage: |i| {
                let (_, l2, _, _, _) = data_entry(i);
                let free = (0..i.l2_entries())
                    .map(|j| i.l2_entry_at(l2, j))
                    .find(|&a| i.u64(a) == 0)
                    .unwrap();
                i.set_u64(free, COMPRESSED | 0x10200);
                i.set_u64(free + 8, 0x1);
            },
        },
        Case {
            name: "extended L2: refcount of a data cluster zeroed",
            base: "ext",
            expect: 2,
            damage: |i| {
                let c = (data_entry(i).4 & OFFSET_MASK) / i.cs;
                i.set_refcount(c, 0);
            },
        },
        // Snapshots.
        Case {
            name: "snapshot with too much extra data",
            base: "snap",
            expect: 1,
            damage: |i| {
                let sn = i.snapshot_entry_at(0);
                i.set_u32(sn + 36, 2000);
            },
        },
        Case {
            name: "snapshot L1 table not cluster-aligned",
            base: "snap",
            expect: 2,
            damage: |i| {
                let sn = i.snapshot_entry_at(1);
                i.set_u64(sn, i.u64(sn) + 0x200);
            },
        },
        Case {
            name: "snapshot L1 table too large",
            base: "snap",
            expect: 2,
            damage: |i| {
                let sn = i.snapshot_entry_at(0);
                i.set_u32(sn + 8, 5 << 20);
            },
        },
        Case {
            name: "too many snapshots in the header",
            base: "snap",
            expect: 1,
            damage: |i| i.set_u32(60, 70000),
        },
        // Bitmaps.
        Case {
            name: "bitmap directory entry of an unknown type",
            base: "bitmaps",
            expect: 1,
            damage: |i| {
                let (_, _, _, dir) = i.bitmaps_ext().unwrap();
                i.write(dir + 16, &[2]);
            },
        },
        Case {
            name: "bitmap table entry with reserved bits",
            base: "bitmaps",
            expect: 1,
            damage: |i| {
                let (_, _, _, dir) = i.bitmaps_ext().unwrap();
                let table = i.u64(dir);
                i.set_u64(table, i.u64(table) | 0x2);
            },
        },
        Case {
            name: "bitmaps extension counts one bitmap too many",
            base: "bitmaps",
            expect: 1,
            damage: |i| {
                let (at, nb, _, _) = i.bitmaps_ext().unwrap();
                i.set_u32(at, nb + 1);
            },
        },
        Case {
            name: "bitmap marked in use (not loaded, still counted)",
            base: "bitmaps",
            expect: 0,
            damage: |i| {
                let (_, _, _, dir) = i.bitmaps_ext().unwrap();
                i.set_u32(dir + 12, i.u32(dir + 12) | 1);
            },
        },
        Case {
            name: "bitmaps ignored when the autoclear bit is clear (their clusters leak)",
            base: "bitmaps",
            expect: 3,
            damage: |i| i.set_u64(88, 0),
        },
        // Header flags that qemu-img check tolerates.
        Case {
            name: "backing file name offset past the first cluster",
            base: "std",
            expect: 1,
            damage: |i| i.set_u64(8, 2 * i.cs),
        },
        Case {
            name: "compression-type bit set with deflate",
            base: "deflate",
            expect: 1,
            damage: |i| i.set_u64(72, i.incompat | 8),
        },
        Case {
            name: "corrupt bit set on a clean image",
            base: "std",
            expect: 0,
            damage: |i| i.set_u64(72, i.incompat | 2),
        },
    ]
}

fn base_images(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("std", make_std(dir, "std.qcow2", "cluster_size=65536")),
        ("rc1", make_std(dir, "rc1.qcow2", "refcount_bits=1")),
        ("rc64", make_std(dir, "rc64.qcow2", "refcount_bits=64")),
        ("ext", make_extended(dir, "ext.qcow2", "64k")),
        ("deflate", make_compressed(dir, "deflate.qcow2", "zlib")),
        ("zstd", make_compressed(dir, "zstd.qcow2", "zstd")),
        ("snap", make_snapshots(dir, "snap.qcow2")),
        ("bitmaps", make_bitmaps(dir, "bitmaps.qcow2")),
    ]
}

#[test]
fn damaged_images_agree_with_qemu() {
    require_qemu();
    let d = tmp();
    let dir = d.path();
    let bases = base_images(dir);
    let mut failures = Vec::new();
    for (n, case) in damages().iter().enumerate() {
        let base = &bases.iter().find(|(k, _)| *k == case.base).unwrap().1;
        let p = dir.join(format!("damage{n}.qcow2"));
        copy(base, &p);
        (case.damage)(&Img::open(&p));
        let (q, qtext) = qemu_check(&p);
        let (o, otext, report) = our_check(&p);
        let counts = count_mismatch(&p, report.as_ref());
        if q != case.expect || o != q || counts.is_some() {
            failures.push(format!(
                "{}: expected exit {}, qemu-img check exits {q}, ours {o}; {}\n--- qemu ---\n{qtext}\n--- ours ---\n{otext}\n",
                case.name,
                case.expect,
                counts.unwrap_or_default()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} damaged images disagree:\n{}",
        failures.len(),
        damages().len(),
        failures.join("\n")
    );
}

#[test]
fn problem_messages_name_the_structure() {
    require_qemu();
    let d = tmp();
    let base = make_std(d.path(), "std.qcow2", "cluster_size=65536");
    let img = Img::open(&base);
    let (idx, l2) = img.first_l2();
    let at = img.l1_entry_at(idx);
    img.set_u64(at, img.u64(at) + 0x200);
    let r = check(&base, &CheckOptions::default()).unwrap();
    let want = format!(
        "L2 table at {:#x} (L1 index {idx}) is not aligned to the 65536-byte cluster size",
        l2 + 0x200
    );
    assert!(
        r.problems.iter().any(|p| p.message.contains(&want)),
        "no problem says {want:?}: {:#?}",
        r.problems
    );
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.summary().contains("errors were found on the image"),
        "{}",
        r.summary()
    );
    // The report serialises.
    let j = serde_json::to_value(&r).unwrap();
    assert!(j["problems"][0]["severity"].is_string());
}

/// Leak images: our repair fixes them so that qemu-img check and our check both
/// find nothing, and it changes only the refcounts that were raised.
#[test]
fn leak_repair_leaves_a_clean_image() {
    require_qemu();
    let d = tmp();
    let dir = d.path();
    let bases = base_images(dir);
    for (n, case) in damages().iter().enumerate().filter(|(_, c)| c.expect == 3) {
        let base = &bases.iter().find(|(k, _)| *k == case.base).unwrap().1;
        let p = dir.join(format!("leak{n}.qcow2"));
        copy(base, &p);
        (case.damage)(&Img::open(&p));
        assert_eq!(assert_same_class(&p, case.name), 3, "{}", case.name);

        let r = check(&p, &CheckOptions { repair_leaks: true }).unwrap();
        assert!(
            r.leaks_fixed > 0,
            "{}: nothing was fixed: {:#?}",
            case.name,
            r
        );
        assert!(r.summary().contains("repaired"), "{}", r.summary());
        let (q, qtext) = qemu_check(&p);
        assert_eq!(
            q, 0,
            "{}: after our repair qemu-img check says:\n{qtext}",
            case.name
        );
        let (o, otext, _) = our_check(&p);
        assert_eq!(o, 0, "{}: after repair our check says:\n{otext}", case.name);
        assert_eq!(
            r.exit_code(),
            0,
            "{}: the returned report is of the repaired file",
            case.name
        );

        // Nothing else changed: the file is the base again, apart from what the
        // damage added past its end (which is zeros).
        let before = std::fs::read(base).unwrap();
        let after = std::fs::read(&p).unwrap();
        if case.name.contains("autoclear") {
            continue; // the header flag itself stays changed
        }
        assert!(after.len() >= before.len(), "{}", case.name);
        assert!(
            after[..before.len()] == before[..],
            "{}: repair changed bytes it should not have",
            case.name
        );
        assert!(
            after[before.len()..].iter().all(|&b| b == 0),
            "{}",
            case.name
        );
    }
}

/// Repair fixes only leaks: corruptions stay, and qemu-img check agrees.
#[test]
fn repair_leaves_corruptions_alone() {
    require_qemu();
    let d = tmp();
    let p = make_std(d.path(), "both.qcow2", "cluster_size=65536");
    let img = Img::open(&p);
    let rt = img.rt_off / img.cs;
    img.set_refcount(rt, 3); // leak
    let (_, _, _, at, raw) = data_entry(&img);
    img.set_u64(at, raw & !COPIED); // corruption
    drop(img);
    assert_eq!(assert_same_class(&p, "leak + corruption"), 2);
    let r = check(&p, &CheckOptions { repair_leaks: true }).unwrap();
    assert_eq!(r.leaks_fixed, 1, "{r:#?}");
    assert_eq!(r.leaks, 0);
    assert_eq!(r.corruptions, 1, "{r:#?}");
    assert_eq!(assert_same_class(&p, "after repair"), 2);
    assert_eq!(
        Img::open(&p).u64(at),
        raw & !COPIED,
        "the corrupt entry is untouched"
    );
}

/// Repair refuses to run while QEMU holds the image open.
#[test]
fn repair_refuses_an_image_in_use() {
    require_qemu();
    let d = tmp();
    let p = make_std(d.path(), "busy.qcow2", "cluster_size=65536");
    let img = Img::open(&p);
    img.set_refcount(0, 2);
    drop(img);
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000"])
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let r = check(&p, &CheckOptions { repair_leaks: true });
    let _ = child.kill();
    let _ = child.wait();
    let e = r
        .expect_err("repair must refuse an image open in qemu-io")
        .to_string();
    assert!(e.contains("busy.qcow2") && e.contains("open"), "{e}");
    assert_eq!(Img::open(&p).refcount(0), 2, "nothing was repaired");
}

/// Random damage to the metadata of real images: our class and counters equal
/// qemu's, and nothing panics. `FUZZ_ROUNDS=n` runs more rounds; `FUZZ_WIDE=1`
/// also flips header fields.
#[test]
fn fuzzed_metadata_agrees_with_qemu() {
    require_qemu();
    let d = tmp();
    let dir = d.path();
    let bases = base_images(dir);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed_c0de);
    let mut failures = Vec::new();
    let rounds: usize = std::env::var("FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut classes = [0usize; 4];
    for n in 0..rounds {
        let (kind, base) = &bases[n % bases.len()];
        let p = dir.join(format!("fuzz{n}.qcow2"));
        copy(base, &p);
        let img = Img::open(&p);
        // Pick a metadata area: L1, an L2 table, the refcount table, a refcount block.
        let l2s: Vec<u64> = (0..img.l1_size)
            .map(|i| img.u64(img.l1_entry_at(i)) & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let rb = img.u64(img.reftable_entry_at(0)) & OFFSET_MASK;
        let wide = std::env::var("FUZZ_WIDE").is_ok();
        let bitmaps = img.bitmaps_ext();
        let (area, len) = match rng.random_range(0..if wide { 8 } else { 7 }) {
            0 => (img.l1_off, img.l1_size * 8),
            1 if !l2s.is_empty() => (l2s[rng.random_range(0..l2s.len())], img.cs.min(4096)),
            2 => (img.rt_off, 64),
            4 if img.nb_snapshots > 0 => (img.snapshots_off, 160),
            5 if bitmaps.is_some() => (bitmaps.unwrap().3, 64),
            6 if bitmaps.is_some() => (img.u64(bitmaps.unwrap().3), 16),
            7 => (24, 80), // header fields (FUZZ_WIDE only: some make huge tables, slow unoptimised)
            _ => (rb, 512),
        };
        let mut what = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            let off = area + rng.random_range(0..len.max(1));
            let bit = rng.random_range(0..8);
            let b = img.read(off, 1)[0] ^ (1 << bit);
            img.write(off, &[b]);
            what.push(format!("{off:#x} bit {bit}"));
        }
        drop(img);
        let (q, qtext) = qemu_check(&p);
        let (o, otext, report) = our_check(&p);
        if let Some(c) = usize::try_from(q).ok().and_then(|q| classes.get_mut(q)) {
            *c += 1;
        }
        let counts = count_mismatch(&p, report.as_ref());
        if o != q || counts.is_some() {
            failures.push(format!(
                "round {n} ({kind}, flipped {}): qemu-img check exits {q}, ours {o}; {}\n--- qemu ---\n{qtext}\n--- ours ---\n{otext}",
                what.join(", "),
                counts.unwrap_or_default()
            ));
        }
        let _ = std::fs::remove_file(&p);
    }
    eprintln!("fuzz classes (0,1,2,3): {classes:?}");
    assert!(
        failures.is_empty(),
        "{} of {rounds} fuzzed images disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Garbage and truncated files: a clear error or a report (which then agrees
/// with qemu-img check), never a panic.
#[test]
fn hostile_files_do_not_panic() {
    require_qemu();
    let d = tmp();
    let dir = d.path();
    let base = make_std(dir, "std.qcow2", "cluster_size=65536");
    let bytes = std::fs::read(&base).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for n in 0..40 {
        let p = dir.join(format!("hostile{n}.qcow2"));
        let mut b = bytes.clone();
        match n % 4 {
            0 => b.truncate(rng.random_range(0..b.len())),
            1 => {
                // Random header fields past the magic and version.
                for _ in 0..8 {
                    let i = rng.random_range(8..112);
                    b[i] = rng.random();
                }
            }
            2 => {
                for _ in 0..64 {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
            }
            _ => {
                b.truncate(4096);
                for x in b.iter_mut().skip(8) {
                    *x = rng.random();
                }
            }
        }
        if n == 1 {
            // A backing file name offset near 2^64 (overflows naive arithmetic).
            b[8..16].copy_from_slice(&(u64::MAX - 2).to_be_bytes());
            b[16..20].copy_from_slice(&10u32.to_be_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        match check(&p, &CheckOptions::default()) {
            Ok(r) => {
                let _ = r.summary();
                let (q, qtext) = qemu_check(&p);
                assert_eq!(
                    r.exit_code(),
                    q,
                    "hostile{n}: qemu-img check says\n{qtext}\nours: {:#?}",
                    r.problems
                );
            }
            // The header is refused: the message names the file. (qemu-img check
            // refuses most such headers too; see the module documentation for
            // the few it accepts.)
            Err(e) => assert!(e.to_string().contains(&format!("hostile{n}.qcow2")), "{e}"),
        }
    }
}

/// Debugging aid: `CHECK_FILE=path cargo test --test check_vs_qemu -- --ignored --nocapture check_one`
/// prints our report and qemu-img check's for one file.
#[test]
#[ignore]
fn check_one() {
    let Ok(p) = std::env::var("CHECK_FILE") else {
        return;
    };
    let p = PathBuf::from(p);
    let t = std::time::Instant::now();
    let (o, otext, _) = our_check(&p);
    eprintln!("ours: exit {o} in {:?}\n{otext}", t.elapsed());
    let t = std::time::Instant::now();
    let (q, qtext) = qemu_check(&p);
    eprintln!("qemu-img check: exit {q} in {:?}\n{qtext}", t.elapsed());
}

/// A file of more than 2^31 clusters: qemu-img check gives up, and so do we,
/// without allocating for it.
#[test]
fn too_many_clusters_is_a_check_error() {
    require_qemu();
    let d = tmp();
    let p = make_std(d.path(), "huge.qcow2", "cluster_size=512");
    Img::open(&p).set_len((1u64 << 31) * 512 + 512); // sparse
    let r = check(&p, &CheckOptions::default()).unwrap();
    assert_eq!(r.exit_code(), 1, "{r:#?}");
    assert_eq!(assert_same_class(&p, "2^31+1 clusters"), 1);
}
