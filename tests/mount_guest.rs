//! `chainvault mount` end to end with real guest disks: trees built by
//! fixtures/build-tree.sh, disks by fixtures/mkdisk.sh (ext4 in GPT; FAT and
//! NTFS in an MBR with extended partitions), backed up through the daemon (a
//! full, then an incremental after a deleted and a changed file), mounted
//! through real FUSE and compared with the source trees: `diff -r`, and a
//! walk comparing types, sizes, contents, symlink targets, modes, owners and
//! mtimes as far as each filesystem keeps them (fixtures/README.md).
//! Also: a 100k-entry directory (`ls -f`, `find`), a 1.5 GiB sparse file read
//! past 1 GiB, `cmp` of disk.raw with the source disk of each point, a
//! damaged volume (volume.raw + ERROR.txt) beside working ones.

mod common;

use common::*;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn fixture(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(script)
}

fn build_tree(dir: &Path, args: &[&str]) {
    let mut c = std::process::Command::new(fixture("build-tree.sh"));
    c.arg(dir).args(args);
    run_ok(c);
}

fn mkdisk(out: &Path, size: &str, table: &str, parts: &[String]) {
    let mut c = std::process::Command::new(fixture("mkdisk.sh"));
    c.arg(out).arg(size).arg(table).args(parts);
    run_ok(c);
}

/// What a filesystem keeps of a source tree.
#[derive(Clone, Copy, Debug)]
struct Keeps {
    symlinks: bool,
    /// Names with characters outside the BMP (emoji).
    non_bmp: bool,
    modes: bool,
    owners: bool,
    /// mtime resolution in ns (files), 0 when not kept.
    mtime_ns: i128,
    dir_mtimes: bool,
}

const EXT4: Keeps = Keeps {
    symlinks: true,
    non_bmp: true,
    modes: true,
    owners: true,
    mtime_ns: 1,
    dir_mtimes: true,
};
const FAT: Keeps = Keeps {
    symlinks: false,
    non_bmp: false,
    modes: false,
    owners: false,
    mtime_ns: 2_000_000_000,
    dir_mtimes: false,
};
const NTFS: Keeps = Keeps {
    symlinks: true,
    non_bmp: true,
    modes: false,
    owners: false,
    mtime_ns: 100,
    dir_mtimes: true,
};

fn ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn same_contents(a: &Path, b: &Path, size: u64) -> bool {
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    // Huge (sparse) files: samples at the start, 1 GiB and the end.
    let ranges: Vec<(u64, u64)> = if size > 64 * MIB {
        vec![(0, MIB), (1 << 30, MIB), (size - MIB, MIB)]
    } else {
        vec![(0, size)]
    };
    for (off, len) in ranges {
        let mut x = vec![0u8; len as usize];
        let mut y = vec![0u8; len as usize];
        fa.read_exact_at(&mut x, off).unwrap();
        fb.read_exact_at(&mut y, off)
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", b.display()));
        if x != y {
            return false;
        }
    }
    true
}

