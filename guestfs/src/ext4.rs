//! ext2, ext3 and ext4, read-only: our own reader.
//!
//! Why not the `ext4-view` crate: its handle is `Rc`-based (not `Send`, so
//! not usable from a multi-threaded FUSE server without a dedicated thread),
//! it is path-based and hides inode numbers (we want them as stable
//! [`NodeId`]s), and it reads file data one filesystem block per call, where
//! we need to map a file's extents and read straight from the disk in large
//! pieces. The read-only subset of the format is small: superblock, group
//! descriptors (32/64-bit, META_BG), inodes with extra fields (nanosecond
//! times), extent trees and ext2/3 block maps, linear and htree directories
//! (read linearly: htree nodes look like empty entries), inline data, fast
//! and slow symlinks, and replay of the jbd2 journal of a filesystem that
//! was not cleanly unmounted (a crash-consistent backup of a running guest
//! always is one), applied in memory.
//!
//! Metadata is read through the cached volume, file data from the raw
//! volume in one read per extent piece.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::{Listing, Lru, DIR_CACHE_ENTRIES};
use crate::disk::read_vec;
use crate::{Attr, DirEntry, Disk, GuestFs, Kind, NodeId, ReadAt};

const ROOT: u64 = 2;

// incompat features
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_KNOWN: u32 =
    0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000 | 0x20000;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const COMPAT_HAS_JOURNAL: u32 = 0x4;

// inode flags
const FL_HUGE_FILE: u32 = 0x40000;
const FL_EXTENTS: u32 = 0x80000;
const FL_INLINE_DATA: u32 = 0x1000_0000;

/// Directories larger than this are refused rather than read into memory.
const MAX_DIR_BYTES: u64 = 1 << 30;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Linux's 32-bit device number encoding (what `stat` shows as `st_rdev`
/// for majors and minors that fit).
fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Where the newest committed copy of a journalled block is.
pub(crate) enum Replayed {
    /// Byte offset of the copy in the volume (inside the journal).
    At(u64),
    /// An "escaped" copy, whose first four bytes the journal had to change.
    Mem(Arc<[u8]>),
}

/// A contiguous piece of a file: `len` blocks from logical block `lblk`
/// stored at physical block `pblk` (or unwritten: reads as zeroes).
#[derive(Debug, Clone, Copy)]
struct Run {
    lblk: u64,
    len: u64,
    pblk: u64,
    unwritten: bool,
}

struct Inode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    links: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    blocks512: u64,
    flags: u32,
    file_acl: u64,
    iblock: [u8; 60],
    /// The in-inode extended attribute area (for inline data).
    ibody_xattr: Vec<u8>,
}

impl Inode {
    /// A device node's number, in Linux's `makedev` encoding. ext4 keeps it
    /// in the block map: the old 16-bit form in the first word, or (when that
    /// is 0) the new 32-bit form in the second.
    fn rdev(&self) -> u32 {
        if !matches!(self.kind(), Kind::CharDevice | Kind::BlockDevice) {
            return 0;
        }
        let w0 = le32(&self.iblock, 0);
        if w0 != 0 {
            let (major, minor) = ((w0 >> 8) & 0xff, w0 & 0xff);
            return makedev(major, minor);
        }
        let w1 = le32(&self.iblock, 4);
        let major = (w1 & 0xfff00) >> 8;
        let minor = (w1 & 0xff) | ((w1 >> 12) & 0xfff00);
        makedev(major, minor)
    }

    fn kind(&self) -> Kind {
        match self.mode & 0xF000 {
            0x8000 => Kind::File,
            0x4000 => Kind::Dir,
            0xA000 => Kind::Symlink,
            0x1000 => Kind::Fifo,
            0xC000 => Kind::Socket,
            0x2000 => Kind::CharDevice,
            0x6000 => Kind::BlockDevice,
            // Not a type ext4 writes: treat as an empty file.
            _ => Kind::File,
        }
    }
}

