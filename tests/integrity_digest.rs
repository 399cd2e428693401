//! End-to-end block digests (docs/layout.md, "Block digests"): the
//! transfer client's digest of what it read equals the stored point's and
//! `chainvault digest` of the source, over seeded backups from qcow2
//! bitmaps, raw files and an NBD source; a dropped write fails the disk at
//! its offset; bad digests are 4xx; merges keep the digests true.

mod client_common;
mod common;

use std::path::Path;

use client_common::*;
use common::*;

/// `chainvault digest SOURCE --json`: the digest.
fn cv_digest(source: &str) -> String {
    let out = run_ok(cmd(BIN, &["digest", "--json", source]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = s(&v["digest"]);
    assert!(d.starts_with("cvblk2-blake3:"), "{d}");
    d
}

/// The construction of docs/layout.md written out again in Python, as a
/// reimplementer would, over a raw file, with Debian's `b3sum` for BLAKE3.
fn python_digest(raw: &Path) -> String {
    let prog = r#"
import os, struct, subprocess, sys
def b3(data):
    return subprocess.run(["b3sum", "--raw"], input=data, stdout=subprocess.PIPE, check=True).stdout
p = sys.argv[1]; size = os.path.getsize(p); B = 65536
parts = [b"chainvault-cvb2\0" + struct.pack("<QII", size, B, 0)]
with open(p, "rb") as f:
    while block := f.read(B):
        parts.append(b3(block))
print("cvblk2-blake3:" + b3(b"".join(parts)).hex())
"#;
    let out = run_ok(cmd("python3", &["-c", prog, &p(raw)]));
    text(&out.stdout).trim().to_string()
}

/// The digest the catalog recorded for a backup's disk 0.
fn recorded(d: &Daemon, backup_id: &str) -> String {
    let b = d.backup(backup_id);
    s(&disk_of(&b, 0)["digest"])
}

/// One backup run that must succeed; checks the three digests agree and
/// returns the backup id.
fn backup_and_check(
    d: &Daemon,
    vm: &str,
    disk: &str,
    extra: &[&str],
    snapshot: &str,
    what: &str,
) -> String {
    let r = backup(d, vm, &[disk.to_string()], extra).ok(what);
    let id = s(&r.json["backup_id"]);
    let client = s(&r.disk(0)["digest"]);
    let stored = recorded(d, &id);
    let source = cv_digest(snapshot);
    assert_eq!(
        client, stored,
        "{what}: the client's digest and the point's differ"
    );
    assert_eq!(
        client, source,
        "{what}: the client's digest and `chainvault digest` of the source differ"
    );
    id
}

/// Unaligned writes (512-byte aligned, crossing 64 KiB blocks) with qemu-io.
fn qemu_io_unaligned(img: &Path, fmt: &str, seed: u64, n: u64) {
    let size = if fmt == "qcow2" {
        virtual_size(img)
    } else {
        file_len(img)
    };
    let mut r = Rng::new(seed);
    let mut c = cmd("qemu-io", &["-f", fmt]);
    for i in 0..n {
        let len = (1 + r.below(300)) * 512;
        let off = r.below((size - len) / 512) * 512;
        c.arg("-c")
            .arg(format!("write -P {} {off} {len}", 1 + (seed + i) % 250));
    }
    c.arg(img);
    run_ok(c);
}

#[test]
fn fifty_seeded_backups_agree_end_to_end() {
    client_tools();
    need("python3", "python3");
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));

    // 20 backups from a qcow2 file's rotating dirty bitmaps.
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 96 * MIB, 24, 5);
    for i in 0..20u64 {
        if i > 0 {
            qemu_io_modify(&q, 100 + i, 8, 2);
            qemu_io_unaligned(&q, "qcow2", 200 + i, 6);
        }
        backup_and_check(
            &d,
            "vmq",
            &p(&q),
            &["--rotate"],
            &p(&q),
            &format!("qcow2 backup {i}"),
        );
    }
    let raw = tmp.path().join("q-final.raw");
    run_ok(cmd("qemu-img", &["convert", "-O", "raw", &p(&q), &p(&raw)]));
    assert_eq!(
        python_digest(&raw),
        cv_digest(&p(&q)),
        "an independent implementation agrees"
    );

    // 15 backups of a raw file (sparse, with holes not on block boundaries).
    let r = tmp.path().join("r.raw");
    make_disk(&r, 48 * MIB, 7);
    for i in 0..15u64 {
        if i > 0 {
            modify_disk(
                &r,
                300 + i,
                20,
                if i % 2 == 0 {
                    Fill::Random
                } else {
                    Fill::Pattern
                },
            );
            qemu_io_unaligned(&r, "raw", 400 + i, 4);
        }
        // Holes punched off the 64 KiB grid: the file's map has data and
        // holes inside one block.
        for k in 0..3u64 {
            let off = ((i * 3 + k) * 1021 % 40) * MIB + 4096 * (1 + k);
            run_ok(cmd(
                "fallocate",
                &["-p", "-o", &off.to_string(), "-l", "12288", &p(&r)],
            ));
        }
        backup_and_check(&d, "vmr", &p(&r), &[], &p(&r), &format!("raw backup {i}"));
    }
    assert_eq!(python_digest(&r), cv_digest(&p(&r)));

    // 15 backups from an NBD source: qemu-nbd -B exports the previous and
    // the new checkpoint; the client records --bitmap.
    let n = tmp.path().join("n.qcow2");
    make_vm_disk(&n, 64 * MIB, 16, 9);
    let mut prev: Option<String> = None;
    for i in 0..15u64 {
        if i > 0 {
            qemu_io_modify(&n, 500 + i, 6, 1);
            qemu_io_unaligned(&n, "qcow2", 600 + i, 5);
        }
        let cp = format!("cp{i}");
        run_ok(cmd("qemu-img", &["bitmap", "--add", &p(&n), &cp]));
        let snap = tmp.path().join("n-snap.qcow2");
        keep_point(&n, &snap);
        {
            let mut bms: Vec<&str> = vec![&cp];
            if let Some(pv) = &prev {
                bms.push(pv);
            }
            let nbd = QemuNbd::start(&n, &tmp.path().join("n.sock"), &bms);
            backup_and_check(
                &d,
                "vmn",
                &nbd.uri(),
                &["--bitmap", &cp],
                &p(&snap),
                &format!("NBD backup {i}"),
            );
            // The NBD export itself digests the same.
            assert_eq!(cv_digest(&nbd.uri()), cv_digest(&p(&snap)));
        }
        if let Some(pv) = prev.replace(cp) {
            run_ok(cmd("qemu-img", &["bitmap", "--remove", &p(&n), &pv]));
        }
    }
    let chain = d.chain("vmn", 0);
    let modes: Vec<String> = chain["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| s(&p["mode"]))
        .collect();
    assert_eq!(
        modes.iter().filter(|m| *m == "incremental").count(),
        14,
        "{modes:?}"
    );
}

