//! End-to-end: the daemon dies at the worst moments and comes back.
//!
//! * `kill -9` while nbdcopy writes a backup: the job is found on restart and
//!   marked interrupted, its half-written image is not a restore point, the
//!   completed points, heads and change_ids are untouched, and the next backup
//!   continues from the old head.
//! * `CHAINVAULT_CRASH_AT=complete:after-check` / `complete:after-commit`: an
//!   abort inside a completion is either not a completion at all, or a durable
//!   one (with its sidecar repaired on recovery), never half of each.
//! * The catalog is rebuilt from the sidecars alone.
//! * A job nobody completes times out and is failed, its images removed
//!   (MISSION.md #1: never "started" forever).

mod common;

use common::*;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Full backup of a 1-disk VM written with nbdcopy and completed. Returns
/// (backup_id, image).
fn full_1disk(d: &Daemon, vm: &str, src: &Path, size: u64, cid: &str) -> (String, PathBuf) {
    let r = d.start_backup(&start_body(vm, "full", Some(json!([disk_spec(0, size)]))));
    let id = s(&r["backup_id"]);
    assert_eq!(disk_of(&r, 0)["mode"], "full", "{}", pretty(&r));
    nbdcopy(src, &s(&disk_of(&r, 0)["nbd_uri"]));
    d.complete(&id, 0, cid, size);
    let img = d.image_of(&id, 0);
    (id, img)
}

/// An incremental of a 1-disk VM: checks it starts from `parent`/`prev_cid`,
/// writes the changed extents; returns (backup_id, nbd_uri) without completing.
fn start_inc_1disk(d: &Daemon, vm: &str, parent: &str, prev_cid: &str) -> (String, String) {
    let r = d.start_backup(&start_body(vm, "incremental", None));
    let x = disk_of(&r, 0);
    let ctx = pretty(&r);
    assert_eq!(x["mode"], "incremental", "{ctx}");
    assert_eq!(
        x["parent_backup_id"], parent,
        "the next backup continues from the head; {ctx}"
    );
    assert_eq!(x["previous_change_id"], prev_cid, "{ctx}");
    (s(&r["backup_id"]), s(&x["nbd_uri"]))
}

fn head(d: &Daemon, vm: &str) -> Value {
    d.chain(vm, 0)["head"].clone()
}

