//! qcow2 images and chains served over NBD: the `BlockExport` implementation
//! that joins `chainvault-qcow` to `chainvault-nbd` (which know nothing of
//! each other).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chainvault_nbd::proto::{STATE_HOLE, STATE_ZERO};
use chainvault_nbd::{
    BlockExport, BlockSizes, Capabilities, Extent as NbdExtent, MetaContext, ZeroFlags,
};
use chainvault_qcow::{Chain, ExtentKind, Image};

/// Most extents one block-status answer carries (the client asks again for more).
const MAX_EXTENTS: usize = 16 * 1024;
/// Block status never looks further than this in one call.
const MAX_STATUS_SPAN: u64 = 4 << 30;

fn io_err(e: chainvault_qcow::Error) -> io::Error {
    let errno = e.errno();
    tracing::warn!(error = %e, "export I/O failed");
    io::Error::from_raw_os_error(errno)
}

/// A qcow2 chain served over NBD: writable (the top image takes the writes)
/// or read-only (a point in time).
pub struct QcowExport {
    chain: Arc<Chain>,
    image: Option<Arc<Image>>,
    description: String,
    /// Store only what differs from the backing chain (a full read after a CBT
    /// reset, kept as an overlay of the previous point).
    compare: bool,
    activity: Option<Arc<Activity>>,
    /// `qemu:dirty-bitmap:NAME` contexts: name and the sorted, merged guest
    /// ranges it marks dirty.
    dirty: Vec<(String, Vec<(u64, u64)>)>,
}

/// Guest ranges the `layers` top layers of `chain` hold themselves (data or
/// recorded zeroes), sorted and merged: the blocks that differ between the
/// chain's top and the point `layers` levels down (they differ nowhere else).
pub fn changed_ranges(chain: &Chain, layers: usize) -> chainvault_qcow::Result<Vec<(u64, u64)>> {
    let mut all: Vec<(u64, u64)> = Vec::new();
    for l in chain.layers().iter().take(layers) {
        let chainvault_qcow::Layer::Qcow(img) = l else {
            // A raw layer holds everything.
            return Ok(vec![(0, chain.size())]);
        };
        for e in img.block_status(0, img.size())? {
            if e.kind != ExtentKind::Unallocated {
                all.push((e.offset, e.length));
            }
        }
    }
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (o, l) in all {
        match out.last_mut() {
            Some(p) if o <= p.0 + p.1 => p.1 = p.1.max(o + l - p.0),
            _ => out.push((o, l)),
        }
    }
    Ok(out)
}

/// The guest ranges layer `k` of `chain` holds itself (data or recorded
/// zeroes), sorted and merged.
pub fn changed_ranges_of_layer(
    chain: &Chain,
    k: usize,
) -> chainvault_qcow::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    match chain.layers().get(k) {
        Some(chainvault_qcow::Layer::Qcow(img)) => {
            for e in img.block_status(0, img.size())? {
                if e.kind == ExtentKind::Unallocated {
                    continue;
                }
                match out.last_mut() {
                    Some(p) if p.0 + p.1 == e.offset => p.1 += e.length,
                    _ => out.push((e.offset, e.length)),
                }
            }
        }
        Some(_) => out.push((0, chain.size())),
        None => {}
    }
    Ok(out)
}

/// Counters the engine watches: last request time and bytes written.
#[derive(Debug, Default)]
pub struct Activity {
    /// Milliseconds since the Unix epoch of the last request.
    pub last_ms: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Activity {
    pub fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl QcowExport {
    /// Serve `chain`. Writes go to its top image if that was opened writable.
    pub fn new(chain: Arc<Chain>, description: impl Into<String>) -> QcowExport {
        let image = chain.top_image().filter(|i| i.is_writable()).cloned();
        QcowExport {
            chain,
            image,
            description: description.into(),
            compare: false,
            activity: None,
            dirty: Vec::new(),
        }
    }

    /// Offer `qemu:dirty-bitmap:NAME` contexts over these ranges.
    pub fn with_dirty_bitmaps(mut self, d: Vec<(String, Vec<(u64, u64)>)>) -> Self {
        self.dirty = d;
        self
    }

    /// Extents of `offset..offset+len` for one dirty bitmap (flag 1: dirty).
    fn dirty_extents(&self, i: usize, offset: u64, len: u64) -> Vec<NbdExtent> {
        let ranges = self.dirty.get(i).map(|d| d.1.as_slice()).unwrap_or(&[]);
        let end = offset + len;
        let mut out: Vec<NbdExtent> = Vec::new();
        let mut push = |n: u64, flags: u32| {
            if n == 0 {
                return;
            }
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += n,
                _ => out.push(NbdExtent { length: n, flags }),
            }
        };
        let mut pos = offset;
        let start = ranges.partition_point(|r| r.0 + r.1 <= offset);
        for &(o, l) in &ranges[start..] {
            if pos >= end || o >= end {
                break;
            }
            if o > pos {
                push(o - pos, 0);
                pos = o;
            }
            let stop = (o + l).min(end);
            if stop > pos {
                push(stop - pos, 1);
                pos = stop;
            }
        }
        push(end.saturating_sub(pos), 0);
        out
    }

    /// Compare writes with what the chain below already holds, and store only
    /// the (sub)clusters that differ.
    pub fn compare_with_backing(mut self, on: bool) -> Self {
        self.compare = on;
        self
    }

    /// Record activity and bytes written in `a`.
    pub fn with_activity(mut self, a: Arc<Activity>) -> Self {
        self.activity = Some(a);
        self
    }

    fn touch(&self) {
        if let Some(a) = &self.activity {
            a.touch();
        }
    }

    /// Compare-mode write: skip the pieces equal to what is already there.
    fn write_differences(&self, img: &Image, offset: u64, buf: &[u8]) -> io::Result<()> {
        let g = img.geometry().subcluster_size;
        let mut old = vec![0u8; buf.len()];
        self.chain.read_at(&mut old, offset).map_err(io_err)?;
        let mut i = 0usize;
        let mut run: Option<usize> = None;
        while i < buf.len() {
            let j = (i as u64 + g - (offset + i as u64) % g).min(buf.len() as u64) as usize;
            let differs = buf[i..j] != old[i..j];
            match (differs, run) {
                (true, None) => run = Some(i),
                (false, Some(s)) => {
                    img.write_at(&buf[s..i], offset + s as u64)
                        .map_err(io_err)?;
                    run = None;
                }
                _ => {}
            }
            i = j;
        }
        if let Some(s) = run {
            img.write_at(&buf[s..], offset + s as u64).map_err(io_err)?;
        }
        Ok(())
    }

    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }

