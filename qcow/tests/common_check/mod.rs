//! Helpers for `check_vs_qemu`: run qemu-img / qemu-io, and read and patch
//! QCOW2 metadata by hand (independently of the crate's own parsers), so that
//! damaged images can be built deliberately.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use chainvault_qcow::check::{check, CheckOptions, CheckReport};

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Panic with a clear message when the QEMU tools are missing.
pub fn require_qemu() {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is not installed or does not run: install the qemu-utils package (apt-get install qemu-utils)"
        );
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install qemu-utils)"));
    out
}

/// Run qemu-img with arguments; panic on failure.
pub fn qemu_img(args: &[&str]) {
    let out = run(Command::new("qemu-img").args(args));
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run qemu-io commands on a qcow2 file; panic on failure.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path);
    let out = run(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {} failed: {text}",
        path.display()
    );
}

/// `qemu-img check -f qcow2 FILE`: exit code and output.
pub fn qemu_check(path: &Path) -> (i32, String) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// qemu-img check's counters (corruptions, leaks, check errors) from
/// `--output=json`, when it completes far enough to print them.
pub fn qemu_counts(path: &Path) -> Option<(u64, u64, u64)> {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let f = |k: &str| j.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    Some((f("corruptions"), f("leaks"), f("check-errors")))
}

/// Compare our counters with qemu-img check's; a description of the difference, if any.
pub fn count_mismatch(path: &Path, ours: Option<&CheckReport>) -> Option<String> {
    let q = qemu_counts(path);
    let o = ours.map(|r| (r.corruptions, r.leaks, r.check_errors));
    match (q, o) {
        (Some(q), Some(o)) if q.2 == 0 && q != o => Some(format!(
            "(corruptions, leaks, check errors): qemu {q:?}, ours {o:?}"
        )),
        _ => None,
    }
}

/// Our check: exit code (1 when the header cannot be used, as qemu-img cannot
/// open such a file either) and a description.
pub fn our_check(path: &Path) -> (i32, String, Option<CheckReport>) {
    match check(path, &CheckOptions::default()) {
        Ok(r) => {
            let text = format!("{}{:#?}", r.summary(), r.problems);
            (r.exit_code(), text, Some(r))
        }
        Err(e) => (1, format!("error: {e}"), None),
    }
}

/// Assert that our check and qemu-img check agree on `path`, and return the class.
pub fn assert_same_class(path: &Path, what: &str) -> i32 {
    let (q, qtext) = qemu_check(path);
    let (o, otext, _) = our_check(path);
    assert_eq!(
        o, q,
        "{what}: our check exits {o}, qemu-img check exits {q}\n--- qemu-img check ---\n{qtext}\n--- ours ---\n{otext}"
    );
    q
}

