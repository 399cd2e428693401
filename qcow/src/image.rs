//! One QCOW2 image file: read, write, write-zeroes, discard, flush, block status.
//!
//! This file holds the image's state, opening it and the L2 cache; what is
//! done with it lives beside it in `image/`, by what it does: `read` (guest reads,
//! compressed clusters, block status), `alloc` (the refcount allocator),
//! `write` (planning and carrying out writes), `zero` (write-zeroes and
//! discard) and `flush` (metadata made durable in crash-safe order).
//!
//! # Concurrency
//!
//! An [`Image`] is shared between threads (`&self` everywhere). There is no
//! image-wide lock on the data path:
//!
//! - Each L2 table lives in a [`Slot`] of the L2 cache. A slot has a mutex for
//!   its table (`st`), held only while entries are looked up or changed, and an
//!   I/O gate (`io`, a read-write lock). Readers and writers hold the gate shared
//!   while they read or write guest data, so data I/O of many requests runs in
//!   parallel, even inside one L2 table. Operations that free host clusters
//!   (discard, write-zeroes) hold it exclusive, so no one is reading or writing a
//!   cluster while it is freed.
//! - A write that changes a mapping (allocates a cluster, fills a subcluster)
//!   marks that guest cluster *in flight*, releases the table mutex, writes the
//!   data, then takes the mutex again to publish the new entry. Other requests
//!   touching an in-flight cluster wait for it; requests on other clusters do not.
//! - The refcount allocator has its own mutex, held for the few microseconds an
//!   allocation takes (no I/O except loading a refcount block).
//!
//! Lock order: slot `io` → slot `st` → allocator → L1. The cache map lock is
//! never held while another is taken.
//!
//! # Crash safety
//!
//! Metadata is write-back cached and reaches the file only in [`Image::flush`],
//! in this order, each step made durable (fdatasync) before the next:
//!
//! 1. guest data (every write whose mapping is about to be published);
//! 2. refcount blocks and refcount table entries (increases);
//! 3. L2 tables;
//! 4. L1 entries;
//! 5. refcount decreases for clusters whose last reference was dropped in
//!    steps 3-4. A freed cluster is reused only after this step.
//!
//! A crash at any point therefore leaves an image whose metadata is the state of
//! the last completed flush plus, at worst, clusters with a refcount and no
//! reference (leaks, which `check` repairs). Never a reference without a
//! refcount, never a mapping to data that was not written.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::chain::Chain;
use crate::compress::decompress;
use crate::error::{Error, Result};
use crate::header::{self, CompressionType, Header};
use crate::meta::{
    be64, compressed_extent, get_refcount, set_refcount, sub_state, Geometry, HostOffset, L2Entry,
    SubState, ALL_ALLOC_BITS, ALL_ZERO_BITS, COPIED, L1_OFFSET_MASK, REFT_OFFSET_MASK,
};

mod alloc;
mod flush;
mod read;
mod write;
mod zero;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub writable: bool,
    /// Memory budget for cached L2 tables, in bytes.
    pub l2_cache_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            l2_cache_bytes: 32 << 20,
        }
    }
}

/// What a range of the virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Data stored in a layer.
    Data,
    /// Reads as zeros, recorded as such in a layer.
    Zero,
    /// No layer holds it: reads as zeros (or from a backing file not attached).
    Unallocated,
}

/// A run of the virtual disk with one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// Layer that supplies it (0 = top). For unallocated runs, the bottom layer's depth.
    pub depth: u32,
    /// Host offset of the data in that layer's file, where there is one.
    pub host_offset: Option<u64>,
    pub compressed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

struct L1 {
    entries: Vec<u64>,
    dirty: BTreeSet<usize>,
}

/// One L2 table in the cache.
struct Slot {
    io: RwLock<()>,
    st: Mutex<SlotState>,
    cv: Condvar,
}

struct SlotState {
    loaded: bool,
    /// Host offset of the table, 0 when the L1 entry is empty.
    table_off: u64,
    /// Raw entries, 1 (standard) or 2 (extended) u64 per guest cluster.
    raw: Vec<u64>,
    dirty: bool,
    /// L2 indices whose mapping is being changed.
    inflight: HashSet<u64>,
}

