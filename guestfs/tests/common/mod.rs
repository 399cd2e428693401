//! Shared helpers: build fixture disks with fixtures/*.sh and compare what
//! a [`GuestFs`] shows with the source tree it was built from.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chainvault_guestfs::{Disk, FileDisk, GuestFs, Kind, NodeId, Volume};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Fails (never skips) when a tool is missing, naming its Debian package.
pub fn need_tools() {
    for (tool, pkg) in [
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("mkfs.fat", "dosfstools"),
        ("mcopy", "mtools"),
        ("mkntfs", "ntfs-3g"),
        ("ntfs-3g", "ntfs-3g"),
        ("sgdisk", "gdisk"),
        ("sfdisk", "fdisk"),
        ("python3", "python3"),
    ] {
        let found = [
            "/usr/sbin",
            "/sbin",
            "/usr/bin",
            "/bin",
            "/usr/local/bin",
            "/usr/local/sbin",
        ]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
            || Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "'{tool}' is missing: install the Debian package {pkg} (scripts/install-test-deps.sh)"
        );
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn build_tree(dir: &Path, args: &[&str]) {
    need_tools();
    run(Command::new(fixtures().join("build-tree.sh"))
        .arg(dir)
        .args(args));
}

pub fn mkdisk(out: &Path, size: &str, table: &str, parts: &[String]) {
    run(Command::new(fixtures().join("mkdisk.sh"))
        .arg(out)
        .arg(size)
        .arg(table)
        .args(parts));
}

pub fn open(img: &Path) -> Vec<Volume> {
    let d: Disk = Arc::new(FileDisk::open(img).unwrap());
    chainvault_guestfs::volumes(d)
}

pub fn fs_of<'a>(vols: &'a [Volume], name: &str) -> &'a Arc<dyn GuestFs> {
    let v = vols.iter().find(|v| v.name == name).unwrap_or_else(|| {
        panic!(
            "no volume {name}; have {:?}",
            vols.iter().map(|v| &v.name).collect::<Vec<_>>()
        )
    });
    match &v.fs {
        Ok(fs) => fs,
        Err(e) => panic!("volume {name} did not open: {e}"),
    }
}

/// What a filesystem keeps of the source tree (see fixtures/README.md).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Profile {
    /// ext4 built by mkdisk: everything, mtimes to the nanosecond.
    Ext4,
    /// ext2: as ext4 but whole-second mtimes.
    Ext2,
    /// FAT: no symlinks, no non-BMP names, 2 s file mtimes, fixed modes.
    Fat,
    /// NTFS via ntfs-3g: no modes/owners, mtimes to 100 ns, Interix symlinks.
    Ntfs,
}

fn ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

pub fn read_all(fs: &dyn GuestFs, node: NodeId, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < v.len() {
        let end = (off + (1 << 20) + 123).min(v.len());
        let n = fs.read(node, off as u64, &mut v[off..end]).unwrap();
        assert!(n > 0, "read returned 0 before the end ({off} of {size})");
        off += n;
    }
    let mut extra = [0u8; 16];
    assert_eq!(
        fs.read(node, size, &mut extra).unwrap(),
        0,
        "read past the end returns 0"
    );
    v
}

pub struct Counts {
    pub files: usize,
    pub dirs: usize,
    pub links: usize,
    pub bytes: u64,
}

/// Compares the guest tree under `dir` with `src`, recursively: names,
/// kinds, sizes, contents, symlink targets, modes, owners and mtimes, as
/// far as `p` keeps them.
pub fn compare(fs: &dyn GuestFs, src: &Path, p: Profile) -> Counts {
    let mut c = Counts {
        files: 0,
        dirs: 0,
        links: 0,
        bytes: 0,
    };
    compare_dir(fs, fs.root(), src, p, true, &mut c);
    c
}

fn kept(p: Profile, name: &str, meta: &std::fs::Metadata) -> bool {
    match p {
        Profile::Fat => {
            !meta.file_type().is_symlink() && name.chars().all(|c| (c as u32) <= 0xFFFF)
        }
        _ => true,
    }
}