#[test]
fn kill9_during_transfer_then_restart() {
    tools();
    const VM: &str = "crashvm";
    const SIZE: u64 = 64 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("d0.raw");
    make_disk(&src, SIZE, 41);
    let p0 = tmp.path().join("p0.raw");
    snapshot_source(&src, &p0);

    let d = Daemon::start(&data);
    let cid0 = vmware_cid(0, 0, 1);
    let (b0, img0) = full_1disk(&d, VM, &src, SIZE, &cid0);
    let head_before = head(&d, VM);
    assert_eq!(
        head_before["head_backup_id"],
        b0.as_str(),
        "{}",
        pretty(&head_before)
    );

    // A new full, fed slowly to nbdcopy through a pipe so the kill lands mid-transfer.
    let r = d.start_backup(&start_body(VM, "full", None));
    let b1 = s(&r["backup_id"]);
    let uri = s(&disk_of(&r, 0)["nbd_uri"]);
    let img1 = d.image_of(&b1, 0);
    let mut nbdcopy = Command::new("nbdcopy")
        .args(["-", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdcopy");
    {
        let mut stdin = nbdcopy.stdin.take().unwrap();
        let all = std::fs::read(&src).unwrap();
        stdin.write_all(&all[..24 * MIB as usize]).unwrap();
        // Wait until the daemon has received a good part of it.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5)
            && (!img1.exists() || allocated(&img1) < 8 * MIB)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // nbdcopy cannot have finished: its input is still open with 24 of 64 MiB sent.
        eprintln!(
            "kill -9 with {} bytes allocated in the interrupted image",
            if img1.exists() { allocated(&img1) } else { 0 }
        );
        d.kill9();
        drop(stdin);
    }
    if wait_timeout(&mut nbdcopy, Duration::from_secs(30)).is_none() {
        let _ = nbdcopy.kill();
        let _ = nbdcopy.wait();
    }

    let d = Daemon::start(&data);
    assert_interrupted(&d, &b1, "kill -9 during nbdcopy");
    let v = d.backup(&b0);
    assert_eq!(v["status"], "completed", "{}", pretty(&v));
    assert_eq!(disk_of(&v, 0)["change_id"], cid0.as_str(), "{}", pretty(&v));
    assert_eq!(
        head(&d, VM),
        head_before,
        "chain head changed by an interrupted backup"
    );
    let a = d.changeid(VM, 0);
    assert_eq!(a["change_id"], cid0.as_str(), "{}", pretty(&a));
    assert_eq!(a["backup_id"], b0.as_str(), "{}", pretty(&a));
    check("completed full after kill -9", &img0);
    compare("completed full after kill -9", &img0, &p0);
    verify_server(&d);
    d.stop();
    verify_offline(&data);

    // The next backup is an incremental from the old head, and works.
    let d = Daemon::start(&data);
    let ch = modify_disk(&src, 42, 30, Fill::Pattern);
    let (b2, uri) = start_inc_1disk(&d, VM, &b0, &cid0);
    qemu_io_changes(&uri, &ch);
    let cid2 = vmware_cid(0, 0, 2);
    d.complete(&b2, 0, &cid2, ch.bytes());
    let img2 = d.image_of(&b2, 0);
    assert_chain("incremental after the crash", &img2, &[&img2, &img0]);
    check("incremental after the crash", &img2);
    compare("incremental after the crash", &img2, &src);
    compare("the full, still", &img0, &p0);
    assert_eq!(d.change_id(VM, 0), cid2);
    d.stop();
    verify_offline(&data);
}

#[test]
fn sigterm_during_transfer_marks_the_job_interrupted() {
    tools();
    const VM: &str = "termvm";
    const SIZE: u64 = 16 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("d0.raw");
    make_disk(&src, SIZE, 51);
    let d = Daemon::start(&data);
    let cid0 = vmware_cid(0, 0, 1);
    let (b0, img0) = full_1disk(&d, VM, &src, SIZE, &cid0);
    let ch = modify_disk(&src, 52, 30, Fill::Pattern);
    let (b1, uri) = start_inc_1disk(&d, VM, &b0, &cid0);
    qemu_io_changes(&uri, &ch);
    // Written but never completed: SIGTERM must still be a clean exit.
    d.stop();
    let d = Daemon::start(&data);
    assert_interrupted(&d, &b1, "SIGTERM with a running backup");
    assert_eq!(d.change_id(VM, 0), cid0);
    check("full after SIGTERM", &img0);
    d.stop();
    verify_offline(&data);
}

/// Abort inside a completion at `point`; `durable`: whether the completion must
/// survive (after the catalog commit) or not (before it).
fn crash_inside_completion(point: &str, durable: bool) {
    tools();
    let vm = format!("crashat-{}", point.replace(':', "-"));
    let vm = vm.as_str();
    const SIZE: u64 = 32 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("d0.raw");
    make_disk(&src, SIZE, 61);
    let p0 = tmp.path().join("p0.raw");
    snapshot_source(&src, &p0);

    let d = Daemon::start(&data);
    let cid0 = vmware_cid(0, 0, 1);
    let (b0, img0) = full_1disk(&d, vm, &src, SIZE, &cid0);
    d.stop();

    let d = Daemon::start_with(&data, &[], &[("CHAINVAULT_CRASH_AT", point)]);
    let head_before = head(&d, vm);
    let ch1 = modify_disk(&src, 62, 30, Fill::Pattern);
    let (b1, uri) = start_inc_1disk(&d, vm, &b0, &cid0);
    qemu_io_changes(&uri, &ch1);
    let img1 = d.image_of(&b1, 0);
    let cid1 = vmware_cid(0, 0, 2);
    let r = d.try_post(
        &format!("/api/v1/backups/{b1}/complete"),
        &json!({"change_id": cid1, "disk_id": 0, "bytes_transferred": ch1.bytes()}),
    );
    if let Ok((st, body)) = &r {
        panic!(
            "CHAINVAULT_CRASH_AT={point}: the daemon answered the completion (HTTP {st} {}) instead of aborting before the response",
            pretty(body)
        );
    }
    let log = d.log.clone();
    let st = d.wait_exit(Duration::from_secs(20));
    assert!(
        !st.success() && st.signal() == Some(libc::SIGABRT),
        "CHAINVAULT_CRASH_AT={point}: the daemon should abort(), it ended with {}\n{}",
        describe_exit(&st),
        tail(&log, 30)
    );

    let d = Daemon::start(&data);
    if durable {
        let v = d.backup(&b1);
        let x = disk_of(&v, 0);
        assert_eq!(
            v["status"],
            "completed",
            "{point}: the committed completion must survive: {}",
            pretty(&v)
        );
        assert_eq!(x["status"], "completed", "{point}: {}", pretty(&v));
        assert_eq!(x["change_id"], cid1.as_str(), "{point}: {}", pretty(&v));
        let a = d.changeid(vm, 0);
        assert_eq!(
            a["change_id"],
            cid1.as_str(),
            "{point}: changeid after recovery: {}",
            pretty(&a)
        );
        assert_eq!(a["backup_id"], b1.as_str(), "{point}: {}", pretty(&a));
        assert_eq!(
            head(&d, vm)["head_backup_id"],
            b1.as_str(),
            "{point}: head must have advanced"
        );
        check(point, &img1);
        compare(point, &img1, &src);
        assert_chain(point, &img1, &[&img1, &img0]);
        // The sidecar was written before the commit as "running"; recovery repairs it.
        let sc = find_sidecar(&img1)
            .unwrap_or_else(|| panic!("{point}: no sidecar next to {}", img1.display()));
        let sv: Value = serde_json::from_str(&std::fs::read_to_string(&sc).unwrap())
            .unwrap_or_else(|e| panic!("{point}: sidecar {} is not JSON: {e}", sc.display()));
        let st = sv.to_string();
        assert!(
            st.contains(&cid1) && st.contains("completed"),
            "{point}: sidecar {} not repaired on recovery (want change_id {cid1:?} and status completed): {}",
            sc.display(),
            pretty(&sv)
        );
    } else {
        assert_interrupted(&d, &b1, point);
        assert_eq!(
            head(&d, vm),
            head_before,
            "{point}: the chain head must not move"
        );
        let a = d.changeid(vm, 0);
        assert_eq!(
            a["change_id"],
            cid0.as_str(),
            "{point}: changeid after recovery: {}",
            pretty(&a)
        );
        assert_eq!(a["backup_id"], b0.as_str(), "{point}: {}", pretty(&a));
    }
    check(&format!("{point}: full"), &img0);
    compare(&format!("{point}: full"), &img0, &p0);
    d.stop();
    verify_offline(&data);

    // And the next backup continues from the right head.
    let d = Daemon::start(&data);
    let (parent, prev) = if durable {
        (b1.as_str(), cid1.as_str())
    } else {
        (b0.as_str(), cid0.as_str())
    };
    let ch = modify_disk(&src, 63, 30, Fill::Pattern);
    let (b2, uri) = start_inc_1disk(&d, vm, parent, prev);
    if !durable {
        // The interrupted point's changes were never stored: a client following
        // previous_change_id gets both change sets, in order.
        qemu_io_changes(&uri, &ch1);
    }
    qemu_io_changes(&uri, &ch);
    let cid2 = vmware_cid(0, 0, 3);
    d.complete(&b2, 0, &cid2, ch.bytes());
    let img2 = d.image_of(&b2, 0);
    check(&format!("{point}: next backup"), &img2);
    compare(&format!("{point}: next backup"), &img2, &src);
    assert_eq!(d.change_id(vm, 0), cid2);
    d.stop();
    verify_offline(&data);
}

#[test]
fn crash_at_complete_after_check_is_not_a_completion() {
    crash_inside_completion("complete:after-check", false);
}

#[test]
fn crash_at_complete_after_commit_is_a_durable_completion() {
    crash_inside_completion("complete:after-commit", true);
}

/// The facts of a chain that a rebuild must reproduce (no timestamps).
fn chain_facts(v: &Value) -> Value {
    let pts: Vec<Value> = v["points"]
        .as_array()
        .unwrap_or_else(|| panic!("chain JSON without points[]: {}", pretty(v)))
        .iter()
        .map(|p| {
            json!({
                "backup_id": p["backup_id"], "disk_id": p["disk_id"], "vm_name": p["vm_name"],
                "parent_backup_id": p["parent_backup_id"], "chain_id": p["chain_id"],
                "status": p["status"], "change_id": p["change_id"], "image": p["image"], "mode": p["mode"],
            })
        })
        .collect();
    json!({"head": v["head"], "points": pts})
}

fn chain_show(data: &Path, vm: &str, disk: u32) -> Value {
    let out = cli(&[
        "chain",
        "show",
        "--data",
        data.to_str().unwrap(),
        "--vm",
        vm,
        "--disk",
        &disk.to_string(),
        "--json",
    ]);
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "chainvault chain show --vm {vm} --disk {disk} --json exited {:?}\nstdout: {so}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_str(so.trim())
        .unwrap_or_else(|e| panic!("chain show --json printed non-JSON ({e}): {so}"))
}

#[test]
fn catalog_rebuild_from_sidecars() {
    tools();
    const VM: &str = "rebuildvm";
    const SIZES: [u64; 2] = [16 * MIB, 8 * MIB];
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = [tmp.path().join("d0.raw"), tmp.path().join("d1.raw")];
    make_disk(&src[0], SIZES[0], 71);
    make_disk(&src[1], SIZES[1], 72);
    let disks = json!([disk_spec(0, SIZES[0]), disk_spec(1, SIZES[1])]);

    let d = Daemon::start(&data);
    let mut ids = Vec::new();
    // B0 full, B1 incremental, B2 incremental with disk 1 reset to full.
    for (i, (ty, reset1)) in [
        ("full", false),
        ("incremental", false),
        ("incremental", true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut spec = disks.clone();
        if reset1 {
            spec[1]["mode"] = json!("full");
        }
        let r = d.start_backup(&start_body(VM, ty, Some(spec)));
        let id = s(&r["backup_id"]);
        for disk in 0..2u32 {
            let x = disk_of(&r, disk);
            let uri = s(&x["nbd_uri"]);
            if x["mode"] == "full" {
                nbdcopy(&src[disk as usize], &uri);
            } else {
                let ch = modify_disk(
                    &src[disk as usize],
                    700 + i as u64 * 10 + disk as u64,
                    30,
                    Fill::Pattern,
                );
                qemu_io_changes(&uri, &ch);
            }
            d.complete(
                &id,
                disk,
                &vmware_cid(disk, if reset1 && disk == 1 { 1 } else { 0 }, i as u32 + 1),
                1,
            );
        }
        ids.push(id);
    }
    let cids_before: Vec<Value> = (0..2).map(|disk| d.changeid(VM, disk)).collect();
    let backups_before: Vec<Value> = ids.iter().map(|id| d.backup(id)).collect();
    let images: Vec<PathBuf> = ids
        .iter()
        .flat_map(|id| [d.image_of(id, 0), d.image_of(id, 1)])
        .collect();
    d.stop();

    let shown_before: Vec<Value> = (0..2)
        .map(|disk| chain_facts(&chain_show(&data, VM, disk)))
        .collect();
    for (disk, c) in shown_before.iter().enumerate() {
        assert!(
            !c["points"].as_array().unwrap().is_empty() && !c["head"].is_null(),
            "chain show of disk {disk} before the rebuild shows nothing: {}",
            pretty(c)
        );
    }

    let catalog = find_catalog_dir(&data);
    std::fs::remove_dir_all(&catalog).unwrap();
    let out = cli(&["catalog", "rebuild", "--data", data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "chainvault catalog rebuild exited {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    for img in &images {
        assert!(img.is_file(), "rebuild lost image {}", img.display());
    }
    for disk in 0..2u32 {
        let after = chain_facts(&chain_show(&data, VM, disk));
        assert_eq!(
            after, shown_before[disk as usize],
            "chain show --vm {VM} --disk {disk} differs after the catalog rebuild (left: after, right: before)"
        );
    }
    verify_offline(&data);

    let d = Daemon::start(&data);
    for disk in 0..2u32 {
        let a = d.changeid(VM, disk);
        assert_eq!(
            a, cids_before[disk as usize],
            "changeid disk {disk} after rebuild"
        );
    }
    for (id, before) in ids.iter().zip(&backups_before) {
        let v = d.backup(id);
        assert_eq!(
            v["status"],
            before["status"],
            "backup {id} after rebuild: {}",
            pretty(&v)
        );
        assert_eq!(v["vm_name"], before["vm_name"]);
        for disk in 0..2u32 {
            let (x, y) = (disk_of(&v, disk), disk_of(before, disk));
            for k in [
                "status",
                "change_id",
                "parent_backup_id",
                "chain_id",
                "image",
                "mode",
            ] {
                assert_eq!(
                    x[k],
                    y[k],
                    "backup {id} disk {disk} field {k} after rebuild:\nafter: {}\nbefore: {}",
                    pretty(&x),
                    pretty(&y)
                );
            }
        }
    }
    // The next backup continues both chains.
    let r = d.start_backup(&start_body(VM, "incremental", None));
    for disk in 0..2u32 {
        let x = disk_of(&r, disk);
        assert_eq!(x["mode"], "incremental", "{}", pretty(&r));
        assert_eq!(x["parent_backup_id"], ids[2].as_str(), "{}", pretty(&r));
        assert_eq!(
            x["previous_change_id"],
            cids_before[disk as usize]["change_id"],
            "{}",
            pretty(&r)
        );
    }
    let id = s(&r["backup_id"]);
    d.post_ok(
        &format!("/api/v1/backups/{id}/fail"),
        &json!({"reason": "test over"}),
    );
    d.stop();
}

#[test]
fn idle_backup_times_out_and_is_failed() {
    tools();
    const VM: &str = "idlevm";
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start_with(&data, &["--disk-timeout", "2s"], &[]);
    let r = d.start_backup(&start_body(
        VM,
        "full",
        Some(json!([disk_spec(0, 8 * MIB)])),
    ));
    let id = s(&r["backup_id"]);
    let uri = s(&disk_of(&r, 0)["nbd_uri"]);
    let img = d.image_of(&id, 0);
    let t0 = Instant::now();
    let v = loop {
        let v = d.backup(&id);
        if v["status"] != "running" || t0.elapsed() > Duration::from_secs(10) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        v["status"],
        "failed",
        "an idle backup with --disk-timeout 2s after {:?}: {}",
        t0.elapsed(),
        pretty(&v)
    );
    let x = disk_of(&v, 0);
    assert_eq!(x["status"], "failed", "{}", pretty(&v));
    let errors = format!("{} {}", v["error"], x["error"]).to_lowercase();
    assert!(
        errors.contains("timeout") || errors.contains("timed out") || errors.contains("time out"),
        "the error of a timed-out backup must say so: {}",
        pretty(&v)
    );
    assert!(
        !img.exists(),
        "the timed-out backup's image {} was not removed",
        img.display()
    );
    let leftovers: Vec<PathBuf> = walk(&data)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().contains(id.as_str()))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "files of the timed-out backup are left: {leftovers:?}"
    );
    assert_export_gone("timed-out backup", &uri);
    assert_eq!(d.change_id(VM, 0), "");
    let r = d.post(
        &format!("/api/v1/backups/{id}/complete"),
        &json!({"change_id": "52 00-00/1", "disk_id": 0}),
    );
    assert_error("completing a timed-out backup", &r, 409);
    assert_eq!(
        d.change_id(VM, 0),
        "",
        "a completion after the timeout must not record a change_id"
    );
    // The VM is free again.
    let r = d.start_backup(&start_body(VM, "full", None));
    let id2 = s(&r["backup_id"]);
    d.post_ok(
        &format!("/api/v1/backups/{id2}/fail"),
        &json!({"reason": "test over"}),
    );
    d.stop();
}