pub struct Ext4 {
    meta: Disk,
    data: Disk,
    format: &'static str,
    bs: u64,
    blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: usize,
    incompat: u32,
    huge_file: bool,
    /// Inode table block of every group.
    itables: Vec<u64>,
    /// Blocks replaced by the journal replay.
    journal: BTreeMap<u64, Replayed>,
    dirs: Lru<NodeId, Arc<Listing>>,
    maps: Lru<NodeId, Arc<Vec<Run>>>,
}

fn time(lo: u32, extra: Option<u32>) -> SystemTime {
    let mut secs = lo as i32 as i64;
    let mut ns = 0;
    if let Some(x) = extra {
        secs += ((x & 3) as i64) << 32;
        ns = (x >> 2).min(999_999_999);
    }
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, ns)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(ns as u64)
    }
}

impl Ext4 {
    /// True when `vol` has an ext2/3/4 superblock magic.
    pub fn probe(sb: &[u8]) -> bool {
        sb.len() >= 1024 + 58 && le16(sb, 1024 + 56) == 0xEF53
    }

    pub fn open(meta: Disk, data: Disk) -> Result<Self, String> {
        let sb = read_vec(&*meta, 1024, 1024)
            .map_err(|e| format!("cannot read the ext superblock: {e}"))?;
        if le16(&sb, 56) != 0xEF53 {
            return Err("no ext2/3/4 superblock magic (0xEF53) at byte 1080".into());
        }
        let log = le32(&sb, 24);
        if log > 6 {
            return Err(format!(
                "ext superblock: block size 2^(10+{log}) is invalid (damaged superblock?)"
            ));
        }
        let bs = 1024u64 << log;
        let rev = le32(&sb, 76);
        let incompat = if rev >= 1 { le32(&sb, 96) } else { 0 };
        let ro_compat = if rev >= 1 { le32(&sb, 100) } else { 0 };
        let compat = if rev >= 1 { le32(&sb, 92) } else { 0 };
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err("this is an external ext3/4 journal device, not a filesystem".into());
        }
        let bad = incompat & (INCOMPAT_COMPRESSION | INCOMPAT_DIRDATA | INCOMPAT_ENCRYPT);
        if bad != 0 {
            return Err(format!("ext filesystem uses features this reader does not support (incompat 0x{bad:x}: compression, dirdata or encryption)"));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(format!(
                "ext filesystem uses unknown incompatible features 0x{unknown:x}"
            ));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_count = le32(&sb, 4) as u64
            | if is64 {
                (le32(&sb, 0x150) as u64) << 32
            } else {
                0
            };
        let inodes_count = le32(&sb, 0);
        let first_data_block = le32(&sb, 20) as u64;
        let blocks_per_group = le32(&sb, 32) as u64;
        let inodes_per_group = le32(&sb, 40);
        let inode_size = if rev >= 1 {
            le16(&sb, 88) as usize
        } else {
            128
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size as u64 > bs {
            return Err(format!(
                "ext superblock: inode size {inode_size} is invalid"
            ));
        }
        if blocks_per_group == 0 || inodes_per_group == 0 || blocks_count == 0 || inodes_count == 0
        {
            return Err(
                "ext superblock: zero blocks or inodes per group (damaged superblock?)".into(),
            );
        }
        if blocks_count.saturating_mul(bs) > meta.size() {
            return Err(format!(
                "ext filesystem claims {} bytes but its volume has {} (truncated image?)",
                blocks_count.saturating_mul(bs),
                meta.size()
            ));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if groups > 1 << 24
            || groups * inodes_per_group as u64 > u32::MAX as u64 + inodes_per_group as u64
        {
            return Err(format!(
                "ext superblock: {groups} block groups is not plausible"
            ));
        }
        let desc_size = if is64 {
            (le16(&sb, 254) as u64).max(32)
        } else {
            32
        };
        if desc_size > bs || desc_size % 4 != 0 {
            return Err(format!(
                "ext superblock: group descriptor size {desc_size} is invalid"
            ));
        }
        let per_block = bs / desc_size;
        let first_meta_bg = le32(&sb, 0x104) as u64;
        let meta_bg = incompat & INCOMPAT_META_BG != 0;
        let sparse_super = ro_compat & 0x1 != 0;
        let has_super = |g: u64| -> bool {
            if !sparse_super || g <= 1 {
                return true;
            }
            for p in [3u64, 5, 7] {
                let mut x = p;
                while x < g {
                    x *= p;
                }
                if x == g {
                    return true;
                }
            }
            false
        };
        // Group descriptors, a block of them at a time.
        let mut itables = Vec::with_capacity(groups as usize);
        let mut g = 0u64;
        while g < groups {
            let dblock = g / per_block;
            let blk = if meta_bg && dblock >= first_meta_bg {
                let first = dblock * per_block;
                first_data_block + first * blocks_per_group + u64::from(has_super(first))
            } else {
                first_data_block + 1 + dblock
            };
            if blk >= blocks_count {
                return Err(format!(
                    "ext group descriptors of group {g} would be at block {blk}, past the end"
                ));
            }
            let b = read_vec(&*meta, blk * bs, bs as usize)
                .map_err(|e| format!("cannot read group descriptors: {e}"))?;
            for i in 0..per_block {
                if g >= groups {
                    break;
                }
                let d = &b[(i * desc_size) as usize..((i + 1) * desc_size) as usize];
                let mut t = le32(d, 8) as u64;
                if is64 && desc_size >= 64 {
                    t |= (le32(d, 0x28) as u64) << 32;
                }
                itables.push(t);
                g += 1;
            }
        }
        let format = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | 0x200 | 0x8000) != 0
            || ro_compat & (0x8 | 0x10 | 0x20 | 0x40 | 0x400) != 0
        {
            "ext4"
        } else if compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        };
        let mut fs = Ext4 {
            meta,
            data,
            format,
            bs,
            blocks_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            incompat,
            huge_file: ro_compat & RO_COMPAT_HUGE_FILE != 0,
            itables,
            journal: BTreeMap::new(),
            dirs: Lru::new(DIR_CACHE_ENTRIES),
            maps: Lru::new(1 << 20),
        };
        let root = fs
            .inode(ROOT)
            .map_err(|e| format!("cannot read the root directory inode: {e}"))?;
        if root.kind() != Kind::Dir {
            return Err(
                "inode 2 (the root) is not a directory: the inode tables are damaged".into(),
            );
        }
        if incompat & INCOMPAT_RECOVER != 0 && compat & COMPAT_HAS_JOURNAL != 0 {
            let jino = le32(&sb, 0xE0) as u64;
            fs.journal = crate::jbd2::replay(&fs, jino).map_err(|e| {
                format!("the filesystem was not cleanly unmounted and its journal cannot be replayed: {e}")
            })?;
        }
        Ok(fs)
    }