#[test]
fn a_full_of_a_large_disk_uploads_more_than_a_mebibyte_of_digests() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    // 2000 MiB of random data in a 2 GiB sparse raw file: 32000 blocks, 1.28 MB of
    // digests to upload, past the API's 1 MiB limit for JSON bodies.
    let r = tmp.path().join("big.raw");
    std::fs::File::create(&r)
        .unwrap()
        .set_len(2048 * MIB)
        .unwrap();
    run_ok(cmd(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", p(&r)),
            "bs=1M",
            "count=2000",
            "conv=notrunc",
            "status=none",
        ],
    ));
    backup_and_check(&d, "big", &p(&r), &[], &p(&r), "a 2 GiB full");
}

#[test]
fn a_dropped_write_fails_the_disk_at_its_first_block() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 64 * MIB, 16, 3);
    backup(&d, "vm", &[p(&q)], &["--rotate"]).ok("full");
    let before = d.change_id("vm", 0);
    // Data where the parent holds other data, and where it holds nothing.
    let at = 40 * MIB + 3 * 65536;
    run_ok(cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 7 {at} 131072"),
            &p(&q),
        ],
    ));
    let mut c = backup_cmd(&d, "vm", &[p(&q)], &["--rotate"]);
    c.env("CHAINVAULT_FAULT_DROP_WRITE", (at + 70000).to_string());
    let out = run(c);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the backup with a dropped write must fail"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = s(&v["disks"][0]["error"]);
    assert!(err.contains("does not match the source"), "{err}");
    assert!(
        err.contains(&format!("block {} at offset {at} ", at / 65536)),
        "the reason names the first block of the dropped piece: {err}"
    );
    assert_eq!(d.change_id("vm", 0), before, "no change_id was recorded");
    // Without the fault, the next run is good again.
    backup(&d, "vm", &[p(&q)], &["--rotate"]).ok("after the fault");
    assert_ne!(d.change_id("vm", 0), before);
}