fn compare_dir(fs: &dyn GuestFs, dir: NodeId, src: &Path, p: Profile, top: bool, c: &mut Counts) {
    c.dirs += 1;
    let listing = fs.read_dir(dir).unwrap();
    let again = fs.read_dir(dir).unwrap();
    assert!(
        listing
            .iter()
            .map(|e| (&e.name, e.node))
            .eq(again.iter().map(|e| (&e.name, e.node))),
        "stable order"
    );
    let mut guest: BTreeSet<Vec<u8>> = listing.iter().map(|e| e.name.clone()).collect();
    assert_eq!(
        guest.len(),
        listing.len(),
        "{}: duplicate names in the listing",
        src.display()
    );
    if top && matches!(p, Profile::Ext4 | Profile::Ext2) {
        assert!(guest.remove(b"lost+found".as_slice()), "ext has lost+found");
    }
    let mut want = BTreeSet::new();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let m = e.path().symlink_metadata().unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if kept(p, &name, &m) {
            want.insert(e.file_name().as_bytes().to_vec());
        }
    }
    let show = |s: &BTreeSet<Vec<u8>>| {
        s.iter()
            .take(20)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&guest), show(&want), "{}: names differ", src.display());
    assert_eq!(guest, want, "{}: names differ", src.display());
    for e in listing.iter() {
        if top && e.name == b"lost+found" && matches!(p, Profile::Ext4 | Profile::Ext2) {
            continue;
        }
        let path = src.join(std::ffi::OsStr::from_bytes(&e.name));
        let m = path.symlink_metadata().unwrap();
        let a = fs.attr(e.node).unwrap();
        assert_eq!(
            fs.lookup(dir, &e.name).unwrap(),
            Some(e.node),
            "{}: lookup",
            path.display()
        );
        assert_eq!(
            a.kind,
            e.kind,
            "{}: listing and attr agree on the kind",
            path.display()
        );
        let ft = m.file_type();
        let want_kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else {
            Kind::BlockDevice
        };
        assert_eq!(a.kind, want_kind, "{}: kind", path.display());
        // owners and modes
        match p {
            Profile::Ext4 | Profile::Ext2 => {
                assert_eq!(a.perm as u32, m.mode() & 0o7777, "{}: mode", path.display());
                assert_eq!(
                    (a.uid, a.gid),
                    (m.uid(), m.gid()),
                    "{}: owner",
                    path.display()
                );
            }
            Profile::Fat | Profile::Ntfs => {
                assert_eq!((a.uid, a.gid), (0, 0), "{}: owner", path.display());
                let want = match a.kind {
                    Kind::Dir => 0o755,
                    Kind::Symlink => 0o777,
                    _ => 0o644,
                };
                if !(p == Profile::Fat && a.perm == 0o444) {
                    assert_eq!(a.perm, want, "{}: mode", path.display());
                }
            }
        }
        // mtimes
        let src_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
        let got = ns(a.mtime);
        match p {
            Profile::Ext4 => assert_eq!(got, src_ns, "{}: mtime to the ns", path.display()),
            Profile::Ext2 => assert_eq!(
                got,
                src_ns - src_ns % 1_000_000_000,
                "{}: mtime (s)",
                path.display()
            ),
            Profile::Ntfs => assert_eq!(
                got,
                src_ns - src_ns % 100,
                "{}: mtime (100 ns)",
                path.display()
            ),
            Profile::Fat => {
                if a.kind == Kind::File {
                    assert!(
                        (got - src_ns).abs() <= 2_000_000_000,
                        "{}: mtime within 2 s: {got} vs {src_ns}",
                        path.display()
                    );
                }
            }
        }
        match a.kind {
            Kind::Dir => compare_dir(fs, e.node, &path, p, false, c),
            Kind::Symlink => {
                c.links += 1;
                let t = std::fs::read_link(&path).unwrap();
                let got = fs.read_link(e.node).unwrap();
                assert_eq!(
                    got,
                    t.as_os_str().as_bytes(),
                    "{}: symlink target",
                    path.display()
                );
                assert_eq!(a.size, got.len() as u64, "{}: symlink size", path.display());
            }
            Kind::File => {
                c.files += 1;
                assert_eq!(a.size, m.len(), "{}: size", path.display());
                if a.size > 64 << 20 {
                    compare_big(fs, e.node, &path);
                    c.bytes += a.size;
                    continue;
                }
                let data = read_all(fs, e.node, a.size);
                let want = std::fs::read(&path).unwrap();
                assert!(data == want, "{}: contents differ", path.display());
                c.bytes += a.size;
                if a.size > 10 {
                    // an odd offset and length
                    let mut b = vec![0u8; (a.size as usize / 3).max(1)];
                    let off = a.size / 2 + 1;
                    let n = fs.read(e.node, off, &mut b).unwrap();
                    assert_eq!(
                        &b[..n],
                        &want[off as usize..off as usize + n],
                        "{}: read at {off}",
                        path.display()
                    );
                }
                if p != Profile::Fat {
                    let sparse_src = m.blocks() * 512 < m.len();
                    if sparse_src && m.len() > 1 << 20 && matches!(p, Profile::Ext4 | Profile::Ext2)
                    {
                        assert!(
                            a.blocks * 512 < a.size,
                            "{}: holes stay holes ({} blocks)",
                            path.display(),
                            a.blocks
                        );
                    }
                }
            }
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice => {}
        }
    }
}

/// Streams a big file in 4 MiB pieces (plus reads across piece edges).
fn compare_big(fs: &dyn GuestFs, node: NodeId, path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let piece = 4 << 20;
    let (mut a, mut b) = (vec![0u8; piece], vec![0u8; piece]);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(piece as u64) as usize;
        let got = fs.read(node, off, &mut a[..n]).unwrap();
        assert_eq!(got, n, "{}: short read at {off}", path.display());
        f.read_exact_at(&mut b[..n], off).unwrap();
        assert!(
            a[..n] == b[..n],
            "{}: contents differ in the 4 MiB at {off}",
            path.display()
        );
        off += n as u64;
    }
    for at in [size / 2 - 3, (1 << 30) - 7, size - 100] {
        let n = fs.read(node, at, &mut a[..5000]).unwrap();
        let m = ((size - at) as usize).min(5000);
        assert_eq!(n, m);
        f.read_exact_at(&mut b[..n], at).unwrap();
        assert!(a[..n] == b[..n], "{}: read at {at}", path.display());
    }
}
