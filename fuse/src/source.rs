//! Where points in time come from.

use std::io;
use std::time::SystemTime;

use chainvault_guestfs::Disk;

/// One completed point in time of one disk.
#[derive(Debug, Clone)]
pub struct PointInfo {
    /// The VM's name as the catalog has it (any bytes; the tree makes it a
    /// safe file name).
    pub vm: String,
    pub disk_id: u32,
    /// The VM-level backup id (ids sort in creation order).
    pub backup_id: String,
    /// When the backup started: names the point directory.
    pub created: SystemTime,
    /// When this disk's backup completed (directory mtime), if known.
    pub completed: Option<SystemTime>,
    /// Virtual size of the disk in bytes.
    pub size: u64,
    /// The contents of `info.json`.
    pub info_json: Vec<u8>,
    /// Why the point's bytes may be wrong (it, or a point it reads
    /// through, failed deep verify): shown as `WARNING.txt` beside
    /// `disk.raw`, and logged when the point is first opened.
    pub warning: Option<String>,
}

/// A catalog of points and a way to read them.
pub trait Source: Send + Sync + 'static {
    /// One line saying where this reads from (for logs and `statfs`).
    fn describe(&self) -> String;
    /// Every completed point. An error keeps the previous listing in place.
    fn list(&self) -> Result<Vec<PointInfo>, String>;
    /// Open a point's whole disk for reading. Called again after an idle
    /// close (see [`crate::LazyDisk`]), so it must be repeatable.
    fn open(&self, point: &PointInfo) -> io::Result<Disk>;
}
