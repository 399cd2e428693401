//! The [`BlockExport`] trait that the server serves, and two real
//! implementations: [`FileExport`] over a raw file and [`MemExport`] in memory.
//!
//! Exports are synchronous: the server calls them from tokio's blocking thread
//! pool, many calls at once, from any number of connections. Implementations
//! therefore take `&self` and must be internally synchronised.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::proto::{STATE_HOLE, STATE_ZERO};

/// A metadata context the server can answer `NBD_CMD_BLOCK_STATUS` for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaContext {
    /// `base:allocation`: flags [`STATE_HOLE`] (1) and [`STATE_ZERO`] (2).
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 = unallocated in every layer, N = the data
    /// comes from layer N counting from 1 at the top (the image being served),
    /// exactly as `qemu-nbd -A` reports it.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap number N (an index into
    /// [`BlockExport::dirty_bitmaps`]); flag 1 marks a dirty block.
    DirtyBitmap(u16),
}

impl MetaContext {
    /// All contexts this crate knows.
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];

    /// The wire name of a fixed context (dirty bitmaps: see [`MetaContext::wire_name`]).
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => crate::proto::CONTEXT_BASE_ALLOCATION,
            MetaContext::AllocationDepth => crate::proto::CONTEXT_ALLOCATION_DEPTH,
            MetaContext::DirtyBitmap(_) => "qemu:dirty-bitmap:",
        }
    }

    /// The wire name on `export` (a dirty bitmap's name is the export's).
    pub fn wire_name(self, export: &dyn BlockExport) -> String {
        match self {
            MetaContext::DirtyBitmap(i) => format!(
                "qemu:dirty-bitmap:{}",
                export
                    .dirty_bitmaps()
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_default()
            ),
            c => c.name().to_string(),
        }
    }

    /// Parse an exact wire name of a fixed context.
    pub fn from_name(name: &str) -> Option<MetaContext> {
        MetaContext::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Parse an exact wire name, dirty bitmaps of `export` included.
    pub fn from_wire_name(name: &str, export: &dyn BlockExport) -> Option<MetaContext> {
        if let Some(b) = name.strip_prefix("qemu:dirty-bitmap:") {
            return export
                .dirty_bitmaps()
                .iter()
                .position(|n| n == b)
                .and_then(|i| u16::try_from(i).ok())
                .map(MetaContext::DirtyBitmap);
        }
        MetaContext::from_name(name)
    }

    /// Every context `export` can answer.
    pub fn offered(export: &dyn BlockExport) -> Vec<MetaContext> {
        let caps = export.capabilities();
        let mut v: Vec<MetaContext> = MetaContext::ALL
            .into_iter()
            .filter(|c| caps.supports(*c))
            .collect();
        let n = export.dirty_bitmaps().len().min(u16::MAX as usize);
        v.extend((0..n).map(|i| MetaContext::DirtyBitmap(i as u16)));
        v
    }
}

/// One block-status extent: `length` bytes with the context-specific `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// For `base:allocation`: [`STATE_HOLE`] | [`STATE_ZERO`]; for
    /// `qemu:allocation-depth`: the depth.
    pub flags: u32,
}

/// What an export supports beyond plain reads. The server derives the NBD
/// transmission flags from this and never advertises more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `flush()` makes completed writes durable (`NBD_FLAG_SEND_FLUSH`).
    pub flush: bool,
    /// `fua` arguments are honoured (`NBD_FLAG_SEND_FUA`).
    pub fua: bool,
    /// `trim()` is implemented (`NBD_FLAG_SEND_TRIM`).
    pub trim: bool,
    /// `write_zeroes()` is implemented (`NBD_FLAG_SEND_WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// `write_zeroes()` honours [`ZeroFlags::fast`] (`NBD_FLAG_SEND_FAST_ZERO`).
    pub fast_zero: bool,
    /// `cache()` does something useful (`NBD_FLAG_SEND_CACHE`).
    pub cache: bool,
    /// The multi-connection promise (`NBD_FLAG_CAN_MULTI_CONN`): see
    /// [`BlockExport`].
    pub multi_conn: bool,
    /// `block_status(.., BaseAllocation)` gives real answers. When true the
    /// server also uses it to send holes in structured read replies, so it
    /// must be cheap compared with reading the data.
    pub base_allocation: bool,
    /// `block_status(.., AllocationDepth)` is implemented.
    pub allocation_depth: bool,
}

