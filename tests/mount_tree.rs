//! `chainvault mount` end to end, the tree and raw disks: points of a 2-disk
//! VM backed up through the real daemon, mounted through real FUSE in both
//! modes (--data: sidecars + qcow2 chains; --server: HTTP + NBD restore
//! exports). Guest filesystems are covered by mount_guest.rs.
//!
//! Checks: the layout (vm/disk/point, latest, by-id), info.json, `cmp` of
//! every point's disk.raw with the source disk at that time, a volume that is
//! no filesystem (volume.raw + ERROR.txt), a backup completed while mounted
//! appearing, many readers at once, and leaving (SIGINT, fusermount3 -u)
//! with no process, mount or restore export left behind.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const VM: &str = "web/01";
const VM_DIR: &str = "web%2F01";

/// Whether a point directory name looks like `2026-11-23T181532.417Z`.
fn is_point_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() == 22
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[17] == b'.'
        && b[21] == b'Z'
        && n.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 17, 21].contains(&i) || c.is_ascii_digit())
}

fn points_of(m: &Mount, disk: u32) -> Vec<String> {
    names(&m.path(&format!("{VM_DIR}/disk{disk}")))
        .into_iter()
        .filter(|n| n != "latest")
        .collect()
}

fn read_json(p: &Path) -> Value {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// Read `len` bytes at `off` of two files in parallel threads and compare.
fn parallel_reads(a: &Path, b: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (a, b) = (a.to_path_buf(), b.to_path_buf());
            std::thread::spawn(move || {
                let fa = std::fs::File::open(&a).unwrap();
                let fb = std::fs::File::open(&b).unwrap();
                let mut r = Rng::new(77 + t);
                for _ in 0..40 {
                    let len = 1 + r.below(300 * KIB);
                    let off = r.below(size - len);
                    let mut x = vec![0u8; len as usize];
                    let mut y = vec![0u8; len as usize];
                    fa.read_exact_at(&mut x, off).unwrap();
                    fb.read_exact_at(&mut y, off).unwrap();
                    assert!(x == y, "thread {t}: {len} bytes at {off} differ");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader thread failed");
    }
}

#[test]
fn data_mode_tree_raw_disks_and_live_backups() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    let src0 = t.join("src0.img");
    let src1 = t.join("src1.img");
    make_disk(&src0, 24 * MIB, 1);
    make_disk(&src1, 8 * MIB, 2);
    let s0: Vec<PathBuf> = (1..=3).map(|i| t.join(format!("src0-{i}.img"))).collect();
    snapshot_source(&src0, &s0[0]);
    let id1 = backup_sources(&d, VM, "full", &[(0, &src0), (1, &src1)], true);
    modify_disk(&src0, 3, 30, Fill::Random);
    snapshot_source(&src0, &s0[1]);
    let id2 = backup_sources(&d, VM, "incremental", &[(0, &src0), (1, &src1)], false);

    let m = Mount::start(&t.join("mnt"), &["--data", d.data.to_str().unwrap()]);
    assert_eq!(names(&m.dir), vec!["by-id".to_string(), VM_DIR.to_string()]);
    assert_eq!(names(&m.path(VM_DIR)), vec!["disk0", "disk1"]);
    let pts = points_of(&m, 0);
    assert_eq!(pts.len(), 2, "two points of disk0: {pts:?}");
    assert!(pts.iter().all(|p| is_point_name(p)), "point names {pts:?}");
    let latest = std::fs::read_link(m.path(&format!("{VM_DIR}/disk0/latest"))).unwrap();
    assert_eq!(latest, Path::new(&pts[1]), "latest is the newest point");

    // info.json says which backup, its parent and change_id.
    let i1 = read_json(&m.path(&format!("{VM_DIR}/disk0/{}/info.json", pts[0])));
    let i2 = read_json(&m.path(&format!("{VM_DIR}/disk0/latest/info.json")));
    assert_eq!(i1["backup_id"], id1.as_str(), "{}", pretty(&i1));
    assert_eq!(i2["backup_id"], id2.as_str(), "{}", pretty(&i2));
    assert_eq!(i2["parent_backup_id"], id1.as_str(), "{}", pretty(&i2));
    assert_eq!(i2["change_id"], format!("cid-{id2}-0").as_str());
    assert_eq!(i2["backup_type"], "incremental");
    assert_eq!(i2["capacity_bytes"], 24 * MIB);

    // by-id links to the point of each disk.
    assert_eq!(
        names(&m.path(&format!("by-id/{id1}"))),
        vec!["disk0", "disk1"]
    );
    let l = std::fs::read_link(m.path(&format!("by-id/{id1}/disk0"))).unwrap();
    assert_eq!(l, PathBuf::from(format!("../../{VM_DIR}/disk0/{}", pts[0])));
    let via_id = read_json(&m.path(&format!("by-id/{id2}/disk1/info.json")));
    assert_eq!(via_id["disk_id"], 1);

    // disk.raw of each point is the source disk at that time.
    assert_cmp(
        "disk0 point 1",
        &m.path(&format!("{VM_DIR}/disk0/{}/disk.raw", pts[0])),
        &s0[0],
    );
    assert_cmp(
        "disk0 point 2",
        &m.path(&format!("{VM_DIR}/disk0/{}/disk.raw", pts[1])),
        &s0[1],
    );
    assert_cmp(
        "disk1 latest",
        &m.path(&format!("{VM_DIR}/disk1/latest/disk.raw")),
        &src1,
    );
    parallel_reads(
        &m.path(&format!("{VM_DIR}/disk0/{}/disk.raw", pts[1])),
        &s0[1],
        24 * MIB,
    );

    // Random bytes are no filesystem: the volume shows its raw bytes and why.
    let pdir = m.path(&format!("{VM_DIR}/disk0/{}", pts[0]));
    let vols: Vec<String> = names(&pdir)
        .into_iter()
        .filter(|n| n != "disk.raw" && n != "info.json")
        .collect();
    assert_eq!(
        vols.len(),
        1,
        "one volume on an unpartitioned disk: {vols:?}"
    );
    let vdir = pdir.join(&vols[0]);
    assert_eq!(names(&vdir), vec!["ERROR.txt", "volume.raw"]);
    let why = std::fs::read_to_string(vdir.join("ERROR.txt")).unwrap();
    assert!(
        why.contains("could not read the filesystem"),
        "ERROR.txt: {why}"
    );
    assert_cmp(
        "volume.raw of the whole disk",
        &vdir.join("volume.raw"),
        &s0[0],
    );

    // A backup completed while mounted appears, and latest follows it.
    modify_disk(&src0, 4, 20, Fill::Random);
    snapshot_source(&src0, &s0[2]);
    let id3 = backup_sources(&d, VM, "incremental", &[(0, &src0), (1, &src1)], false);
    assert!(
        eventually(10, || points_of(&m, 0).len() == 3),
        "the third point did not appear: {:?}",
        points_of(&m, 0)
    );
    let i3 = read_json(&m.path(&format!("{VM_DIR}/disk0/latest/info.json")));
    assert_eq!(i3["backup_id"], id3.as_str());
    assert_cmp(
        "disk0 point 3",
        &m.path(&format!("{VM_DIR}/disk0/latest/disk.raw")),
        &s0[2],
    );
    assert!(m.path(&format!("by-id/{id3}/disk0/disk.raw")).exists());

    // Read-only.
    assert!(std::fs::write(m.path("x"), b"no").is_err());
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(m.path(&format!("{VM_DIR}/disk0/latest/disk.raw")))
        .is_err());

    m.sigint();
    d.stop();
}

#[test]
fn server_mode_reads_through_restore_exports_and_closes_them() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = Daemon::start(&t.join("data"));
    let src = t.join("src.img");
    make_disk(&src, 16 * MIB, 5);
    let s1 = t.join("src-1.img");
    snapshot_source(&src, &s1);
    backup_sources(&d, VM, "full", &[(0, &src)], true);

    let m = Mount::start(&t.join("mnt"), &["--server", &d.api, "--vm", VM]);
    assert_eq!(points_of(&m, 0).len(), 1);
    assert_cmp(
        "latest over NBD",
        &m.path(&format!("{VM_DIR}/disk0/latest/disk.raw")),
        &s1,
    );
    let restores = |d: &Daemon| {
        let (_, v) = d.get("/metrics");
        let t = v["__non_json_body"].as_str().unwrap_or("").to_string();
        t.lines()
            .find(|l| l.starts_with("chainvault_active_restores "))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(
        restores(&d),
        "1",
        "one restore export is open while reading"
    );

    // A backup completed while mounted appears.
    modify_disk(&src, 6, 30, Fill::Random);
    let s2 = t.join("src-2.img");
    snapshot_source(&src, &s2);
    backup_sources(&d, VM, "incremental", &[(0, &src)], false);
    assert!(eventually(10, || points_of(&m, 0).len() == 2));
    parallel_reads(
        &m.path(&format!("{VM_DIR}/disk0/latest/disk.raw")),
        &s2,
        16 * MIB,
    );

    // Unmounted from outside: the process leaves and closes its exports.
    m.fusermount_u();
    assert_eq!(restores(&d), "0", "restore exports left open after unmount");
    d.stop();
}
