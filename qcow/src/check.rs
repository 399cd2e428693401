//! Consistency check and leak repair, straight from the on-disk structures.
//!
//! [`check`] rebuilds the reference count every host cluster should have from
//! everything that points into the file (header, active and snapshot L1/L2
//! tables, data and compressed clusters, refcount table and blocks, snapshot
//! table, persistent bitmaps) and compares it with the refcounts stored on
//! disk. It classifies what it finds the way `qemu-img check` does, so that
//! [`CheckReport::exit_code`] has the same meaning and, on the same file, the
//! same value as `qemu-img check`'s exit status:
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | no problem |
//! | 1 | the check could not be completed (`check_errors`) |
//! | 2 | corruptions: data may be wrong or further writes may corrupt it |
//! | 3 | only leaked clusters: wasted space, no harm to data |
//!
//! What counts as what follows QEMU's `block/qcow2-refcount.c`,
//! `qcow2-snapshot.c` and `qcow2-bitmap.c`:
//!
//! - *corruptions*: on-disk refcount lower than the number of references;
//!   COPIED flag on an L1 or L2 entry that disagrees with the on-disk refcount
//!   (set iff the refcount is 1); COPIED set on a compressed entry; L2 tables,
//!   data clusters, preallocated zero clusters or refcount blocks not aligned
//!   to the cluster size; reserved bits set in L1, L2 or refcount table
//!   entries; extended-L2 subclusters marked both allocated and zero, or
//!   allocated without a host cluster, or a compressed entry with a subcluster
//!   bitmap; a reference that ends a cluster or more past the end of the file;
//!   a refcount block outside the file or shared with other metadata; more
//!   references to a cluster than the refcount width can hold (overflow);
//!   snapshot table entries of a version 3 image without the mandatory extra
//!   data; a misaligned or oversized snapshot L1 table.
//! - *leaks*: on-disk refcount higher than the number of references.
//! - *check errors*: a refcount block offset that is not cluster-aligned (its
//!   refcounts cannot be read); a snapshot table that is too large or has too
//!   much extra data; persistent bitmaps whose directory or tables QEMU refuses
//!   to load; an L1 or refcount table whose offset QEMU refuses; a file with
//!   more than 2^31 clusters; a reference the in-memory table cannot hold. In
//!   all of these QEMU either cannot open the image or aborts the check, and
//!   `qemu-img check` exits with 1.
//!
//! Memory stays bounded on hostile files: the expected-refcount table has one
//! byte per cluster of the *file* (plus a map for the rare counts above 254),
//! tables are only read where they lie inside the file (the rest reads as
//! zeros, as QEMU's block layer does past end-of-file), table sizes are bounded
//! by the header limits, and refcount blocks are read through a small cache.
//! Nothing the file says can make this code panic.
//!
//! Leak repair ([`CheckOptions::repair_leaks`]) lowers the on-disk refcount of
//! leaked clusters to the number of references found, nothing else: it
//! rewrites only the bytes of those refcount entries, fsyncs, and checks again.
//! The image must not be open for writing anywhere else while it runs:
//! chainvault repairs only images it is not serving; repair refuses to start
//! when another process holds QEMU's image locks or a `flock` on the file, but
//! it cannot see every writer, so callers must guarantee this.
//!
//! Where this deliberately differs from `qemu-img check`:
//!
//! - Headers that [`Header::parse`] refuses give `Err` (treat it as exit 1).
//!   QEMU's check would open a few of them: no refcount table
//!   (`refcount_table_clusters == 0` or offset 0), an L1 table at offset 0,
//!   external data files, encryption.
//! - When QEMU aborts its check (exit 1) the report still carries what was
//!   found up to that point.
//! - Repair never touches corruptions (QEMU's `-r all` would rebuild
//!   refcounts and rewrite COPIED flags). Leaks are repaired even when
//!   corruptions are present, where `qemu-img check -r leaks` refuses to do
//!   anything if a refcount is zero but referenced; nothing is repaired when
//!   the check could not be completed, nor in a refcount block that is shared
//!   with other metadata.
//! - Bytes past the image end are not truncated (neither does QEMU for qcow2).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, Header};
use crate::meta::{self, Geometry};

/// At most this many problems are listed in a report; the counters stay exact.
const MAX_LISTED_PROBLEMS: usize = 1000;
/// Budget for cached refcount blocks while comparing.
const REFBLOCK_CACHE_BYTES: u64 = 8 << 20;

// QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c).
const QEMU_MAX_SNAPSHOTS: u64 = 65536;
const QEMU_MAX_SNAPSHOTS_SIZE: u64 = 1024 * QEMU_MAX_SNAPSHOTS;
const QEMU_MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// Known part of a snapshot's extra data: vm_state_size_large, disk_size, icount.
const SNAPSHOT_KNOWN_EXTRA: u32 = 24;
/// Version 3 images need at least vm_state_size_large and disk_size.
const SNAPSHOT_V3_MIN_EXTRA: u32 = 16;
const QEMU_MAX_BITMAPS: u32 = 65535;
const QEMU_MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * QEMU_MAX_BITMAPS as u64;
const BITMAP_DIR_ENTRY_LEN: u64 = 24;
const BME_MAX_TABLE_SIZE: u32 = 0x0800_0000;
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
const BME_MIN_GRANULARITY_BITS: u8 = 9;
const BME_MAX_GRANULARITY_BITS: u8 = 31;
const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
const BME_FLAG_IN_USE: u32 = 1;
const BME_TYPE_DIRTY_TRACKING: u8 = 1;
const BME_TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_TABLE_ALL_ONES: u64 = 1;
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// QEMU's block layer refuses (EIO) any request that ends past this offset.
const QEMU_MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);

/// Whether QEMU's block layer accepts a read of `len` bytes at `off` (it fails
/// the read with EIO otherwise, and then gives up on what it was reading).
fn qemu_can_read(off: u64, len: u64) -> bool {
    off <= QEMU_MAX_REQUEST_END && len <= QEMU_MAX_REQUEST_END && off <= QEMU_MAX_REQUEST_END - len
}

/// What [`check`] should do besides checking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Lower the on-disk refcount of leaked clusters to the number of references
    /// found, then check again. Corruptions are left alone. Nothing is repaired
    /// when the check could not be completed (`check_errors > 0`). The image must
    /// not be open for writing by any other process or `Image` while this runs.
    pub repair_leaks: bool,
}

/// How serious a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A corruption, or a reason the check could not be completed.
    Error,
    /// A leaked cluster: wasted space, no harm to data.
    Leak,
    /// Informational: something was skipped or not listed.
    Warning,
}

/// One finding, in words that name the structure and the offsets involved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

/// The result of [`check`]. Counters have the meaning of `qemu-img check`'s.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Errors that may corrupt data (or already did).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their number of references.
    pub leaks: u64,
    /// Problems that kept the check from completing.
    pub check_errors: u64,
    /// Leaked clusters whose refcount was repaired (with `repair_leaks`).
    pub leaks_fixed: u64,
    /// Corruptions repaired. Always 0: corruptions are never repaired.
    pub corruptions_fixed: u64,
    /// The findings, at most 1000 of them (the counters are exact).
    pub problems: Vec<Problem>,
    /// End of the last cluster in use or with a nonzero refcount.
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Virtual clusters allocated in the active L1/L2 tables.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active L1/L2 tables.
    pub compressed_clusters: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit status: 0 clean, 1 check not completed,
    /// 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// True when nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// A human summary close to `qemu-img check`'s.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if self.leaks_fixed > 0 || self.corruptions_fixed > 0 {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            ));
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                ));
            }
            if self.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                ));
            }
            if self.check_errors > 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                ));
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                pct(self.allocated_clusters, self.total_clusters),
                pct(self.fragmented_clusters, self.allocated_clusters),
                pct(self.compressed_clusters, self.allocated_clusters),
            ));
        }
        if self.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        s
    }
}