/// Compare the mounted volume `got` with the source tree `src`. Directories
/// in `names_only` (relative) are compared by their entry names alone.
fn compare_tree(what: &str, src: &Path, got: &Path, k: Keeps, names_only: &[&str]) {
    let mut problems = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let sdir = src.join(&rel);
        let gdir = got.join(&rel);
        let mut want: Vec<String> = Vec::new();
        for e in std::fs::read_dir(&sdir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() && !k.symlinks {
                continue;
            }
            if !k.non_bmp && name.chars().any(|c| c as u32 > 0xFFFF) {
                continue;
            }
            want.push(name);
        }
        want.sort();
        let mut have: Vec<String> = names(&gdir)
            .into_iter()
            .filter(|n| !(rel.as_os_str().is_empty() && n == "lost+found"))
            .collect();
        have.sort();
        if want != have {
            let missing: Vec<_> = want.iter().filter(|n| !have.contains(n)).take(5).collect();
            let extra: Vec<_> = have.iter().filter(|n| !want.contains(n)).take(5).collect();
            problems.push(format!(
                "{}: entries differ: missing {missing:?}, extra {extra:?}",
                rel.display()
            ));
        }
        if names_only.iter().any(|n| Path::new(n) == rel) {
            continue;
        }
        for name in want.iter().filter(|n| have.contains(n)) {
            let r = rel.join(name);
            let (sp, gp) = (src.join(&r), got.join(&r));
            let sm = std::fs::symlink_metadata(&sp).unwrap();
            let gm = match std::fs::symlink_metadata(&gp) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{}: lstat: {e}", r.display()));
                    continue;
                }
            };
            let st = sm.file_type();
            let gt = gm.file_type();
            if (st.is_dir(), st.is_file(), st.is_symlink())
                != (gt.is_dir(), gt.is_file(), gt.is_symlink())
            {
                problems.push(format!("{}: type {st:?} became {gt:?}", r.display()));
                continue;
            }
            if st.is_symlink() {
                let (a, b) = (std::fs::read_link(&sp).unwrap(), std::fs::read_link(&gp));
                if b.as_ref().ok() != Some(&a) {
                    problems.push(format!(
                        "{}: symlink target {a:?} became {b:?}",
                        r.display()
                    ));
                }
                continue;
            }
            if st.is_file() {
                if sm.len() != gm.len() {
                    problems.push(format!(
                        "{}: size {} became {}",
                        r.display(),
                        sm.len(),
                        gm.len()
                    ));
                } else if !same_contents(&sp, &gp, sm.len()) {
                    problems.push(format!("{}: contents differ", r.display()));
                }
            }
            if k.modes && sm.mode() & 0o7777 != gm.mode() & 0o7777 {
                problems.push(format!(
                    "{}: mode {:o} became {:o}",
                    r.display(),
                    sm.mode() & 0o7777,
                    gm.mode() & 0o7777
                ));
            }
            if k.owners && (sm.uid(), sm.gid()) != (gm.uid(), gm.gid()) {
                problems.push(format!(
                    "{}: owner {}:{} became {}:{}",
                    r.display(),
                    sm.uid(),
                    sm.gid(),
                    gm.uid(),
                    gm.gid()
                ));
            }
            if k.mtime_ns > 0 && (st.is_file() || (st.is_dir() && k.dir_mtimes)) {
                let (a, b) = (ns(sm.modified().unwrap()), ns(gm.modified().unwrap()));
                if (a - b).abs() >= k.mtime_ns.max(1) && !(k.mtime_ns == 1 && a == b) {
                    problems.push(format!("{}: mtime {a} ns became {b} ns", r.display()));
                }
            }
            if st.is_dir() {
                stack.push(r);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: the mounted tree differs from the source ({} problems):\n{}",
        problems.len(),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `diff -r --no-dereference SRC GOT` (excluding what `excl` names) must find nothing.
fn diff_r(what: &str, src: &Path, got: &Path, excl: &[&str]) {
    let mut c = std::process::Command::new("diff");
    c.args(["-r", "--no-dereference", "-q"]);
    for x in excl {
        c.arg("-x").arg(x);
    }
    c.arg(src).arg(got);
    let out = run(c);
    assert!(
        out.status.success(),
        "{what}: diff -r {} {} found differences:\n{}{}",
        src.display(),
        got.display(),
        text(&out.stdout)
            .lines()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n"),
        text(&out.stderr)
    );
}

/// Copy a tree with `cp -a`.
fn copy_tree(a: &Path, b: &Path) {
    run_ok(cmd(
        "cp",
        &[std::ffi::OsStr::new("-a"), a.as_os_str(), b.as_os_str()],
    ));
}

/// The point directories of a disk, oldest first.
fn points(m: &Mount, vm: &str, disk: u32) -> Vec<PathBuf> {
    let d = m.path(&format!("{vm}/disk{disk}"));
    names(&d)
        .into_iter()
        .filter(|n| n != "latest")
        .map(|n| d.join(n))
        .collect()
}

fn only_dir_starting(dir: &Path, prefix: &str) -> PathBuf {
    let hits: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "one entry starting with {prefix:?} in {}: {:?}",
        dir.display(),
        names(dir)
    );
    dir.join(&hits[0])
}

