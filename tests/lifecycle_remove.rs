//! Removing points anywhere in a chain (engine/lifecycle.rs): the base, a
//! middle point, the newest, in a seeded random order, and with the daemon
//! killed at random moments of the consolidation.
//!
//! After every removal: every kept point compares identical to the source
//! as it was at that point (`qemu-img compare`), `qemu-img check` is clean on
//! every image, `qemu-img info --backing-chain` shows the chain the catalog
//! shows, no file is left that the catalog does not account for, and the
//! next backup is an incremental on the right parent.
//!
//! `CHAINVAULT_CRASH_TRIALS` sets the number of crash trials (default 20).

mod common;

use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const VM: &str = "lifevm";
const SIZE: u64 = 32 * MIB;

/// One kept point: its backup id and the source as it was.
#[derive(Clone)]
struct Point {
    id: String,
    src: PathBuf,
}

/// A full and then `n - 1` incrementals (2% of the blocks, pattern data
/// written with qemu-io), each source snapshot kept beside.
fn build_chain(d: &Daemon, dir: &Path, n: usize, seed: u64) -> Vec<Point> {
    let src = dir.join("live.raw");
    make_disk(&src, SIZE, seed);
    let mut out = Vec::new();
    for i in 0..n {
        let r = if i == 0 {
            d.start_backup(&start_body(VM, "full", Some(json!([disk_spec(0, SIZE)]))))
        } else {
            d.start_backup(&start_body(VM, "incremental", None))
        };
        let id = s(&r["backup_id"]);
        let uri = s(&disk_of(&r, 0)["nbd_uri"]);
        if i == 0 {
            nbdcopy(&src, &uri);
        } else {
            assert_eq!(disk_of(&r, 0)["mode"], "incremental", "{}", pretty(&r));
            let ch = modify_disk(&src, seed * 1000 + i as u64, 20, Fill::Pattern);
            qemu_io_changes(&uri, &ch);
        }
        d.complete(&id, 0, &vmware_cid(0, 0, i as u32 + 1), SIZE);
        let snap = dir.join(format!("point-{i:02}.raw"));
        snapshot_source(&src, &snap);
        out.push(Point { id, src: snap });
    }
    out
}

