//! Damaged and hostile disks: errors, never panics or hangs; a journal
//! that needs replay; many readers at once.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use chainvault_guestfs::{Disk, GuestFs, Kind, ReadAt};
use common::*;

/// xorshift64*: deterministic noise without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

/// A shared base image with byte patches on top.
struct Patched {
    base: Arc<Vec<u8>>,
    patches: BTreeMap<u64, Vec<u8>>,
}

impl ReadAt for Patched {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size());
        let Some(end) = end else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        buf.copy_from_slice(&self.base[offset as usize..end as usize]);
        for (&at, p) in &self.patches {
            let (ps, pe) = (at, at + p.len() as u64);
            let (s, e) = (ps.max(offset), pe.min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&p[(s - ps) as usize..(e - ps) as usize]);
            }
        }
        Ok(())
    }
}

/// Visits up to `budget` nodes, reading a little of everything; errors are
/// fine, panics are not.
fn walk(fs: &dyn GuestFs, budget: &mut usize) {
    let mut stack = vec![fs.root()];
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(d) = stack.pop() {
        let _ = fs.attr(d);
        let Ok(list) = fs.read_dir(d) else { continue };
        for e in list.iter() {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let _ = fs.lookup(d, &e.name);
            let a = fs.attr(e.node);
            match e.kind {
                Kind::Dir => stack.push(e.node),
                Kind::Symlink => {
                    let _ = fs.read_link(e.node);
                }
                _ => {
                    let _ = fs.read(e.node, 0, &mut buf);
                    if let Ok(a) = a {
                        let _ = fs.read(e.node, a.size / 2, &mut buf[..4096]);
                        let _ = fs.read(e.node, a.size.saturating_sub(10), &mut buf[..100]);
                    }
                }
            }
        }
    }
}

fn open_and_walk(d: Disk) -> usize {
    let mut opened = 0;
    for v in chainvault_guestfs::volumes(d) {
        if let Ok(fs) = &v.fs {
            opened += 1;
            let mut budget = 3000;
            walk(&**fs, &mut budget);
        } else {
            assert!(!v.fs.as_ref().err().unwrap().is_empty());
        }
    }
    opened
}

#[test]
fn random_bytes_and_planted_signatures_give_errors_not_panics() {
    let mut r = Rng(0x6b1d_0a3e);
    for size in [0usize, 1, 511, 512, 4096, 70_000, 1 << 20, 8 << 20] {
        for plant in 0..8 {
            let mut b = vec![0u8; size];
            r.fill(&mut b);
            let mut put = |o: usize, m: &[u8]| {
                if o + m.len() <= b.len() {
                    b[o..o + m.len()].copy_from_slice(m);
                }
            };
            match plant {
                1 => put(510, &[0x55, 0xAA]), // an MBR of noise
                2 => {
                    put(510, &[0x55, 0xAA]);
                    put(446, &[0, 0, 0, 0, 0xEE]); // protective MBR
                    put(512, b"EFI PART");
                }
                3 => put(1080, &[0x53, 0xEF]), // ext magic
                4 => put(3, b"NTFS    "),
                5 => {
                    put(510, &[0x55, 0xAA]);
                    put(11, &[0, 2, 1, 1, 0, 2]); // FAT-ish BPB
                    put(54, b"FAT16   ");
                }
                6 => {
                    put(510, &[0x55, 0xAA]);
                    put(446, &[0, 0, 0, 0, 0x05, 0, 0, 0, 1, 0, 0, 0, 0xff, 0, 0, 0]);
                    // extended
                }
                _ => {}
            }
            let d: Disk = Arc::new(chainvault_guestfs::MemDisk(b));
            let vols = chainvault_guestfs::volumes(d.clone());
            assert!(!vols.is_empty(), "always at least one volume");
            open_and_walk(d);
        }
    }
}

#[test]
fn corrupted_real_filesystems_give_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "40"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "64M",
        "gpt",
        &[
            format!("ext4:20M:{s}"),
            format!("fat16:20M:{s}"),
            format!("ntfs:rest:{s}"),
        ],
    );
    let base = Arc::new(std::fs::read(&img).unwrap());
    let starts = [0u64, 1 << 20, 21 << 20, 41 << 20];
    let mut r = Rng(42);
    let mut opened = 0;
    for round in 0..150 {
        let mut patches = BTreeMap::new();
        for _ in 0..1 + r.below(6) {
            // Mostly metadata: the first 2 MiB of a partition (or the table).
            let span = if round % 3 == 0 { 20 << 20 } else { 2 << 20 };
            let at = starts[r.below(4) as usize] + r.below(span);
            let max = if r.below(2) == 0 { 16 } else { 4096 };
            let len = 1 + r.below(max) as usize;
            let mut p = vec![0u8; len];
            match r.below(3) {
                0 => r.fill(&mut p),
                1 => {} // zeroes
                _ => p.fill(0xff),
            }
            patches.insert(at, p);
        }
        let d: Disk = Arc::new(Patched {
            base: base.clone(),
            patches,
        });
        opened += open_and_walk(d);
    }
    assert!(opened > 150, "most volumes still open ({opened})");
}

#[test]
fn a_journal_that_needs_replay_is_replayed_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "5"]);
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "40M",
        "none",
        &[format!("ext4:rest:{}", src.display())],
    );
    let out = std::process::Command::new("debugfs")
        .args(["-R", "bmap /hello.txt 0"])
        .arg(&img)
        .output()
        .unwrap();
    let pblk: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("debugfs bmap");
    // Commit a new copy of hello.txt's block to the journal without
    // checkpointing it, as a crash right after the commit would leave it.
    let blk = t.path().join("blk");
    let mut data = b"journalled copy\n".to_vec();
    data.resize(1024, 0);
    std::fs::write(&blk, &data).unwrap();
    let cmds = t.path().join("cmds");
    std::fs::write(&cmds, format!("jo\njw -b {pblk} {}\njc\n", blk.display())).unwrap();
    let st = std::process::Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let h = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&h.stdout).contains("needs_recovery"),
        "the journal needs recovery"
    );

    let vols = open(&img);
    let fs = fs_of(&vols, "whole");
    let node = fs.lookup(fs.root(), b"hello.txt").unwrap().unwrap();
    let mut b = [0u8; 64];
    let n = fs.read(node, 0, &mut b).unwrap();
    // The kernel's answer: e2fsck replays the journal for real on a copy.
    let copy = t.path().join("e.img");
    std::fs::copy(&img, &copy).unwrap();
    let _ = std::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(&copy)
        .output()
        .unwrap();
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        &b[..n],
        &cat.stdout[..],
        "same bytes as after e2fsck's replay"
    );
    assert_eq!(&b[..n], b"journalled co");
}

#[test]
fn many_readers_at_once_see_the_same_files() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "200"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "110M",
        "gpt",
        &[
            format!("ext4:30M:{s}"),
            format!("fat:40M:{s}"),
            format!("ntfs:rest:{s}"),
        ],
    );
    let vols = open(&img);
    let fss: Vec<(Arc<dyn GuestFs>, Profile)> = vec![
        (fs_of(&vols, "p1").clone(), Profile::Ext4),
        (fs_of(&vols, "p2").clone(), Profile::Fat),
        (fs_of(&vols, "p3").clone(), Profile::Ntfs),
    ];
    std::thread::scope(|sc| {
        for i in 0..6 {
            let (fs, p) = fss[i % 3].clone();
            let src = &src;
            sc.spawn(move || compare(&*fs, src, p));
        }
    });
}