impl Capabilities {
    /// Whether a metadata context may be negotiated on this export.
    pub fn supports(&self, ctx: MetaContext) -> bool {
        match ctx {
            // base:allocation can always be answered (as "all data") so
            // generic clients get an answer even from exports without holes.
            MetaContext::BaseAllocation => true,
            MetaContext::AllocationDepth => self.allocation_depth,
            MetaContext::DirtyBitmap(_) => true,
        }
    }
}

/// Flags for [`BlockExport::write_zeroes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The export may deallocate the range (no `NBD_CMD_FLAG_NO_HOLE`).
    pub may_unmap: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail quickly with `EOPNOTSUPP` (ENOTSUP)
    /// without changing anything unless zeroing is faster than writing.
    pub fast: bool,
    /// Force unit access: durable before returning.
    pub fua: bool,
}

/// Preferred I/O sizes advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size (power of two, 1..=65536). Requests not aligned to
    /// it are rejected with EINVAL.
    pub minimum: u32,
    /// Preferred block size (power of two, >= max(minimum, 512)).
    pub preferred: u32,
    /// Maximum payload of one READ or WRITE.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: crate::proto::DEFAULT_MAX_PAYLOAD,
        }
    }
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn enotsup() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

/// A block device served over NBD.
///
/// Offsets and lengths passed by the server are always validated first: every
/// request lies within `0..size()`, is non-empty, and writes are only issued
/// to exports that are not read-only and advertise the capability in
/// question. The size must not change while the export is registered.
///
/// Errors are `std::io::Error`; the server maps `raw_os_error()` (or the
/// error kind) to the NBD error set: EPERM (also EACCES/EROFS), EIO, ENOMEM,
/// EINVAL, ENOSPC (also EDQUOT/EFBIG), EOVERFLOW, ENOTSUP (EOPNOTSUPP) and
/// ESHUTDOWN; anything else becomes EIO.
///
/// # Flush, FUA and multiple connections
///
/// The server shares **one** `Arc<dyn BlockExport>` between all connections
/// to the same export name. `flush()` must make durable every write (and
/// write-zeroes/trim) that has *returned* from this object, whichever
/// connection issued it; a write with `fua = true` must be durable when it
/// returns. An export whose cache and state are shared by all callers (for
/// example one file descriptor, or `fdatasync` of the underlying files)
/// naturally satisfies this, and may then set
/// [`Capabilities::multi_conn`] so the server advertises
/// `NBD_FLAG_CAN_MULTI_CONN`. An export with per-caller caches must not.
pub trait BlockExport: Send + Sync + 'static {
    /// Size in bytes. Constant for the lifetime of the export.
    fn size(&self) -> u64;

    /// Whether the export refuses writes (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;

    /// Optional features (see [`Capabilities`]).
    fn capabilities(&self) -> Capabilities;

    /// Block size constraints; defaults to 1 / 4096 / 32 MiB.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Names of the dirty bitmaps offered as `qemu:dirty-bitmap:NAME`
    /// contexts (none by default). `block_status` answers
    /// [`MetaContext::DirtyBitmap`] with the index into this list.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }

    /// Human readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    fn description(&self) -> String {
        String::new()
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Write `buf` at `offset`; if `fua`, the data is durable on return.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let _ = (offset, buf, fua);
        Err(erofs())
    }

    /// Make `len` bytes at `offset` read as zero. The default writes zero
    /// buffers (and refuses `fast` requests with EOPNOTSUPP).
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.fast {
            return Err(enotsup());
        }
        const CHUNK: u64 = 1024 * 1024;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done);
            let last = done + n == len;
            self.write(offset + done, &zeroes[..n as usize], flags.fua && last)?;
            done += n;
        }
        Ok(())
    }

    /// Discard `len` bytes at `offset` (contents afterwards are unspecified
    /// until rewritten). Only called when [`Capabilities::trim`] is set.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _ = (offset, len, fua);
        Ok(())
    }

    /// Make every completed write durable (see the trait docs for the
    /// multi-connection rule).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Prefetch hint. Only called when [`Capabilities::cache`] is set.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Describe `offset..offset+len` for `ctx` as consecutive extents starting
    /// at `offset`. The export may describe less than `len` (at least one
    /// non-empty extent) or more (the server clips). The default reports one
    /// extent: allocated data for `base:allocation`, depth 1 otherwise.
    fn block_status(&self, offset: u64, len: u64, ctx: MetaContext) -> io::Result<Vec<Extent>> {
        let _ = offset;
        let flags = match ctx {
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => 1,
            MetaContext::DirtyBitmap(_) => 0,
        };
        Ok(vec![Extent { length: len, flags }])
    }
}

