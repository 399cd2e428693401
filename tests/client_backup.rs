//! `chainvault backup` against the real daemon, with QEMU dirty bitmaps as
//! changed-block tracking: a single disk through full + two incrementals
//! (rotating bitmaps on a local qcow2 file, then through an external
//! `qemu-nbd -B` export), two disks with a CBT reset on one, and a sparse
//! raw file.

mod client_common;
mod common;

use client_common::*;
use common::*;

/// 1 GiB disk, 640 MiB of data; full, then two incrementals that each change
/// 2% of the disk's 64 KiB blocks (328 of 16384: 280 written, 12 ranges of
/// 256 KiB zeroed) scattered over the disk.
const DATA_MIB: u64 = 640;
const WRITES: u64 = 280;
const ZERO_RANGES: u64 = 12;

#[test]
fn single_disk_full_then_two_incrementals_from_dirty_bitmaps() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let src = tmp.path().join("vda.qcow2");
    make_vm_disk(&src, 1 << 30, DATA_MIB, 11);
    let disk = vec![p(&src)];

    // Full, creating the first checkpoint.
    let full = backup(&d, "vm1", &disk, &["--rotate"]).ok("full");
    let f0 = full.disk(0);
    assert_eq!(f0["mode"], "full", "{}", pretty(&full.json));
    let cp1 = s(&f0["change_id"]);
    assert_eq!(
        bitmaps(&src),
        vec![cp1.clone()],
        "the checkpoint is on the source"
    );
    assert_eq!(d.change_id("vm1", 0), cp1);
    // Only the data was read: 640 MiB of 1 GiB.
    assert_eq!(f0["bytes_read"], DATA_MIB * MIB, "{}", pretty(&f0));
    assert!(f0["data_reduction_percent"].as_f64().unwrap() > 30.0);
    let point0 = tmp.path().join("point0.qcow2");
    keep_point(&src, &point0);
    let b0 = s(&full.json["backup_id"]);

    // Incremental 1: --rotate on the local file.
    qemu_io_modify(&src, 21, WRITES, ZERO_RANGES);
    let dirty1 = dirty_bytes(&src, &cp1);
    assert_eq!(
        dirty1,
        (WRITES + 4 * ZERO_RANGES) * 64 * KIB,
        "independent count of dirty bytes"
    );
    // About 2% of the disk's blocks.
    let pct = dirty1 as f64 * 100.0 / (1u64 << 30) as f64;
    assert!((1.9..2.1).contains(&pct), "{pct:.2}% of the disk is dirty");
    let inc1 = backup(&d, "vm1", &disk, &["--rotate"]).ok("incremental 1");
    let i1 = inc1.disk(0);
    assert_eq!(i1["mode"], "incremental", "{}", pretty(&inc1.json));
    assert_eq!(i1["previous_change_id"], cp1.as_str());
    let cp2 = s(&i1["change_id"]);
    assert_ne!(cp2, cp1);
    assert_eq!(
        bitmaps(&src),
        vec![cp2.clone()],
        "the old checkpoint is retired after completion"
    );
    assert_eq!(i1["dirty_bytes"], dirty1);
    let sent1 = i1["bytes_written"].as_u64().unwrap() + i1["bytes_zeroed"].as_u64().unwrap();
    assert!(
        sent1.abs_diff(dirty1) * 10 <= dirty1,
        "incremental 1 sent {sent1} bytes, the bitmap marks {dirty1}"
    );
    assert!(i1["bytes_written"].as_u64().unwrap() <= WRITES * 64 * KIB);
    let point1 = tmp.path().join("point1.qcow2");
    keep_point(&src, &point1);
    let b1 = s(&inc1.json["backup_id"]);

    // Incremental 2: the operator's flow for an exported disk. The new
    // checkpoint is created at the point in time, both bitmaps are exported
    // with qemu-nbd -B, the client records --bitmap, and the old bitmap is
    // removed after the backup.
    qemu_io_modify(&src, 31, WRITES, ZERO_RANGES);
    let dirty2 = dirty_bytes(&src, &cp2);
    let cp3 = "cp3-offline".to_string();
    run_ok(cmd("qemu-img", &["bitmap", "--add", &p(&src), &cp3]));
    let point2 = tmp.path().join("point2.qcow2");
    keep_point(&src, &point2);
    let b2 = {
        let nbd = QemuNbd::start(&src, &tmp.path().join("vda.sock"), &[&cp2, &cp3]);
        let inc2 = backup(&d, "vm1", &[nbd.uri()], &["--bitmap", &cp3]).ok("incremental 2");
        let i2 = inc2.disk(0);
        assert_eq!(i2["mode"], "incremental", "{}", pretty(&inc2.json));
        assert_eq!(i2["change_id"], cp3.as_str());
        let sent2 = i2["bytes_written"].as_u64().unwrap() + i2["bytes_zeroed"].as_u64().unwrap();
        assert!(
            sent2.abs_diff(dirty2) * 10 <= dirty2,
            "incremental 2 sent {sent2} bytes, the bitmap marks {dirty2}"
        );
        s(&inc2.json["backup_id"])
    };
    run_ok(cmd("qemu-img", &["bitmap", "--remove", &p(&src), &cp2]));
    assert_eq!(d.change_id("vm1", 0), cp3);

    // Every point reads back as the source was; incrementals are small.
    let (img0, img1, img2) = (d.image_of(&b0, 0), d.image_of(&b1, 0), d.image_of(&b2, 0));
    compare_qcow2("full", &img0, &point0);
    compare_qcow2("incremental 1", &img1, &point1);
    compare_qcow2("incremental 2", &img2, &point2);
    for img in [&img0, &img1, &img2] {
        check("backup image", img);
    }
    assert_chain("incremental 2", &img2, &[&img2, &img1, &img0]);
    // Sizes are what the files occupy on disk: a 64 KiB change allocates a
    // 128 KiB cluster's offset range, but with subclusters only the written
    // half is ever written, and the rest stays a hole in the file.
    let full_size = allocated(&img0);
    for (what, img) in [("incremental 1", &img1), ("incremental 2", &img2)] {
        assert!(
            allocated(img) * 20 <= full_size,
            "{what}: {} bytes on disk, more than 5% of the full's {full_size} (file lengths {} and {})",
            allocated(img),
            file_len(img),
            file_len(&img0)
        );
    }
}

