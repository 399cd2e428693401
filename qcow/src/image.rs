//! One QCOW2 image file: read, write, write-zeroes, discard, flush, block status.
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

    /// Describe guest range `[start, end)`, which lies inside one L2 table.
    fn segments(
        &self,
        st: &SlotState,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64, Seg)>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let ss = self.geo.subcluster_size;
        let mut pos = start;
        while pos < end {
            let li = self.geo.l2_index(pos);
            let cbase = pos & !(cs - 1);
            let cend = (cbase + cs).min(end);
            let e = self.entry(st, li);
            let mut push = |off: u64, len: u64, seg: Seg| {
                if let Some(last) = out.last_mut() {
                    let contiguous = last.0 + last.1 == off
                        && match (last.2, seg) {
                            (Seg::Data(h1), Seg::Data(h2)) => h1 + last.1 == h2,
                            (Seg::Zero, Seg::Zero) | (Seg::Unalloc, Seg::Unalloc) => true,
                            _ => false,
                        };
                    if contiguous {
                        last.1 += len;
                        return;
                    }
                }
                out.push((off, len, seg));
            };
            match e {
                L2Entry::Unallocated => push(pos, cend - pos, Seg::Unalloc),
                L2Entry::Zero { .. } => push(pos, cend - pos, Seg::Zero),
                L2Entry::Normal { host, .. } => {
                    self.check_host(host.0, cbase)?;
                    push(pos, cend - pos, Seg::Data(host.0 + (pos - cbase)))
                }
                L2Entry::Compressed { descriptor } => {
                    push(pos, cend - pos, Seg::Compressed(descriptor))
                }
                L2Entry::Sub { host, bitmap, .. } => {
                    if let Some(h) = host {
                        self.check_host(h.0, cbase)?;
                    }
                    let mut p = pos;
                    while p < cend {
                        let si = ((p - cbase) / ss) as u32;
                        let send = (cbase + (si as u64 + 1) * ss).min(cend);
                        let seg = match (sub_state(bitmap, si), host) {
                            (SubState::Unallocated, _) => Seg::Unalloc,
                            (SubState::Zero, _) => Seg::Zero,
                            (SubState::Data, Some(h)) => Seg::Data(h.0 + (p - cbase)),
                            (SubState::Data, None) => {
                                return Err(self.fail(
                                    "L2 entry",
                                    format!("guest offset {cbase:#x}: subcluster {si} is allocated but the cluster has no host offset"),
                                ))
                            }
                            (SubState::Invalid, _) => {
                                return Err(self.fail(
                                    "L2 entry",
                                    format!("guest offset {cbase:#x}: subcluster {si} is marked both allocated and zero"),
                                ))
                            }
                        };
                        push(p, send - p, seg);
                        p = send;
                    }
                }
            }
            pos = cend;
        }
        Ok(())
    }

    /// Read a whole compressed cluster (cached: the last one decompressed).
    fn read_compressed(&self, descriptor: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((d, data)) = lock(&self.last_decompressed).as_ref() {
            if *d == descriptor {
                return Ok(data.clone());
            }
        }
        let (off, len) = compressed_extent(descriptor, self.geo.cluster_bits);
        let end = self.end.load(Ordering::Acquire);
        if off.0 >= end {
            return Err(self.fail(
                "compressed cluster",
                format!(
                    "compressed data at {:#x} is past the end of the file",
                    off.0
                ),
            ));
        }
        let len = len.min(end - off.0).min(2 * self.geo.cluster_size + 512);
        let mut input = vec![0u8; len as usize];
        self.pread(&mut input, off.0, "read compressed cluster")?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        decompress(self.compression, &input, &mut out)
            .map_err(|e| self.fail("compressed cluster", format!("at {:#x}: {e}", off.0)))?;
        let out = Arc::new(out);
        *lock(&self.last_decompressed) = Some((descriptor, out.clone()));
        Ok(out)
    }

    /// Read this layer only. Ranges this layer does not allocate are appended to
    /// `holes` as (guest offset, length), and zero-filled in `buf` only when
    /// `zero_holes` is set (a layer below that fills them anyway skips it).
    pub(crate) fn read_own(
        &self,
        buf: &mut [u8],
        off: u64,
        holes: &mut Vec<(u64, u64)>,
        zero_holes: bool,
    ) -> Result<()> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        let mut segs = Vec::new();
        while pos < end {
            let l1i = self.geo.l1_index(pos);
            let tend = ((l1i + 1) << self.geo.l2_span_bits).min(end);
            let slot = self.slot(l1i);
            let _io = rlock(&slot.io);
            segs.clear();
            {
                let mut st = lock(&slot.st);
                self.load(l1i, &mut st)?;
                self.segments(&st, pos, tend, &mut segs)?;
            }
            for &(g, len, seg) in &segs {
                let b = &mut buf[(g - off) as usize..(g - off + len) as usize];
                match seg {
                    Seg::Data(h) => self.pread(b, h, "read data")?,
                    Seg::Zero => b.fill(0),
                    Seg::Unalloc => {
                        if zero_holes {
                            b.fill(0);
                        }
                        match holes.last_mut() {
                            Some(last) if last.0 + last.1 == g => last.1 += len,
                            _ => holes.push((g, len)),
                        }
                    }
                    Seg::Compressed(d) => {
                        let data = self.read_compressed(d)?;
                        let i = self.geo.in_cluster(g) as usize;
                        b.copy_from_slice(&data[i..i + b.len()]);
                    }
                }
            }
            pos = tend;
        }
        Ok(())
    }

    /// Read guest data: this layer, then the attached backing chain (zeros without one).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let mut holes = Vec::new();
        self.read_own(buf, off, &mut holes, self.backing.is_none())?;
        if let Some(b) = &self.backing {
            for (h, len) in holes {
                let s = (h - off) as usize;
                b.read_padded(&mut buf[s..s + len as usize], h)?;
            }
        }
        Ok(())
    }

    /// Where the compressed data of the cluster holding guest offset `off`
    /// starts in this layer's file; None when that cluster is not compressed
    /// here. ([`Extent::host_offset`] is None for compressed data, which has
    /// no byte-for-byte host mapping.)
    pub fn compressed_host_offset(&self, off: u64) -> Result<Option<u64>> {
        self.check_range(off, 1)?;
        let l1i = self.geo.l1_index(off);
        let slot = self.slot(l1i);
        let mut segs = Vec::new();
        let mut st = lock(&slot.st);
        self.load(l1i, &mut st)?;
        self.segments(&st, off, off + 1, &mut segs)?;
        Ok(segs.iter().find_map(|&(_, _, seg)| match seg {
            Seg::Compressed(d) => Some(compressed_extent(d, self.geo.cluster_bits).0 .0),
            _ => None,
        }))
    }

    /// Block status of this layer alone (depth 0).
    pub fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(off, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let end = off + len;
        let mut pos = off;
        let mut segs = Vec::new();
        while pos < end {
            let l1i = self.geo.l1_index(pos);
            let tend = ((l1i + 1) << self.geo.l2_span_bits).min(end);
            let slot = self.slot(l1i);
            segs.clear();
            {
                let mut st = lock(&slot.st);
                self.load(l1i, &mut st)?;
                self.segments(&st, pos, tend, &mut segs)?;
            }
            for &(g, l, seg) in &segs {
                let (kind, host, compressed) = match seg {
                    Seg::Data(h) => (ExtentKind::Data, Some(h), false),
                    Seg::Compressed(_) => (ExtentKind::Data, None, true),
                    Seg::Zero => (ExtentKind::Zero, None, false),
                    Seg::Unalloc => (ExtentKind::Unallocated, None, false),
                };
                push_extent(
                    &mut out,
                    Extent {
                        offset: g,
                        length: l,
                        kind,
                        depth: 0,
                        host_offset: host,
                        compressed,
                    },
                );
            }
            pos = tend;
        }
        Ok(out)
    }

    // ------------------------------------------------------------- allocation

    fn load_block(&self, a: &mut Allocator, r: u64) -> Result<()> {
        if a.blocks.contains_key(&r) {
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        let off = a.rt.get(r as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        let mut data = vec![0u8; cs as usize];
        if off != 0 {
            self.check_cluster_at(off, "refcount table", || {
                format!("entry {r} points to a refcount block at {off:#x}")
            })?;
            self.pread(&mut data, off, "read refcount block")?;
        }
        a.blocks.insert(r, RefBlock { data });
        Ok(())
    }

    fn refcount(&self, a: &mut Allocator, c: u64) -> Result<u64> {
        let r = c / self.geo.rb_entries;
        if a.rt.get(r as usize).copied().unwrap_or(0) == 0 {
            return Ok(0);
        }
        self.load_block(a, r)?;
        Ok(a.blocks.get(&r).map_or(0, |b| {
            get_refcount(&b.data, self.geo.refcount_order, c % self.geo.rb_entries)
        }))
    }

    fn set_rc(&self, a: &mut Allocator, c: u64, v: u64) -> Result<()> {
        let r = c / self.geo.rb_entries;
        self.load_block(a, r)?;
        if let Some(b) = a.blocks.get_mut(&r) {
            set_refcount(
                &mut b.data,
                self.geo.refcount_order,
                c % self.geo.rb_entries,
                v,
            );
            a.dirty_blocks.insert(r);
        }
        Ok(())
    }

    fn table_full(&self) -> Error {
        Error::unsupported(
            &self.path,
            "the refcount table is full: the file has grown beyond what its refcount table can describe",
        )
    }

    /// Make sure refcount block `r` exists, creating it (in a fresh cluster) if needed.
    /// Returns true when a block was created (the caller re-plans, `next` moved).
    fn ensure_block(&self, a: &mut Allocator, r: u64) -> Result<bool> {
        if r as usize >= a.rt.len() {
            self.grow_table(a, r)?;
        }
        if a.rt[r as usize] != 0 {
            self.load_block(a, r)?;
            return Ok(false);
        }
        // Place the new block at the first free cluster from `next`.
        let rbe = self.geo.rb_entries;
        let mut c = a.next;
        loop {
            let cr = c / rbe;
            if cr == r
                || (a.rt.get(cr as usize).copied().unwrap_or(0) != 0 && self.refcount(a, c)? == 0)
            {
                break;
            }
            if a.rt.get(cr as usize).copied().unwrap_or(0) == 0 {
                // c lies in yet another uncovered range: cover that first.
                self.ensure_block(a, cr)?;
                c = a.next;
                continue;
            }
            c += 1;
        }
        a.rt[r as usize] = c << self.geo.cluster_bits;
        a.rt_dirty.insert(r as usize);
        a.blocks.insert(
            r,
            RefBlock {
                data: vec![0u8; self.geo.cluster_size as usize],
            },
        );
        a.dirty_blocks.insert(r);
        self.set_rc(a, c, 1)?;
        a.next = a.next.max(c + 1);
        self.end
            .fetch_max((c + 1) << self.geo.cluster_bits, Ordering::AcqRel);
        Ok(true)
    }

    /// Grow the refcount table so that it has entry `r`. The new table is written
    /// whole at the next flush, then the header is switched to it, then the old
    /// table's clusters are freed.
    fn grow_table(&self, a: &mut Allocator, r: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let per = cs / 8;
        let want = (r + 1).max(a.rt.len() as u64 * 2).div_ceil(per) * per;
        let clusters = want / per;
        if clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(self.table_full());
        }
        a.rt.resize(want as usize, 0);
        let start = self.alloc_run_locked(a, clusters)?;
        match a.rt_moved {
            None => a.rt_moved = Some((a.rt_offset, a.rt_clusters)),
            Some(_) => {
                // An intermediate table never reached the header: just free it.
                let first = a.rt_offset >> self.geo.cluster_bits;
                let n = a.rt_clusters;
                a.pending_free.extend(first..first + n);
            }
        }
        a.rt_offset = start << self.geo.cluster_bits;
        a.rt_clusters = clusters;
        tracing::debug!(path = %self.path.display(), clusters, "refcount table grown");
        Ok(())
    }

    /// Allocate `n` contiguous host clusters with refcount 1. Returns the first.
    fn alloc_run(&self, n: u64) -> Result<u64> {
        let mut a = lock(&self.alloc);
        self.alloc_run_locked(&mut a, n)
    }

    fn alloc_run_locked(&self, a: &mut Allocator, n: u64) -> Result<u64> {
        if n == 1 {
            while let Some(c) = a.free.pop_first() {
                if self.refcount(a, c)? == 0 {
                    self.set_rc(a, c, 1)?;
                    return Ok(c);
                }
            }
        }
        let rbe = self.geo.rb_entries;
        'outer: loop {
            let start = a.next;
            for r in start / rbe..=(start + n - 1) / rbe {
                if self.ensure_block(a, r)? {
                    continue 'outer;
                }
            }
            for c in start..start + n {
                if self.refcount(a, c)? != 0 {
                    a.next = c + 1;
                    continue 'outer;
                }
            }
            for c in start..start + n {
                self.set_rc(a, c, 1)?;
            }
            a.next = start + n;
            self.end
                .fetch_max((start + n) << self.geo.cluster_bits, Ordering::AcqRel);
            return Ok(start);
        }
    }

    /// Drop references that `old` held and `new` does not.
    fn release(&self, old: &L2Entry, new_host: Option<u64>, frees: &mut Vec<u64>) {
        match *old {
            L2Entry::Compressed { descriptor } => {
                let (off, len) = compressed_extent(descriptor, self.geo.cluster_bits);
                let first = off.0 >> self.geo.cluster_bits;
                let last = (off.0 + len - 1) >> self.geo.cluster_bits;
                frees.extend(first..=last);
            }
            _ => {
                if let Some(h) = old.host() {
                    if Some(h.0) != new_host {
                        frees.push(h.0 >> self.geo.cluster_bits);
                    }
                }
            }
        }
    }

    /// Give the slot an L2 table if it has none.
    fn ensure_table(&self, l1i: u64, st: &mut SlotState) -> Result<()> {
        if st.table_off != 0 {
            return Ok(());
        }
        let c = self.alloc_run(1)?;
        let off = c << self.geo.cluster_bits;
        st.table_off = off;
        st.raw.iter_mut().for_each(|e| *e = 0);
        st.dirty = true;
        let mut l1 = wlock(&self.l1);
        if let Some(e) = l1.entries.get_mut(l1i as usize) {
            *e = off | COPIED;
            l1.dirty.insert(l1i as usize);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ write

    /// Write guest data.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let l1i = self.geo.l1_index(pos);
            let tend = ((l1i + 1) << self.geo.l2_span_bits).min(end);
            self.write_table(l1i, &buf[(pos - off) as usize..(tend - off) as usize], pos)?;
            pos = tend;
        }
        self.maybe_flush_for_cache()
    }

    /// Plan the write of `[start, end)` (inside one L2 table) cluster by cluster.
    fn plan_write(&self, st: &SlotState, start: u64, end: u64) -> Result<Vec<Action>> {
        let cs = self.geo.cluster_size;
        let ss = self.geo.subcluster_size;
        let mut plan = Vec::new();
        let mut pos = start;
        while pos < end {
            let cbase = pos & !(cs - 1);
            let cend = (cbase + cs).min(end);
            let li = self.geo.l2_index(pos);
            let (a, b) = (pos - cbase, cend - cbase);
            let e = self.entry(st, li);
            let remap = |host: Option<u64>, fresh: bool| Action::Remap {
                li,
                guest_cluster: cbase,
                a,
                b,
                old: e,
                host,
                fresh,
            };
            let act = match e {
                L2Entry::Normal { host, copied: true } => {
                    self.check_host(host.0, cbase)?;
                    Action::Direct {
                        guest: pos,
                        len: cend - pos,
                        host: host.0 + a,
                    }
                }
                L2Entry::Sub {
                    host: Some(h),
                    copied,
                    bitmap,
                } => {
                    self.check_host(h.0, cbase)?;
                    let (s0, s1) = ((a / ss) as u32, ((b - 1) / ss) as u32);
                    let all_data = (s0..=s1).all(|s| sub_state(bitmap, s) == SubState::Data);
                    if !copied {
                        return Err(Error::unsupported(
                            &self.path,
                            format!("guest cluster {cbase:#x} is shared (COPIED clear); writing shared extended-L2 clusters is not supported"),
                        ));
                    }
                    if all_data {
                        Action::Direct {
                            guest: pos,
                            len: cend - pos,
                            host: h.0 + a,
                        }
                    } else {
                        remap(Some(h.0), false)
                    }
                }
                _ => remap(None, true),
            };
            plan.push(act);
            pos = cend;
        }
        Ok(plan)
    }

    fn write_table(&self, l1i: u64, data: &[u8], start: u64) -> Result<()> {
        let end = start + data.len() as u64;
        let slot = self.slot(l1i);
        let _io = rlock(&slot.io);
        let (mut plan, remaps) = {
            let mut st = lock(&slot.st);
            loop {
                self.load(l1i, &mut st)?;
                let (l0, l1) = (self.geo.l2_index(start), self.geo.l2_index(end - 1));
                if !st.inflight.is_empty() && (l0..=l1).any(|li| st.inflight.contains(&li)) {
                    st = slot.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                break;
            }
            let mut plan = self.plan_write(&st, start, end)?;
            let fresh = plan
                .iter()
                .filter(|a| matches!(a, Action::Remap { fresh: true, .. }))
                .count() as u64;
            if fresh > 0 || plan.iter().any(|a| matches!(a, Action::Remap { .. })) {
                self.ensure_table(l1i, &mut st)?;
            }
            if fresh > 0 {
                let first = self.alloc_run(fresh)?;
                let mut next = first;
                for act in plan.iter_mut() {
                    if let Action::Remap {
                        host, fresh: true, ..
                    } = act
                    {
                        *host = Some(next << self.geo.cluster_bits);
                        next += 1;
                    }
                }
            }
            let mut remaps = 0;
            for act in &plan {
                if let Action::Remap { li, .. } = act {
                    st.inflight.insert(*li);
                    remaps += 1;
                }
            }
            (plan, remaps)
        };

        let result = self.execute(&mut plan, data, start);

        if remaps > 0 {
            let mut st = lock(&slot.st);
            let mut frees = Vec::new();
            for act in &plan {
                if let Action::Remap {
                    li,
                    old,
                    host,
                    fresh,
                    a,
                    b,
                    ..
                } = *act
                {
                    st.inflight.remove(&li);
                    let Some(h) = host else { continue };
                    if result.is_err() {
                        if fresh {
                            frees.push(h >> self.geo.cluster_bits);
                        }
                        continue;
                    }
                    let new = if self.geo.extended_l2 {
                        let old_bits = match old {
                            L2Entry::Sub { bitmap, .. } => bitmap,
                            L2Entry::Compressed { .. } => 0,
                            _ => 0,
                        };
                        let bitmap = if matches!(old, L2Entry::Compressed { .. }) {
                            ALL_ALLOC_BITS
                        } else {
                            let ss = self.geo.subcluster_size;
                            let (s0, s1) = (a / ss, (b - 1) / ss);
                            let mut bm = old_bits;
                            for s in s0..=s1 {
                                bm |= 1 << s;
                                bm &= !(1 << (32 + s));
                            }
                            bm
                        };
                        L2Entry::Sub {
                            host: Some(HostOffset(h)),
                            copied: true,
                            bitmap,
                        }
                    } else {
                        L2Entry::Normal {
                            host: HostOffset(h),
                            copied: true,
                        }
                    };
                    self.release(&old, Some(h), &mut frees);
                    self.set_entry(&mut st, li, new);
                }
            }
            drop(st);
            slot.cv.notify_all();
            if !frees.is_empty() {
                lock(&self.alloc).pending_free.extend(frees);
            }
        }
        result
    }

    /// Do the data I/O of a plan.
    fn execute(&self, plan: &mut [Action], data: &[u8], start: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let ss = self.geo.subcluster_size;
        let slice = |g: u64, len: u64| &data[(g - start) as usize..(g - start + len) as usize];
        let mut i = 0;
        while i < plan.len() {
            match plan[i] {
                Action::Direct { guest, len, host } => {
                    // Merge with following direct pieces contiguous in guest and host.
                    let (mut glen, mut j) = (len, i + 1);
                    while let Some(Action::Direct {
                        guest: g2,
                        len: l2,
                        host: h2,
                    }) = plan.get(j).copied()
                    {
                        if g2 == guest + glen && h2 == host + glen {
                            glen += l2;
                            j += 1;
                        } else {
                            break;
                        }
                    }
                    self.pwrite(slice(guest, glen), host, "write data")?;
                    i = j;
                }
                Action::Remap {
                    guest_cluster,
                    a,
                    b,
                    old,
                    host: Some(h),
                    fresh,
                    ..
                } => {
                    let whole = a == 0 && b == cs;
                    if whole && fresh {
                        // Whole fresh clusters: one write for the run.
                        let (mut n, mut j) = (1u64, i + 1);
                        while let Some(Action::Remap {
                            guest_cluster: g2,
                            a: 0,
                            b: b2,
                            host: Some(h2),
                            fresh: true,
                            ..
                        }) = plan.get(j).copied()
                        {
                            if b2 == cs && g2 == guest_cluster + n * cs && h2 == h + n * cs {
                                n += 1;
                                j += 1;
                            } else {
                                break;
                            }
                        }
                        self.pwrite(slice(guest_cluster, n * cs), h, "write data")?;
                        i = j;
                        continue;
                    }
                    // Region to write: the whole cluster (standard L2, or replacing a
                    // compressed cluster), or the touched subclusters (extended L2).
                    let (ra, rb) =
                        if self.geo.extended_l2 && !matches!(old, L2Entry::Compressed { .. }) {
                            (a / ss * ss, b.div_ceil(ss) * ss)
                        } else {
                            (0, cs)
                        };
                    let mut buf = vec![0u8; (rb - ra) as usize];
                    if a > ra {
                        self.fill_old(&old, guest_cluster, ra, &mut buf[..(a - ra) as usize])?;
                    }
                    if rb > b {
                        self.fill_old(&old, guest_cluster, b, &mut buf[(b - ra) as usize..])?;
                    }
                    buf[(a - ra) as usize..(b - ra) as usize]
                        .copy_from_slice(slice(guest_cluster + a, b - a));
                    self.pwrite(&buf, h + ra, "write data")?;
                    i += 1;
                }
                Action::Remap { host: None, .. } => i += 1,
            }
        }
        Ok(())
    }

    /// Fill `out` with what bytes `[x, x+len)` of guest cluster `cbase` held under
    /// mapping `old` (before the write being done).
    fn fill_old(&self, old: &L2Entry, cbase: u64, x: u64, out: &mut [u8]) -> Result<()> {
        let ss = self.geo.subcluster_size;
        match *old {
            L2Entry::Unallocated => self.read_backing(out, cbase + x),
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => {
                self.pread(out, host.0 + x, "read data for copy-on-write")
            }
            L2Entry::Compressed { descriptor } => {
                let d = self.read_compressed(descriptor)?;
                out.copy_from_slice(&d[x as usize..x as usize + out.len()]);
                Ok(())
            }
            L2Entry::Sub { host, bitmap, .. } => {
                let mut p = x;
                let end = x + out.len() as u64;
                while p < end {
                    let si = (p / ss) as u32;
                    let send = ((si as u64 + 1) * ss).min(end);
                    let o = &mut out[(p - x) as usize..(send - x) as usize];
                    match (sub_state(bitmap, si), host) {
                        (SubState::Data, Some(h)) => {
                            self.pread(o, h.0 + p, "read data for copy-on-write")?
                        }
                        (SubState::Unallocated, _) => self.read_backing(o, cbase + p)?,
                        _ => o.fill(0),
                    }
                    p = send;
                }
                Ok(())
            }
        }
    }

    fn read_backing(&self, out: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_padded(out, guest),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    // ---------------------------------------------------------- zero, discard

    /// Make `[off, off+len)` read as zeros. With `may_unmap`, host clusters are
    /// released; without it, allocated clusters stay allocated (marked zero).
    /// Whole (sub)clusters never get data clusters allocated; unaligned edges are
    /// written as zeros when this layer does not already read as zero there.
    pub fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_range(off, len, may_unmap, false)
    }

    /// Discard `[off, off+len)`. It reads as zeros afterwards; in an overlay the
    /// clusters become zero clusters, so backing data is never exposed.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.zero_range(off, len, true, true)
    }

    fn zero_range(&self, off: u64, len: u64, may_unmap: bool, discard: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let g = if self.geo.extended_l2 {
            self.geo.subcluster_size
        } else {
            self.geo.cluster_size
        };
        let end = off + len;
        let astart = off.div_ceil(g) * g;
        let aend = (end / g * g).max(astart);
        // Unaligned head and tail.
        if astart > off || aend < end {
            let head_end = astart.min(end);
            if head_end > off {
                self.zero_partial(off, head_end - off)?;
            }
            if aend < end && aend >= head_end {
                self.zero_partial(aend, end - aend)?;
            }
        }
        let mut pos = astart;
        while pos < aend {
            let l1i = self.geo.l1_index(pos);
            let tend = ((l1i + 1) << self.geo.l2_span_bits).min(aend);
            self.zero_table(l1i, pos, tend, may_unmap, discard)?;
            pos = tend;
        }
        self.maybe_flush_for_cache()
    }

    /// Zero an unaligned piece: nothing to do if this layer already reads it as
    /// zeros; otherwise write zeros.
    fn zero_partial(&self, off: u64, len: u64) -> Result<()> {
        let ext = self.block_status(off, len)?;
        let already = ext.iter().all(|e| match e.kind {
            ExtentKind::Zero => true,
            ExtentKind::Unallocated => !self.has_backing_file,
            ExtentKind::Data => false,
        });
        if already {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let l1i = self.geo.l1_index(pos);
            let tend = ((l1i + 1) << self.geo.l2_span_bits).min(end);
            self.write_table(
                l1i,
                &zeros[(pos - off) as usize..(tend - off) as usize],
                pos,
            )?;
            pos = tend;
        }
        Ok(())
    }

    /// Zero whole (sub)clusters `[start, end)` inside one L2 table, by metadata only.
    fn zero_table(
        &self,
        l1i: u64,
        start: u64,
        end: u64,
        may_unmap: bool,
        discard: bool,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let ss = self.geo.subcluster_size;
        let slot = self.slot(l1i);
        // Exclusive: host clusters may be released, so nobody may be doing I/O on them.
        let _io = wlock(&slot.io);
        let mut st = lock(&slot.st);
        self.load(l1i, &mut st)?;
        let unalloc_ok = discard && !self.has_backing_file;
        if st.table_off == 0 && unalloc_ok {
            return Ok(());
        }
        self.ensure_table(l1i, &mut st)?;
        let mut frees = Vec::new();
        let mut pos = start;
        while pos < end {
            let cbase = pos & !(cs - 1);
            let cend = (cbase + cs).min(end);
            let li = self.geo.l2_index(pos);
            let old = self.entry(&st, li);
            let whole = pos == cbase && cend == cbase + cs;
            let keep = |h: Option<HostOffset>| -> Option<HostOffset> {
                if may_unmap {
                    None
                } else {
                    match old {
                        L2Entry::Normal { copied: true, .. } | L2Entry::Zero { .. } => h,
                        L2Entry::Sub { copied: true, .. } => h,
                        _ => None,
                    }
                }
            };
            let new = if !self.geo.extended_l2 {
                // Standard L2: always whole clusters here.
                let kept = keep(old.host());
                if unalloc_ok && kept.is_none() {
                    L2Entry::Unallocated
                } else {
                    L2Entry::Zero { host: kept }
                }
            } else if whole {
                let kept = keep(old.host());
                match (unalloc_ok, kept) {
                    (true, None) => L2Entry::Sub {
                        host: None,
                        copied: false,
                        bitmap: 0,
                    },
                    (_, kept) => L2Entry::Sub {
                        host: kept,
                        copied: kept.is_some(),
                        bitmap: ALL_ZERO_BITS,
                    },
                }
            } else {
                // Some subclusters of an extended-L2 cluster.
                let (s0, s1) = ((pos - cbase) / ss, (cend - cbase - 1) / ss);
                match old {
                    L2Entry::Compressed { .. } => {
                        // Cannot zero part of a compressed cluster by metadata: rewrite it.
                        drop(st);
                        drop(_io);
                        lock(&self.alloc).pending_free.extend(frees);
                        self.zero_partial_force(pos, cend - pos)?;
                        return if cend < end {
                            self.zero_table(l1i, cend, end, may_unmap, discard)
                        } else {
                            Ok(())
                        };
                    }
                    L2Entry::Sub {
                        host,
                        copied,
                        bitmap,
                    } => {
                        let mut bm = bitmap;
                        for s in s0..=s1 {
                            bm &= !(1u64 << s);
                            if unalloc_ok {
                                bm &= !(1u64 << (32 + s));
                            } else {
                                bm |= 1u64 << (32 + s);
                            }
                        }
                        let any_data = bm & ALL_ALLOC_BITS != 0;
                        let host = if any_data || !may_unmap { host } else { None };
                        L2Entry::Sub {
                            host,
                            copied: copied && host.is_some(),
                            bitmap: bm,
                        }
                    }
                    _ => old,
                }
            };
            self.release(&old, new.host().map(|h| h.0), &mut frees);
            if new != old {
                self.set_entry(&mut st, li, new);
            }
            pos = cend;
        }
        drop(st);
        if !frees.is_empty() {
            lock(&self.alloc).pending_free.extend(frees);
        }
        Ok(())
    }

    fn zero_partial_force(&self, off: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_table(self.geo.l1_index(off), &zeros, off)
    }

    // ------------------------------------------------------------------ flush

    fn maybe_flush_for_cache(&self) -> Result<()> {
        let n = lock(&self.cache).len();
        if n > self.cache_cap * 2 {
            self.flush()?;
        }
        Ok(())
    }

    /// Make everything written so far durable, metadata in crash-safe order.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::unsupported(
                &self.path,
                "an earlier metadata write failed; the image is refusing further writes until reopened",
            ));
        }
        let _f = lock(&self.flush_lock);
        let r = self.flush_inner();
        if r.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        r
    }

    fn flush_inner(&self) -> Result<()> {
        let cs = self.geo.cluster_size;
        // Snapshots, in the order that makes each later one cover the earlier:
        // frees, L1, L2 tables, refcounts.
        let frees = std::mem::take(&mut lock(&self.alloc).pending_free);
        let l1w: Vec<(usize, u64)> = {
            let mut l1 = wlock(&self.l1);
            let d = std::mem::take(&mut l1.dirty);
            d.into_iter().map(|i| (i, l1.entries[i])).collect()
        };
        let slots: Vec<Arc<Slot>> = lock(&self.cache).values().cloned().collect();
        let mut l2w: Vec<(u64, Vec<u8>)> = Vec::new();
        for s in &slots {
            let mut st = lock(&s.st);
            if st.dirty && st.table_off != 0 {
                let mut bytes = Vec::with_capacity(cs as usize);
                for e in &st.raw {
                    bytes.extend_from_slice(&e.to_be_bytes());
                }
                l2w.push((st.table_off, bytes));
                st.dirty = false;
            }
        }
        let rw = self.snapshot_refcounts();
        let mut frees = frees;

        // 1. guest data
        self.sync("flush data")?;
        // 2. refcount increases (and a moved refcount table)
        if !rw.blocks.is_empty() || !rw.entries.is_empty() || rw.moved.is_some() {
            frees.extend(self.write_refcounts(&rw)?);
            self.sync("flush refcounts")?;
        }
        // 3. L2 tables
        if !l2w.is_empty() {
            for (off, bytes) in &l2w {
                self.pwrite(bytes, *off, "write L2 table")?;
            }
            self.sync("flush L2 tables")?;
        }
        // 4. L1 entries
        if !l1w.is_empty() {
            let l1off = self.header.l1_table_offset;
            for (i, v) in &l1w {
                self.pwrite(&v.to_be_bytes(), l1off + *i as u64 * 8, "write L1 table")?;
            }
            self.sync("flush L1 table")?;
        }
        // 5. refcount decreases
        if !frees.is_empty() {
            let mut freed = Vec::new();
            {
                let mut a = lock(&self.alloc);
                for c in frees {
                    let v = self.refcount(&mut a, c)?;
                    if v == 0 {
                        tracing::warn!(path = %self.path.display(), cluster = c, "freeing a cluster whose refcount is already zero");
                        continue;
                    }
                    self.set_rc(&mut a, c, v - 1)?;
                    if v == 1 {
                        freed.push(c);
                    }
                }
            }
            let rw = self.snapshot_refcounts();
            let old_table = self.write_refcounts(&rw)?;
            self.sync("flush refcounts")?;
            let mut a = lock(&self.alloc);
            a.free.extend(freed);
            // A table that moved during this flush is freed by the next one.
            a.pending_free.extend(old_table);
        }
        Ok(())
    }

    fn snapshot_refcounts(&self) -> RefcountWrites {
        let mut a = lock(&self.alloc);
        let dirty = std::mem::take(&mut a.dirty_blocks);
        let rbw = dirty
            .into_iter()
            .filter_map(|r| {
                let off = a.rt.get(r as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
                a.blocks.get(&r).map(|b| (off, b.data.clone()))
            })
            .collect();
        let rtd = std::mem::take(&mut a.rt_dirty);
        let rtw = rtd.into_iter().map(|i| (i, a.rt[i])).collect();
        let moved = a.rt_moved.take().map(|old| {
            let mut table = Vec::with_capacity(a.rt.len() * 8);
            for e in &a.rt {
                table.extend_from_slice(&e.to_be_bytes());
            }
            TableMove {
                new_offset: a.rt_offset,
                new_clusters: a.rt_clusters,
                table,
                old_offset: old.0,
                old_clusters: old.1,
            }
        });
        RefcountWrites {
            blocks: rbw,
            entries: rtw,
            table_offset: a.rt_offset,
            moved,
        }
    }

    /// Write refcount blocks, then the table entries pointing at new ones (or the
    /// whole new table and the header switch when the table moved). Returns the
    /// clusters of a replaced table, to be freed.
    fn write_refcounts(&self, w: &RefcountWrites) -> Result<Vec<u64>> {
        for (off, data) in &w.blocks {
            self.pwrite(data, *off, "write refcount block")?;
        }
        if w.entries.is_empty() && w.moved.is_none() {
            return Ok(Vec::new());
        }
        // New refcount blocks must be durable before a table points at them.
        self.sync("flush refcount blocks")?;
        match &w.moved {
            Some(m) => {
                self.pwrite(&m.table, m.new_offset, "write refcount table")?;
                self.sync("flush refcount table")?;
                let mut hdr = [0u8; 12];
                hdr[..8].copy_from_slice(&m.new_offset.to_be_bytes());
                hdr[8..].copy_from_slice(&(m.new_clusters as u32).to_be_bytes());
                self.pwrite(&hdr, 48, "switch header to the new refcount table")?;
                self.sync("flush header")?;
                let first = m.old_offset >> self.geo.cluster_bits;
                Ok((first..first + m.old_clusters).collect())
            }
            None => {
                for (i, v) in &w.entries {
                    self.pwrite(
                        &v.to_be_bytes(),
                        w.table_offset + *i as u64 * 8,
                        "write refcount table",
                    )?;
                }
                Ok(Vec::new())
            }
        }
    }

    fn sync(&self, what: &'static str) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, what, e))
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

struct TableMove {
    new_offset: u64,
    new_clusters: u64,
    table: Vec<u8>,
    old_offset: u64,
    old_clusters: u64,
}

struct RefcountWrites {
    blocks: Vec<(u64, Vec<u8>)>,
    entries: Vec<(usize, u64)>,
    table_offset: u64,
    moved: Option<TableMove>,
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