// ---------------------------------------------------------------------------
// FileExport
// ---------------------------------------------------------------------------

/// Cap on extents one block-status call returns (keeps replies bounded).
pub const MAX_EXTENTS_PER_CALL: usize = 64 * 1024;

/// An export over a plain raw file (or block device) using `pread`/`pwrite`,
/// `fallocate` for trim and zeroing, and `SEEK_DATA`/`SEEK_HOLE` for block
/// status.
///
/// All connections share the one file descriptor, and `flush()` calls
/// `fdatasync`, which covers every write issued through it: the export
/// advertises multi-conn.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
    description: String,
}

impl FileExport {
    /// Open `path` read-write (or read-only). The export size is the file size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<FileExport> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file_size(&file)?;
        Ok(FileExport {
            file,
            size,
            read_only,
            description: format!("raw file {}", path.display()),
        })
    }

    /// Wrap an already opened file.
    pub fn from_file(
        file: File,
        read_only: bool,
        description: impl Into<String>,
    ) -> io::Result<FileExport> {
        let size = file_size(&file)?;
        Ok(FileExport {
            file,
            size,
            read_only,
            description: description.into(),
        })
    }

    /// Override the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate on a valid fd with plain integer arguments.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a valid fd. SEEK_DATA/SEEK_HOLE do not disturb
        // pread/pwrite, which carry their own offsets.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn allocation_extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS_PER_CALL {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // Filesystem without SEEK_DATA: everything is data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(Extent {
                        length: end - pos,
                        flags: 0,
                    });
                    break;
                }
                Err(e) => return Err(e),
            };
            match data {
                None => {
                    // No data after pos: the rest is a hole.
                    out.push(Extent {
                        length: end - pos,
                        flags: STATE_HOLE | STATE_ZERO,
                    });
                    break;
                }
                Some(d) if d > pos => {
                    let hole_end = d.min(end);
                    out.push(Extent {
                        length: hole_end - pos,
                        flags: STATE_HOLE | STATE_ZERO,
                    });
                    pos = hole_end;
                }
                Some(_) => {
                    let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end);
                    // SEEK_HOLE always finds the implicit hole at EOF; guard
                    // against a non-advancing answer.
                    let data_end = if hole <= pos { end } else { hole.min(end) };
                    out.push(Extent {
                        length: data_end - pos,
                        flags: 0,
                    });
                    pos = data_end;
                }
            }
        }
        Ok(out)
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block device: seek to the end.
    // SAFETY: lseek on a valid fd.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl BlockExport for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> Capabilities {
        let w = !self.read_only;
        Capabilities {
            flush: true,
            fua: w,
            trim: w,
            write_zeroes: w,
            fast_zero: w,
            cache: true,
            multi_conn: true,
            base_allocation: true,
            allocation_depth: true,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // The file shrank underneath us: what is past EOF reads
                    // as zero, like a sparse tail.
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        let r = if flags.may_unmap {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .or_else(|e| {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(e);
                }
                // e.g. tmpfs: punch, then allocate the range again so it
                // stays provisioned as NO_HOLE requires.
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )?;
                self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
            })
        };
        match r {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || e.raw_os_error() == Some(libc::ENOSYS) =>
            {
                if flags.fast {
                    return Err(enotsup());
                }
                // Slow path: write real zeroes.
                const CHUNK: u64 = 1024 * 1024;
                let zeroes = vec![0u8; CHUNK.min(len) as usize];
                let mut done = 0u64;
                while done < len {
                    let n = CHUNK.min(len - done);
                    self.file
                        .write_all_at(&zeroes[..n as usize], offset + done)?;
                    done += n;
                }
            }
            Err(e) => return Err(e),
        }
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            // Trim is advisory.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: advisory call on a valid fd.
        let r = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED)
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, ctx: MetaContext) -> io::Result<Vec<Extent>> {
        let extents = self.allocation_extents(offset, len)?;
        Ok(match ctx {
            MetaContext::BaseAllocation => extents,
            // A raw file is a single layer: data is at depth 1, holes are
            // unallocated.
            MetaContext::AllocationDepth => extents
                .into_iter()
                .map(|e| Extent {
                    length: e.length,
                    flags: if e.flags & STATE_HOLE != 0 { 0 } else { 1 },
                })
                .collect(),
            // No bitmaps are offered, so none is asked for.
            MetaContext::DirtyBitmap(_) => vec![Extent {
                length: len.max(1),
                flags: 0,
            }],
        })
    }
}