    pub(crate) fn block_size(&self) -> u64 {
        self.bs
    }

    /// Reads a metadata block, as replayed from the journal if it is there.
    pub(crate) fn read_block(&self, blk: u64, buf: &mut [u8]) -> io::Result<()> {
        if blk >= self.blocks_count {
            return Err(corrupt(format!(
                "block {blk} is past the end of the filesystem ({} blocks)",
                self.blocks_count
            )));
        }
        match self.journal.get(&blk) {
            Some(Replayed::At(at)) => self.meta.read_exact_at(buf, *at),
            Some(Replayed::Mem(b)) => {
                let n = buf.len().min(b.len());
                buf[..n].copy_from_slice(&b[..n]);
                Ok(())
            }
            None => self.meta.read_exact_at(buf, blk * self.bs),
        }
    }

    fn inode(&self, ino: u64) -> io::Result<Inode> {
        if ino == 0 || ino > self.inodes_count as u64 {
            return Err(corrupt(format!(
                "inode number {ino} is out of range (1..={})",
                self.inodes_count
            )));
        }
        let g = (ino - 1) / self.inodes_per_group as u64;
        let i = (ino - 1) % self.inodes_per_group as u64;
        let table = *self
            .itables
            .get(g as usize)
            .ok_or_else(|| corrupt(format!("inode {ino} is in a group past the end")))?;
        let byte = i * self.inode_size as u64;
        let blk = table + byte / self.bs;
        let within = (byte % self.bs) as usize;
        let mut b = vec![0u8; self.bs as usize];
        self.read_block(blk, &mut b)
            .map_err(|e| io::Error::new(e.kind(), format!("inode {ino}: {e}")))?;
        let r = &b[within..within + self.inode_size];
        let extra = if self.inode_size > 128 {
            le16(r, 128) as usize
        } else {
            0
        };
        let has = |off: usize| extra >= off + 4 - 128 && self.inode_size >= off + 4;
        let ext = |off: usize| has(off).then(|| le32(r, off));
        let flags = le32(r, 32);
        let mut blocks = le32(r, 28) as u64;
        if self.huge_file {
            blocks |= (le16(r, 116) as u64) << 32;
            if flags & FL_HUGE_FILE != 0 {
                blocks = blocks.saturating_mul(self.bs / 512);
            }
        }
        let mut iblock = [0u8; 60];
        iblock.copy_from_slice(&r[40..100]);
        let xattr_start = (128 + extra).min(self.inode_size);
        Ok(Inode {
            mode: le16(r, 0),
            uid: le16(r, 2) as u32 | (le16(r, 120) as u32) << 16,
            gid: le16(r, 24) as u32 | (le16(r, 122) as u32) << 16,
            size: le32(r, 4) as u64 | (le32(r, 108) as u64) << 32,
            links: le16(r, 26) as u32,
            atime: time(le32(r, 8), ext(140)),
            ctime: time(le32(r, 12), ext(132)),
            mtime: time(le32(r, 16), ext(136)),
            blocks512: blocks,
            flags,
            file_acl: le32(r, 104) as u64 | (le16(r, 118) as u64) << 32,
            iblock,
            ibody_xattr: r[xattr_start..].to_vec(),
        })
    }