struct RefBlock {
    data: Vec<u8>,
}

struct Allocator {
    rt: Vec<u64>,
    /// Where the refcount table lives (it moves when it grows).
    rt_offset: u64,
    rt_clusters: u64,
    /// Set when the table moved since the last flush: the on-disk table the
    /// header still points to (offset, clusters).
    rt_moved: Option<(u64, u64)>,
    rt_dirty: BTreeSet<usize>,
    blocks: HashMap<u64, RefBlock>,
    dirty_blocks: BTreeSet<u64>,
    /// Next host cluster to try when appending.
    next: u64,
    /// Clusters whose refcount dropped to zero durably; safe to reuse.
    free: BTreeSet<u64>,
    /// Host clusters whose reference was dropped in memory; decremented at flush.
    pending_free: Vec<u64>,
}

/// What one guest sub-range of a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Data(u64),
    Zero,
    Unalloc,
    Compressed(u64),
}

/// One planned piece of a write within one L2 table.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Write the data straight to `host` (no mapping change).
    Direct { guest: u64, len: u64, host: u64 },
    /// The mapping of the cluster at L2 index `li` changes.
    Remap {
        li: u64,
        guest_cluster: u64,
        a: u64,
        b: u64,
        old: L2Entry,
        /// Host cluster to write into: an existing one (extended L2 in place), or
        /// assigned from a fresh allocation.
        host: Option<u64>,
        fresh: bool,
    },
}

/// An open QCOW2 image.
pub struct Image {
    path: PathBuf,
    file: File,
    geo: Geometry,
    header: Header,
    compression: CompressionType,
    writable: bool,
    has_backing_file: bool,
    backing: Option<Arc<Chain>>,
    l1: RwLock<L1>,
    cache: Mutex<HashMap<u64, Arc<Slot>>>,
    cache_cap: usize,
    alloc: Mutex<Allocator>,
    flush_lock: Mutex<()>,
    /// Bytes of the file that exist or are allocated; references beyond are invalid.
    end: AtomicU64,
    poisoned: AtomicBool,
    last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("size", &self.geo.size)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Image {
    /// Open one image file without its backing chain (unallocated ranges read as zeros).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        Image::open_with_backing(path, opts, None)
    }