/// Check the QCOW2 image at `path`, and with `opts.repair_leaks` repair its
/// leaked clusters.
///
/// Returns `Err` only when the file cannot be read or its header is not a
/// usable QCOW2 header; every problem past the header is described in the
/// report. With repair, the report is that of a second check of the repaired
/// file, with `leaks_fixed` set.
///
/// The file must not be written by anyone while it is checked; for repair it
/// must not even be open for writing elsewhere.
pub fn check(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let checker = Checker::run(path)?;
    if !opts.repair_leaks || checker.report.leaks == 0 {
        return Ok(checker.report);
    }
    if checker.report.check_errors > 0 || checker.aborted {
        let mut report = checker.report;
        report.problems.push(Problem {
            severity: Severity::Warning,
            message: "leaks were not repaired because the check could not be completed".to_string(),
        });
        return Ok(report);
    }
    let (fixed, skipped) = checker.repair_leaks()?;
    drop(checker);
    let mut report = Checker::run(path)?.report;
    report.leaks_fixed = fixed;
    for m in skipped {
        report.problems.push(Problem {
            severity: Severity::Warning,
            message: m,
        });
    }
    Ok(report)
}

/// Expected refcounts, one byte per cluster; counts of 255 and more live in a map.
#[derive(Debug, Default)]
struct Imrt {
    small: Vec<u8>,
    big: HashMap<u64, u64>,
}

impl Imrt {
    /// A table of `n` zero counts, or None if the memory cannot be had.
    fn new(n: u64) -> Option<Imrt> {
        let n = usize::try_from(n).ok()?;
        let mut small = Vec::new();
        small.try_reserve_exact(n).ok()?;
        small.resize(n, 0);
        Some(Imrt {
            small,
            big: HashMap::new(),
        })
    }

    fn len(&self) -> u64 {
        self.small.len() as u64
    }

    fn get(&self, k: u64) -> u64 {
        let Ok(i) = usize::try_from(k) else { return 0 };
        match self.small.get(i) {
            Some(255) => self.big.get(&k).copied().unwrap_or(255),
            Some(&v) => v as u64,
            None => 0,
        }
    }

    fn set(&mut self, k: u64, v: u64) {
        let Ok(i) = usize::try_from(k) else { return };
        if let Some(slot) = self.small.get_mut(i) {
            if v >= 255 {
                *slot = 255;
                if v > 255 {
                    self.big.insert(k, v);
                } else {
                    self.big.remove(&k);
                }
            } else {
                *slot = v as u8;
                self.big.remove(&k);
            }
        }
    }
}

/// A read of part of the file: bytes past `data` (past end-of-file) read as zeros.
struct ZeroTail {
    data: Vec<u8>,
}

impl ZeroTail {
    fn byte(&self, off: u64) -> u8 {
        usize::try_from(off)
            .ok()
            .and_then(|i| self.data.get(i))
            .copied()
            .unwrap_or(0)
    }
    fn be(&self, off: u64, n: u64) -> u64 {
        (0..n).fold(0u64, |acc, i| {
            (acc << 8) | self.byte(off.saturating_add(i)) as u64
        })
    }
    fn u16(&self, off: u64) -> u16 {
        self.be(off, 2) as u16
    }
    fn u32(&self, off: u64) -> u32 {
        self.be(off, 4) as u32
    }
    fn u64(&self, off: u64) -> u64 {
        self.be(off, 8)
    }
}

/// Why the check stopped early: an I/O failure, or a condition in which QEMU
/// aborts its check (already counted as a check error).
enum Stop {
    Io(Error),
    Abort,
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Io(e)
    }
}

type Step<T = ()> = std::result::Result<T, Stop>;

/// Whose L1/L2 tables are being walked, for messages.
#[derive(Clone)]
enum Owner {
    Active,
    Snapshot {
        index: usize,
        id: String,
        name: String,
    },
}

impl Owner {
    fn describe(&self) -> String {
        match self {
            Owner::Active => "active".to_string(),
            Owner::Snapshot { index, id, name } => {
                format!("snapshot {index} (id {id:?}, name {name:?})")
            }
        }
    }
}

/// An internal snapshot, as read from the snapshot table.
struct Snapshot {
    l1_table_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
}

/// A persistent bitmap, as read from the bitmap directory.
struct Bitmap {
    name: String,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
}

/// Cluster type as QEMU classifies an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterType {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

fn cluster_type(raw: u64, extended: bool) -> ClusterType {
    if raw & meta::COMPRESSED != 0 {
        ClusterType::Compressed
    } else if raw & meta::ZERO != 0 && !extended {
        if raw & meta::L2_OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if raw & meta::L2_OFFSET_MASK == 0 {
        ClusterType::Unallocated
    } else {
        ClusterType::Normal
    }
}

fn be64_at(buf: &[u8], off: usize) -> u64 {
    match buf.get(off..off.saturating_add(8)) {
        Some(b) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        }
        None => 0,
    }
}

fn be32_at(buf: &[u8], off: usize) -> u32 {
    match buf.get(off..off.saturating_add(4)) {
        Some(b) => {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            u32::from_be_bytes(a)
        }
        None => 0,
    }
}

/// Size in bytes of a bitmap table QEMU expects for a bitmap of `disk_size`
/// bytes at 2^`granularity_bits` bytes per bit: the bits are serialised in
/// 64-bit words, stored in whole clusters.
fn expected_bitmap_table_size(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    if disk_size == 0 {
        return 0;
    }
    let words = ((disk_size - 1) >> granularity_bits >> 6) + 1;
    (words * 8).div_ceil(cluster_size)
}

/// Reads the refcounts stored on disk, through a small cache of refcount blocks.
struct DiskRefcounts {
    /// Refcount table entries that lie inside the file; the rest read as zero.
    table: Vec<u64>,
    /// Entries the header declares.
    declared: u64,
    cache: Vec<(u64, Vec<u8>)>,
    cache_cap: usize,
}

/// Outcome of reading one on-disk refcount.
enum DiskRc {
    Value(u64),
    /// The refcount block offset is not cluster-aligned, or lies where QEMU
    /// cannot read: the refcount cannot be known.
    Unreadable {
        rt_index: u64,
        offset: u64,
    },
}

struct Checker<'p> {
    path: &'p Path,
    file: File,
    file_len: u64,
    h: Header,
    geo: Geometry,
    cb: u32,
    cs: u64,
    refmax: u64,
    /// QEMU's `nb_clusters`: clusters in the file, grown by references just past it.
    nb: u64,
    imrt: Imrt,
    disk: DiskRefcounts,
    active_l1: Vec<u8>,
    report: CheckReport,
    unlisted: u64,
    aborted: bool,
    l2_buf: Vec<u8>,
}

