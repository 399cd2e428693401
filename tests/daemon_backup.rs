//! End-to-end: a 2-disk VM through the real daemon, real NBD clients and
//! qemu-img. Full, two incrementals (only the changed extents written), a CBT
//! reset of one disk, a restore export of an older point, and deletion rules.
//!
//! MISSION.md: "a test with 2+ disks proves that each keeps its own change_id"
//! (the old multi-disk overwrite), incrementals really are overlays of the
//! previous point (the bypassed incremental path), and a full of one disk never
//! disturbs the chains of the others (CBT resets).

mod common;

use common::*;
use std::path::{Path, PathBuf};

const VM: &str = "pgtest1";
const SIZES: [u64; 2] = [64 * MIB, 32 * MIB];

/// One completed backup as the test knows it.
#[derive(Clone, Debug)]
struct Point {
    backup_id: String,
    /// change_id per disk
    cids: [String; 2],
    /// copy of each source disk at this point
    srcs: [PathBuf; 2],
    /// image per disk (absolute)
    images: [PathBuf; 2],
    /// chain_id per disk
    chains: [String; 2],
}

fn check_start_disk(
    r: &Value,
    disk_id: u32,
    mode: &str,
    prev_cid: &str,
    parent: Option<&str>,
) -> String {
    let d = disk_of(r, disk_id);
    let ctx = format!("start response, disk {disk_id}: {}", pretty(r));
    assert_eq!(d["mode"], mode, "mode; {ctx}");
    assert_eq!(
        d["previous_change_id"], prev_cid,
        "previous_change_id; {ctx}"
    );
    match parent {
        Some(p) => assert_eq!(d["parent_backup_id"], p, "parent_backup_id; {ctx}"),
        None => assert!(
            d["parent_backup_id"].is_null(),
            "a full must have no parent_backup_id; {ctx}"
        ),
    }
    let uri = s(&d["nbd_uri"]);
    let export = s(&d["export_name"]);
    assert!(!export.is_empty(), "empty export_name; {ctx}");
    assert!(
        uri.starts_with("nbd+unix:///") || uri.starts_with("nbd://"),
        "nbd_uri {uri:?} is not an NBD URI; {ctx}"
    );
    assert!(
        uri.contains(&export),
        "nbd_uri {uri:?} does not name the export {export:?}; {ctx}"
    );
    // Usable as-is by a real client, with the disk's size.
    let size = nbd_size(&uri).unwrap_or_else(|e| panic!("nbdinfo --size {uri} failed: {e}; {ctx}"));
    assert_eq!(
        size, SIZES[disk_id as usize],
        "export size of disk {disk_id}; {ctx}"
    );
    uri
}

/// Check what GET /backups/{id} says about a completed point, and fill in the
/// images and chain ids.
fn check_completed(d: &Daemon, p: &mut Point, parents: [Option<&str>; 2]) {
    let b = d.backup(&p.backup_id);
    assert_eq!(
        b["status"],
        "completed",
        "backup {} after both completions: {}",
        p.backup_id,
        pretty(&b)
    );
    assert_eq!(b["vm_name"], VM, "{}", pretty(&b));
    for disk in 0..2u32 {
        let x = disk_of(&b, disk);
        let ctx = format!("backup {} disk {disk}: {}", p.backup_id, pretty(&x));
        assert_eq!(x["status"], "completed", "{ctx}");
        assert_eq!(
            x["change_id"],
            p.cids[disk as usize].as_str(),
            "each disk keeps its own change_id; {ctx}"
        );
        match parents[disk as usize] {
            Some(par) => assert_eq!(x["parent_backup_id"], par, "{ctx}"),
            None => assert!(x["parent_backup_id"].is_null(), "{ctx}"),
        }
        let chain = s(&x["chain_id"]);
        assert!(!chain.is_empty(), "empty chain_id; {ctx}");
        p.chains[disk as usize] = chain;
        let img = abs_image(&d.data, &s(&x["image"]));
        assert!(
            img.is_file(),
            "image {} of a completed point does not exist; {ctx}",
            img.display()
        );
        let sod = x["size_on_disk"].as_u64().unwrap_or(0);
        assert!(
            sod > 0,
            "size_on_disk of a completed disk must be a positive number; {ctx}"
        );
        assert_sidecar(
            &ctx,
            &img,
            &[
                &p.backup_id,
                &p.cids[disk as usize],
                &p.chains[disk as usize],
            ],
        );
        p.images[disk as usize] = img;
    }
}

