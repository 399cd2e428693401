//! Read-only access to what a guest stored on its disk: partition tables
//! (MBR with extended partitions, GPT) and the filesystems inside them
//! (ext2/3/4, NTFS, FAT12/16/32).
//!
//! Everything here works over [`ReadAt`], a random-access byte source of
//! known size. The FUSE tree hands in a qcow2 chain (or an NBD restore
//! export); tests hand in plain files.
//!
//! The contract with the FUSE layer:
//! - [`volumes`] lists what a disk holds. Every volume either opened as a
//!   [`GuestFs`] or carries the reason it could not, so the caller can show
//!   the raw bytes and an `ERROR.txt` instead of an empty directory.
//! - A [`GuestFs`] names files by [`NodeId`]s that stay valid and stable for
//!   the life of that object, so the caller can map them to its own inodes.
//! - Nothing here panics on a damaged disk: bad bytes become `io::Error`s.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::SystemTime;

mod cache;
mod disk;
mod ext4;
mod fat;
mod jbd2;
mod lznt1;
mod ntfs;
mod ntfs_compressed;
pub mod part;

pub use disk::{CachedDisk, FileDisk, MemDisk, SliceDisk};

/// A random-access, read-only byte source of known size.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill all of `buf` from `offset`. Reading past [`ReadAt::size`] is an
    /// `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A shared disk or volume.
pub type Disk = Arc<dyn ReadAt>;

/// Identifies one file, directory or symlink within one [`GuestFs`].
pub type NodeId = u64;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Named pipe (size 0, no data).
    Fifo,
    /// Unix socket (size 0, no data).
    Socket,
    /// Character device; its number is [`Attr::rdev`].
    CharDevice,
    /// Block device; its number is [`Attr::rdev`].
    BlockDevice,
}