impl<'p> Checker<'p> {
    /// Open and check the image; the checker keeps what repair needs.
    fn run(path: &'p Path) -> Result<Checker<'p>> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let first_len = file_len.min(1u64 << header::MAX_CLUSTER_BITS) as usize;
        let mut first = vec![0u8; first_len];
        file.read_exact_at(&mut first, 0)
            .map_err(|e| Error::io(path, "read header", e))?;
        precheck_header(&first, path)?;
        let h = Header::parse(&first, path)?;
        let geo = Geometry::from_header(&h);
        let cb = h.cluster_bits;
        let cs = geo.cluster_size;
        let mut c = Checker {
            path,
            file,
            file_len,
            refmax: geo.max_refcount(),
            geo,
            cb,
            cs,
            nb: 0,
            imrt: Imrt::default(),
            disk: DiskRefcounts {
                table: Vec::new(),
                declared: h.refcount_table_clusters as u64 * (cs / 8),
                cache: Vec::new(),
                cache_cap: (REFBLOCK_CACHE_BYTES / cs).max(4) as usize,
            },
            active_l1: Vec::new(),
            report: CheckReport {
                total_clusters: ((h.size / 512) * 512).div_ceil(cs),
                ..CheckReport::default()
            },
            unlisted: 0,
            aborted: false,
            l2_buf: vec![0u8; cs as usize],
            h,
        };
        match c.run_steps(&first) {
            Ok(()) => {}
            Err(Stop::Io(e)) => return Err(e),
            Err(Stop::Abort) => c.aborted = true,
        }
        if c.unlisted > 0 {
            c.report.problems.push(Problem {
                severity: Severity::Warning,
                message: format!(
                    "{} further problems were counted but are not listed",
                    c.unlisted
                ),
            });
        }
        Ok(c)
    }

    // ----- reporting -----

    fn note(&mut self, severity: Severity, msg: impl FnOnce() -> String) {
        if self.report.problems.len() < MAX_LISTED_PROBLEMS {
            self.report.problems.push(Problem {
                severity,
                message: msg(),
            });
        } else {
            self.unlisted += 1;
        }
    }

    fn corruption(&mut self, msg: impl FnOnce() -> String) {
        self.report.corruptions += 1;
        self.note(Severity::Error, msg);
    }

    fn leak(&mut self, msg: impl FnOnce() -> String) {
        self.report.leaks += 1;
        self.note(Severity::Leak, msg);
    }

    fn check_error(&mut self, msg: impl FnOnce() -> String) {
        self.report.check_errors += 1;
        self.note(Severity::Error, || {
            format!("check could not be completed: {}", msg())
        });
    }

    /// Count a check error and stop, as QEMU does when it cannot open the image
    /// or aborts its check.
    fn abort<T>(&mut self, msg: impl FnOnce() -> String) -> Step<T> {
        self.check_error(msg);
        Err(Stop::Abort)
    }

    // ----- reading -----

    /// Read `len` bytes at `off`, or as many as lie inside the file. The caller
    /// treats what is missing as zeros (QEMU reads zeros past end-of-file).
    /// The result is padded with zeros to a multiple of 8 bytes (at most `len`).
    fn read_avail(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        if off >= self.file_len || len == 0 {
            return Ok(Vec::new());
        }
        let avail = (self.file_len - off).min(len);
        let mut buf = vec![0u8; avail as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(self.path, "read", e))?;
        let padded = avail.next_multiple_of(8).min(len);
        buf.resize(padded as usize, 0);
        Ok(buf)
    }

    /// Fill `buf` from `off`, zeros past end-of-file.
    fn read_zero_filled(
        file: &File,
        path: &Path,
        file_len: u64,
        off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        buf.fill(0);
        if off >= file_len {
            return Ok(());
        }
        let avail = (file_len - off).min(buf.len() as u64) as usize;
        if let Some(head) = buf.get_mut(..avail) {
            file.read_exact_at(head, off)
                .map_err(|e| Error::io(path, "read", e))?;
        }
        Ok(())
    }