/// Every image of every point is clean and equals its source copy.
fn check_points(what: &str, points: &[&Point]) {
    for p in points {
        for disk in 0..2 {
            let ctx = format!("{what}: backup {} disk {disk}", p.backup_id);
            check(&ctx, &p.images[disk]);
            compare(&ctx, &p.images[disk], &p.srcs[disk]);
        }
    }
}

fn assert_small(what: &str, inc: &Path, full: &Path) {
    let (i, f) = (allocated(inc), allocated(full));
    eprintln!(
        "{what}: incremental {i} bytes vs full {f} bytes ({:.1}%)",
        i as f64 * 100.0 / f as f64
    );
    assert!(
        i * 10 <= f,
        "{what}: incremental {} stores {i} bytes, more than 10% of the full {} ({f} bytes): the overlay must hold only what changed",
        inc.display(),
        full.display()
    );
}

#[test]
fn two_disks_full_incrementals_cbt_reset_restore_delete() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let srcdir = tmp.path().join("src");
    std::fs::create_dir_all(&srcdir).unwrap();
    let src = [srcdir.join("disk0.raw"), srcdir.join("disk1.raw")];
    make_disk(&src[0], SIZES[0], 1);
    make_disk(&src[1], SIZES[1], 2);
    let copy = |tag: &str, disk: usize| -> PathBuf {
        let p = srcdir.join(format!("{tag}-disk{disk}.raw"));
        snapshot_source(&src[disk], &p);
        p
    };

    let d = Daemon::start(&data);
    assert!(
        d.nbd.starts_with("nbd"),
        "ready line nbd= is not an NBD URI: {}",
        d.nbd
    );

    // Before anything: no change_id, 200 with "".
    for disk in 0..2 {
        assert_eq!(
            d.change_id(VM, disk),
            "",
            "changeid before any backup of disk {disk}"
        );
    }

    // ---- B0: full of both disks ------------------------------------------------
    let disks = json!([disk_spec(0, SIZES[0]), disk_spec(1, SIZES[1])]);
    let r = d.start_backup(&start_body(VM, "full", Some(disks.clone())));
    let b0 = s(&r["backup_id"]);
    assert_eq!(
        r["disks"].as_array().unwrap().len(),
        2,
        "two disks asked, two targets: {}",
        pretty(&r)
    );
    let uri0 = check_start_disk(&r, 0, "full", "", None);
    let uri1 = check_start_disk(&r, 1, "full", "", None);
    assert_ne!(uri0, uri1, "the two disks got the same NBD target");
    nbdcopy(&src[0], &uri0);
    nbdcopy(&src[1], &uri1);

    let mut p0 = Point {
        backup_id: b0.clone(),
        cids: [vmware_cid(0, 0, 100), vmware_cid(1, 0, 200)],
        srcs: [copy("p0", 0), copy("p0", 1)],
        images: Default::default(),
        chains: Default::default(),
    };
    assert_ne!(p0.cids[0], p0.cids[1]);
    let c = d.complete(&b0, 0, &p0.cids[0], SIZES[0]);
    assert_eq!(
        c["backup_status"],
        "running",
        "backup_status after 1 of 2 disks completed: {}",
        pretty(&c)
    );
    assert!(
        c["timestamp"].is_string() && c["message"].is_string(),
        "complete response: {}",
        pretty(&c)
    );
    assert_export_gone("disk 0 after its completion", &uri0);
    assert_eq!(
        nbd_size(&uri1),
        Ok(SIZES[1]),
        "disk 1's export must stay while disk 0 completes"
    );
    // Disk 1 is not complete yet: it has no change_id; disk 0 has its own.
    assert_eq!(
        d.change_id(VM, 0),
        p0.cids[0],
        "changeid disk 0 after its completion"
    );
    assert_eq!(
        d.change_id(VM, 1),
        "",
        "changeid disk 1 must not show disk 0's change_id (multi-disk overwrite)"
    );
    let c = d.complete(&b0, 1, &p0.cids[1], SIZES[1]);
    assert_eq!(
        c["backup_status"],
        "completed",
        "backup_status after the last disk: {}",
        pretty(&c)
    );
    assert_export_gone("disk 1 after its completion", &uri1);
    for disk in 0..2u32 {
        let a = d.changeid(VM, disk);
        assert_eq!(
            a["change_id"],
            p0.cids[disk as usize].as_str(),
            "changeid disk {disk}: {}",
            pretty(&a)
        );
        assert_eq!(
            a["backup_id"],
            b0.as_str(),
            "changeid disk {disk}: {}",
            pretty(&a)
        );
    }
    check_completed(&d, &mut p0, [None, None]);
    for disk in 0..2 {
        assert_chain("full", &p0.images[disk], &[&p0.images[disk]]);
        assert!(
            find_sidecar(&p0.images[disk]).is_some(),
            "no JSON sidecar next to {}",
            p0.images[disk].display()
        );
    }
    check_points("after B0", &[&p0]);

    // ---- B1: incremental, known VM without `disks`, qemu-io writes -----------------
    let ch0 = modify_disk(&src[0], 11, 30, Fill::Pattern);
    let ch1 = modify_disk(&src[1], 12, 30, Fill::Pattern);
    let r = d.start_backup(&json!({"vm_name": VM, "backup_type": "incremental", "repository_id": "r1", "tags": ["nightly"]}));
    let b1 = s(&r["backup_id"]);
    assert_ne!(b1, b0);
    let uri0 = check_start_disk(&r, 0, "incremental", &p0.cids[0], Some(b0.as_str()));
    let uri1 = check_start_disk(&r, 1, "incremental", &p0.cids[1], Some(b0.as_str()));
    qemu_io_changes(&uri0, &ch0);
    qemu_io_changes(&uri1, &ch1);
    let mut p1 = Point {
        backup_id: b1.clone(),
        cids: [vmware_cid(0, 0, 101), vmware_cid(1, 0, 201)],
        srcs: [copy("p1", 0), copy("p1", 1)],
        images: Default::default(),
        chains: Default::default(),
    };
    d.complete(&b1, 1, &p1.cids[1], ch1.bytes()); // the other order this time
    d.complete(&b1, 0, &p1.cids[0], ch0.bytes());
    for disk in 0..2u32 {
        assert_eq!(
            d.change_id(VM, disk),
            p1.cids[disk as usize],
            "changeid disk {disk} after B1"
        );
    }
    check_completed(&d, &mut p1, [Some(b0.as_str()), Some(b0.as_str())]);
    for disk in 0..2 {
        assert_eq!(
            p1.chains[disk], p0.chains[disk],
            "an incremental continues its parent's chain (disk {disk})"
        );
        assert_chain(
            "B1 (incremental)",
            &p1.images[disk],
            &[&p1.images[disk], &p0.images[disk]],
        );
        assert_small(
            &format!("B1 disk {disk}"),
            &p1.images[disk],
            &p0.images[disk],
        );
    }
    check_points("after B1", &[&p0, &p1]);

    // ---- B2: incremental with `disks` given, real data through libnbd -------------
    let ch0 = modify_disk(&src[0], 21, 30, Fill::Random);
    let ch1 = modify_disk(&src[1], 22, 30, Fill::Random);
    let r = d.start_backup(&start_body(VM, "incremental", Some(disks.clone())));
    let b2 = s(&r["backup_id"]);
    let uri0 = check_start_disk(&r, 0, "incremental", &p1.cids[0], Some(b1.as_str()));
    let uri1 = check_start_disk(&r, 1, "incremental", &p1.cids[1], Some(b1.as_str()));
    nbd_write_changes(&uri0, &src[0], &ch0);
    nbd_write_changes(&uri1, &src[1], &ch1);
    let mut p2 = Point {
        backup_id: b2.clone(),
        cids: [vmware_cid(0, 0, 102), vmware_cid(1, 0, 202)],
        srcs: [copy("p2", 0), copy("p2", 1)],
        images: Default::default(),
        chains: Default::default(),
    };
    d.complete(&b2, 0, &p2.cids[0], ch0.bytes());
    d.complete(&b2, 1, &p2.cids[1], ch1.bytes());
    check_completed(&d, &mut p2, [Some(b1.as_str()), Some(b1.as_str())]);
    for disk in 0..2 {
        assert_eq!(p2.chains[disk], p0.chains[disk]);
        assert_chain(
            "B2 (second incremental)",
            &p2.images[disk],
            &[&p2.images[disk], &p1.images[disk], &p0.images[disk]],
        );
        assert_small(
            &format!("B2 disk {disk}"),
            &p2.images[disk],
            &p0.images[disk],
        );
        assert_eq!(
            d.change_id(VM, disk as u32),
            p2.cids[disk],
            "changeid disk {disk} after B2"
        );
    }
    check_points("after B2", &[&p0, &p1, &p2]);

    // ---- B3: CBT reset of disk 1 alone: incremental, disk 1 "mode": "full" ---------
    let ch0 = modify_disk(&src[0], 31, 20, Fill::Pattern);
    modify_disk(&src[1], 32, 50, Fill::Random);
    let mut dspec = disks.clone();
    dspec[1]["mode"] = json!("full");
    let r = d.start_backup(&start_body(VM, "incremental", Some(dspec)));
    let b3 = s(&r["backup_id"]);
    let uri0 = check_start_disk(&r, 0, "incremental", &p2.cids[0], Some(b2.as_str()));
    let uri1 = check_start_disk(&r, 1, "full", "", None);
    qemu_io_changes(&uri0, &ch0);
    nbdcopy(&src[1], &uri1);
    let mut p3 = Point {
        backup_id: b3.clone(),
        // disk 1 has a new CBT UUID after the reset
        cids: [vmware_cid(0, 0, 103), vmware_cid(1, 1, 1)],
        srcs: [copy("p3", 0), copy("p3", 1)],
        images: Default::default(),
        chains: Default::default(),
    };
    d.complete(&b3, 1, &p3.cids[1], SIZES[1]);
    d.complete(&b3, 0, &p3.cids[0], ch0.bytes());
    check_completed(&d, &mut p3, [Some(b2.as_str()), None]);
    assert_eq!(
        p3.chains[0], p0.chains[0],
        "disk 0 must stay on its chain when disk 1 is reset"
    );
    assert_ne!(
        p3.chains[1], p2.chains[1],
        "disk 1's full after a CBT reset must start a new chain_id"
    );
    assert_chain(
        "B3 disk 0 (incremental)",
        &p3.images[0],
        &[&p3.images[0], &p2.images[0], &p1.images[0], &p0.images[0]],
    );
    assert_chain(
        "B3 disk 1 (full after CBT reset)",
        &p3.images[1],
        &[&p3.images[1]],
    );
    assert_small("B3 disk 0", &p3.images[0], &p0.images[0]);
    for disk in 0..2u32 {
        let a = d.changeid(VM, disk);
        assert_eq!(
            a["change_id"],
            p3.cids[disk as usize].as_str(),
            "changeid disk {disk} after B3: {}",
            pretty(&a)
        );
        assert_eq!(
            a["backup_id"],
            b3.as_str(),
            "changeid disk {disk} after B3: {}",
            pretty(&a)
        );
    }
    // Chain views.
    let cv0 = d.chain(VM, 0);
    assert_eq!(
        cv0["head"]["head_backup_id"],
        b3.as_str(),
        "chain disk 0: {}",
        pretty(&cv0)
    );
    assert_eq!(
        cv0["head"]["chain_id"],
        p0.chains[0].as_str(),
        "chain disk 0: {}",
        pretty(&cv0)
    );
    assert_eq!(
        cv0["head"]["head_change_id"],
        p3.cids[0].as_str(),
        "chain disk 0: {}",
        pretty(&cv0)
    );
    let ids0: Vec<String> = cv0["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| s(&p["backup_id"]))
        .collect();
    assert_eq!(
        ids0,
        vec![b0.clone(), b1.clone(), b2.clone(), b3.clone()],
        "chain disk 0 points, oldest first: {}",
        pretty(&cv0)
    );
    let cv1 = d.chain(VM, 1);
    assert_eq!(
        cv1["head"]["head_backup_id"],
        b3.as_str(),
        "chain disk 1 after CBT reset: {}",
        pretty(&cv1)
    );
    assert_eq!(
        cv1["head"]["chain_id"],
        p3.chains[1].as_str(),
        "chain disk 1 head must be the new chain: {}",
        pretty(&cv1)
    );
    assert_eq!(
        cv1["head"]["head_change_id"],
        p3.cids[1].as_str(),
        "chain disk 1: {}",
        pretty(&cv1)
    );
    let pts1 = cv1["points"].as_array().unwrap();
    assert_eq!(
        pts1.last().map(|p| s(&p["backup_id"])),
        Some(b3.clone()),
        "chain disk 1: newest point last: {}",
        pretty(&cv1)
    );
    let new_chain: Vec<String> = pts1
        .iter()
        .filter(|p| p["chain_id"] == p3.chains[1].as_str())
        .map(|p| s(&p["backup_id"]))
        .collect();
    assert_eq!(
        new_chain,
        vec![b3.clone()],
        "disk 1's new chain holds only B3: {}",
        pretty(&cv1)
    );
    // The old points of disk 1 are untouched by the reset.
    check_points("after B3 (CBT reset of disk 1)", &[&p0, &p1, &p2, &p3]);

    // ---- Restore exports of older points ------------------------------------------
    for (p, disk) in [(&p1, 0u32), (&p2, 1u32)] {
        let what = format!("restore of {} disk {disk}", p.backup_id);
        let r = d.post_ok(
            "/api/v1/restores",
            &json!({"backup_id": p.backup_id, "disk_id": disk}),
        );
        let rid = s(&r["restore_id"]);
        let uri = s(&r["nbd_uri"]);
        assert_eq!(
            nbd_size(&uri),
            Ok(SIZES[disk as usize]),
            "{what}: size of {uri}: {}",
            pretty(&r)
        );
        let ro = run(cmd("nbdinfo", &["--can", "read-only", &uri]));
        assert_eq!(
            ro.status.code(),
            Some(0),
            "{what}: the restore export must be read-only (nbdinfo --can read-only)"
        );
        let out = tmp
            .path()
            .join(format!("restored-{}-{disk}.raw", p.backup_id));
        run_ok(cmd(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &uri,
                out.to_str().unwrap(),
            ],
        ));
        let cmp = run(cmd(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                out.to_str().unwrap(),
                p.srcs[disk as usize].to_str().unwrap(),
            ],
        ));
        assert!(
            cmp.status.success(),
            "{what}: restored data differs from the source at that point: {}",
            text(&cmp.stdout)
        );
        let del = d.delete(&format!("/api/v1/restores/{rid}"));
        assert!(
            (200..300).contains(&del.0),
            "{what}: DELETE restore {rid}: HTTP {} {}",
            del.0,
            pretty(&del.1)
        );
        assert_export_gone(&format!("{what} after DELETE"), &uri);
    }

    // ---- Delete the newest point (removals anywhere in a chain: lifecycle_remove.rs)
    let r = d.delete(&format!("/api/v1/backups/{b3}"));
    assert!(
        (200..300).contains(&r.0),
        "DELETE the newest backup B3: HTTP {} {}",
        r.0,
        pretty(&r.1)
    );
    let r = d.get(&format!("/api/v1/backups/{b3}"));
    assert_error("GET a deleted backup", &r, 404);
    for disk in 0..2 {
        assert!(
            !p3.images[disk].exists(),
            "image {} of deleted B3 still exists",
            p3.images[disk].display()
        );
    }
    let a = d.changeid(VM, 0);
    assert_eq!(
        a["change_id"],
        p2.cids[0].as_str(),
        "changeid disk 0 after deleting B3 moves back to B2: {}",
        pretty(&a)
    );
    assert_eq!(a["backup_id"], b2.as_str(), "{}", pretty(&a));
    assert_eq!(
        d.chain(VM, 0)["head"]["head_backup_id"],
        b2.as_str(),
        "chain head of disk 0 after deleting B3"
    );
    // Disk 1's new chain lost its only point. Assumption: the head falls back to
    // the newest remaining completed point (B2, old chain) or to none; it must
    // never still answer with the deleted point's change_id.
    let a1 = d.changeid(VM, 1);
    let c1 = s(&a1["change_id"]);
    eprintln!(
        "changeid disk 1 after deleting B3: {c1:?} (B2's is {:?})",
        p2.cids[1]
    );
    assert!(
        c1 == p2.cids[1] || c1.is_empty(),
        "changeid disk 1 after deleting B3 (its only point in the new chain): {}",
        pretty(&a1)
    );
    check_points("after deleting B3", &[&p0, &p1, &p2]);

    // The next incremental starts from the moved-back head; fail it through the API.
    let r = d.start_backup(&json!({"vm_name": VM, "backup_type": "incremental"}));
    let b4 = s(&r["backup_id"]);
    check_start_disk(&r, 0, "incremental", &p2.cids[0], Some(b2.as_str()));
    let r = d.post_ok(
        &format!("/api/v1/backups/{b4}/fail"),
        &json!({"reason": "test: client gave up"}),
    );
    assert_eq!(r["status"], "failed", "POST fail: {}", pretty(&r));
    let v = d.backup(&b4);
    assert_eq!(v["status"], "failed", "{}", pretty(&v));
    for x in v["disks"].as_array().unwrap() {
        let img = abs_image(&d.data, &s(&x["image"]));
        assert!(
            !img.exists(),
            "failed backup's image {} was not removed",
            img.display()
        );
    }
    assert_eq!(
        d.change_id(VM, 0),
        p2.cids[0],
        "a failed backup must not move the head"
    );

    // Listing with filters.
    let ids = |q: &str| -> Vec<String> { d.list(q).iter().map(|b| s(&b["backup_id"])).collect() };
    let all = ids(&format!("vm_name={VM}"));
    for id in [&b0, &b1, &b2, &b4] {
        assert!(
            all.contains(id),
            "GET /api/v1/backups?vm_name={VM} lacks {id}: {all:?}"
        );
    }
    assert!(
        !all.contains(&b3),
        "the deleted B3 is still listed: {all:?}"
    );
    let done = ids(&format!("vm_name={VM}&status=completed"));
    assert!(
        done.contains(&b0) && done.contains(&b2) && !done.contains(&b4),
        "status=completed: {done:?}"
    );
    let failed = ids("status=failed");
    assert!(
        failed.contains(&b4) && !failed.contains(&b0),
        "status=failed: {failed:?}"
    );
    assert!(
        ids("vm_name=someothervm").is_empty(),
        "backups listed for a VM that has none"
    );

    verify_server(&d);
    d.stop();
    verify_offline(&data);
    check_points("after shutdown", &[&p0, &p1, &p2]);
}