    /// The `system.data` value of an inline-data inode.
    fn inline_xattr(ino: &Inode) -> Vec<u8> {
        let x = &ino.ibody_xattr;
        if x.len() < 4 || le32(x, 0) != 0xEA02_0000 {
            return Vec::new();
        }
        let first = 4;
        let mut p = first;
        while p + 16 <= x.len() {
            if le32(x, p) == 0 {
                break;
            }
            let name_len = x[p] as usize;
            let index = x[p + 1];
            let voff = le16(x, p + 2) as usize;
            let vsize = le32(x, p + 8) as usize;
            let name = x.get(p + 16..p + 16 + name_len).unwrap_or(&[]);
            if index == 7 && name == b"data" {
                return x
                    .get(first + voff..first + voff + vsize)
                    .map(|v| v.to_vec())
                    .unwrap_or_default();
            }
            p += (16 + name_len + 3) & !3;
        }
        Vec::new()
    }

    /// The logical-to-physical map of a file, cached per inode.
    fn runs(&self, node: NodeId, ino: &Inode) -> io::Result<Arc<Vec<Run>>> {
        if let Some(r) = self.maps.get(&node) {
            return Ok(r);
        }
        let mut out = Vec::new();
        let nblocks = ino.size.div_ceil(self.bs);
        if ino.flags & FL_EXTENTS != 0 {
            let mut budget = 1_000_000usize;
            self.walk_extents(&ino.iblock, None, &mut out, &mut budget)
                .map_err(|e| corrupt(format!("inode {node}: extent tree: {e}")))?;
            out.sort_by_key(|r| r.lblk);
        } else {
            let mut lblk = 0u64;
            let ptrs: Vec<u64> = (0..15).map(|i| le32(&ino.iblock, i * 4) as u64).collect();
            for (i, &p) in ptrs.iter().enumerate() {
                if lblk >= nblocks {
                    break;
                }
                let level = i.saturating_sub(11) as u32; // 0 direct, 1-3 indirect
                self.walk_indirect(p, level, &mut lblk, nblocks, &mut out)
                    .map_err(|e| corrupt(format!("inode {node}: block map: {e}")))?;
            }
        }
        // Merge neighbours so that big reads become single disk reads.
        let mut merged: Vec<Run> = Vec::with_capacity(out.len());
        for r in out {
            if r.pblk
                .checked_add(r.len)
                .is_none_or(|end| end > self.blocks_count)
            {
                return Err(corrupt(format!(
                    "inode {node}: blocks {}..{} are past the end of the filesystem",
                    r.pblk,
                    r.pblk.saturating_add(r.len)
                )));
            }
            if let Some(last) = merged.last_mut() {
                if r.lblk < last.lblk + last.len {
                    return Err(corrupt(format!(
                        "inode {node}: overlapping extents at block {}",
                        r.lblk
                    )));
                }
                if last.lblk + last.len == r.lblk
                    && last.pblk + last.len == r.pblk
                    && last.unwritten == r.unwritten
                {
                    last.len += r.len;
                    continue;
                }
            }
            merged.push(r);
        }
        let merged = Arc::new(merged);
        self.maps.insert(node, merged.clone(), merged.len() + 1);
        Ok(merged)
    }