// ---------------------------------------------------------------------------
// MemExport
// ---------------------------------------------------------------------------

/// Allocation granularity of [`MemExport`].
pub const MEM_CHUNK: u64 = 64 * 1024;
const SHARDS: usize = 64;

type ChunkMap = BTreeMap<u64, Box<[u8]>>;

/// A sparse in-memory export, allocated in 64 KiB chunks.
///
/// Two durability models are available:
/// * [`MemExport::new`]: write-through; `flush()` has nothing to do.
/// * [`MemExport::new_write_back`]: writes land in the live image at once
///   (all connections see them), but only `flush()` or a FUA write copies
///   them to the *durable* image, which [`MemExport::read_durable`] exposes.
///   This models a shared write-back cache and makes the multi-conn promise
///   observable in tests.
pub struct MemExport {
    size: u64,
    read_only: bool,
    description: String,
    shards: Vec<Mutex<ChunkMap>>,
    durable: Option<Mutex<DurableState>>,
    flushes: AtomicU64,
}

#[derive(Default)]
struct DurableState {
    chunks: ChunkMap,
    dirty: BTreeSet<u64>,
}

impl std::fmt::Debug for MemExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemExport")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("write_back", &self.durable.is_some())
            .finish()
    }
}

impl MemExport {
    /// A zero-filled, write-through export of `size` bytes.
    pub fn new(size: u64) -> MemExport {
        MemExport {
            size,
            read_only: false,
            description: "in-memory export".into(),
            shards: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
            durable: None,
            flushes: AtomicU64::new(0),
        }
    }

    /// A zero-filled export with a write-back durability model.
    pub fn new_write_back(size: u64) -> MemExport {
        let mut m = MemExport::new(size);
        m.durable = Some(Mutex::new(DurableState::default()));
        m.description = "in-memory export (write-back)".into();
        m
    }

    /// Build from existing contents.
    pub fn from_bytes(data: &[u8]) -> MemExport {
        let m = MemExport::new(data.len() as u64);
        // Cannot fail: in range and writable.
        let _ = m.store(0, data);
        m
    }

