//! Write-zeroes and discard: whole (sub)clusters by their L2 entries, the
//! unaligned edges as written zeros.

use super::*;

impl Image {
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

    pub(super) fn zero_range(
        &self,
        off: u64,
        len: u64,
        may_unmap: bool,
        discard: bool,
    ) -> Result<()> {
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
    pub(super) fn zero_partial(&self, off: u64, len: u64) -> Result<()> {
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
    pub(super) fn zero_table(
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

    pub(super) fn zero_partial_force(&self, off: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_table(self.geo.l1_index(off), &zeros, off)
    }
}