    /// The on-disk refcount of cluster `k`.
    fn disk_refcount(&mut self, k: u64) -> Result<DiskRc> {
        let rb_bits = self.cb + 3 - self.h.refcount_order;
        let rt_index = k >> rb_bits;
        if rt_index >= self.disk.declared {
            return Ok(DiskRc::Value(0));
        }
        let entry = usize::try_from(rt_index)
            .ok()
            .and_then(|i| self.disk.table.get(i))
            .copied()
            .unwrap_or(0);
        let offset = entry & meta::REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(DiskRc::Value(0));
        }
        if offset & (self.cs - 1) != 0 || !qemu_can_read(offset, self.cs) {
            return Ok(DiskRc::Unreadable { rt_index, offset });
        }
        let idx = k & (self.geo.rb_entries - 1);
        let order = self.h.refcount_order;
        if let Some(pos) = self.disk.cache.iter().position(|(o, _)| *o == offset) {
            if pos != 0 {
                let e = self.disk.cache.remove(pos);
                self.disk.cache.insert(0, e);
            }
            if let Some((_, block)) = self.disk.cache.first() {
                return Ok(DiskRc::Value(meta::get_refcount(block, order, idx)));
            }
        }
        let mut block = if self.disk.cache.len() >= self.disk.cache_cap {
            self.disk.cache.pop().map(|(_, b)| b).unwrap_or_default()
        } else {
            Vec::new()
        };
        block.resize(self.cs as usize, 0);
        Self::read_zero_filled(&self.file, self.path, self.file_len, offset, &mut block)?;
        let v = meta::get_refcount(&block, order, idx);
        self.disk.cache.insert(0, (offset, block));
        Ok(DiskRc::Value(v))
    }

    // ----- reference counting -----

    /// Count one reference to every cluster `[offset, offset + size)` touches,
    /// as QEMU's `qcow2_inc_refcounts_imrt` does.
    fn inc(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String) -> Step {
        if size == 0 {
            return Ok(());
        }
        // QEMU does this in signed 64-bit arithmetic.
        let end_past_eof = offset as i64 as i128 + size as i128 - self.file_len as i128;
        if end_past_eof >= self.cs as i128 {
            let file_len = self.file_len;
            self.corruption(|| {
                format!(
                    "{} at {offset:#x} ({size} bytes) lies past the end of the file ({file_len} bytes)",
                    what()
                )
            });
            return Ok(());
        }
        let mask = !(self.cs - 1);
        let start = offset & mask;
        let last = offset.wrapping_add(size - 1) & mask;
        let mut c = start;
        loop {
            let k = c >> self.cb;
            if k >= self.imrt.len() {
                return self.abort(|| {
                    format!(
                        "{} at {offset:#x} ({size} bytes) cannot be counted: the offset is out of range",
                        what()
                    )
                });
            }
            if k >= self.nb {
                self.nb = k + 1;
            }
            let v = self.imrt.get(k);
            if v >= self.refmax {
                let refmax = self.refmax;
                let bits = self.h.refcount_bits();
                self.corruption(|| {
                    format!(
                        "host cluster at {c:#x} is referenced more than {refmax} times, the most {bits}-bit refcounts can hold ({} is one more); widen the refcounts with qemu-img amend -o refcount_bits=16 or copy the image with qemu-img convert",
                        what()
                    )
                });
            } else {
                self.imrt.set(k, v + 1);
            }
            if c >= last {
                break;
            }
            c += self.cs;
        }
        Ok(())
    }

    // ----- the steps -----

    fn run_steps(&mut self, first: &[u8]) -> Step {
        let cs = self.cs;
        // What QEMU validates when it opens the image.
        self.validate_table_offsets()?;
        let bitmaps = self.load_bitmaps(first)?;

        // Snapshot table (QEMU reads it first, and gives up if it cannot).
        let (snapshots, snapshots_size) = self.read_snapshot_table()?;

        // The expected-refcount table, sized by the file.
        let nb = self.file_len.div_ceil(cs);
        if nb > i32::MAX as u64 {
            return self.abort(|| {
                format!("the file has {nb} clusters, more than the 2^31 a check can handle")
            });
        }
        self.nb = nb;
        self.imrt = match Imrt::new(nb + 1) {
            Some(t) => t,
            None => {
                return self
                    .abort(|| format!("not enough memory for the refcounts of {nb} clusters"))
            }
        };
        // The refcount table as QEMU loads it when opening.
        let rt = self.read_avail(
            self.h.refcount_table_offset,
            self.disk.declared.saturating_mul(8),
        )?;
        self.disk.table = rt.chunks_exact(8).map(|b| be64_at(b, 0)).collect();

        // Header.
        self.inc(0, cs, &|| "the header cluster".to_string())?;

        // Active L1 and everything below it.
        let l1_off = self.h.l1_table_offset;
        let l1_size = self.h.l1_size;
        self.check_l1(l1_off, l1_size, &Owner::Active, true)?;

        // Internal snapshots.
        for (i, sn) in snapshots.iter().enumerate() {
            let owner = Owner::Snapshot {
                index: i,
                id: sn.id.clone(),
                name: sn.name.clone(),
            };
            if sn.l1_table_offset & (cs - 1) != 0 {
                let off = sn.l1_table_offset;
                self.corruption(|| {
                    format!(
                        "{}: L1 table offset {off:#x} is not aligned to the {cs}-byte cluster size; snapshot table entry corrupted",
                        owner.describe()
                    )
                });
                continue;
            }
            if sn.l1_size as u64 > header::MAX_L1_BYTES / 8 {
                let n = sn.l1_size;
                self.corruption(|| {
                    format!(
                        "{}: L1 table of {n} entries is larger than the {}-byte limit; snapshot table entry corrupted",
                        owner.describe(),
                        header::MAX_L1_BYTES
                    )
                });
                continue;
            }
            self.check_l1(sn.l1_table_offset, sn.l1_size, &owner, false)?;
        }
        let sn_off = self.h.snapshots_offset;
        self.inc(sn_off, snapshots_size, &|| "the snapshot table".to_string())?;

        // Refcount table.
        let rt_off = self.h.refcount_table_offset;
        let rt_bytes = self.disk.declared * 8;
        self.inc(rt_off, rt_bytes, &|| "the refcount table".to_string())?;

        // Persistent bitmaps.
        if let Some((dir_off, dir_size, list)) = bitmaps {
            self.count_bitmaps(dir_off, dir_size, &list)?;
        }

        // Refcount blocks.
        self.check_refblocks()?;

        // Compare with what the disk says.
        self.compare()?;

        // COPIED flags of the active tables.
        self.check_copied()?;
        Ok(())
    }

    /// Header values QEMU refuses when opening the image (so `qemu-img check`
    /// fails), beyond what [`Header::parse`] rejects.
    fn validate_table_offsets(&mut self) -> Step {
        let bfo = self.h.backing_file_offset;
        if bfo > self.cs {
            return self.abort(|| {
                format!("the backing file name offset {bfo:#x} lies outside the first cluster")
            });
        }
        if self.h.incompatible_features & header::incompat::COMPRESSION_TYPE != 0
            && self.h.compression_type == header::CompressionType::Deflate
        {
            return self.abort(|| {
                "the compression-type incompatible bit is set, but the compression type is deflate (zlib), for which it must be clear".to_string()
            });
        }
        let max = i64::MAX as u64;
        let l1_bytes = self.h.l1_size as u64 * 8;
        let l1_off = self.h.l1_table_offset;
        if max - l1_bytes < l1_off || (l1_bytes > 0 && !qemu_can_read(l1_off, l1_bytes)) {
            return self.abort(|| {
                format!(
                    "the active L1 table offset {l1_off:#x} is invalid (it would end past 2^63)"
                )
            });
        }
        let rt_bytes = self.h.refcount_table_clusters as u64 * self.cs;
        let rt_off = self.h.refcount_table_offset;
        if max - rt_bytes < rt_off || !qemu_can_read(rt_off, rt_bytes) {
            return self.abort(|| {
                format!("the refcount table offset {rt_off:#x} is invalid (it would end past 2^63)")
            });
        }
        Ok(())
    }

    fn check_l1(&mut self, l1_off: u64, l1_size: u32, owner: &Owner, frag: bool) -> Step {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size as u64 * 8;
        self.inc(l1_off, bytes, &|| {
            format!("the {} L1 table", owner.describe())
        })?;
        if !qemu_can_read(l1_off, bytes) {
            return self.abort(|| {
                format!(
                    "the {} L1 table at {l1_off:#x} cannot be read",
                    owner.describe()
                )
            });
        }
        let table = self.read_avail(l1_off, bytes)?;
        let cs = self.cs;
        for i in 0..table.len() / 8 {
            let e = be64_at(&table, i * 8);
            if e == 0 {
                continue;
            }
            if e & meta::L1_RESERVED_MASK != 0 {
                self.corruption(|| {
                    format!(
                        "{} L1 table at {l1_off:#x}: entry {i} ({e:#018x}) has reserved bits set",
                        owner.describe()
                    )
                });
            }
            let l2_off = e & meta::L1_OFFSET_MASK;
            self.inc(l2_off, cs, &|| {
                format!("the {} L2 table of L1 index {i}", owner.describe())
            })?;
            if l2_off & (cs - 1) != 0 {
                self.corruption(|| {
                    format!(
                        "{} L2 table at {l2_off:#x} (L1 index {i}) is not aligned to the {cs}-byte cluster size; L1 entry corrupted",
                        owner.describe()
                    )
                });
            }
            self.check_l2(l2_off, i as u64, owner, frag)?;
        }
        if matches!(owner, Owner::Active) {
            self.active_l1 = table;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2_off: u64, l1_index: u64, owner: &Owner, frag: bool) -> Step {
        let mut buf = std::mem::take(&mut self.l2_buf);
        let r = Self::read_zero_filled(&self.file, self.path, self.file_len, l2_off, &mut buf);
        if let Err(e) = r {
            self.l2_buf = buf;
            return Err(e.into());
        }
        let r = self.check_l2_entries(&buf, l2_off, l1_index, owner, frag);
        self.l2_buf = buf;
        r
    }

    fn check_l2_entries(
        &mut self,
        table: &[u8],
        l2_off: u64,
        l1_index: u64,
        owner: &Owner,
        frag: bool,
    ) -> Step {
        let ext = self.geo.extended_l2;
        let esz = self.geo.l2_entry_size as usize;
        let cs = self.cs;
        let cb = self.cb;
        let span_bits = self.geo.l2_span_bits;
        let mut next_contiguous = 0u64;
        let where_ = |i: u64| {
            let guest = (l1_index << span_bits).wrapping_add(i << cb);
            format!(
                "{} L2 table at {l2_off:#x} (L1 index {l1_index}), entry {i} (guest offset {guest:#x})",
                owner.describe()
            )
        };
        for i in 0..self.geo.l2_entries {
            let at = i as usize * esz;
            let raw = be64_at(table, at);
            let bitmap = if ext { be64_at(table, at + 8) } else { 0 };
            let ty = cluster_type(raw, ext);
            if ty != ClusterType::Compressed && raw & meta::L2_STD_RESERVED_MASK != 0 {
                self.corruption(|| {
                    format!("{}: entry {raw:#018x} has reserved bits set", where_(i))
                });
            }
            match ty {
                ClusterType::Compressed => {
                    if raw & meta::COPIED != 0 {
                        self.corruption(|| {
                            format!(
                                "{}: compressed cluster has the COPIED flag set, which it must never have",
                                where_(i)
                            )
                        });
                    }
                    if bitmap != 0 {
                        self.corruption(|| {
                            format!(
                                "{}: compressed cluster has a nonzero subcluster bitmap {bitmap:#018x}",
                                where_(i)
                            )
                        });
                        continue;
                    }
                    let (host, len) =
                        meta::compressed_extent(raw & !(meta::COMPRESSED | meta::COPIED), cb);
                    self.inc(host.0, len, &|| {
                        format!("the compressed data of {}", where_(i))
                    })?;
                    if frag {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let off = raw & meta::L2_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.corruption(|| {
                            format!(
                                "{}: subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero",
                                where_(i)
                            )
                        });
                    }
                    if off & (cs - 1) != 0 {
                        let has_data = if ext {
                            bitmap & meta::ALL_ALLOC_BITS != 0
                        } else {
                            raw & meta::ZERO == 0
                        };
                        let kind = if has_data {
                            "data cluster"
                        } else {
                            "preallocated zero cluster"
                        };
                        self.corruption(|| {
                            format!(
                                "{}: {kind} offset {off:#x} is not aligned to the {cs}-byte cluster size; L2 entry corrupted",
                                where_(i)
                            )
                        });
                    }
                    if frag {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = off.wrapping_add(cs);
                    }
                    self.inc(off, cs, &|| format!("the cluster of {}", where_(i)))?;
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & meta::ALL_ALLOC_BITS != 0 {
                        self.corruption(|| {
                            format!(
                                "{}: unallocated cluster has subclusters marked allocated (bitmap {bitmap:#018x})",
                                where_(i)
                            )
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Read and validate the snapshot table as QEMU's check does. Returns the
    /// snapshots and the table's size in bytes.
    fn read_snapshot_table(&mut self) -> Step<(Vec<Snapshot>, u64)> {
        let nb = self.h.nb_snapshots as u64;
        let base = self.h.snapshots_offset;
        if nb > QEMU_MAX_SNAPSHOTS {
            return self.abort(|| {
                format!("the snapshot table has {nb} entries, more than {QEMU_MAX_SNAPSHOTS}")
            });
        }
        if (i64::MAX as u64) - nb * SNAPSHOT_HEADER_LEN < base {
            return self.abort(|| format!("the snapshot table offset {base:#x} is invalid"));
        }
        let mut snapshots = Vec::new();
        let mut offset = base;
        let mut table_length = 0u64;
        for i in 0..nb {
            table_length = table_length.next_multiple_of(8);
            offset = offset.next_multiple_of(8);
            let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
            Self::read_zero_filled(&self.file, self.path, self.file_len, offset, &mut h)?;
            let entry_at = offset;
            offset += SNAPSHOT_HEADER_LEN;
            let l1_table_offset = be64_at(&h, 0);
            let l1_size = be32_at(&h, 8);
            let id_size = u16::from_be_bytes([h[12], h[13]]) as u64;
            let name_size = u16::from_be_bytes([h[14], h[15]]) as u64;
            let extra = be32_at(&h, 36);
            if extra > QEMU_MAX_SNAPSHOT_EXTRA_DATA {
                return self.abort(|| {
                    format!(
                        "snapshot table entry {i} at {entry_at:#x} has {extra} bytes of extra data, more than {QEMU_MAX_SNAPSHOT_EXTRA_DATA}; qemu-img check -r all can drop it"
                    )
                });
            }
            offset += extra.min(SNAPSHOT_KNOWN_EXTRA) as u64;
            if extra > SNAPSHOT_KNOWN_EXTRA {
                offset += (extra - SNAPSHOT_KNOWN_EXTRA) as u64;
            }
            let text = |c: &Self, at: u64, len: u64| -> Result<String> {
                let mut b = vec![0u8; len.min(64) as usize];
                Self::read_zero_filled(&c.file, c.path, c.file_len, at, &mut b)?;
                let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
                Ok(String::from_utf8_lossy(&b[..end]).into_owned())
            };
            let id = text(self, offset, id_size)?;
            offset += id_size;
            let name = text(self, offset, name_size)?;
            offset += name_size;
            if !qemu_can_read(entry_at, offset - entry_at) {
                return self
                    .abort(|| format!("snapshot table entry {i} at {entry_at:#x} cannot be read"));
            }
            table_length += SNAPSHOT_HEADER_LEN + extra as u64 + id_size + name_size;
            if table_length > QEMU_MAX_SNAPSHOTS_SIZE || offset - base > i32::MAX as u64 {
                return self.abort(|| {
                    format!("the snapshot table at {base:#x} is larger than {QEMU_MAX_SNAPSHOTS_SIZE} bytes")
                });
            }
            if self.h.version >= 3 && extra < SNAPSHOT_V3_MIN_EXTRA {
                self.corruption(|| {
                    format!(
                        "snapshot table entry {i} at {entry_at:#x} is incomplete: {extra} bytes of extra data, a version 3 image needs {SNAPSHOT_V3_MIN_EXTRA}"
                    )
                });
            }
            snapshots.push(Snapshot {
                l1_table_offset,
                l1_size,
                id,
                name,
            });
        }
        Ok((snapshots, offset - base))
    }

    /// Find the raw bitmaps extension (its length and reserved field) in the
    /// first cluster.
    fn raw_bitmaps_ext(&self, first: &[u8]) -> Option<(u32, u32)> {
        let mut off = if self.h.version >= 3 {
            self.h.header_length as usize
        } else {
            header::V2_HEADER_LEN
        };
        let end = if self.h.backing_file_offset != 0 {
            self.h.backing_file_offset
        } else {
            self.cs
        };
        let end = (end.min(first.len() as u64)) as usize;
        while off.saturating_add(8) <= end {
            let kind = be32_at(first, off);
            let len = be32_at(first, off + 4);
            off += 8;
            if kind == header::ext::END {
                return None;
            }
            if kind == header::ext::BITMAPS {
                return Some((len, be32_at(first, off + 4)));
            }
            off = off.saturating_add((len as usize).next_multiple_of(8));
        }
        None
    }

    /// Validate the bitmaps extension, directory and tables as QEMU does when it
    /// opens the image (it refuses to open an image whose bitmaps it cannot
    /// load). Returns the directory and bitmaps to count, if bitmaps are in use.
    #[allow(clippy::type_complexity)]
    fn load_bitmaps(&mut self, first: &[u8]) -> Step<Option<(u64, u64, Vec<Bitmap>)>> {
        let Some((len, reserved)) = self.raw_bitmaps_ext(first) else {
            return Ok(None);
        };
        if len != 24 {
            return self.abort(|| {
                format!("the bitmaps header extension is {len} bytes long instead of 24")
            });
        }
        if self.h.autoclear_features & header::autoclear::BITMAPS == 0 {
            self.note(Severity::Warning, || {
                "the bitmaps extension is present but its autoclear bit is clear: a program without bitmap support changed the image, so the bitmaps are inconsistent and ignored".to_string()
            });
            return Ok(None);
        }
        let Some(ext) = self.h.bitmaps() else {
            return Ok(None);
        };
        if reserved != 0 {
            return self
                .abort(|| "the bitmaps header extension has a nonzero reserved field".to_string());
        }
        let nb = ext.nb_bitmaps;
        if nb > QEMU_MAX_BITMAPS {
            return self
                .abort(|| format!("the image has {nb} bitmaps, more than {QEMU_MAX_BITMAPS}"));
        }
        if nb == 0 {
            return self.abort(|| "the bitmaps extension lists zero bitmaps".to_string());
        }
        let dir_off = ext.directory_offset;
        let dir_size = ext.directory_size;
        let cs = self.cs;
        if dir_off & (cs - 1) != 0 {
            return self.abort(|| {
                format!("the bitmap directory offset {dir_off:#x} is not aligned to the {cs}-byte cluster size")
            });
        }
        if dir_size > QEMU_MAX_BITMAP_DIRECTORY_SIZE {
            return self.abort(|| {
                format!("the bitmap directory is {dir_size} bytes, more than {QEMU_MAX_BITMAP_DIRECTORY_SIZE}")
            });
        }
        let list = match self.read_bitmap_directory(dir_off, dir_size, nb)? {
            Ok(list) => list,
            Err(why) => {
                return self.abort(|| {
                    format!("the bitmap directory at {dir_off:#x} cannot be loaded: {why}")
                })
            }
        };
        // QEMU loads every bitmap not marked in-use, and creates all of them by name.
        let mut names = std::collections::HashSet::new();
        for bm in &list {
            if !names.insert(bm.name.clone()) {
                let n = bm.name.clone();
                return self.abort(|| format!("two bitmaps are named {n:?}"));
            }
            if bm.flags & BME_FLAG_IN_USE != 0 {
                continue;
            }
            if let Err(why) = self.load_bitmap_table(bm)? {
                let n = bm.name.clone();
                return self.abort(|| format!("bitmap {n:?} cannot be loaded: {why}"));
            }
        }
        Ok(Some((dir_off, dir_size, list)))
    }

    fn read_bitmap_directory(
        &mut self,
        dir_off: u64,
        dir_size: u64,
        nb: u32,
    ) -> Result<std::result::Result<Vec<Bitmap>, String>> {
        if dir_size == 0 {
            return Ok(Err("its size is zero".to_string()));
        }
        if !qemu_can_read(dir_off, dir_size) {
            return Ok(Err(
                "it lies beyond the largest offset a file can have".to_string()
            ));
        }
        let dir = ZeroTail {
            data: self.read_avail(dir_off, dir_size)?,
        };
        let cs = self.cs;
        let disk_size = self.h.size;
        let mut list = Vec::new();
        let mut e = 0u64;
        let mut count = 0u32;
        while e < dir_size {
            if e + BITMAP_DIR_ENTRY_LEN > dir_size {
                return Ok(Err(
                    "broken directory: an entry runs past its end".to_string()
                ));
            }
            count += 1;
            if count > nb {
                return Ok(Err(format!(
                    "more bitmaps found than the {nb} in the header extension"
                )));
            }
            let table_offset = dir.u64(e);
            let table_size = dir.u32(e + 8);
            let flags = dir.u32(e + 12);
            let ty = dir.byte(e + 16);
            let gran = dir.byte(e + 17);
            let name_size = dir.u16(e + 18) as u64;
            let extra = dir.u32(e + 20) as u64;
            let entry_len = (BITMAP_DIR_ENTRY_LEN + name_size + extra).next_multiple_of(8);
            if e + entry_len > dir_size {
                return Ok(Err(
                    "broken directory: an entry runs past its end".to_string()
                ));
            }
            if extra != 0 {
                return Ok(Err("bitmap extra data is not supported".to_string()));
            }
            let name_bytes: Vec<u8> = (0..name_size)
                .map(|j| dir.byte(e + BITMAP_DIR_ENTRY_LEN + j))
                .collect();
            let name = String::from_utf8_lossy(&name_bytes).into_owned();
            let bad = table_size == 0
                || table_offset == 0
                || !table_offset.is_multiple_of(cs)
                || table_size > BME_MAX_TABLE_SIZE
                || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&gran)
                || flags & BME_RESERVED_FLAGS != 0
                || name_size > 1023
                || ty != BME_TYPE_DIRTY_TRACKING;
            if bad {
                return Ok(Err(format!(
                    "bitmap {name:?} does not satisfy the constraints"
                )));
            }
            let phys = table_size as u64 * cs;
            if phys > BME_MAX_PHYS_SIZE {
                return Ok(Err(format!(
                    "bitmap {name:?} does not satisfy the constraints (table too large)"
                )));
            }
            if flags & BME_FLAG_IN_USE == 0 && disk_size > ((phys * 8) << gran) {
                return Ok(Err(format!("bitmap {name:?} is too small for the disk")));
            }
            list.push(Bitmap {
                name,
                table_offset,
                table_size,
                flags,
                granularity_bits: gran,
            });
            e += entry_len;
        }
        if count != nb {
            return Ok(Err(format!(
                "fewer bitmaps found than the {nb} in the header extension"
            )));
        }
        Ok(Ok(list))
    }

    /// Check every entry of a bitmap table as QEMU does when loading it.
    fn load_bitmap_table(&mut self, bm: &Bitmap) -> Result<std::result::Result<(), String>> {
        if !qemu_can_read(bm.table_offset, bm.table_size as u64 * 8) {
            return Ok(Err(format!(
                "its table at {:#x} lies beyond the largest offset a file can have",
                bm.table_offset
            )));
        }
        let table = self.read_avail(bm.table_offset, bm.table_size as u64 * 8)?;
        let cs = self.cs;
        for i in 0..bm.table_size as usize {
            let e = be64_at(&table, i * 8);
            if let Err(why) = bitmap_entry_ok(e, cs) {
                return Ok(Err(format!(
                    "table entry {i} at {:#x}: {why}",
                    bm.table_offset + i as u64 * 8
                )));
            }
        }
        let expected = expected_bitmap_table_size(self.h.size, bm.granularity_bits, cs);
        if expected != bm.table_size as u64 || expected > BME_MAX_TABLE_SIZE as u64 {
            return Ok(Err(format!(
                "its table has {} entries but a bitmap of this disk at this granularity needs {expected}",
                bm.table_size
            )));
        }
        Ok(Ok(()))
    }

    fn count_bitmaps(&mut self, dir_off: u64, dir_size: u64, list: &[Bitmap]) -> Step {
        self.inc(dir_off, dir_size, &|| "the bitmap directory".to_string())?;
        let cs = self.cs;
        for bm in list {
            let name = bm.name.clone();
            self.inc(bm.table_offset, bm.table_size as u64 * 8, &|| {
                format!("the table of bitmap {name:?}")
            })?;
            if !qemu_can_read(bm.table_offset, bm.table_size as u64 * 8) {
                self.corruption(|| format!("the table of bitmap {name:?} cannot be read"));
                return self.abort(|| format!("the table of bitmap {name:?} cannot be loaded"));
            }
            let table = self.read_avail(bm.table_offset, bm.table_size as u64 * 8)?;
            for i in 0..bm.table_size as usize {
                let e = be64_at(&table, i * 8);
                if let Err(why) = bitmap_entry_ok(e, cs) {
                    self.corruption(|| format!("bitmap {name:?} table entry {i}: {why}"));
                    return self.abort(|| format!("the table of bitmap {name:?} cannot be loaded"));
                }
                let off = e & BME_TABLE_OFFSET_MASK;
                if off != 0 {
                    self.inc(off, cs, &|| format!("data cluster {i} of bitmap {name:?}"))?;
                }
            }
        }
        Ok(())
    }

    /// Account for the refcount blocks and check their placement.
    fn check_refblocks(&mut self) -> Step {
        let cs = self.cs;
        let n = self.disk.table.len();
        for i in 0..n {
            let entry = self.disk.table.get(i).copied().unwrap_or(0);
            let offset = entry & meta::REFT_OFFSET_MASK;
            let cluster = offset >> self.cb;
            if entry & REFT_RESERVED_MASK != 0 {
                self.corruption(|| {
                    format!("refcount table entry {i} ({entry:#018x}) has reserved bits set")
                });
                continue;
            }
            if offset & (cs - 1) != 0 {
                self.corruption(|| {
                    format!(
                        "refcount block {i} at {offset:#x} is not aligned to the {cs}-byte cluster size; refcount table entry corrupted"
                    )
                });
                continue;
            }
            if cluster >= self.nb {
                let file_len = self.file_len;
                self.corruption(|| {
                    format!("refcount block {i} at {offset:#x} is outside the image (the file is {file_len} bytes)")
                });
                continue;
            }
            if offset != 0 {
                self.inc(offset, cs, &|| format!("refcount block {i}"))?;
                let rc = self.imrt.get(cluster);
                if rc != 1 {
                    self.corruption(|| {
                        format!(
                            "refcount block {i} at {offset:#x} is referenced {rc} times: it overlaps other metadata or another refcount block"
                        )
                    });
                }
            }
        }
        Ok(())
    }

    /// Compare expected and on-disk refcounts of every cluster.
    fn compare(&mut self) -> Step {
        let cs = self.cs;
        let mut highest = 0u64;
        let mut last_bad_block = None;
        for k in 0..self.nb {
            let disk = match self.disk_refcount(k)? {
                DiskRc::Value(v) => v,
                DiskRc::Unreadable { rt_index, offset } => {
                    self.report.check_errors += 1;
                    if last_bad_block != Some(rt_index) {
                        last_bad_block = Some(rt_index);
                        let why = if offset & (cs - 1) != 0 {
                            format!("is not aligned to the {cs}-byte cluster size")
                        } else {
                            "lies beyond the largest offset a file can have".to_string()
                        };
                        self.note(Severity::Error, || {
                            format!(
                                "check could not be completed: the refcounts of host cluster {:#x} and the following clusters cannot be read, because refcount block {rt_index} at {offset:#x} {why}",
                                k * cs
                            )
                        });
                    }
                    continue;
                }
            };
            let expected = self.imrt.get(k);
            if disk > 0 || expected > 0 {
                highest = k;
            }
            if disk < expected {
                self.corruption(|| {
                    format!(
                        "host cluster {k} at {:#x}: refcount too low: {disk} on disk but {expected} references found (the cluster could be reallocated and overwritten)",
                        k * cs
                    )
                });
            } else if disk > expected {
                self.leak(|| {
                    format!(
                        "host cluster {k} at {:#x}: leaked: refcount {disk} on disk but {expected} references found",
                        k * cs
                    )
                });
            }
        }
        self.report.image_end_offset = (highest + 1) * cs;
        Ok(())
    }

    /// COPIED must be set on active L1 and L2 entries exactly when the on-disk
    /// refcount of what they point to is 1.
    fn check_copied(&mut self) -> Step {
        let l1 = std::mem::take(&mut self.active_l1);
        let r = self.check_copied_in(&l1);
        self.active_l1 = l1;
        r
    }

    fn check_copied_in(&mut self, l1: &[u8]) -> Step {
        let ext = self.geo.extended_l2;
        let esz = self.geo.l2_entry_size as usize;
        let cb = self.cb;
        let span_bits = self.geo.l2_span_bits;
        let mut buf = std::mem::take(&mut self.l2_buf);
        let mut result = Ok(());
        'l1: for i in 0..l1.len() / 8 {
            let e = be64_at(l1, i * 8);
            let l2_off = e & meta::L1_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let rc = match self.disk_refcount(l2_off >> cb) {
                Ok(DiskRc::Value(v)) => v,
                Ok(DiskRc::Unreadable { .. }) => continue,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            let copied = e & meta::COPIED != 0;
            if (rc == 1) != copied {
                self.corruption(|| {
                    format!(
                        "active L1 table entry {i} (L2 table at {l2_off:#x}): COPIED flag is {} but the L2 table's refcount is {rc}",
                        if copied { "set" } else { "clear" }
                    )
                });
            }
            if let Err(e) =
                Self::read_zero_filled(&self.file, self.path, self.file_len, l2_off, &mut buf)
            {
                result = Err(e.into());
                break;
            }
            for j in 0..self.geo.l2_entries {
                let raw = be64_at(&buf, j as usize * esz);
                let ty = cluster_type(raw, ext);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let data = raw & meta::L2_OFFSET_MASK;
                let rc = match self.disk_refcount(data >> cb) {
                    Ok(DiskRc::Value(v)) => v,
                    Ok(DiskRc::Unreadable { .. }) => continue,
                    Err(e) => {
                        result = Err(e.into());
                        break 'l1;
                    }
                };
                let copied = raw & meta::COPIED != 0;
                if (rc == 1) != copied {
                    let guest = ((i as u64) << span_bits).wrapping_add(j << cb);
                    self.corruption(|| {
                        format!(
                            "active L2 table at {l2_off:#x} (L1 index {i}), entry {j} (guest offset {guest:#x}): COPIED flag is {} but the refcount of data cluster {data:#x} is {rc}",
                            if copied { "set" } else { "clear" }
                        )
                    });
                }
            }
        }
        self.l2_buf = buf;
        result
    }

    // ----- repair -----

    /// Lower the on-disk refcount of every leaked cluster to its number of
    /// references. Returns the number of clusters fixed and messages about
    /// refcount blocks left alone.
    fn repair_leaks(&self) -> Result<(u64, Vec<String>)> {
        let path = self.path;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open for repair", e))?;
        ensure_not_in_use(&file, path)?;
        let len_now = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len_now != self.file_len {
            return Err(Error::InvalidArgument(format!(
                "{}: the file changed size during the check ({} → {len_now} bytes); it is in use, not repairing",
                path.display(),
                self.file_len
            )));
        }
        let cs = self.cs;
        let order = self.h.refcount_order;
        let rb_entries = self.geo.rb_entries;
        let mut fixed = 0u64;
        let mut skipped = Vec::new();
        let mut block = vec![0u8; cs as usize];
        for (i, &entry) in self.disk.table.iter().enumerate() {
            let offset = entry & meta::REFT_OFFSET_MASK;
            let first = i as u64 * rb_entries;
            if offset == 0 || first >= self.nb {
                continue;
            }
            if entry & REFT_RESERVED_MASK != 0 || offset & (cs - 1) != 0 || offset >= self.file_len
            {
                continue;
            }
            Self::read_zero_filled(&file, path, self.file_len, offset, &mut block)?;
            let end = (first + rb_entries).min(self.nb);
            let leaky = (first..end)
                .any(|k| meta::get_refcount(&block, order, k - first) > self.imrt.get(k));
            if !leaky {
                continue;
            }
            if self.imrt.get(offset >> self.cb) != 1 {
                skipped.push(format!(
                    "refcount block {i} at {offset:#x} was not repaired because it is shared with other metadata"
                ));
                continue;
            }
            let mut lo = usize::MAX;
            let mut hi = 0usize;
            for k in first..end {
                let idx = k - first;
                let disk = meta::get_refcount(&block, order, idx);
                let expected = self.imrt.get(k);
                if disk > expected {
                    meta::set_refcount(&mut block, order, idx, expected);
                    fixed += 1;
                    let (b0, b1) = entry_bytes(order, idx);
                    lo = lo.min(b0);
                    hi = hi.max(b1);
                }
            }
            if let Some(bytes) = block.get(lo..hi) {
                file.write_all_at(bytes, offset + lo as u64)
                    .map_err(|e| Error::io(path, "write refcount block", e))?;
            }
        }
        file.sync_all().map_err(|e| Error::io(path, "fsync", e))?;
        Ok((fixed, skipped))
    }
}

/// Refuse, before [`Header::parse`] sees them, header values QEMU refuses and
/// whose arithmetic could overflow: a backing file name offset outside the
/// first cluster.
fn precheck_header(first: &[u8], path: &Path) -> Result<()> {
    let cluster_bits = be32_at(first, 20);
    let bfo = be64_at(first, 8);
    if first.len() >= header::V2_HEADER_LEN
        && (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits)
        && bfo > 1u64 << cluster_bits
    {
        return Err(Error::format(
            path,
            "backing_file_offset",
            format!("{bfo:#x} lies outside the first cluster"),
        ));
    }
    Ok(())
}

/// Byte range `[start, end)` of refcount entry `idx` in a block of the given order.
fn entry_bytes(order: u32, idx: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    let start = (idx * bits / 8) as usize;
    let len = (bits / 8).max(1) as usize;
    (start, start + len)
}

/// Whether a bitmap table entry is valid, as QEMU's `check_table_entry`.
fn bitmap_entry_ok(e: u64, cs: u64) -> std::result::Result<(), &'static str> {
    if e & BME_TABLE_RESERVED_MASK != 0 {
        return Err("reserved bits are set");
    }
    let off = e & BME_TABLE_OFFSET_MASK;
    if off != 0 {
        if e & BME_TABLE_ALL_ONES != 0 {
            return Err("the all-ones flag is set together with an offset");
        }
        if !off.is_multiple_of(cs) {
            return Err("the data offset is not cluster-aligned");
        }
    }
    Ok(())
}

/// Refuse to repair an image another process holds open: QEMU marks its users
/// with open-file-description locks on bytes 100.. of the image, and other
/// chainvault writers would hold a `flock`.
fn ensure_not_in_use(file: &File, path: &Path) -> Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `flock` is plain data; zero is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 100;
    fl.l_len = 200;
    // SAFETY: F_OFD_GETLK on a descriptor we own, with a valid flock struct.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short {
        return Err(Error::InvalidArgument(format!(
            "{}: the image is open in another process (a QEMU lock is held); close it before repairing",
            path.display()
        )));
    }
    // SAFETY: flock on a descriptor we own; the lock is released when `file` is closed.
    let r = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::InvalidArgument(format!(
                "{}: the image is open for writing elsewhere; close it before repairing",
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imrt_counts_past_a_byte() {
        let mut t = Imrt::new(4).unwrap();
        for v in [0u64, 1, 254, 255, 256, 70000, u64::MAX, 3] {
            t.set(2, v);
            assert_eq!(t.get(2), v);
        }
        assert!(t.big.is_empty(), "small values leave no entry in the map");
        t.set(99, 5); // out of range: ignored, no panic
        assert_eq!(t.get(99), 0);
        assert_eq!(t.get(u64::MAX), 0);
    }

    #[test]
    fn imrt_allocation_failure_is_reported() {
        assert!(Imrt::new(u64::MAX).is_none());
    }

    #[test]
    fn entry_byte_ranges() {
        assert_eq!(entry_bytes(0, 0), (0, 1));
        assert_eq!(entry_bytes(0, 9), (1, 2));
        assert_eq!(entry_bytes(2, 3), (1, 2));
        assert_eq!(entry_bytes(4, 3), (6, 8));
        assert_eq!(entry_bytes(6, 2), (16, 24));
    }

    #[test]
    fn cluster_types_follow_qemu() {
        assert_eq!(cluster_type(0, false), ClusterType::Unallocated);
        assert_eq!(cluster_type(1, false), ClusterType::ZeroPlain);
        assert_eq!(cluster_type(0x10000 | 1, false), ClusterType::ZeroAlloc);
        assert_eq!(cluster_type(0x10000 | 1, true), ClusterType::Normal);
        assert_eq!(cluster_type(1, true), ClusterType::Unallocated);
        assert_eq!(
            cluster_type(meta::COMPRESSED | 5, false),
            ClusterType::Compressed
        );
        assert_eq!(
            cluster_type(meta::COPIED | 0x20000, false),
            ClusterType::Normal
        );
    }

    #[test]
    fn bitmap_table_size_matches_qemu_serialisation() {
        // 1 GiB at 64 KiB granularity: 16384 bits = 256 words = 2 KiB: one cluster.
        assert_eq!(expected_bitmap_table_size(1 << 30, 16, 65536), 1);
        // 64 GiB at 512 B granularity: 2^27 bits = 16 MiB: 256 clusters.
        assert_eq!(expected_bitmap_table_size(64 << 30, 9, 65536), 256);
        assert_eq!(expected_bitmap_table_size(0, 16, 65536), 0);
        assert_eq!(expected_bitmap_table_size(1, 16, 512), 1);
    }

    #[test]
    fn zero_tail_reads_zeros_past_data() {
        let z = ZeroTail {
            data: vec![1, 2, 3],
        };
        assert_eq!(z.u16(1), 0x0203);
        assert_eq!(z.u32(2), 0x0300_0000);
        assert_eq!(z.u64(u64::MAX - 2), 0);
    }

    #[test]
    fn exit_codes_and_summary() {
        let mut r = CheckReport::default();
        assert_eq!(r.exit_code(), 0);
        assert!(r.summary().contains("No errors were found on the image."));
        r.leaks = 2;
        assert_eq!(r.exit_code(), 3);
        assert!(r
            .summary()
            .contains("2 leaked clusters were found on the image."));
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        assert!(r.summary().contains("1 errors were found on the image."));
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn bitmap_entries() {
        assert!(bitmap_entry_ok(0, 65536).is_ok());
        assert!(bitmap_entry_ok(1, 65536).is_ok());
        assert!(bitmap_entry_ok(0x10000, 65536).is_ok());
        assert!(bitmap_entry_ok(0x10001, 65536).is_err());
        assert!(bitmap_entry_ok(0x10200, 65536).is_err());
        assert!(bitmap_entry_ok(2, 65536).is_err());
    }
}
