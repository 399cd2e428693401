//! Space and depth (engine/space.rs, engine/depth.rs), end to end:
//!
//! * the chain depth limit rewrites the newest point as a full when a
//!   backup makes the chain too long, and every point, old chain and new,
//!   still reads what it read; a kill -9 on either side of the rename is
//!   finished or cleaned up;
//! * orphans (files no record or journal accounts for), made by hand and by
//!   a real crash, are reported by `chain verify` and `gc --dry-run` and
//!   removed by `gc`;
//! * `usage` and `/metrics` give the bytes of every VM, disk and point.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VM: &str = "deepvm";
const SIZE: u64 = 8 * MIB;

/// One backup of `src` (full the first time, then incremental of 2% changes),
/// with the source snapshot kept beside.
fn backup(d: &Daemon, src: &Path, dir: &Path, i: usize) -> (String, PathBuf) {
    let r = if i == 0 {
        make_disk(src, SIZE, 5);
        d.start_backup(&start_body(VM, "full", Some(json!([disk_spec(0, SIZE)]))))
    } else {
        d.start_backup(&start_body(VM, "incremental", None))
    };
    let id = s(&r["backup_id"]);
    let uri = s(&disk_of(&r, 0)["nbd_uri"]);
    if i == 0 {
        nbdcopy(src, &uri);
    } else {
        assert_eq!(disk_of(&r, 0)["mode"], "incremental", "{}", pretty(&r));
        let ch = modify_disk(src, 100 + i as u64, 20, Fill::Pattern);
        qemu_io_changes(&uri, &ch);
    }
    d.complete(&id, 0, &format!("cid-{i}"), SIZE);
    let snap = dir.join(format!("snap-{i}.raw"));
    snapshot_source(src, &snap);
    (id, snap)
}