fn repo_allocated(data: &Path) -> u64 {
    walk(&data.join("vms"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .map(|p| allocated(p))
        .sum()
}

/// Everything a kept set of points must satisfy.
fn check_kept(what: &str, d: &Daemon, kept: &[Point]) {
    let chain = d.chain(VM, 0);
    let pts: Vec<Value> = chain["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "completed")
        .cloned()
        .collect();
    let ids: Vec<String> = pts.iter().map(|p| s(&p["backup_id"])).collect();
    let want: Vec<String> = kept.iter().map(|p| p.id.clone()).collect();
    assert_eq!(
        ids,
        want,
        "{what}: the catalog's points: {}",
        pretty(&chain)
    );
    assert!(
        pts[0]["parent_backup_id"].is_null(),
        "{what}: the oldest kept point is the base: {}",
        pretty(&pts[0])
    );
    for w in pts.windows(2) {
        assert_eq!(
            w[1]["parent_backup_id"], w[0]["backup_id"],
            "{what}: parents link the kept points"
        );
    }
    let images: Vec<PathBuf> = kept.iter().map(|p| d.image_of(&p.id, 0)).collect();
    for (p, img) in kept.iter().zip(&images) {
        compare(&format!("{what}: point {}", p.id), img, &p.src);
        check(&format!("{what}: point {}", p.id), img);
    }
    // qemu-img's view of the chain is the catalog's (top first).
    let top = images.last().unwrap();
    let refs: Vec<&Path> = images.iter().rev().map(|p| p.as_path()).collect();
    assert_chain(what, top, &refs);
    // The sidecars say the same parents.
    for (i, img) in images.iter().enumerate() {
        let sc: Value =
            serde_json::from_slice(&std::fs::read(img.with_extension("json")).unwrap()).unwrap();
        let want_parent = if i == 0 {
            Value::Null
        } else {
            json!(kept[i - 1].id)
        };
        assert_eq!(
            sc["disk"]["parent_backup_id"],
            want_parent,
            "{what}: sidecar of {}",
            img.display()
        );
    }
    // Every kept point keeps its block digests.
    for img in &images {
        assert!(
            img.with_extension("digests").is_file(),
            "{what}: {} lost its block digests",
            img.display()
        );
    }
    // No file the catalog does not account for, and no journal left.
    let known: HashSet<PathBuf> = images
        .iter()
        .flat_map(|i| {
            [
                i.clone(),
                i.with_extension("json"),
                i.with_extension("digests"),
            ]
        })
        .collect();
    for f in walk(&d.data.join("vms"))
        .into_iter()
        .filter(|f| f.is_file())
    {
        assert!(known.contains(&f), "{what}: orphan file {}", f.display());
    }
    let journals: Vec<PathBuf> = walk(&d.data.join("journal"));
    assert!(journals.is_empty(), "{what}: journals left: {journals:?}");
    // The head is the newest kept point.
    assert_eq!(
        chain["head"]["head_backup_id"],
        json!(kept.last().unwrap().id),
        "{what}: head"
    );
}

/// The next backup is an incremental on the newest kept point, and reads right.
fn next_backup_is_incremental(
    what: &str,
    d: &Daemon,
    dir: &Path,
    kept: &mut Vec<Point>,
    seed: u64,
) {
    let newest = kept.last().unwrap().clone();
    let r = d.start_backup(&start_body(VM, "incremental", None));
    let x = disk_of(&r, 0);
    assert_eq!(x["mode"], "incremental", "{what}: {}", pretty(&r));
    assert_eq!(
        x["parent_backup_id"],
        json!(newest.id),
        "{what}: parent: {}",
        pretty(&r)
    );
    let id = s(&r["backup_id"]);
    let src = dir.join("live.raw");
    snapshot_source(&newest.src, &src);
    let ch = modify_disk(&src, seed, 20, Fill::Pattern);
    qemu_io_changes(&s(&x["nbd_uri"]), &ch);
    d.complete(&id, 0, &vmware_cid(0, 1, seed as u32), SIZE);
    let snap = dir.join(format!("point-next-{seed}.raw"));
    snapshot_source(&src, &snap);
    compare(
        &format!("{what}: the next backup"),
        &d.image_of(&id, 0),
        &snap,
    );
    kept.push(Point { id, src: snap });
}

#[test]
fn any_removal_order_keeps_every_point_identical() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    let mut kept = build_chain(&d, t, 30, 7);
    check_kept("before any removal", &d, &kept);
    let mut rng = Rng::new(0x5EED_0011);
    let mut before = repo_allocated(&d.data);
    while kept.len() > 1 {
        let i = rng.below(kept.len() as u64) as usize;
        let p = kept.remove(i);
        let where_ = if i == 0 {
            "base"
        } else if i == kept.len() {
            "newest"
        } else {
            "middle"
        };
        let what = format!("after removing point {i} ({where_}) {}", p.id);
        let r = d.delete(&format!("/api/v1/backups/{}", p.id));
        assert_eq!(r.0, 200, "{what}: DELETE: {}", pretty(&r.1));
        assert_error(
            &format!("{what}: GET"),
            &d.get(&format!("/api/v1/backups/{}", p.id)),
            404,
        );
        check_kept(&what, &d, &kept);
        let now = repo_allocated(&d.data);
        assert!(
            now < before,
            "{what}: the repository's allocated bytes must shrink: {before} -> {now}"
        );
        before = now;
    }
    verify_server(&d);
    next_backup_is_incremental("after the removals", &d, t, &mut kept, 99);
    check_kept("after the next backup", &d, &kept);
}

#[test]
fn refusals_leave_everything_as_it_was() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    let kept = build_chain(&d, t, 3, 5);
    // Unknown backup.
    let r = d.delete("/api/v1/backups/20990101T000000.000Z-00000000");
    assert_error("DELETE an unknown backup", &r, 404);
    // A point with an open restore export.
    let rv = d.post_ok(
        "/api/v1/restores",
        &json!({"backup_id": kept[1].id, "disk_id": 0}),
    );
    let r = d.delete(&format!("/api/v1/backups/{}", kept[1].id));
    assert_error("DELETE a point with an open restore", &r, 409);
    d.delete(&format!("/api/v1/restores/{}", s(&rv["restore_id"])));
    // The newest point while a backup writes an incremental onto it.
    let run = d.start_backup(&start_body(VM, "incremental", None));
    let r = d.delete(&format!("/api/v1/backups/{}", kept[2].id));
    assert_error("DELETE the parent of a running backup", &r, 409);
    let r = d.delete(&format!("/api/v1/backups/{}", s(&run["backup_id"])));
    assert_error("DELETE a running backup", &r, 409);
    d.post_ok(
        &format!("/api/v1/backups/{}/fail", s(&run["backup_id"])),
        &json!({"reason": "test"}),
    );

    // Protection and notes, through the CLI and the API.
    let mid = &kept[1].id;
    let out = cli(&["backups", "protect", mid, "--server", &d.api]);
    assert!(
        out.status.success(),
        "backups protect: {}",
        text(&out.stderr)
    );
    let out = cli(&[
        "backups",
        "note",
        mid,
        "before the ERP upgrade",
        "--server",
        &d.api,
        "--json",
    ]);
    assert!(out.status.success(), "backups note: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protected"], true, "{}", pretty(&v));
    assert_eq!(v["note"], "before the ERP upgrade", "{}", pretty(&v));
    let r = d.delete(&format!("/api/v1/backups/{mid}"));
    assert_error("DELETE a protected backup", &r, 409);
    let msg = s(&r.1["error"]);
    assert!(
        msg.contains("protected") && msg.contains("unprotect"),
        "{msg}"
    );
    let out = cli(&["backups", "delete", mid, "--server", &d.api]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "backups delete of a protected backup: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("protected"),
        "{}",
        text(&out.stderr)
    );
    let img = d.image_of(mid, 0);
    let sc: Value =
        serde_json::from_slice(&std::fs::read(img.with_extension("json")).unwrap()).unwrap();
    assert_eq!(
        sc["backup"]["protected"], true,
        "the sidecar keeps the protection"
    );
    assert_eq!(sc["backup"]["note"], "before the ERP upgrade");
    for (what, body) in [
        ("no field", "{}"),
        ("unknown field", r#"{"protect": true}"#),
        ("not a boolean", r#"{"protected": "yes"}"#),
        ("control characters", r#"{"note": "a\u0007b"}"#),
        ("not JSON", "protect"),
    ] {
        let r = d
            .try_patch_raw(&format!("/api/v1/backups/{mid}"), body)
            .unwrap();
        assert_error(&format!("PATCH with {what}"), &r, 400);
    }
    let long = json!({"note": "x".repeat(5000)});
    assert_error(
        "PATCH with a 5000-byte note",
        &d.patch(&format!("/api/v1/backups/{mid}"), &long),
        400,
    );
    assert_error(
        "PATCH an unknown backup",
        &d.patch(
            "/api/v1/backups/20990101T000000.000Z-00000000",
            &json!({"protected": true}),
        ),
        404,
    );
    // A restart keeps it; unprotected, it goes.
    d.stop();
    let d = Daemon::start(&t.join("data"));
    assert_eq!(
        d.backup(mid)["protected"],
        true,
        "protection survives a restart"
    );
    let r = d.patch(
        &format!("/api/v1/backups/{mid}"),
        &json!({"protected": false, "note": null}),
    );
    assert_eq!(r.0, 200, "{}", pretty(&r.1));
    assert!(r.1["note"].is_null(), "note cleared: {}", pretty(&r.1));
    check_kept("after the refusals", &d, &kept);
    let out = cli(&["backups", "delete", mid, "--server", &d.api]);
    assert!(
        out.status.success(),
        "backups delete: {}",
        text(&out.stderr)
    );
    let kept: Vec<Point> = kept.iter().filter(|p| &p.id != mid).cloned().collect();
    check_kept("after deleting the unprotected middle point", &d, &kept);
}

/// How a trial stops the daemon in the middle of a removal.
fn crash_modes() -> Vec<Option<&'static str>> {
    vec![
        Some("delete:after-journal"),
        Some("delete:after-commit"),
        Some("merge:before-copy"),
        Some("merge:after-copy"),
        Some("merge:after-rename"),
        Some("merge:after-rebase"),
        None, // kill -9 after a random delay
    ]
}

#[test]
fn kill9_during_consolidation_is_finished_at_restart() {
    tools();
    let trials: usize = std::env::var("CHAINVAULT_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("data");
    let mut d = Daemon::start(&data);
    let mut kept = build_chain(&d, t, 8, 11);
    let mut rng = Rng::new(0xC4A5_0001);
    let modes = crash_modes();
    let mut finished = 0;
    // Removals the daemon died in the middle of (the request got no answer).
    let mut cut_off = 0;
    let mut recovered_at_start = 0;
    for trial in 0..trials {
        if kept.len() < 3 {
            next_backup_is_incremental(
                &format!("trial {trial}: refill"),
                &d,
                t,
                &mut kept,
                1000 + trial as u64,
            );
            next_backup_is_incremental(
                &format!("trial {trial}: refill"),
                &d,
                t,
                &mut kept,
                2000 + trial as u64,
            );
        }
        let mode = modes[trial % modes.len()];
        let i = rng.below(kept.len() as u64) as usize;
        let victim = kept[i].clone();
        let what = format!(
            "trial {trial}: removing point {i} of {} ({victim_id}) with {mode:?}",
            kept.len(),
            victim_id = victim.id
        );
        d.stop();
        let env: Vec<(&str, &str)> = mode
            .map(|m| ("CHAINVAULT_CRASH_AT", m))
            .into_iter()
            .collect();
        d = Daemon::start_with(&data, &[], &env);
        let path = format!("/api/v1/backups/{}", victim.id);
        match mode {
            Some(_) => {
                // The daemon aborts at the named step (or, where this removal
                // never reaches it, finishes the removal).
                match d.try_delete(&path) {
                    Ok((200, _)) => {}
                    _ => cut_off += 1,
                }
                std::thread::sleep(Duration::from_millis(50));
                d.kill9();
            }
            None => {
                let url = d.url(&path);
                let delay = rng.below(40);
                let h = std::thread::spawn(move || {
                    let _ = ureq::delete(&url).call();
                });
                std::thread::sleep(Duration::from_millis(delay));
                d.kill9();
                let _ = h.join();
            }
        }
        d = Daemon::start(&data);
        let recovered = std::fs::read_to_string(&d.log)
            .unwrap_or_default()
            .contains("finishing a removal");
        if recovered {
            recovered_at_start += 1;
        }
        // Finished (the point is gone) or never begun (it is still there).
        let gone = d.get(&path).0 == 404;
        if gone {
            kept.remove(i);
            finished += 1;
        }
        check_kept(&what, &d, &kept);
        verify_server(&d);
    }
    next_backup_is_incremental("after the crash trials", &d, t, &mut kept, 77);
    check_kept("after the crash trials", &d, &kept);
    eprintln!(
        "{trials} crash trials: {cut_off} removals cut off by the crash, {recovered_at_start} finished from the journal at restart, \
         {finished} points removed in all, 0 lost"
    );
    // The named crash points on every removal's path (after the journal,
    // after the catalog commit) must have cut removals off and left journals.
    let always = trials.div_ceil(modes.len()) * 2 - 1;
    assert!(
        cut_off >= always.min(trials),
        "only {cut_off} of {trials} removals were cut off"
    );
    assert!(
        recovered_at_start >= always.min(trials),
        "only {recovered_at_start} removals were finished from a journal"
    );
    d.stop();
}

/// Reads `what` whole, over and over, until `stop`; every read must equal
/// `want`. Returns the number of complete reads.
fn reader(
    what: String,
    want: std::sync::Arc<Vec<u8>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    read: impl Fn() -> Result<Vec<u8>, String> + Send + 'static,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut rounds = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) || rounds < 2 {
            let got = read().unwrap_or_else(|e| panic!("{what}: read {rounds}: {e}"));
            assert_eq!(got.len(), want.len(), "{what}: read {rounds}: size");
            if let Some(at) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
                panic!("{what}: read {rounds} differs from the point's original at byte {at}");
            }
            rounds += 1;
        }
        rounds
    })
}