    fn image(&self) -> io::Result<&Arc<Image>> {
        self.image
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Granularity below which zeroing is not metadata-only.
    fn zero_granularity(&self) -> u64 {
        match &self.image {
            Some(i) => i.geometry().subcluster_size,
            None => 512,
        }
    }
}

impl BlockExport for QcowExport {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    fn read_only(&self) -> bool {
        self.image.is_none()
    }

    fn capabilities(&self) -> Capabilities {
        let w = self.image.is_some();
        Capabilities {
            flush: true,
            fua: w,
            trim: w,
            write_zeroes: w,
            fast_zero: w,
            cache: false,
            // One Image shared by every connection: a flush covers them all.
            multi_conn: true,
            base_allocation: true,
            allocation_depth: true,
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        let preferred = match self.chain.top_image() {
            Some(i) => i.geometry().cluster_size.clamp(4096, 2 << 20) as u32,
            None => 4096,
        };
        BlockSizes {
            minimum: 1,
            preferred,
            maximum: 32 << 20,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.touch();
        self.chain.read_at(buf, offset).map_err(io_err)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.touch();
        let img = self.image()?;
        if let Some(a) = &self.activity {
            a.bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        if self.compare {
            self.write_differences(img, offset, buf)?;
        } else {
            img.write_at(buf, offset).map_err(io_err)?;
        }
        if fua {
            img.flush().map_err(io_err)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.touch();
        let img = self.image()?;
        if self.compare {
            // Already zero below: nothing to store.
            let below = self.chain.block_status(offset, len).map_err(io_err)?;
            if below.iter().all(|e| e.kind != ExtentKind::Data) {
                return Ok(());
            }
        }
        if flags.fast {
            // Fast only when it is metadata alone: aligned to what the image can mark zero.
            let g = self.zero_granularity();
            if !offset.is_multiple_of(g)
                || (!(offset + len).is_multiple_of(g) && offset + len != self.size())
            {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
        }
        img.write_zeroes(offset, len, flags.may_unmap)
            .map_err(io_err)?;
        if flags.fua {
            img.flush().map_err(io_err)?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.touch();
        let img = self.image()?;
        img.discard(offset, len).map_err(io_err)?;
        if fua {
            img.flush().map_err(io_err)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.touch();
        match &self.image {
            Some(i) => i.flush().map_err(io_err),
            None => Ok(()),
        }
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.dirty.iter().map(|d| d.0.clone()).collect()
    }

    fn block_status(&self, offset: u64, len: u64, ctx: MetaContext) -> io::Result<Vec<NbdExtent>> {
        self.touch();
        let len = len.min(MAX_STATUS_SPAN);
        if let MetaContext::DirtyBitmap(i) = ctx {
            return Ok(self.dirty_extents(i as usize, offset, len));
        }
        let extents = self.chain.block_status(offset, len).map_err(io_err)?;
        let mut out: Vec<NbdExtent> = Vec::new();
        for e in extents {
            let flags = match ctx {
                MetaContext::BaseAllocation => match e.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
                },
                MetaContext::AllocationDepth => match e.kind {
                    ExtentKind::Unallocated => 0,
                    _ => e.depth + 1,
                },
                MetaContext::DirtyBitmap(_) => 0,
            };
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += e.length,
                _ => {
                    if out.len() == MAX_EXTENTS {
                        break;
                    }
                    out.push(NbdExtent {
                        length: e.length,
                        flags,
                    })
                }
            }
        }
        if out.is_empty() {
            out.push(NbdExtent {
                length: len,
                flags: 0,
            });
        }
        Ok(out)
    }
}
