//! `chainvault-fuse`: every point in time of every disk as a read-only FUSE
//! file tree, for file-level restore.
//!
//! ```text
//! /<vm>/disk<N>/<point>/disk.raw        the whole disk at that point
//! /<vm>/disk<N>/<point>/info.json       backup id, type, parent, change_id, digest, sizes, times
//! /<vm>/disk<N>/<point>/WARNING.txt     only when the point, or one it reads through, failed deep verify
//! /<vm>/disk<N>/<point>/<volume>/...    the guest's files (guestfs), or
//!                      <volume>/volume.raw + ERROR.txt when its filesystem cannot be read
//! /<vm>/disk<N>/latest -> <newest point>
//! /by-id/<backup-id>/disk<N> -> ../../<vm>/disk<N>/<point>
//! ```
//!
//! The tree does not know where points come from: a [`Source`] lists them
//! and opens a point's disk as a [`guestfs::Disk`]. The binary has two: the
//! repository directory read through sidecars and qcow2 chains, and a running
//! daemon (HTTP catalog + NBD restore exports).
//!
//! * [`source`]: the [`Source`] trait and [`PointInfo`].
//! * [`disk`]: [`ChainDisk`] (a qcow2 chain as a byte source), [`LazyDisk`]
//!   (opened on first read, closed again when idle), and the panic guard
//!   around guest readers.
//! * [`catalog`]: the listing of points, rescanned with a short TTL so that new
//!   backups appear without a remount.
//! * [`point`]: one point, its volumes found lazily on first access.
//! * [`inodes`]: the table between tree nodes and FUSE inode numbers.
//! * [`fs`]: the [`fuser::Filesystem`] implementation.
//! * [`mount`]: mounting in the foreground, leaving on SIGINT/SIGTERM or an
//!   external unmount.

pub mod catalog;
pub mod disk;
pub mod fs;
pub mod inodes;
pub mod mount;
pub mod naming;
pub mod point;
pub mod source;

pub use chainvault_guestfs as guestfs;
pub use disk::{ChainDisk, LazyDisk};
pub use fs::{RestoreFs, TreeOptions};
pub use mount::{block_termination_signals, mount_foreground, MountOptions};
pub use source::{PointInfo, Source};
