//! Reading: the segments of a guest range in one L2 table, data reads
//! through this layer (and the chain below it), compressed clusters, block
//! status.

use super::*;

impl Image {
    /// Describe guest range `[start, end)`, which lies inside one L2 table.
    pub(super) fn segments(
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
                    // Most clusters are all one state: one segment, not 32
                    // (an overlay's untouched clusters are all unallocated).
                    let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
                    let uniform = match (alloc, zero, host) {
                        (0, 0, _) => Some(Seg::Unalloc),
                        (0, u32::MAX, _) => Some(Seg::Zero),
                        (u32::MAX, 0, Some(h)) => Some(Seg::Data(h.0 + (pos - cbase))),
                        _ => None,
                    };
                    if let Some(seg) = uniform {
                        push(pos, cend - pos, seg);
                        pos = cend;
                        continue;
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
    pub(super) fn read_compressed(&self, descriptor: u64) -> Result<Arc<Vec<u8>>> {
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
}