pub fn copy(src: &Path, dst: &Path) {
    std::fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// A QCOW2 file opened for reading and patching, with the header fields we need.
pub struct Img {
    pub path: PathBuf,
    f: File,
    pub version: u32,
    pub cluster_bits: u32,
    pub cs: u64,
    pub size: u64,
    pub l1_size: u64,
    pub l1_off: u64,
    pub rt_off: u64,
    pub rt_clusters: u64,
    pub nb_snapshots: u32,
    pub snapshots_off: u64,
    pub incompat: u64,
    pub refcount_order: u32,
    pub header_len: u64,
}

impl Img {
    pub fn open(path: &Path) -> Img {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut h = [0u8; 104];
        f.read_exact_at(&mut h, 0).unwrap();
        let u32_at = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
        let version = u32_at(4);
        let cluster_bits = u32_at(20);
        Img {
            path: path.to_path_buf(),
            version,
            cluster_bits,
            cs: 1 << cluster_bits,
            size: u64_at(24),
            l1_size: u32_at(36) as u64,
            l1_off: u64_at(40),
            rt_off: u64_at(48),
            rt_clusters: u32_at(56) as u64,
            nb_snapshots: u32_at(60),
            snapshots_off: u64_at(64),
            incompat: if version >= 3 { u64_at(72) } else { 0 },
            refcount_order: if version >= 3 { u32_at(96) } else { 4 },
            header_len: if version >= 3 { u32_at(100) as u64 } else { 72 },
            f,
        }
    }

    pub fn extended_l2(&self) -> bool {
        self.incompat & (1 << 4) != 0
    }
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cs / self.l2_entry_size()
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let n = self.f.read_at(&mut b, off).unwrap();
        b.truncate(n);
        b.resize(len, 0);
        b
    }
    pub fn write(&self, off: u64, data: &[u8]) {
        self.f.write_all_at(data, off).unwrap();
        self.f.sync_all().unwrap();
    }
    pub fn u64(&self, off: u64) -> u64 {
        u64::from_be_bytes(self.read(off, 8).try_into().unwrap())
    }
    pub fn u32(&self, off: u64) -> u32 {
        u32::from_be_bytes(self.read(off, 4).try_into().unwrap())
    }
    pub fn set_u64(&self, off: u64, v: u64) {
        self.write(off, &v.to_be_bytes());
    }
    pub fn set_u32(&self, off: u64, v: u32) {
        self.write(off, &v.to_be_bytes());
    }
    pub fn len(&self) -> u64 {
        self.f.metadata().unwrap().len()
    }
    pub fn set_len(&self, len: u64) {
        self.f.set_len(len).unwrap();
    }

    /// File offset of L1 entry `i`.
    pub fn l1_entry_at(&self, i: u64) -> u64 {
        self.l1_off + i * 8
    }
    /// File offset of L2 entry `j` of the table at `l2`.
    pub fn l2_entry_at(&self, l2: u64, j: u64) -> u64 {
        l2 + j * self.l2_entry_size()
    }

    /// L2 entries with a host offset: (L1 index, L2 table offset, entry index, entry file offset, raw).
    pub fn mapped_entries(&self, want_compressed: bool) -> Vec<(u64, u64, u64, u64, u64)> {
        let mut out = Vec::new();
        for i in 0..self.l1_size {
            let l1e = self.u64(self.l1_entry_at(i));
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for j in 0..self.l2_entries() {
                let at = self.l2_entry_at(l2, j);
                let raw = self.u64(at);
                let compressed = raw & COMPRESSED != 0;
                if compressed == want_compressed
                    && (compressed && raw != 0 || raw & OFFSET_MASK != 0)
                {
                    out.push((i, l2, j, at, raw));
                }
            }
        }
        out
    }

    /// The first L1 entry pointing to an L2 table: (index, L2 offset).
    pub fn first_l2(&self) -> (u64, u64) {
        for i in 0..self.l1_size {
            let l2 = self.u64(self.l1_entry_at(i)) & OFFSET_MASK;
            if l2 != 0 {
                return (i, l2);
            }
        }
        panic!("{}: no L2 table", self.path.display());
    }

    fn refblock_entries(&self) -> u64 {
        (self.cs * 8) >> self.refcount_order
    }

    /// Refcount table entry `i` (raw) and its file offset.
    pub fn reftable_entry_at(&self, i: u64) -> u64 {
        self.rt_off + i * 8
    }

    /// (file offset of the refcount block byte holding the entry, bit shift, width in bits).
    fn refcount_location(&self, cluster: u64) -> (u64, u32, u32) {
        let per = self.refblock_entries();
        let rb = self.u64(self.reftable_entry_at(cluster / per)) & !0x1ffu64;
        assert!(
            rb != 0,
            "{}: cluster {cluster} has no refcount block",
            self.path.display()
        );
        let idx = cluster % per;
        let bits = 1u32 << self.refcount_order;
        let bit = idx * bits as u64;
        (rb + bit / 8, (bit % 8) as u32, bits)
    }

    pub fn refcount(&self, cluster: u64) -> u64 {
        let (at, shift, bits) = self.refcount_location(cluster);
        if bits < 8 {
            ((self.read(at, 1)[0] >> shift) & ((1u16 << bits) - 1) as u8) as u64
        } else {
            self.read(at, (bits / 8) as usize)
                .iter()
                .fold(0u64, |a, &b| (a << 8) | b as u64)
        }
    }

    pub fn set_refcount(&self, cluster: u64, v: u64) {
        let (at, shift, bits) = self.refcount_location(cluster);
        if bits < 8 {
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = self.read(at, 1)[0];
            self.write(at, &[(b & !mask) | (((v as u8) << shift) & mask)]);
        } else {
            let n = (bits / 8) as usize;
            let bytes = v.to_be_bytes();
            self.write(at, &bytes[8 - n..]);
        }
    }

    /// Offset of snapshot table entry `n` (walking the variable-length entries).
    pub fn snapshot_entry_at(&self, n: u32) -> u64 {
        let mut off = self.snapshots_off;
        for _ in 0..n {
            off = off.next_multiple_of(8);
            let id = u16::from_be_bytes(self.read(off + 12, 2).try_into().unwrap()) as u64;
            let name = u16::from_be_bytes(self.read(off + 14, 2).try_into().unwrap()) as u64;
            let extra = self.u32(off + 36) as u64;
            off += 40 + extra + id + name;
        }
        off.next_multiple_of(8)
    }

    /// The bitmaps header extension: (file offset of its data, nb_bitmaps, dir size, dir offset).
    pub fn bitmaps_ext(&self) -> Option<(u64, u32, u64, u64)> {
        let mut off = self.header_len;
        while off + 8 <= self.cs {
            let kind = self.u32(off);
            let len = self.u32(off + 4) as u64;
            if kind == 0 {
                return None;
            }
            if kind == 0x2385_2875 {
                let d = off + 8;
                return Some((d, self.u32(d), self.u64(d + 8), self.u64(d + 16)));
            }
            off += 8 + len.next_multiple_of(8);
        }
        None
    }
}