#[test]
fn ext4_gpt_full_then_incremental_with_100k_dir_big_sparse_file_and_a_damaged_volume() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree1 = t.join("tree1");
    build_tree(&tree1, &["--big"]);
    let small = t.join("small");
    build_tree(&small, &["--many", "10", "--seed", "9"]);

    // p1: an ext4 whose superblock is then destroyed; p2: the real tree.
    let disk = t.join("disk.img");
    let parts = |tree: &Path| {
        vec![
            format!("ext4:16M:{}:broken", small.display()),
            format!("ext4-kernel:rest:{}:root", tree.display()),
        ]
    };
    mkdisk(&disk, "2200M", "gpt", &parts(&tree1));
    let damage = |img: &Path| {
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(&[0u8; 2048], MIB).unwrap();
    };
    damage(&disk);
    let disk1 = t.join("disk-1.img");
    run_ok(cmd(
        "cp",
        &[
            "--sparse=always",
            disk.to_str().unwrap(),
            disk1.to_str().unwrap(),
        ],
    ));

    let d = Daemon::start(&t.join("data"));
    let id1 = backup_sources(&d, "vm1", "full", &[(0, &disk)], true);

    // Changes: a deleted file, a changed file, a new file.
    let tree2 = t.join("tree2");
    copy_tree(&tree1, &tree2);
    std::fs::remove_file(tree2.join("hello.txt")).unwrap();
    std::fs::write(tree2.join("data/blob-1.bin"), b"changed between backups\n").unwrap();
    std::fs::write(tree2.join("nested/new.txt"), b"new in point 2\n").unwrap();
    mkdisk(&disk, "2200M", "gpt", &parts(&tree2));
    damage(&disk);
    let id2 = backup_sources(&d, "vm1", "incremental", &[(0, &disk)], false);

    let m = Mount::start(&t.join("mnt"), &["--data", d.data.to_str().unwrap()]);
    let pts = points(&m, "vm1", 0);
    assert_eq!(pts.len(), 2);
    for (p, tree, img, id) in [
        (&pts[0], &tree1, &disk1, &id1),
        (&pts[1], &tree2, &disk, &id2),
    ] {
        let what = format!("point {id}");
        let root = only_dir_starting(p, "p2");
        diff_r(&what, tree, &root, &["lost+found", "many", "big.bin"]);
        compare_tree(&what, tree, &root, EXT4, &["many"]);
        assert_cmp(&format!("{what} disk.raw"), &p.join("disk.raw"), img);
        // The damaged volume shows its bytes and why; the rest works.
        let broken = only_dir_starting(p, "p1");
        assert_eq!(names(&broken), vec!["ERROR.txt", "volume.raw"], "{what}");
        assert_eq!(
            std::fs::metadata(broken.join("volume.raw")).unwrap().len(),
            16 * MIB
        );
    }
    let r1 = only_dir_starting(&pts[0], "p2");
    let r2 = only_dir_starting(&pts[1], "p2");
    assert!(
        r1.join("hello.txt").exists(),
        "the deleted file is in point 1"
    );
    assert!(
        !r2.join("hello.txt").exists(),
        "the deleted file is gone in point 2"
    );
    assert_eq!(
        std::fs::read(r2.join("data/blob-1.bin")).unwrap(),
        b"changed between backups\n"
    );

    // The 100k-entry directory lists completely with ls -f and find.
    let many = r2.join("many");
    let out = run_ok(cmd(
        "sh",
        &["-c", &format!("ls -f '{}' | wc -l", many.display())],
    ));
    assert_eq!(
        text(&out.stdout).trim(),
        "100002",
        "ls -f many | wc -l (with . and ..)"
    );
    let out = run_ok(cmd(
        "sh",
        &["-c", &format!("find '{}' -type f | wc -l", many.display())],
    ));
    assert_eq!(text(&out.stdout).trim(), "100000", "find many -type f");

    // The 1.5 GiB sparse file, read at offsets past 1 GiB.
    let big = r2.join("big.bin");
    let size = std::fs::metadata(&big).unwrap().len();
    assert_eq!(
        size,
        std::fs::metadata(tree2.join("big.bin")).unwrap().len()
    );
    assert!(
        same_contents(&tree2.join("big.bin"), &big, size),
        "big.bin samples differ"
    );

    m.sigint();
    d.stop();
}