#[test]
fn readers_of_a_kept_point_see_the_same_bytes_while_its_chain_is_consolidated() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    let mut kept = build_chain(&d, t, 12, 23);
    // The newest point reads through every layer; a middle one through half.
    let watched = [kept[11].clone(), kept[6].clone()];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let m = Mount::start(&t.join("mnt"), &["--data", d.data.to_str().unwrap()]);
    let mut threads = Vec::new();
    for p in &watched {
        let want = std::sync::Arc::new(std::fs::read(&p.src).unwrap());
        // A restore export over NBD, read with nbdcopy.
        let rv = d.post_ok(
            "/api/v1/restores",
            &json!({"backup_id": p.id, "disk_id": 0}),
        );
        let uri = s(&rv["nbd_uri"]);
        let out = t.join(format!("read-{}.raw", p.id));
        threads.push(reader(
            format!("NBD restore export of {}", p.id),
            want.clone(),
            stop.clone(),
            move || {
                let o = run(cmd("nbdcopy", &[uri.as_str(), out.to_str().unwrap()]));
                if !o.status.success() {
                    return Err(text(&o.stderr));
                }
                std::fs::read(&out).map_err(|e| e.to_string())
            },
        ));
        // The mount's disk.raw of the point.
        let raw = m.path(&format!("by-id/{}/disk0/disk.raw", p.id));
        threads.push(reader(
            format!("mount {}", raw.display()),
            want,
            stop.clone(),
            move || std::fs::read(&raw).map_err(|e| e.to_string()),
        ));
    }
    // Remove every point but the watched ones: the base, middles, and the
    // newest point's neighbours, while the readers read.
    let mut rng = Rng::new(0x0EAD_E125);
    while kept.len() > watched.len() {
        let candidates: Vec<usize> = (0..kept.len())
            .filter(|&i| watched.iter().all(|w| w.id != kept[i].id))
            .collect();
        let i = candidates[rng.below(candidates.len() as u64) as usize];
        let p = kept.remove(i);
        let r = d.delete(&format!("/api/v1/backups/{}", p.id));
        assert_eq!(r.0, 200, "DELETE {}: {}", p.id, pretty(&r.1));
        // A removed point is gone from the mount's listing.
        let by_id = m.path(&format!("by-id/{}", p.id));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while by_id.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!by_id.exists(), "{} is still listed in the mount", p.id);
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for th in threads {
        let rounds = th
            .join()
            .expect("a reader saw wrong bytes (its message is above)");
        assert!(rounds >= 2, "a reader finished only {rounds} reads");
    }
    check_kept("after consolidating around the readers", &d, &kept);
    m.sigint();
    d.stop();
}