    fn walk_extents(
        &self,
        node: &[u8],
        depth: Option<u16>,
        out: &mut Vec<Run>,
        budget: &mut usize,
    ) -> Result<(), String> {
        if node.len() < 12 || le16(node, 0) != 0xF30A {
            return Err("bad extent header magic".into());
        }
        let entries = le16(node, 2) as usize;
        let d = le16(node, 6);
        if let Some(want) = depth {
            if d != want {
                return Err(format!("node depth {d}, expected {want}"));
            }
        }
        if d > 5 {
            return Err(format!("depth {d} is more than ext4 allows"));
        }
        if 12 + entries * 12 > node.len() {
            return Err(format!(
                "{entries} entries do not fit in a node of {} bytes",
                node.len()
            ));
        }
        *budget = budget.checked_sub(entries + 1).ok_or("too many extents")?;
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if d == 0 {
                let mut len = le16(e, 4) as u64;
                let unwritten = len > 32768;
                if unwritten {
                    len -= 32768;
                }
                let pblk = (le16(e, 6) as u64) << 32 | le32(e, 8) as u64;
                if len > 0 {
                    out.push(Run {
                        lblk: le32(e, 0) as u64,
                        len,
                        pblk,
                        unwritten,
                    });
                }
            } else {
                let child = (le16(e, 8) as u64) << 32 | le32(e, 4) as u64;
                let mut b = vec![0u8; self.bs as usize];
                self.read_block(child, &mut b).map_err(|e| e.to_string())?;
                self.walk_extents(&b, Some(d - 1), out, budget)?;
            }
        }
        Ok(())
    }

    /// ext2/3 block maps: `level` 0 is a direct pointer, 1-3 indirect.
    fn walk_indirect(
        &self,
        ptr: u64,
        level: u32,
        lblk: &mut u64,
        nblocks: u64,
        out: &mut Vec<Run>,
    ) -> Result<(), String> {
        let per = self.bs / 4;
        let span = per.pow(level);
        if ptr == 0 {
            *lblk += span; // a hole
            return Ok(());
        }
        if level == 0 {
            out.push(Run {
                lblk: *lblk,
                len: 1,
                pblk: ptr,
                unwritten: false,
            });
            *lblk += 1;
            return Ok(());
        }
        let mut b = vec![0u8; self.bs as usize];
        self.read_block(ptr, &mut b).map_err(|e| e.to_string())?;
        for i in 0..per as usize {
            if *lblk >= nblocks {
                break;
            }
            self.walk_indirect(le32(&b, i * 4) as u64, level - 1, lblk, nblocks, out)?;
        }
        Ok(())
    }

    /// Reads file bytes at `offset` (already clipped to the file size).
    fn read_data(
        &self,
        node: NodeId,
        ino: &Inode,
        offset: u64,
        buf: &mut [u8],
        dev: &dyn ReadAt,
    ) -> io::Result<()> {
        if ino.flags & FL_INLINE_DATA != 0 {
            // Inline data lives in the inode (60 bytes) and its in-inode
            // xattr; a size claiming more is damage.
            let mut d = ino.iblock.to_vec();
            d.extend(Self::inline_xattr(ino));
            if ino.size > d.len() as u64 {
                return Err(corrupt(format!(
                    "inode {node}: inline data of {} bytes claimed, the inode holds at most {}",
                    ino.size,
                    d.len()
                )));
            }
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            return Ok(());
        }
        let runs = self.runs(node, ino)?;
        let bs = self.bs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let lblk = pos / bs;
            let idx = runs.partition_point(|r| r.lblk <= lblk);
            let cur = idx
                .checked_sub(1)
                .map(|i| runs[i])
                .filter(|r| lblk < r.lblk + r.len);
            match cur {
                Some(r) if !r.unwritten => {
                    let end = ((r.lblk + r.len) * bs - pos).min((buf.len() - done) as u64) as usize;
                    let chunk = &mut buf[done..done + end];
                    let pblk = r.pblk + (lblk - r.lblk);
                    let within = pos % bs;
                    let replayed = self
                        .journal
                        .range(pblk..pblk + (within + end as u64).div_ceil(bs))
                        .next()
                        .is_some();
                    if replayed {
                        // Rare: a journalled data block. Go block by block.
                        let mut b = vec![0u8; bs as usize];
                        let mut k = 0usize;
                        while k < chunk.len() {
                            let p = pos + k as u64;
                            self.read_block(r.pblk + (p / bs - r.lblk), &mut b)?;
                            let w = (p % bs) as usize;
                            let n = (bs as usize - w).min(chunk.len() - k);
                            chunk[k..k + n].copy_from_slice(&b[w..w + n]);
                            k += n;
                        }
                    } else {
                        dev.read_exact_at(chunk, pblk * bs + within)?;
                    }
                    done += end;
                }
                Some(r) => {
                    let end = ((r.lblk + r.len) * bs - pos).min((buf.len() - done) as u64) as usize;
                    buf[done..done + end].fill(0);
                    done += end;
                }
                None => {
                    let next = runs.get(idx).map(|r| r.lblk * bs).unwrap_or(u64::MAX);
                    let end = (next - pos).min((buf.len() - done) as u64) as usize;
                    buf[done..done + end].fill(0);
                    done += end;
                }
            }
        }
        Ok(())
    }

    /// Reads a whole small file-like object (a directory, a slow symlink,
    /// the journal's blocks) through the metadata cache.
    fn read_all(&self, node: NodeId, ino: &Inode, limit: u64) -> io::Result<Vec<u8>> {
        if ino.size > limit {
            return Err(corrupt(format!(
                "inode {node} claims {} bytes, more than the {limit} allowed here",
                ino.size
            )));
        }
        let mut v = vec![0u8; ino.size as usize];
        self.read_data(node, ino, 0, &mut v, &*self.meta)?;
        Ok(v)
    }

    /// For the journal replay: map a journal inode's logical block.
    pub(crate) fn journal_block_offset(&self, jino: u64, lblk: u64) -> io::Result<u64> {
        let ino = self.inode(jino)?;
        let runs = self.runs(jino, &ino)?;
        let idx = runs.partition_point(|r| r.lblk <= lblk);
        match idx
            .checked_sub(1)
            .map(|i| runs[i])
            .filter(|r| lblk < r.lblk + r.len && !r.unwritten)
        {
            Some(r) => Ok((r.pblk + lblk - r.lblk) * self.bs),
            None => Err(corrupt(format!("journal block {lblk} is not mapped"))),
        }
    }

    pub(crate) fn journal_len_blocks(&self, jino: u64) -> io::Result<u64> {
        Ok(self.inode(jino)?.size / self.bs)
    }

    pub(crate) fn meta(&self) -> &dyn ReadAt {
        &*self.meta
    }

    fn parse_dir_block(
        &self,
        dir: NodeId,
        b: &[u8],
        out: &mut Vec<(Vec<u8>, u64, u8)>,
    ) -> io::Result<()> {
        let filetype = self.incompat & INCOMPAT_FILETYPE != 0;
        let mut pos = 0usize;
        while pos + 8 <= b.len() {
            let ino = le32(b, pos) as u64;
            let mut rec = le16(b, pos + 4) as usize;
            if rec == 0 || (rec == 65535 && b.len() >= 65536) {
                rec = b.len() - pos;
            }
            if rec < 8 || pos + rec > b.len() {
                return Err(corrupt(format!(
                    "directory inode {dir}: entry at byte {pos} of a block has length {rec}"
                )));
            }
            let (name_len, ft) = if filetype {
                (b[pos + 6] as usize, b[pos + 7])
            } else {
                (le16(b, pos + 6) as usize, 0)
            };
            if ino != 0 && name_len > 0 && 8 + name_len <= rec {
                let name = &b[pos + 8..pos + 8 + name_len];
                if name != b"." && name != b".." {
                    out.push((name.to_vec(), ino, ft));
                }
            }
            pos += rec;
        }
        Ok(())
    }

    fn list(&self, dir: NodeId) -> io::Result<Arc<Listing>> {
        if let Some(l) = self.dirs.get(&dir) {
            return Ok(l);
        }
        let ino = self.inode(dir)?;
        if ino.kind() != Kind::Dir {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let mut raw = Vec::new();
        if ino.flags & FL_INLINE_DATA != 0 {
            // 4 bytes of parent inode, then entries; more in system.data.
            self.parse_dir_block(dir, &ino.iblock[4..], &mut raw)?;
            let x = Self::inline_xattr(&ino);
            if !x.is_empty() {
                self.parse_dir_block(dir, &x, &mut raw)?;
            }
        } else {
            // A directory has no holes: its size cannot exceed what it has
            // allocated (a damaged size must not make us allocate gigabytes).
            let limit =
                MAX_DIR_BYTES.min(ino.blocks512.saturating_mul(512).saturating_add(self.bs));
            let data = self.read_all(dir, &ino, limit)?;
            for b in data.chunks(self.bs as usize) {
                self.parse_dir_block(dir, b, &mut raw)?;
            }
        }
        let mut entries = Vec::with_capacity(raw.len());
        for (name, node, ft) in raw {
            let kind = match ft {
                1 => Kind::File,
                2 => Kind::Dir,
                7 => Kind::Symlink,
                3 => Kind::CharDevice,
                4 => Kind::BlockDevice,
                5 => Kind::Fifo,
                6 => Kind::Socket,
                _ => self.inode(node).map(|i| i.kind()).unwrap_or(Kind::File),
            };
            entries.push(DirEntry { name, node, kind });
        }
        let l = Listing::new(entries);
        self.dirs.insert(dir, l.clone(), l.weight());
        Ok(l)
    }
}

