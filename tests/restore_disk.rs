//! `chainvault restore` (src/restore/), end to end: a three-disk VM (sparse
//! raw file, qcow2, NBD source) backed up twice by `chainvault backup` and a
//! two-disk VM backed up through the API, each point restored to sparse raw files, new qcow2 images and NBD
//! targets (qemu-nbd over a file, nbdkit memory), through the daemon and on
//! the repository directly, each result compared with the source as it was;
//! a mostly empty disk restores to a file that allocates what it holds; bad
//! targets and points are refused with exit 2 and nothing changes.

mod client_common;
mod common;

use client_common::{backup, make_vm_disk, qemu_io_modify};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VM: &str = "rvm";
const SIZES: [u64; 2] = [24 * MIB, 16 * MIB];

/// An NBD server on a unix socket, killed on drop.
struct Server(Child, PathBuf);

impl Server {
    fn start(mut c: Command, sock: &Path) -> Server {
        let _ = std::fs::remove_file(sock);
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn NBD server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "{c:?} did not create {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        Server(child, sock.to_path_buf())
    }
    fn qemu_nbd(file: &Path, sock: &Path, read_only: bool) -> Server {
        let mut c = Command::new("qemu-nbd");
        c.args(["-f", "raw", "-t", "-e", "8", "--cache=none"])
            .arg(format!("--socket={}", sock.display()));
        if read_only {
            c.arg("-r");
        }
        c.arg(file);
        Server::start(c, sock)
    }
    fn nbdkit_memory(size: u64, sock: &Path) -> Server {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-U"])
            .arg(sock)
            .args(["memory", &size.to_string()]);
        Server::start(c, sock)
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.1.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn same_bytes(what: &str, a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{what}: sizes of {} and {}",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{what}: {} and {} differ at byte {i}",
            a.display(),
            b.display()
        );
    }
}

fn restore(args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    let out = cli(&a);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn restore_ok(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--json", "--verify"]);
    let (code, so, se) = restore(&a);
    assert_eq!(code, 0, "chainvault restore {}: {so}{se}", args.join(" "));
    let v: Value = serde_json::from_str(&so).unwrap_or_else(|e| panic!("not JSON ({e}): {so}"));
    for d in v["disks"].as_array().unwrap() {
        assert_eq!(d["status"], "restored", "{}", pretty(&v));
        assert_eq!(d["verified"], true, "{}", pretty(&v));
    }
    v
}

/// Two backups of a two-disk VM; the sources as they were at each point.
fn two_points(d: &Daemon, dir: &Path) -> Vec<(String, Vec<PathBuf>)> {
    let srcs: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("src{i}.raw"))).collect();
    for (i, s) in srcs.iter().enumerate() {
        make_disk(s, SIZES[i], 40 + i as u64);
    }
    let mut out = Vec::new();
    for p in 0..2 {
        let r = if p == 0 {
            d.start_backup(&start_body(
                VM,
                "full",
                Some(json!([disk_spec(0, SIZES[0]), disk_spec(1, SIZES[1])])),
            ))
        } else {
            d.start_backup(&start_body(VM, "incremental", None))
        };
        let id = s(&r["backup_id"]);
        for (i, src) in srcs.iter().enumerate() {
            let uri = s(&disk_of(&r, i as u32)["nbd_uri"]);
            if p == 0 {
                nbdcopy(src, &uri);
            } else {
                let ch = modify_disk(src, 500 + i as u64, 30, Fill::Pattern);
                qemu_io_changes(&uri, &ch);
            }
            d.complete(&id, i as u32, &format!("cid-{p}-{i}"), SIZES[i]);
        }
        let snaps: Vec<PathBuf> = srcs
            .iter()
            .enumerate()
            .map(|(i, src)| {
                let snap = dir.join(format!("point{p}-disk{i}.raw"));
                snapshot_source(src, &snap);
                snap
            })
            .collect();
        out.push((id, snaps));
    }
    out
}