/// The guest's view of a node.
#[derive(Debug, Clone)]
pub struct Attr {
    pub kind: Kind,
    /// Length in bytes (for a symlink, the length of its target).
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Allocated size in 512-byte units (smaller than `size / 512` for a
    /// sparse file).
    pub blocks: u64,
    /// Device number of a device node, as Linux encodes it (`makedev`);
    /// 0 otherwise.
    pub rdev: u32,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// The name as raw bytes (UTF-8 for every format we read; NTFS and FAT
    /// long names are converted from UTF-16).
    pub name: Vec<u8>,
    pub node: NodeId,
    pub kind: Kind,
}

/// A mounted, read-only guest filesystem.
pub trait GuestFs: Send + Sync {
    /// Short name of the format: `"ext4"`, `"ntfs"`, `"fat32"`, ...
    fn format(&self) -> &'static str;
    /// The root directory.
    fn root(&self) -> NodeId;
    fn attr(&self, node: NodeId) -> io::Result<Attr>;
    /// The whole listing, without `.` and `..`, in an order that does not
    /// change between calls (offsets into it are readdir cookies).
    fn read_dir(&self, dir: NodeId) -> io::Result<Arc<[DirEntry]>>;
    /// Find `name` in `dir`.
    fn lookup(&self, dir: NodeId, name: &[u8]) -> io::Result<Option<NodeId>> {
        Ok(self
            .read_dir(dir)?
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.node))
    }
    /// Read up to `buf.len()` bytes at `offset`; returns how many were read
    /// (0 at or past the end). Holes read as zeroes.
    fn read(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The target of a symlink.
    fn read_link(&self, node: NodeId) -> io::Result<Vec<u8>>;
}

/// One volume found on a disk.
pub struct Volume {
    /// Directory name: `p<N>` or `p<N>-<label>` (label made filename-safe),
    /// or `whole` for a filesystem on the bare disk.
    pub name: String,
    /// The volume's bytes.
    pub dev: Disk,
    /// The filesystem, or why it could not be opened (unknown format,
    /// damaged superblock, ...), in words for a person.
    pub fs: Result<Arc<dyn GuestFs>, String>,
}

/// List the volumes of `disk`. Never fails: a disk with no partition table
/// and no filesystem yields one `whole` volume whose `fs` says so.
///
/// Metadata is read through one bounded [`CachedDisk`] shared by all the
/// volumes of the disk; file data (ext4 extents) is read from `disk` itself
/// in large pieces.
pub fn volumes(disk: Disk) -> Vec<Volume> {
    let cached: Disk = Arc::new(CachedDisk::with_defaults(disk.clone()));
    let whole = |fs: Result<Arc<dyn GuestFs>, String>| Volume {
        name: "whole".into(),
        dev: disk.clone(),
        fs,
    };
    match read_table(&*cached) {
        Ok(part::Table::None) => vec![whole(open_fs(cached.clone(), disk.clone()))],
        Ok(part::Table::Gpt(parts)) | Ok(part::Table::Mbr(parts)) if parts.is_empty() => {
            vec![whole(Err("the partition table lists no partitions".into()))]
        }
        Ok(part::Table::Gpt(parts)) | Ok(part::Table::Mbr(parts)) => parts
            .into_iter()
            .map(|p| {
                let name = match p.label.as_deref().map(part::safe_label) {
                    Some(l) if !l.is_empty() => format!("p{}-{}", p.number, l),
                    _ => format!("p{}", p.number),
                };
                let raw = SliceDisk::new(disk.clone(), p.start, p.len);
                let meta = SliceDisk::new(cached.clone(), p.start, p.len);
                match (raw, meta) {
                    (Ok(raw), Ok(meta)) => {
                        let raw: Disk = Arc::new(raw);
                        Volume {
                            name,
                            dev: raw.clone(),
                            fs: open_fs(Arc::new(meta), raw),
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => Volume {
                        name,
                        dev: Arc::new(MemDisk(Vec::new())),
                        fs: Err(format!("partition {}: {e}", p.number)),
                    },
                }
            })
            .collect(),
        Err(reason) => {
            // A damaged table: a filesystem on the bare disk may still open.
            let fs = open_fs(cached.clone(), disk.clone())
                .map_err(|e| format!("the partition table is damaged ({reason}), and the disk itself does not open: {e}"));
            vec![whole(fs)]
        }
    }
}

/// Which partition table, if any, `disk` has.
pub fn read_table(disk: &dyn ReadAt) -> Result<part::Table, String> {
    if part::has_protective_mbr(disk) {
        return match part::read_gpt(disk)? {
            Some(p) => Ok(part::Table::Gpt(p)),
            None => Err("a protective MBR announces a GPT, but neither GPT header (LBA 1, last LBA) is there".into()),
        };
    }
    // A FAT or NTFS boot sector ends in 55 AA like an MBR: look first.
    let mut s = [0u8; 512];
    if disk.read_exact_at(&mut s, 0).is_ok() && (ntfs::Ntfs::probe(&s) || fat::Fat::probe(&s)) {
        return Ok(part::Table::None);
    }
    if let Some(p) = part::read_mbr(disk)? {
        return Ok(part::Table::Mbr(p));
    }
    if let Ok(Some(p)) = part::read_gpt(disk) {
        return Ok(part::Table::Gpt(p));
    }
    Ok(part::Table::None)
}

/// Opens the filesystem of one volume: `meta` is the cached view used for
/// metadata, `raw` the same bytes uncached, for bulk file data. Returns why
/// not, in words, for an unknown or damaged filesystem; never panics.
pub fn open_fs(meta: Disk, raw: Disk) -> Result<Arc<dyn GuestFs>, String> {
    match catch_unwind(AssertUnwindSafe(|| open_fs_inner(meta, raw))) {
        Ok(r) => r,
        Err(_) => Err("the filesystem reader failed on damaged metadata (a bug: please report it with the image)".into()),
    }
}

fn open_fs_inner(meta: Disk, raw: Disk) -> Result<Arc<dyn GuestFs>, String> {
    let size = meta.size();
    if size < 512 {
        return Err(format!(
            "the volume is only {size} bytes: too small for any filesystem"
        ));
    }
    let mut head = vec![0u8; size.min(4096) as usize];
    meta.read_exact_at(&mut head, 0)
        .map_err(|e| format!("cannot read the start of the volume: {e}"))?;
    if ntfs::Ntfs::probe(&head) {
        return Ok(Arc::new(ntfs::Ntfs::open(meta)?));
    }
    if ext4::Ext4::probe(&head) {
        return Ok(Arc::new(ext4::Ext4::open(meta, raw)?));
    }
    if fat::Fat::probe(&head) {
        return Ok(Arc::new(fat::Fat::open(meta)?));
    }
    Err(unknown_reason(&*meta, &head))
}

/// Why nothing was recognised, as precisely as cheap probes allow.
fn unknown_reason(meta: &dyn ReadAt, head: &[u8]) -> String {
    let at = |o: usize, m: &[u8]| head.get(o..o + m.len()) == Some(m);
    let other = if at(3, b"EXFAT   ") {
        Some("exFAT")
    } else if at(0, b"XFSB") {
        Some("XFS")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS (encrypted)")
    } else if at(512, b"LABELONE") {
        Some("an LVM physical volume")
    } else if head.len() >= 4096 && at(4086, b"SWAPSPACE2") {
        Some("Linux swap")
    } else {
        let mut b = [0u8; 8];
        if meta.read_exact_at(&mut b, 0x10040).is_ok() && &b == b"_BHRfS_M" {
            Some("btrfs")
        } else {
            None
        }
    };
    if let Some(o) = other {
        return format!("{o} is not supported (this reader opens ext2/3/4, NTFS and FAT12/16/32)");
    }
    // A zeroed ext superblock with intact backups is a common damage.
    for (bs, blk) in [(1024u64, 8193u64), (2048, 16384), (4096, 32768)] {
        let mut m = [0u8; 2];
        let off = blk * bs + 56;
        if meta.read_exact_at(&mut m, off).is_ok() && u16::from_le_bytes(m) == 0xEF53 {
            return format!(
                "no filesystem signature at the start, but a backup ext2/3/4 superblock is at block {blk} ({bs}-byte blocks): \
                 the primary superblock is damaged (e2fsck -b {blk} -B {bs} on a copy would repair it)"
            );
        }
    }
    if head.iter().all(|&b| b == 0) {
        "no filesystem: the first 4 KiB of the volume are all zero (unformatted, or its superblock was wiped)".into()
    } else {
        "no filesystem recognised: no ext2/3/4, NTFS or FAT signature (unknown format or damaged superblock)".into()
    }
}