/// Two disks; disk 1's bitmap is removed (a CBT reset) before the
/// incremental: disk 1 is read in full and stored as an overlay holding only
/// what changed (compare with parent), disk 0 stays incremental.
#[test]
fn two_disks_cbt_reset_on_one() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let srcs = [tmp.path().join("vda.qcow2"), tmp.path().join("vdb.qcow2")];
    make_vm_disk(&srcs[0], 256 * MIB, 40, 1);
    make_vm_disk(&srcs[1], 512 * MIB, 60, 2);
    let disks: Vec<String> = srcs.iter().map(|x| p(x)).collect();

    let full = backup(&d, "vm2", &disks, &["--rotate", "--connections", "2"]).ok("full");
    let cp1 = s(&full.disk(0)["change_id"]);
    assert_eq!(
        full.disk(1)["change_id"],
        cp1.as_str(),
        "one checkpoint name per run"
    );
    let b0 = s(&full.json["backup_id"]);

    let changed0 = qemu_io_modify(&srcs[0], 5, 20, 2);
    let changed1 = qemu_io_modify(&srcs[1], 6, 30, 2);
    run_ok(cmd("qemu-img", &["bitmap", "--remove", &disks[1], &cp1]));
    let points: Vec<_> = (0..2)
        .map(|i| {
            let pt = tmp.path().join(format!("point-d{i}.qcow2"));
            keep_point(&srcs[i], &pt);
            pt
        })
        .collect();

    let inc = backup(&d, "vm2", &disks, &["--rotate"]).ok("incremental");
    let (i0, i1) = (inc.disk(0), inc.disk(1));
    assert_eq!(i0["mode"], "incremental", "{}", pretty(&inc.json));
    assert_eq!(i1["mode"], "full", "{}", pretty(&inc.json));
    assert_eq!(i1["compare_with_parent"], true);
    let reason = s(&i1["reason"]);
    assert!(
        reason.contains(&cp1) && reason.contains("read in full"),
        "the summary says why disk 1 was read in full: {reason}"
    );
    let cp2 = s(&i0["change_id"]);
    assert_ne!(cp2, cp1);
    assert_eq!(i1["change_id"], cp2.as_str());
    assert_eq!(d.change_id("vm2", 0), cp2);
    assert_eq!(d.change_id("vm2", 1), cp2);
    assert_eq!(bitmaps(&srcs[0]), vec![cp2.clone()]);
    assert_eq!(bitmaps(&srcs[1]), vec![cp2.clone()]);
    assert_eq!(i0["bytes_written"], changed0);
    // Disk 1 was read in full (its 60 MiB of data plus the changes).
    assert!(i1["bytes_read"].as_u64().unwrap() >= 60 * MIB);

    let b1 = s(&inc.json["backup_id"]);
    for i in 0..2u32 {
        let img = d.image_of(&b1, i);
        compare_qcow2(&format!("disk {i}"), &img, &points[i as usize]);
        check("image", &img);
        assert_chain(&format!("disk {i}"), &img, &[&img, &d.image_of(&b0, i)]);
    }
    // Compare with parent: disk 1's new point holds the changed data only
    // (the pattern writes; zeroed ranges are metadata).
    let top = top_layer_data(&d.image_of(&b1, 1));
    assert!(
        top >= changed1 && top <= changed1 + changed1 / 10,
        "disk 1's new point stores {top} bytes of data; {changed1} changed"
    );
    let text = run_ok(cmd(
        BIN,
        &[
            "backup",
            "--server",
            &d.api,
            "--vm",
            "vm2",
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
            "--rotate",
            "--no-progress",
        ],
    ));
    let t = common::text(&text.stdout);
    assert!(t.contains("incremental") && t.contains("completed"), "{t}");
}