#[test]
fn every_point_restores_to_files_qcow2_and_nbd_targets() {
    tools();
    need("nbdkit", "nbdkit");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let d = Daemon::start(&data);
    let points = two_points(&d, tmp.path());

    for (p, (id, snaps)) in points.iter().enumerate() {
        // Sparse raw files.
        let (a, b) = (
            out.join(format!("p{p}-d0.raw")),
            out.join(format!("p{p}-d1.raw")),
        );
        let v = restore_ok(&[
            "--vm",
            VM,
            "--at",
            id,
            "--to",
            a.to_str().unwrap(),
            "--to",
            b.to_str().unwrap(),
            "--server",
            &d.api,
        ]);
        assert_eq!(s(&v["backup_id"]), *id);
        same_bytes(&format!("point {p} disk 0 raw"), &a, &snaps[0]);
        same_bytes(&format!("point {p} disk 1 raw"), &b, &snaps[1]);
        // New qcow2 images, standalone.
        let (qa, qb) = (
            out.join(format!("p{p}-d0.qcow2")),
            out.join(format!("p{p}-d1.qcow2")),
        );
        restore_ok(&[
            "--vm",
            VM,
            "--at",
            id,
            "-O",
            "qcow2",
            "--to",
            qa.to_str().unwrap(),
            "--to",
            qb.to_str().unwrap(),
            "--server",
            &d.api,
        ]);
        for (q, snap) in [(&qa, &snaps[0]), (&qb, &snaps[1])] {
            compare(&format!("point {p} qcow2"), q, snap);
            check(&format!("point {p} qcow2"), q);
            assert_chain("standalone", q, &[q]);
        }
        // NBD targets: qemu-nbd over a file of random bytes (everything must
        // be overwritten, zeroes included), and nbdkit's memory plugin.
        let file = out.join(format!("p{p}-nbd.raw"));
        make_disk(&file, SIZES[0], 999);
        let qn = Server::qemu_nbd(&file, &tmp.path().join("qn.sock"), false);
        let mem = Server::nbdkit_memory(SIZES[1], &tmp.path().join("mem.sock"));
        restore_ok(&[
            "--vm",
            VM,
            "--at",
            id,
            "--to",
            &qn.uri(),
            "--to",
            &mem.uri(),
            "--server",
            &d.api,
        ]);
        let mem_copy = out.join(format!("p{p}-mem.raw"));
        run_ok(cmd(
            "nbdcopy",
            &[mem.uri().as_str(), mem_copy.to_str().unwrap()],
        ));
        drop(qn);
        drop(mem);
        same_bytes(&format!("point {p} qemu-nbd target"), &file, &snaps[0]);
        same_bytes(
            &format!("point {p} nbdkit memory target"),
            &mem_copy,
            &snaps[1],
        );
    }

    // One disk, chosen by time and by "latest"; an existing file is overwritten.
    let created = s(&d.backup(&points[1].0)["created_at"]);
    let one = out.join("p0-d0.raw");
    let v = restore_ok(&[
        "--vm",
        VM,
        "--disk",
        "1",
        "--at",
        &created,
        "--to",
        one.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert_eq!(s(&v["backup_id"]), points[1].0);
    same_bytes(
        "disk 1 by time over an existing file",
        &one,
        &points[1].1[1],
    );
    let (code, so, _) = restore(&[
        "--vm",
        VM,
        "--disk",
        "0",
        "--to",
        out.join("latest.raw").to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert_eq!(code, 0);
    assert!(so.contains(&points[1].0) && so.contains("restored"), "{so}");
    same_bytes("latest", &out.join("latest.raw"), &points[1].1[0]);
    assert!(d.get_ok("/api/v1/backups?vm_name=rvm")["count"].as_u64() == Some(2));
    assert!(
        d.get("/metrics").1["__non_json_body"]
            .as_str()
            .unwrap_or("")
            .contains("chainvault_active_restores 0"),
        "the restore exports are closed"
    );

    // On the repository directly, with the daemon stopped.
    d.stop();
    let off = out.join("offline.raw");
    restore_ok(&[
        "--vm",
        VM,
        "--at",
        &points[0].0,
        "--disk",
        "0",
        "--to",
        off.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    same_bytes("offline", &off, &points[0].1[0]);
}

#[test]
fn a_mostly_empty_disk_restores_to_a_file_that_holds_only_its_data() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let size = 1024 * MIB;
    let src = tmp.path().join("sparse.raw");
    std::fs::File::create(&src).unwrap().set_len(size).unwrap();
    for (off, n) in [(0u64, 8u64), (300, 8), (900, 8)] {
        run_ok(cmd(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P 0x5a {}M {}M", off, n),
                src.to_str().unwrap(),
            ],
        ));
    }
    let r = d.start_backup(&start_body(
        "sparse",
        "full",
        Some(json!([disk_spec(0, size)])),
    ));
    let id = s(&r["backup_id"]);
    nbdcopy(&src, &s(&disk_of(&r, 0)["nbd_uri"]));
    d.complete(&id, 0, "c", size);
    let dst = tmp.path().join("restored.raw");
    let v = restore_ok(&[
        "--vm",
        "sparse",
        "--to",
        dst.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    same_bytes("sparse restore", &dst, &src);
    let a = allocated(&dst);
    assert!(
        a <= 24 * MIB * 11 / 10 + MIB,
        "the restored file allocates {a} bytes for 24 MiB of data: {}",
        pretty(&v)
    );
    assert_eq!(
        v["disks"][0]["written"].as_u64(),
        Some(24 * MIB),
        "{}",
        pretty(&v)
    );
}

#[test]
fn bad_points_and_targets_are_refused_and_nothing_changes() {
    tools();
    need("nbdkit", "nbdkit");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start(&data);
    let points = two_points(&d, tmp.path());
    let snapshot = |d: &Daemon| {
        let mut f: Vec<(String, u64)> = walk(&d.data.join("vms"))
            .iter()
            .map(|p| (p.display().to_string(), std::fs::metadata(p).unwrap().len()))
            .collect();
        f.sort();
        (f, pretty(&d.get_ok("/api/v1/backups?vm_name=rvm")))
    };
    let before = snapshot(&d);
    let out = tmp.path().join("o.raw");
    let o2 = tmp.path().join("o2.raw");
    let (o, o2s) = (out.to_str().unwrap(), o2.to_str().unwrap());
    let small = Server::nbdkit_memory(MIB, &tmp.path().join("small.sock"));
    let ro_file = tmp.path().join("ro.raw");
    std::fs::File::create(&ro_file)
        .unwrap()
        .set_len(SIZES[0])
        .unwrap();
    let ro = Server::qemu_nbd(&ro_file, &tmp.path().join("ro.sock"), true);
    let repo_image = d.image_of(&points[0].0, 0);
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "unknown point",
            vec![
                "--at".into(),
                "20000101T000000.000Z-00000000".into(),
                "--to".into(),
                o.into(),
                "--to".into(),
                o2s.into(),
            ],
            "neither a backup id",
        ),
        (
            "time before the first backup",
            vec![
                "--at".into(),
                "2001-01-01T00:00:00Z".into(),
                "--to".into(),
                o.into(),
                "--to".into(),
                o2s.into(),
            ],
            "no backup at or before",
        ),
        (
            "too few targets",
            vec!["--to".into(), o.into()],
            "one per disk",
        ),
        (
            "target too small",
            vec!["--disk".into(), "0".into(), "--to".into(), small.uri()],
            "the disk needs",
        ),
        (
            "unreachable NBD target",
            vec![
                "--disk".into(),
                "0".into(),
                "--to".into(),
                "nbd+unix:///?socket=/nonexistent/x.sock".into(),
            ],
            "unreachable",
        ),
        (
            "read-only target",
            vec!["--disk".into(), "0".into(), "--to".into(), ro.uri()],
            "read-only",
        ),
        (
            "the repository's own image",
            vec![
                "--disk".into(),
                "0".into(),
                "--to".into(),
                repo_image.display().to_string(),
            ],
            "chainvault repository",
        ),
        (
            "missing directory",
            vec![
                "--disk".into(),
                "0".into(),
                "--to".into(),
                "/nonexistent/dir/x.raw".into(),
            ],
            "does not exist",
        ),
        (
            "a disk the point lacks",
            vec!["--disk".into(), "7".into(), "--to".into(), o.into()],
            "no completed backup of disk",
        ),
    ];
    for (what, args, want) in cases {
        let mut a: Vec<&str> = vec!["--vm", VM, "--server", &d.api];
        a.extend(args.iter().map(|s| s.as_str()));
        let (code, so, se) = restore(&a);
        assert_eq!(code, 2, "{what}: exit code; stdout {so} stderr {se}");
        assert!(se.contains(want), "{what}: expected {want:?} in: {se}");
        assert!(
            !out.exists() && !o2.exists(),
            "{what}: a target file was left behind"
        );
        assert_eq!(snapshot(&d), before, "{what}: the repository changed");
    }
    let (code, _, se) = restore(&["--vm", "nosuchvm", "--to", o, "--server", &d.api]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("no backups"), "{se}");
    // The repository's image was not touched: it still reads its point.
    compare("repository image", &repo_image, &points[0].1[0]);
    // Over --data too: a target inside the repository.
    d.stop();
    let inside = data.join("x.raw");
    let (code, _, se) = restore(&[
        "--vm",
        VM,
        "--disk",
        "0",
        "--to",
        inside.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("inside the repository"), "{se}");
    assert!(!inside.exists());
    // No daemon: exit 3.
    let (code, _, se) = restore(&["--vm", VM, "--to", o, "--server", "http://127.0.0.1:9"]);
    assert_eq!(code, 3, "{se}");
}

/// `nbdinfo --map=CONTEXT URI`: the ranges with flag 1.
fn nbdinfo_dirty(uri: &str, ctx: &str) -> Vec<(u64, u64)> {
    let out = run_ok(cmd("nbdinfo", &[&format!("--map={ctx}"), uri]));
    let mut v = Vec::new();
    for line in text(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 {
            if let (Ok(o), Ok(l), Ok(t)) = (
                f[0].parse::<u64>(),
                f[1].parse::<u64>(),
                f[2].parse::<u32>(),
            ) {
                if t & 1 != 0 {
                    v.push((o, l));
                }
            }
        }
    }
    v
}

#[test]
fn quick_rollback_writes_only_what_changed_since_the_point_the_target_holds() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let size = 32 * MIB;
    let src = tmp.path().join("live.raw");
    make_disk(&src, size, 61);
    let mut pts: Vec<(String, PathBuf)> = Vec::new();
    for i in 0..3 {
        let r = if i == 0 {
            d.start_backup(&start_body("rb", "full", Some(json!([disk_spec(0, size)]))))
        } else {
            d.start_backup(&start_body("rb", "incremental", None))
        };
        let id = s(&r["backup_id"]);
        let uri = s(&disk_of(&r, 0)["nbd_uri"]);
        if i == 0 {
            nbdcopy(&src, &uri);
        } else {
            let ch = modify_disk(&src, 900 + i as u64, 25, Fill::Pattern);
            qemu_io_changes(&uri, &ch);
        }
        d.complete(&id, 0, &format!("c{i}"), size);
        let snap = tmp.path().join(format!("p{i}.raw"));
        snapshot_source(&src, &snap);
        pts.push((id, snap));
    }
    let (p1, p3) = (&pts[0].0, &pts[2].0);

    // What changed between the two points, by the source snapshots.
    let (a, b) = (
        std::fs::read(&pts[0].1).unwrap(),
        std::fs::read(&pts[2].1).unwrap(),
    );
    let blk = 64 * KIB as usize;
    let changed: Vec<u64> = (0..a.len() / blk)
        .filter(|i| a[i * blk..(i + 1) * blk] != b[i * blk..(i + 1) * blk])
        .map(|i| (i * blk) as u64)
        .collect();
    assert!(!changed.is_empty());
    // The restore export of point 3 offers what changed since point 1.
    let ro = d.post_ok(
        "/api/v1/restores",
        &json!({ "backup_id": p3, "disk_id": 0 }),
    );
    let dirty = nbdinfo_dirty(&s(&ro["nbd_uri"]), &format!("qemu:dirty-bitmap:since-{p1}"));
    let dirty_bytes: u64 = dirty.iter().map(|r| r.1).sum();
    for off in &changed {
        assert!(
            dirty
                .iter()
                .any(|&(o, l)| *off >= o && *off + blk as u64 <= o + l),
            "block at {off} changed between the snapshots but is not in the map"
        );
    }
    let changed_bytes = changed.len() as u64 * blk as u64;
    assert!(
        dirty_bytes <= changed_bytes * 11 / 10 + 64 * KIB,
        "the map marks {dirty_bytes} bytes for {changed_bytes} changed"
    );
    d.delete(&format!("/api/v1/restores/{}", s(&ro["restore_id"])));

    // Restore point 1 to a file, then roll it forward to point 3.
    let f = tmp.path().join("rolled.raw");
    restore_ok(&[
        "--vm",
        "rb",
        "--at",
        p1,
        "--to",
        f.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    let v = restore_ok(&[
        "--vm",
        "rb",
        "--at",
        p3,
        "--since",
        p1,
        "--check",
        "--to",
        f.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    same_bytes("rolled forward", &f, &pts[2].1);
    let disk = &v["disks"][0];
    let sent = disk["written"].as_u64().unwrap() + disk["zeroed"].as_u64().unwrap();
    assert_eq!(
        disk["changed_bytes"].as_u64(),
        Some(dirty_bytes),
        "{}",
        pretty(&v)
    );
    assert!(
        sent <= dirty_bytes * 11 / 10 && sent * 10 >= dirty_bytes * 9,
        "sent {sent} bytes for {dirty_bytes} dirty: {}",
        pretty(&v)
    );

    // --check refuses a target that does not hold point 1; a bad --since is refused.
    let wrong = tmp.path().join("wrong.raw");
    make_disk(&wrong, size, 4242);
    let before = std::fs::read(&wrong).unwrap();
    let (code, _, se) = restore(&[
        "--vm",
        "rb",
        "--at",
        p3,
        "--since",
        p1,
        "--check",
        "--to",
        wrong.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("does not hold point"), "{se}");
    assert!(
        std::fs::read(&wrong).unwrap() == before,
        "the refused target is untouched"
    );
    let (code, _, se) = restore(&[
        "--vm",
        "rb",
        "--at",
        p1,
        "--since",
        p3,
        "--to",
        f.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("not earlier"), "{se}");
    let (code, _, se) = restore(&[
        "--vm",
        "rb",
        "--at",
        p3,
        "--since",
        p1,
        "--to",
        tmp.path().join("new.raw").to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("does not exist"), "{se}");

    // The same on the repository directly.
    d.stop();
    let g = tmp.path().join("rolled-offline.raw");
    let data = tmp.path().join("data");
    restore_ok(&[
        "--vm",
        "rb",
        "--at",
        &pts[1].0,
        "--to",
        g.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let v = restore_ok(&[
        "--vm",
        "rb",
        "--at",
        p3,
        "--since",
        &pts[1].0,
        "--check",
        "--to",
        g.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    same_bytes("rolled forward offline", &g, &pts[2].1);
    assert!(
        v["disks"][0]["changed_bytes"].as_u64().unwrap() < dirty_bytes,
        "{}",
        pretty(&v)
    );
}

#[test]
fn a_three_disk_vm_backed_up_by_the_client_restores_at_every_point() {
    tools();
    need("nbdkit", "nbdkit");
    need("qemu-nbd", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    // Disk 0: a sparse raw file, 64 MiB holding 8 MiB. Disk 1: a qcow2 with
    // 8 MiB of data in 32 MiB. Disk 2: a raw file served by qemu-nbd.
    let raw = t.join("vda.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    for (off, n) in [(1u64, 2u64), (20, 4), (50, 2)] {
        run_ok(cmd(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P 0x3c {off}M {n}M"),
                raw.to_str().unwrap(),
            ],
        ));
    }
    let q = t.join("vdb.qcow2");
    make_vm_disk(&q, 32 * MIB, 8, 5);
    let nbd_file = t.join("vdc.raw");
    make_disk(&nbd_file, 16 * MIB, 9);
    let sizes = [64 * MIB, 32 * MIB, 16 * MIB];
    let snap = |p: usize| -> Vec<PathBuf> {
        let s0 = t.join(format!("p{p}-0.raw"));
        snapshot_source(&raw, &s0);
        let s1 = t.join(format!("p{p}-1.raw"));
        run_ok(cmd(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                q.to_str().unwrap(),
                s1.to_str().unwrap(),
            ],
        ));
        let s2 = t.join(format!("p{p}-2.raw"));
        snapshot_source(&nbd_file, &s2);
        vec![s0, s1, s2]
    };
    let mut points: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for p in 0..2 {
        if p == 1 {
            modify_disk(&raw, 71, 20, Fill::Pattern);
            qemu_io_modify(&q, 72, 30, 2);
            modify_disk(&nbd_file, 73, 20, Fill::Pattern);
        }
        let src = Server::start(
            {
                let mut c = Command::new("qemu-nbd");
                c.args(["-r", "-f", "raw", "-t", "-e", "4"])
                    .arg(format!("--socket={}", t.join("src.sock").display()))
                    .arg(&nbd_file);
                c
            },
            &t.join("src.sock"),
        );
        let disks = vec![
            format!("0={}", raw.display()),
            format!("1={}", q.display()),
            format!("2={}", src.uri()),
        ];
        let run = backup(&d, "v3", &disks, &[]).ok(&format!("backup {p}"));
        drop(src);
        points.push((s(&run.json["backup_id"]), snap(p)));
    }
    let out = t.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for (p, (id, snaps)) in points.iter().enumerate() {
        let files: Vec<PathBuf> = (0..3).map(|i| out.join(format!("p{p}-{i}.raw"))).collect();
        let mut a = vec!["--vm", "v3", "--at", id.as_str(), "--server", &d.api];
        for f in &files {
            a.extend(["--to", f.to_str().unwrap()]);
        }
        restore_ok(&a);
        for i in 0..3 {
            same_bytes(
                &format!("point {p} disk {i} to a file"),
                &files[i],
                &snaps[i],
            );
        }
        let qs: Vec<PathBuf> = (0..3)
            .map(|i| out.join(format!("p{p}-{i}.qcow2")))
            .collect();
        let mut a = vec![
            "--vm",
            "v3",
            "--at",
            id.as_str(),
            "-O",
            "qcow2",
            "--server",
            &d.api,
        ];
        for f in &qs {
            a.extend(["--to", f.to_str().unwrap()]);
        }
        restore_ok(&a);
        for i in 0..3 {
            compare(&format!("point {p} disk {i} to qcow2"), &qs[i], &snaps[i]);
            check(&format!("point {p} disk {i} to qcow2"), &qs[i]);
        }
        // NBD: qemu-nbd over files of random bytes for disks 0 and 2, nbdkit memory for disk 1.
        let (f0, f2) = (
            out.join(format!("p{p}-nbd0.raw")),
            out.join(format!("p{p}-nbd2.raw")),
        );
        make_disk(&f0, sizes[0], 100);
        make_disk(&f2, sizes[2], 102);
        let n0 = Server::qemu_nbd(&f0, &t.join("n0.sock"), false);
        let n2 = Server::qemu_nbd(&f2, &t.join("n2.sock"), false);
        let mem = Server::nbdkit_memory(sizes[1], &t.join("m1.sock"));
        restore_ok(&[
            "--vm",
            "v3",
            "--at",
            id,
            "--to",
            &n0.uri(),
            "--to",
            &mem.uri(),
            "--to",
            &n2.uri(),
            "--server",
            &d.api,
        ]);
        let m1 = out.join(format!("p{p}-mem1.raw"));
        run_ok(cmd("nbdcopy", &[mem.uri().as_str(), m1.to_str().unwrap()]));
        drop((n0, n2, mem));
        same_bytes(&format!("point {p} disk 0 to qemu-nbd"), &f0, &snaps[0]);
        same_bytes(
            &format!("point {p} disk 1 to nbdkit memory"),
            &m1,
            &snaps[1],
        );
        same_bytes(&format!("point {p} disk 2 to qemu-nbd"), &f2, &snaps[2]);
    }
    // backups show: each disk's size, bytes on disk, change_id and parent.
    let sh = cli(&["backups", "show", &points[1].0, "--server", &d.api]);
    let st = text(&sh.stdout);
    assert!(sh.status.success(), "{}", text(&sh.stderr));
    for i in 0..3 {
        assert!(st.contains(&format!("disk {i}: completed")), "{st}");
    }
    assert!(st.contains(&format!("parent {}", points[0].0)), "{st}");
    assert!(st.contains("change_id"), "{st}");
}
