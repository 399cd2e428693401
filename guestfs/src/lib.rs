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
use std::sync::Arc;
use std::time::SystemTime;

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
    /// Devices, fifos, sockets: listed, with size 0 and no data.
    Other,
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
pub fn volumes(disk: Disk) -> Vec<Volume> {
    let _ = disk;
    unimplemented!("built by the guest-formats work of issue 6")
}