impl GuestFs for Ext4 {
    fn format(&self) -> &'static str {
        self.format
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn attr(&self, node: NodeId) -> io::Result<Attr> {
        let i = self.inode(node)?;
        let kind = i.kind();
        Ok(Attr {
            kind,
            size: match kind {
                Kind::File | Kind::Dir | Kind::Symlink => i.size,
                _ => 0,
            },
            perm: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            nlink: i.links.max(1),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            blocks: i.blocks512,
            rdev: i.rdev(),
        })
    }

    fn read_dir(&self, dir: NodeId) -> io::Result<Arc<[DirEntry]>> {
        Ok(self.list(dir)?.entries.clone())
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> io::Result<Option<NodeId>> {
        Ok(self.list(dir)?.find(name))
    }

    fn read(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let ino = self.inode(node)?;
        match ino.kind() {
            Kind::File => {}
            Kind::Dir => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("inode {node} is not a regular file"),
                ))
            }
        }
        if offset >= ino.size {
            return Ok(0);
        }
        let n = (ino.size - offset).min(buf.len() as u64) as usize;
        self.read_data(node, &ino, offset, &mut buf[..n], &*self.data)?;
        Ok(n)
    }

    fn read_link(&self, node: NodeId) -> io::Result<Vec<u8>> {
        let ino = self.inode(node)?;
        if ino.kind() != Kind::Symlink {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if ino.size > 4096 {
            return Err(corrupt(format!(
                "symlink inode {node} claims a {}-byte target",
                ino.size
            )));
        }
        let fast = ino.flags & (FL_EXTENTS | FL_INLINE_DATA) == 0
            && ino.size < 60
            && (ino.blocks512 == 0 || (ino.file_acl != 0 && ino.blocks512 == self.bs / 512));
        if fast {
            return Ok(ino.iblock[..ino.size as usize].to_vec());
        }
        self.read_all(node, &ino, 4096)
    }
}

/// Big-endian helper for the journal module.
pub(crate) fn be32_at(b: &[u8], o: usize) -> u32 {
    be32(b, o)
}