#[test]
fn fat_and_ntfs_in_mbr_with_extended_partitions() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree = t.join("tree");
    build_tree(&tree, &["--many", "500"]);
    let disk = t.join("disk.img");
    // p1 primary FAT32, p5 NTFS and p6 FAT16 logical in the extended partition.
    mkdisk(
        &disk,
        "400M",
        "mbr-ext",
        &[
            format!("fat:96M:{}:FATVOL", tree.display()),
            format!("ntfs:128M:{}:NTFSVOL", tree.display()),
            format!("fat16:rest:{}", tree.display()),
        ],
    );
    let d = Daemon::start(&t.join("data"));
    backup_sources(&d, "win", "full", &[(0, &disk)], true);

    let m = Mount::start(
        &t.join("mnt"),
        &["--data", d.data.to_str().unwrap(), "--vm", "win"],
    );
    let p = &points(&m, "win", 0)[0];
    let vols: Vec<String> = names(p);
    assert!(vols.iter().any(|v| v.starts_with("p1")), "{vols:?}");
    assert!(vols.iter().any(|v| v.starts_with("p5")), "{vols:?}");
    assert!(vols.iter().any(|v| v.starts_with("p6")), "{vols:?}");
    compare_tree("FAT32 p1", &tree, &only_dir_starting(p, "p1"), FAT, &[]);
    compare_tree("FAT16 p6", &tree, &only_dir_starting(p, "p6"), FAT, &[]);
    let ntfs = only_dir_starting(p, "p5");
    // `compressed/` is stored LZNT1-compressed by ntfs-3g: it must read back
    // byte for byte like everything else.
    diff_r("NTFS p5", &tree, &ntfs, &[]);
    compare_tree("NTFS p5", &tree, &ntfs, NTFS, &[]);
    assert_cmp("disk.raw", &p.join("disk.raw"), &disk);
    m.sigint();
    d.stop();
}

#[test]
fn fat12_fat16_fat32_names_keep_their_case_through_the_mount() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tree = t.join("tree");
    build_tree(&tree, &["--many", "0"]);
    let disk = t.join("disk.img");
    let s = tree.display();
    mkdisk(
        &disk,
        "80M",
        "mbr",
        &[
            format!("fat12:12M:{s}"),
            format!("fat16:20M:{s}"),
            format!("fat:rest:{s}"),
        ],
    );
    let d = Daemon::start(&t.join("data"));
    backup_sources(&d, "dos", "full", &[(0, &disk)], true);
    let m = Mount::start(
        &t.join("mnt"),
        &["--data", d.data.to_str().unwrap(), "--vm", "dos"],
    );
    let p = &points(&m, "dos", 0)[0];
    for part in ["p1", "p2", "p3"] {
        let vol = only_dir_starting(p, part);
        // `Docs` (long name DOCS), `Read Me First.txt`, `Makefile`, and the
        // 8.3 names with lower-case flags (fixtures/README.md).
        assert!(
            vol.join("Docs/Read Me First.txt").is_file(),
            "{part}: Docs/Read Me First.txt: have {:?}",
            names(&vol)
        );
        diff_r(part, &tree, &vol, &["links", "emoji-*"]);
        compare_tree(part, &tree, &vol, FAT, &[]);
    }
    m.sigint();
    d.stop();
}