/// Wait until the daemon's background task has made `id` a full.
fn wait_full(d: &Daemon, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let chain = d.chain(VM, 0);
        let p = chain["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| s(&p["backup_id"]) == id)
            .cloned();
        if p.as_ref().is_some_and(|p| p["parent_backup_id"].is_null()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "point {id} was not rewritten as a full: {}\n{}",
            pretty(&chain),
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_read_their_sources(what: &str, d: &Daemon, pts: &[(String, PathBuf)]) {
    for (id, snap) in pts {
        let img = d.image_of(id, 0);
        compare(&format!("{what}: point {id}"), &img, snap);
        check(&format!("{what}: point {id}"), &img);
    }
}

#[test]
fn a_depth_limit_starts_a_new_chain_and_keeps_every_point() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("live.raw");
    let mut d = Daemon::start(&data);
    let p = cli(&[
        "policy",
        "set",
        "--vm",
        VM,
        "--max-chain-length",
        "3",
        "--prune",
        "never",
        "--server",
        &d.api,
    ]);
    assert!(p.status.success(), "{}", text(&p.stderr));

    let mut pts = Vec::new();
    for i in 0..3 {
        pts.push(backup(&d, &src, tmp.path(), i));
    }
    // Three points: at the limit, nothing happens.
    std::thread::sleep(Duration::from_millis(1500));
    let chain = d.chain(VM, 0);
    assert_eq!(
        s(&chain["points"][2]["parent_backup_id"]),
        pts[1].0,
        "{}",
        pretty(&chain)
    );

    // The fourth goes past it: it becomes a full, a chain of one.
    pts.push(backup(&d, &src, tmp.path(), 3));
    wait_full(&d, &pts[3].0);
    let img3 = d.image_of(&pts[3].0, 0);
    assert_chain("new full", &img3, &[&img3]);
    let imgs: Vec<PathBuf> = pts.iter().map(|(id, _)| d.image_of(id, 0)).collect();
    assert_chain("old chain", &imgs[2], &[&imgs[2], &imgs[1], &imgs[0]]);
    all_read_their_sources("after the rewrite", &d, &pts);
    let chain = d.chain(VM, 0);
    assert_ne!(
        chain["points"][3]["chain_id"],
        chain["points"][2]["chain_id"]
    );
    assert_eq!(chain["head"]["chain_id"], chain["points"][3]["chain_id"]);

    // The next backup builds on the new full.
    pts.push(backup(&d, &src, tmp.path(), 4));
    let chain = d.chain(VM, 0);
    assert_eq!(s(&chain["points"][4]["parent_backup_id"]), pts[3].0);
    all_read_their_sources("the next backup", &d, &pts);
    verify_server(&d);

    // kill -9 just before the rename: the old file stays, the temporary is an orphan.
    d.stop();
    let p = cli(&[
        "policy",
        "set",
        "--vm",
        VM,
        "--max-chain-length",
        "2",
        "--prune",
        "never",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    d = Daemon::start_with(
        &data,
        &[],
        &[("CHAINVAULT_CRASH_AT", "depth:before-rename")],
    );
    pts.push(backup(&d, &src, tmp.path(), 5));
    let _ = d.wait_exit(Duration::from_secs(30));
    let d2 = Daemon::start(&data);
    let chain = d2.chain(VM, 0);
    assert_eq!(
        s(&chain["points"][5]["parent_backup_id"]),
        pts[4].0,
        "unchanged: {}",
        pretty(&chain)
    );
    all_read_their_sources("after a crash before the rename", &d2, &pts);
    let v = cli(&["chain", "verify", "--server", &d2.api]);
    assert_eq!(
        v.status.code(),
        Some(2),
        "verify reports the orphan: {}",
        text(&v.stdout)
    );
    assert!(text(&v.stdout).contains(".flatten-"), "{}", text(&v.stdout));
    let g = cli(&["gc", "--server", &d2.api, "--json"]);
    assert!(g.status.success(), "{}", text(&g.stderr));
    let g: Value = serde_json::from_slice(&g.stdout).unwrap();
    assert_eq!(g["removed"], 1, "{}", pretty(&g));
    verify_server(&d2);
    d2.stop();

    // kill -9 just after the rename: the start finishes the catalog's side.
    let d = Daemon::start_with(&data, &[], &[("CHAINVAULT_CRASH_AT", "depth:after-rename")]);
    pts.push(backup(&d, &src, tmp.path(), 6));
    let _ = d.wait_exit(Duration::from_secs(30));
    let d = Daemon::start(&data);
    let chain = d.chain(VM, 0);
    assert!(
        chain["points"][6]["parent_backup_id"].is_null(),
        "finished at the start: {}",
        pretty(&chain)
    );
    all_read_their_sources("after a crash after the rename", &d, &pts);
    verify_server(&d);
    let r = d.start_backup(&start_body(VM, "incremental", None));
    assert_eq!(s(&disk_of(&r, 0)["parent_backup_id"]), pts[6].0);
    d.stop();
}

#[test]
fn orphans_are_reported_and_collected_and_usage_adds_up() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("live.raw");
    let d = Daemon::start(&data);
    let mut pts = Vec::new();
    for i in 0..3 {
        pts.push(backup(&d, &src, tmp.path(), i));
    }
    let g = cli(&["gc", "--dry-run", "--server", &d.api]);
    assert!(
        text(&g.stdout).contains("no orphans"),
        "{}",
        text(&g.stdout)
    );

    // usage: every point, bytes that add up, frees no more than the bytes.
    let u: Value =
        serde_json::from_slice(&cli(&["usage", "--vm", VM, "--server", &d.api, "--json"]).stdout)
            .unwrap();
    let points = u["vms"][0]["disks"][0]["points"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(points.len(), 3, "{}", pretty(&u));
    let mut sum = 0;
    for (p, (id, _)) in points.iter().zip(&pts) {
        assert_eq!(s(&p["backup_id"]), *id);
        let b = p["bytes"].as_u64().unwrap();
        assert_eq!(b, allocated(&d.image_of(id, 0)), "{}", pretty(p));
        assert!(p["frees"].as_u64().unwrap() <= b, "{}", pretty(p));
        sum += b;
    }
    // The base is mostly shadowed by nothing: removing it frees little of its 8 MiB.
    assert!(
        points[0]["frees"].as_u64().unwrap() < points[0]["bytes"].as_u64().unwrap() / 2,
        "{}",
        pretty(&points[0])
    );
    // The newest is a leaf: removing it frees all it holds.
    assert_eq!(points[2]["frees"], points[2]["bytes"]);
    assert_eq!(u["vms"][0]["bytes"].as_u64().unwrap(), sum);
    assert!(u["free_bytes"].as_u64().unwrap() > 0);
    assert!(u["repository_bytes"].as_u64().unwrap() >= sum);
    let m = d.get("/metrics");
    let metrics = s(&m.1["__non_json_body"]);
    assert!(
        metrics.contains(&format!("chainvault_vm_bytes{{vm=\"{VM}\"}} {sum}\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("chainvault_vm_points{{vm=\"{VM}\"}} 3\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains("chainvault_repository_free_bytes "),
        "{metrics}"
    );
    let r = d.get("/api/v1/usage?vm_name=nosuch");
    assert_error("usage of an unknown VM", &r, 404);
    let t = cli(&["usage", "--server", &d.api]);
    assert!(
        text(&t.stdout).contains(&format!("VM {VM}")),
        "{}",
        text(&t.stdout)
    );

    // Orphans made by hand: an image and a sidecar without records, a
    // temporary file, a saved header without its journal, a stranger.
    let dir = d.image_of(&pts[0].0, 0).parent().unwrap().to_path_buf();
    std::fs::copy(
        d.image_of(&pts[2].0, 0),
        dir.join("20990101T000000.000Z-deadbeef.qcow2"),
    )
    .unwrap();
    std::fs::write(dir.join("20980101T000000.000Z-0badf00d.json"), b"{}").unwrap();
    std::fs::write(dir.join(".import-x.qcow2.tmp"), vec![1u8; 70000]).unwrap();
    std::fs::create_dir_all(data.join("journal")).unwrap();
    std::fs::write(data.join("journal/x-disk0.header"), vec![2u8; 512]).unwrap();
    std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
    let v = cli(&["chain", "verify", "--server", &d.api, "--json"]);
    assert_eq!(v.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&v.stdout).unwrap();
    let problems: Vec<String> = v["problems"].as_array().unwrap().iter().map(s).collect();
    assert_eq!(
        problems.iter().filter(|p| p.starts_with("orphan ")).count(),
        5,
        "{problems:#?}"
    );

    let dry: Value =
        serde_json::from_slice(&cli(&["gc", "--dry-run", "--server", &d.api, "--json"]).stdout)
            .unwrap();
    assert_eq!(
        dry["orphans"].as_array().unwrap().len(),
        5,
        "{}",
        pretty(&dry)
    );
    assert_eq!(dry["removed"], 0);
    assert!(dir.join("notes.txt").exists(), "a dry run removes nothing");
    let text_gc = cli(&["gc", "--server", &d.api]);
    assert!(text_gc.status.success(), "{}", text(&text_gc.stderr));
    assert!(
        text(&text_gc.stdout).contains("removed 5 file(s)"),
        "{}",
        text(&text_gc.stdout)
    );
    for f in [
        "20990101T000000.000Z-deadbeef.qcow2",
        "20980101T000000.000Z-0badf00d.json",
        ".import-x.qcow2.tmp",
        "notes.txt",
    ] {
        assert!(!dir.join(f).exists(), "{f} was collected");
    }
    assert!(!data.join("journal/x-disk0.header").exists());
    verify_server(&d);
    all_read_their_sources("after gc", &d, &pts);

    // Offline too, with the daemon stopped.
    d.stop();
    std::fs::write(dir.join(".tmp-leftover"), b"x").unwrap();
    let g = cli(&["gc", "--data", data.to_str().unwrap(), "--json"]);
    assert!(g.status.success(), "{}", text(&g.stderr));
    let g: Value = serde_json::from_slice(&g.stdout).unwrap();
    assert_eq!(g["removed"], 1, "{}", pretty(&g));
    verify_offline(&data);
}