    /// Make the export read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Override the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Number of `flush()` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Read the durable image (write-back mode); in write-through mode this
    /// equals a normal read.
    pub fn read_durable(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let Some(d) = &self.durable else {
            return self.read(offset, buf);
        };
        let d = lock(d);
        for_each_chunk(offset, buf.len() as u64, |idx, in_chunk, pos, n| {
            let dst = &mut buf[pos..pos + n];
            match d.chunks.get(&idx) {
                Some(c) => dst.copy_from_slice(&c[in_chunk..in_chunk + n]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    /// Whether the chunk containing `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        let idx = offset / MEM_CHUNK;
        lock(self.shard(idx)).contains_key(&idx)
    }

    fn shard(&self, idx: u64) -> &Mutex<ChunkMap> {
        &self.shards[(idx % SHARDS as u64) as usize]
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn chunk_len(&self, idx: u64) -> usize {
        let start = idx * MEM_CHUNK;
        (self.size - start).min(MEM_CHUNK) as usize
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        if let Some(d) = &self.durable {
            if len == 0 {
                return;
            }
            let mut d = lock(d);
            let first = offset / MEM_CHUNK;
            let last = (offset + len - 1) / MEM_CHUNK;
            d.dirty.extend(first..=last);
        }
    }

    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        for_each_chunk(offset, data.len() as u64, |idx, in_chunk, pos, n| {
            let mut shard = lock(self.shard(idx));
            let len = self.chunk_len(idx);
            let chunk = shard
                .entry(idx)
                .or_insert_with(|| vec![0u8; len].into_boxed_slice());
            chunk[in_chunk..in_chunk + n].copy_from_slice(&data[pos..pos + n]);
        });
        self.mark_dirty(offset, data.len() as u64);
        Ok(())
    }

    fn mark_dirty_chunk(&self, idx: u64) {
        if let Some(d) = &self.durable {
            lock(d).dirty.insert(idx);
        }
    }

    /// Deallocate every allocated chunk in `first..=last`; cost is
    /// proportional to the chunks actually allocated.
    fn remove_chunks(&self, first: u64, last: u64) {
        if first > last {
            return;
        }
        for shard in &self.shards {
            let keys: Vec<u64> = {
                let mut shard = lock(shard);
                let keys: Vec<u64> = shard.range(first..=last).map(|(k, _)| *k).collect();
                for k in &keys {
                    shard.remove(k);
                }
                keys
            };
            // Lock order: never hold a shard while taking the durable state.
            for k in keys {
                self.mark_dirty_chunk(k);
            }
        }
    }

    /// First allocated chunk index at or after `from`.
    fn next_allocated(&self, from: u64) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| lock(s).range(from..).next().map(|(k, _)| *k))
            .min()
    }

    /// Zero one chunk's byte range `from..to` (absolute offsets).
    fn zero_in_chunk(&self, idx: u64, from: u64, to: u64, deallocate: bool) {
        let cstart = idx * MEM_CHUNK;
        let clen = self.chunk_len(idx) as u64;
        let mut shard = lock(self.shard(idx));
        if deallocate && from == cstart && to == cstart + clen {
            if shard.remove(&idx).is_some() {
                drop(shard);
                self.mark_dirty_chunk(idx);
            }
        } else if let Some(c) = shard.get_mut(&idx) {
            c[(from - cstart) as usize..(to - cstart) as usize].fill(0);
            drop(shard);
            self.mark_dirty_chunk(idx);
        } else if !deallocate {
            shard.insert(idx, vec![0u8; clen as usize].into_boxed_slice());
            drop(shard);
            self.mark_dirty_chunk(idx);
        }
        // An unallocated chunk that stays unallocated is unchanged.
    }

    fn zero(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / MEM_CHUNK;
        let last = (end - 1) / MEM_CHUNK;
        let bounds = |idx: u64| {
            let cstart = idx * MEM_CHUNK;
            (
                offset.max(cstart),
                end.min(cstart + self.chunk_len(idx) as u64),
            )
        };
        let (f, t) = bounds(first);
        self.zero_in_chunk(first, f, t, deallocate);
        if last > first {
            if deallocate {
                self.remove_chunks(first + 1, last - 1);
            } else {
                for idx in first + 1..last {
                    let (f, t) = bounds(idx);
                    self.zero_in_chunk(idx, f, t, false);
                }
            }
            let (f, t) = bounds(last);
            self.zero_in_chunk(last, f, t, deallocate);
        }
        Ok(())
    }

    fn commit(&self, only: Option<(u64, u64)>) {
        let Some(d) = &self.durable else { return };
        let mut d = lock(d);
        let dirty: Vec<u64> = match only {
            None => std::mem::take(&mut d.dirty).into_iter().collect(),
            Some((offset, len)) if len > 0 => {
                let first = offset / MEM_CHUNK;
                let last = (offset + len - 1) / MEM_CHUNK;
                let v: Vec<u64> = d.dirty.range(first..=last).copied().collect();
                for i in &v {
                    d.dirty.remove(i);
                }
                v
            }
            Some(_) => Vec::new(),
        };
        for idx in dirty {
            let current = lock(self.shard(idx)).get(&idx).cloned();
            match current {
                Some(c) => {
                    d.chunks.insert(idx, c);
                }
                None => {
                    d.chunks.remove(&idx);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bytes behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Call `f(chunk_index, offset_in_chunk, offset_in_buffer, n)` for each piece
/// of `offset..offset+len` split at chunk boundaries.
fn for_each_chunk(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut pos = 0u64;
    while pos < len {
        let abs = offset + pos;
        let idx = abs / MEM_CHUNK;
        let in_chunk = abs % MEM_CHUNK;
        let n = (MEM_CHUNK - in_chunk).min(len - pos);
        f(idx, in_chunk as usize, pos as usize, n as usize);
        pos += n;
    }
}

impl BlockExport for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> Capabilities {
        let w = !self.read_only;
        Capabilities {
            flush: true,
            fua: w,
            trim: w,
            write_zeroes: w,
            fast_zero: w,
            cache: true,
            multi_conn: true,
            base_allocation: true,
            allocation_depth: true,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for_each_chunk(offset, buf.len() as u64, |idx, in_chunk, pos, n| {
            let shard = lock(self.shard(idx));
            let dst = &mut buf[pos..pos + n];
            match shard.get(&idx) {
                Some(c) => dst.copy_from_slice(&c[in_chunk..in_chunk + n]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        self.store(offset, buf)?;
        if fua {
            self.commit(Some((offset, buf.len() as u64)));
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        self.zero(offset, len, flags.may_unmap)?;
        if flags.fua {
            self.commit(Some((offset, len)));
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(erofs());
        }
        // Deallocate whole chunks only; partial chunks keep their contents,
        // which trim permits.
        self.check_range(offset, len)?;
        let end = offset + len;
        let first = offset.div_ceil(MEM_CHUNK);
        // The export's last chunk may be short; it counts as whole when the
        // range reaches the end of the export.
        let last_excl = if end == self.size {
            end.div_ceil(MEM_CHUNK)
        } else {
            end / MEM_CHUNK
        };
        if last_excl > first {
            self.remove_chunks(first, last_excl - 1);
        }
        if fua {
            self.commit(Some((offset, len)));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.commit(None);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64, ctx: MetaContext) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS_PER_CALL {
            let idx = pos / MEM_CHUNK;
            let allocated = lock(self.shard(idx)).contains_key(&idx);
            let next = if allocated {
                (idx * MEM_CHUNK + self.chunk_len(idx) as u64).min(end)
            } else {
                // Skip the whole hole in one step.
                match self.next_allocated(idx + 1) {
                    Some(n) => (n * MEM_CHUNK).min(end),
                    None => end,
                }
            };
            let flags = match (ctx, allocated) {
                (MetaContext::BaseAllocation, true) => 0,
                (MetaContext::BaseAllocation, false) => STATE_HOLE | STATE_ZERO,
                (MetaContext::AllocationDepth, true) => 1,
                (MetaContext::AllocationDepth, false) => 0,
                (MetaContext::DirtyBitmap(_), _) => 0,
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    flags,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_export_rw_and_status() {
        let m = MemExport::new(10 * MEM_CHUNK + 100);
        m.write(MEM_CHUNK - 2, &[1, 2, 3, 4], false).unwrap();
        let mut b = [0u8; 6];
        m.read(MEM_CHUNK - 3, &mut b).unwrap();
        assert_eq!(b, [0, 1, 2, 3, 4, 0]);
        let ext = m
            .block_status(0, m.size(), MetaContext::BaseAllocation)
            .unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 2 * MEM_CHUNK,
                    flags: 0
                },
                Extent {
                    length: 8 * MEM_CHUNK + 100,
                    flags: STATE_HOLE | STATE_ZERO
                },
            ]
        );
        m.write_zeroes(
            0,
            2 * MEM_CHUNK,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!m.is_allocated(0));
        // Last partial chunk.
        m.write(10 * MEM_CHUNK + 99, &[9], false).unwrap();
        let mut b = [0u8; 1];
        m.read(10 * MEM_CHUNK + 99, &mut b).unwrap();
        assert_eq!(b, [9]);
        assert!(m.write(10 * MEM_CHUNK + 100, &[9], false).is_err());
    }

    #[test]
    fn mem_export_write_back() {
        let m = MemExport::new_write_back(4 * MEM_CHUNK);
        m.write(10, b"hello", false).unwrap();
        let mut b = [0u8; 5];
        m.read_durable(10, &mut b).unwrap();
        assert_eq!(&b, &[0; 5]);
        m.flush().unwrap();
        m.read_durable(10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        m.write(MEM_CHUNK * 2, b"fua", true).unwrap();
        let mut b = [0u8; 3];
        m.read_durable(MEM_CHUNK * 2, &mut b).unwrap();
        assert_eq!(&b, b"fua");
    }

    #[test]
    fn mem_export_huge_sparse_ranges_are_cheap() {
        let t = std::time::Instant::now();
        let m = MemExport::new_write_back(1 << 40);
        m.write(1 << 39, b"x", false).unwrap();
        let ext = m
            .block_status(0, 1 << 40, MetaContext::BaseAllocation)
            .unwrap();
        assert_eq!(ext.len(), 3, "{ext:?}");
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 40);
        m.write_zeroes(
            0,
            1 << 40,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!m.is_allocated(1 << 39));
        m.write(5, b"abc", false).unwrap();
        m.trim(0, 1 << 40, false).unwrap();
        assert!(!m.is_allocated(0));
        m.flush().unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn mem_export_partial_zero_and_short_last_chunk() {
        let m = MemExport::new(2 * MEM_CHUNK + 10);
        m.write(0, &vec![1u8; (2 * MEM_CHUNK + 10) as usize], false)
            .unwrap();
        m.write_zeroes(
            100,
            2 * MEM_CHUNK - 100,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = vec![9u8; (2 * MEM_CHUNK + 10) as usize];
        m.read(0, &mut b).unwrap();
        assert!(b[..100].iter().all(|&x| x == 1));
        assert!(b[100..(2 * MEM_CHUNK) as usize].iter().all(|&x| x == 0));
        assert!(b[(2 * MEM_CHUNK) as usize..].iter().all(|&x| x == 1));
        assert!(!m.is_allocated(MEM_CHUNK));
        // Trim to the end covers the short last chunk.
        m.trim(MEM_CHUNK, MEM_CHUNK + 10, false).unwrap();
        assert!(!m.is_allocated(2 * MEM_CHUNK));
        assert!(m.is_allocated(0));
    }

    #[test]
    fn file_export_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let e = FileExport::open(&p, false).unwrap();
        e.write(1 << 20, &[7u8; 4096], false).unwrap();
        let ext = e
            .block_status(0, 8 << 20, MetaContext::BaseAllocation)
            .unwrap();
        let total: u64 = ext.iter().map(|x| x.length).sum();
        assert_eq!(total, 8 << 20);
        assert!(ext.iter().any(|x| x.flags == 0));
        assert!(ext.iter().any(|x| x.flags == STATE_HOLE | STATE_ZERO));
        e.write_zeroes(
            1 << 20,
            4096,
            ZeroFlags {
                may_unmap: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = vec![1u8; 4096];
        e.read(1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        e.write_zeroes(
            0,
            4096,
            ZeroFlags {
                may_unmap: false,
                fast: true,
                fua: true,
            },
        )
        .unwrap();
        e.flush().unwrap();
    }
}