#[test]
fn bad_digests_are_refused_and_change_nothing() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let started = d.start_backup(&start_body(
        "vm",
        "full",
        Some(json!([disk_spec(0, 4 * MIB)])),
    ));
    let id = s(&started["backup_id"]);
    let path = format!("/api/v1/backups/{id}/complete");
    let zeros = "0".repeat(64);
    for (what, body, want) in [
        (
            "malformed",
            json!({"change_id": "c", "disk_id": 0, "digest": "cvblk2-blake3:xyz"}),
            400,
        ),
        (
            "no algorithm",
            json!({"change_id": "c", "disk_id": 0, "digest": zeros}),
            400,
        ),
        (
            "wrong algorithm",
            json!({"change_id": "c", "disk_id": 0, "digest": format!("sha256:{zeros}")}),
            400,
        ),
        (
            "not a string",
            json!({"change_id": "c", "disk_id": 0, "digest": 5}),
            400,
        ),
        (
            "a disk it has not",
            json!({"change_id": "c", "disk_id": 3, "digest": format!("cvblk2-blake3:{zeros}")}),
            404,
        ),
    ] {
        let r = d.post(&path, &body);
        assert_error(what, &r, want);
        assert_error_body(what, &r);
    }
    // Uploads of source digests that are not digest files.
    let up = format!("/api/v1/backups/{id}/disks/0/source-digests");
    for (what, body) in [("garbage", "not a digest file"), ("empty", "")] {
        let r = d.put_raw(&up, body);
        assert_error(what, &r, 400);
        assert_error_body(what, &r);
    }
    // Nothing changed: the disk is still running and completes as usual,
    // and its digest is that of the 4 MiB of zeroes written (none).
    let b = d.backup(&id);
    assert_eq!(disk_of(&b, 0)["status"], "running", "{}", pretty(&b));
    let done = d.complete(&id, 0, "c1", 0);
    let zero_disk = tmp.path().join("zero.raw");
    std::fs::File::create(&zero_disk)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    assert_eq!(s(&done["digest"]), cv_digest(&p(&zero_disk)));
    assert_eq!(recorded(&d, &id), cv_digest(&p(&zero_disk)));
    // A completed disk takes no more source digests.
    let r = d.put_raw(&up, "x");
    assert_error("completed", &r, 409);
    // And a completion with the wrong digest for a running disk fails it.
    let started = d.start_backup(&start_body(
        "vm",
        "incremental",
        Some(json!([disk_spec(0, 4 * MIB)])),
    ));
    let id2 = s(&started["backup_id"]);
    let r = d.post(
        &format!("/api/v1/backups/{id2}/complete"),
        &json!({"change_id": "c2", "disk_id": 0, "digest": format!("cvblk2-blake3:{zeros}")}),
    );
    assert_error("wrong digest", &r, 409);
    assert_eq!(
        d.change_id("vm", 0),
        "c1",
        "the mismatch recorded no change_id"
    );
}

#[test]
fn removing_points_keeps_the_digests_of_the_rest_true() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 64 * MIB, 16, 13);
    let mut ids = Vec::new();
    for i in 0..6u64 {
        if i > 0 {
            qemu_io_modify(&q, 700 + i, 10, 1);
        }
        ids.push(backup_and_check(
            &d,
            "vm",
            &p(&q),
            &["--rotate"],
            &p(&q),
            &format!("backup {i}"),
        ));
    }
    // Remove a middle point, the oldest, and the newest but one: merges
    // into the parent and into the child.
    for id in [&ids[2], &ids[0], &ids[4]] {
        let r = d.delete(&format!("/api/v1/backups/{id}"));
        assert!(r.0 == 200, "delete {id}: {}", pretty(&r.1));
    }
    // Each remaining point still reads what it recorded, and the digest
    // files still resolve to it: the next incremental builds on them.
    for id in [&ids[1], &ids[3], &ids[5]] {
        let img = d.image_of(id, 0);
        assert_eq!(
            cv_digest(&p(&img)),
            recorded(&d, id),
            "point {id} after the removals"
        );
    }
    qemu_io_modify(&q, 777, 10, 1);
    backup_and_check(
        &d,
        "vm",
        &p(&q),
        &["--rotate"],
        &p(&q),
        "after the removals",
    );
}