/// A sparse raw file: holes are never read, all-zero data blocks are not
/// sent, and the image stores about the data alone.
#[test]
fn sparse_raw_file_keeps_its_holes() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let raw = tmp.path().join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(1 << 30).unwrap();
    let mut r = Rng::new(9);
    let mut buf = vec![0u8; MIB as usize];
    use std::os::unix::fs::FileExt;
    for i in 0..24u64 {
        r.fill(&mut buf);
        f.write_all_at(&buf, i * 40 * MIB + 3 * MIB).unwrap();
    }
    // 16 MiB written as zeroes: allocated in the file, but nothing to store.
    f.write_all_at(&vec![0u8; 16 * MIB as usize], 700 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);

    let run = backup(&d, "raw1", &[format!("0={}", p(&raw))], &[]).ok("raw full");
    let d0 = run.disk(0);
    assert_eq!(d0["mode"], "full");
    assert!(
        s(&d0["change_id"]).starts_with("nocbt:"),
        "a raw source records no checkpoint: {}",
        pretty(&d0)
    );
    assert!(
        d0["bytes_read"].as_u64().unwrap() <= 42 * MIB,
        "{}",
        pretty(&d0)
    );
    assert_eq!(d0["bytes_written"], 24 * MIB);
    assert!(d0["bytes_skipped"].as_u64().unwrap() >= 16 * MIB);
    let notes = run.json["notes"].to_string();
    assert!(notes.contains("next backup"), "{notes}");
    let img = d.image_of(&s(&run.json["backup_id"]), 0);
    compare("raw", &img, &raw);
    let alloc = allocated(&img);
    assert!(
        alloc <= 24 * MIB + 24 * MIB / 10 + 2 * MIB,
        "image allocates {alloc} bytes for 24 MiB of data"
    );

    // The next backup of a raw source is a full read kept as an overlay of
    // the differences.
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&[0xabu8; 65536], 500 * MIB).unwrap();
    drop(f);
    let again = backup(&d, "raw1", &[p(&raw)], &[]).ok("raw again");
    let a0 = again.disk(0);
    assert_eq!(a0["mode"], "full");
    assert_eq!(a0["compare_with_parent"], true, "{}", pretty(&a0));
    let img2 = d.image_of(&s(&again.json["backup_id"]), 0);
    compare("raw again", &img2, &raw);
    assert!(
        top_layer_data(&img2) <= 256 * KIB,
        "only the changed cluster is stored"
    );
}