    /// Open an image whose unallocated ranges read from `backing`.
    pub fn open_with_backing(
        path: &Path,
        opts: &OpenOptions,
        backing: Option<Arc<Chain>>,
    ) -> Result<Image> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(opts.writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let mut first = vec![0u8; (2u64 << 20).min(file_len) as usize];
        file.read_exact_at(&mut first, 0)
            .map_err(|e| Error::io(path, "read header", e))?;
        let header = Header::parse(&first, path)?;
        let geo = Geometry::from_header(&header);
        let cs = geo.cluster_size;
        let fail = |field: &'static str, detail: String| Error::format(path, field, detail);

        if opts.writable {
            let why = if header.version < 3 {
                Some("version 2 images are opened read-only (upgrade with qemu-img amend -o compat=1.1)".to_string())
            } else if header.incompatible_features & header::incompat::DIRTY != 0 {
                Some("the dirty bit is set (refcounts may be stale); repair with qemu-img check -r all".to_string())
            } else if header.incompatible_features & header::incompat::CORRUPT != 0 {
                Some(
                    "the image is marked corrupt; repair it with qemu-img check -r all".to_string(),
                )
            } else if header.nb_snapshots != 0 {
                Some(format!(
                    "it has {} internal snapshots, which chainvault does not write",
                    header.nb_snapshots
                ))
            } else if header.bitmaps().is_some() {
                Some(
                    "it has persistent dirty bitmaps, which a write by chainvault would invalidate"
                        .to_string(),
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::unsupported(
                    path,
                    format!("cannot open read-write: {why}"),
                ));
            }
        }

        // L1 table.
        let l1_bytes = header.l1_size as u64 * 8;
        if header.l1_size > 0 && header.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(fail(
                "l1_table_offset",
                format!(
                    "L1 table at {:#x} of {} entries runs past the end of the {}-byte file",
                    header.l1_table_offset, header.l1_size, file_len
                ),
            ));
        }
        let mut l1raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut l1raw, header.l1_table_offset)
            .map_err(|e| Error::io(path, "read L1 table", e))?;
        let entries: Vec<u64> = (0..header.l1_size as usize)
            .map(|i| be64(&l1raw, i))
            .collect();

        // Refcount table.
        let rt_bytes = header.refcount_table_clusters as u64 * cs;
        if header.refcount_table_offset.saturating_add(rt_bytes) > file_len {
            return Err(fail(
                "refcount_table_offset",
                format!(
                    "refcount table at {:#x} of {} clusters runs past the end of the {}-byte file",
                    header.refcount_table_offset, header.refcount_table_clusters, file_len
                ),
            ));
        }
        let mut rtraw = vec![0u8; if opts.writable { rt_bytes as usize } else { 0 }];
        file.read_exact_at(&mut rtraw, header.refcount_table_offset)
            .map_err(|e| Error::io(path, "read refcount table", e))?;
        let rt: Vec<u64> = (0..rtraw.len() / 8).map(|i| be64(&rtraw, i)).collect();

        let next = file_len.div_ceil(cs).max(1);
        let end = next * cs;
        let compression = header.compression_type;
        let has_backing_file = header.backing_file.is_some();
        let cache_cap = (opts.l2_cache_bytes / cs).max(16) as usize;

        let img = Image {
            path: path.to_path_buf(),
            file,
            geo,
            compression,
            writable: opts.writable,
            has_backing_file,
            backing,
            l1: RwLock::new(L1 {
                entries,
                dirty: BTreeSet::new(),
            }),
            cache: Mutex::new(HashMap::new()),
            cache_cap,
            alloc: Mutex::new(Allocator {
                rt,
                rt_offset: header.refcount_table_offset,
                rt_clusters: header.refcount_table_clusters as u64,
                rt_moved: None,
                rt_dirty: BTreeSet::new(),
                blocks: HashMap::new(),
                dirty_blocks: BTreeSet::new(),
                next,
                free: BTreeSet::new(),
                pending_free: Vec::new(),
            }),
            flush_lock: Mutex::new(()),
            end: AtomicU64::new(end),
            poisoned: AtomicBool::new(false),
            last_decompressed: Mutex::new(None),
            header,
        };

        // Opening read-write clears the autoclear bits, as the spec requires of a
        // writer that does not maintain what they describe.
        if opts.writable && img.header.autoclear_features != 0 {
            img.file
                .write_all_at(&0u64.to_be_bytes(), 88)
                .and_then(|_| img.file.sync_data())
                .map_err(|e| Error::io(path, "clear autoclear bits", e))?;
        }
        Ok(img)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header as it was read when the image was opened.
    pub fn header(&self) -> Header {
        self.header.clone()
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The backing chain this image reads unallocated ranges from, if attached.
    pub fn backing(&self) -> Option<&Arc<Chain>> {
        self.backing.as_ref()
    }

    fn fail(&self, field: &'static str, detail: String) -> Error {
        Error::format(&self.path, field, detail)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.geo.size) {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset: off,
                len,
                size: self.geo.size,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::unsupported(
                &self.path,
                "an earlier metadata write failed; the image is refusing further writes until reopened",
            ));
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], off: u64, what: &'static str) -> Result<()> {
        // Bytes past the end of the file (allocated, not yet written) read as zeros.
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, what, e)),
            }
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], off: u64, what: &'static str) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(&self.path, what, e))
    }

    // ---------------------------------------------------------------- L2 cache

    fn slot(&self, l1i: u64) -> Arc<Slot> {
        let mut cache = lock(&self.cache);
        if let Some(s) = cache.get(&l1i) {
            return s.clone();
        }
        if cache.len() >= self.cache_cap {
            // Evict clean tables nobody is using.
            let victims: Vec<u64> = cache
                .iter()
                .filter(|(_, s)| {
                    Arc::strong_count(s) == 1
                        && s.st
                            .try_lock()
                            .map(|st| !st.dirty && st.inflight.is_empty())
                            .unwrap_or(false)
                })
                .map(|(k, _)| *k)
                .take(cache.len() / 4 + 1)
                .collect();
            for v in victims {
                cache.remove(&v);
            }
        }
        let s = Arc::new(Slot {
            io: RwLock::new(()),
            st: Mutex::new(SlotState {
                loaded: false,
                table_off: 0,
                raw: Vec::new(),
                dirty: false,
                inflight: HashSet::new(),
            }),
            cv: Condvar::new(),
        });
        cache.insert(l1i, s.clone());
        s
    }

    fn stride(&self) -> usize {
        if self.geo.extended_l2 {
            2
        } else {
            1
        }
    }

    fn load(&self, l1i: u64, st: &mut SlotState) -> Result<()> {
        if st.loaded {
            return Ok(());
        }
        let l1e = {
            let l1 = rlock(&self.l1);
            l1.entries.get(l1i as usize).copied().unwrap_or(0)
        };
        let off = l1e & L1_OFFSET_MASK;
        let cs = self.geo.cluster_size;
        let n = self.geo.l2_entries as usize * self.stride();
        if off == 0 {
            st.table_off = 0;
            st.raw = vec![0; n];
        } else {
            self.check_cluster_at(off, "L1 entry", || {
                format!("L1 index {l1i} points to an L2 table at {off:#x}")
            })?;
            if self.writable && l1e & COPIED == 0 {
                return Err(self.fail(
                    "L1 entry",
                    format!("L1 index {l1i}: the L2 table at {off:#x} is shared (COPIED flag clear); run qemu-img check"),
                ));
            }
            let mut buf = vec![0u8; cs as usize];
            self.pread(&mut buf, off, "read L2 table")?;
            st.raw = (0..n).map(|i| be64(&buf, i)).collect();
            st.table_off = off;
        }
        st.loaded = true;
        Ok(())
    }

    fn entry(&self, st: &SlotState, li: u64) -> L2Entry {
        if self.geo.extended_l2 {
            L2Entry::decode(st.raw[li as usize * 2], Some(st.raw[li as usize * 2 + 1]))
        } else {
            L2Entry::decode(st.raw[li as usize], None)
        }
    }

    fn set_entry(&self, st: &mut SlotState, li: u64, e: L2Entry) {
        let (a, b) = e.encode(self.geo.extended_l2);
        if self.geo.extended_l2 {
            st.raw[li as usize * 2] = a;
            st.raw[li as usize * 2 + 1] = b;
        } else {
            st.raw[li as usize] = a;
        }
        st.dirty = true;
    }

    /// Validate a data cluster's host offset taken from an L2 entry.
    fn check_host(&self, host: u64, guest: u64) -> Result<()> {
        self.check_cluster_at(host, "L2 entry", || {
            format!("guest offset {guest:#x} maps to host offset {host:#x}")
        })
    }

    /// A cluster-sized structure at `off` must be cluster-aligned and inside
    /// the file; `subject` says what pointed there, for the error.
    fn check_cluster_at(
        &self,
        off: u64,
        field: &'static str,
        subject: impl FnOnce() -> String,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        if !off.is_multiple_of(cs) {
            return Err(self.fail(
                field,
                format!("{}, not aligned to the {cs}-byte cluster size", subject()),
            ));
        }
        if off.saturating_add(cs) > self.end.load(Ordering::Acquire) {
            return Err(self.fail(field, format!("{}, past the end of the file", subject())));
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.writable && !self.poisoned.load(Ordering::Acquire) {
            if let Err(e) = self.flush() {
                tracing::error!(path = %self.path.display(), error = %e, "flush on close failed");
            }
        }
    }
}

/// Append an extent, merging with the previous one when they continue each other.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let host_ok = match (last.host_offset, e.host_offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.offset + last.length == e.offset
            && last.kind == e.kind
            && last.depth == e.depth
            && last.compressed == e.compressed
            && host_ok
        {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}
