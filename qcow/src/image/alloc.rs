//! The refcount allocator: refcount blocks and the refcount table, cluster
//! runs, releasing clusters, and new L2 tables.

use super::*;

impl Image {
    pub(super) fn load_block(&self, a: &mut Allocator, r: u64) -> Result<()> {
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

    pub(super) fn refcount(&self, a: &mut Allocator, c: u64) -> Result<u64> {
        let r = c / self.geo.rb_entries;
        if a.rt.get(r as usize).copied().unwrap_or(0) == 0 {
            return Ok(0);
        }
        self.load_block(a, r)?;
        Ok(a.blocks.get(&r).map_or(0, |b| {
            get_refcount(&b.data, self.geo.refcount_order, c % self.geo.rb_entries)
        }))
    }

    pub(super) fn set_rc(&self, a: &mut Allocator, c: u64, v: u64) -> Result<()> {
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

    pub(super) fn table_full(&self) -> Error {
        Error::unsupported(
            &self.path,
            "the refcount table is full: the file has grown beyond what its refcount table can describe",
        )
    }

    /// Make sure refcount block `r` exists, creating it (in a fresh cluster) if needed.
    /// Returns true when a block was created (the caller re-plans, `next` moved).
    pub(super) fn ensure_block(&self, a: &mut Allocator, r: u64) -> Result<bool> {
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
    pub(super) fn grow_table(&self, a: &mut Allocator, r: u64) -> Result<()> {
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
    pub(super) fn alloc_run(&self, n: u64) -> Result<u64> {
        let mut a = lock(&self.alloc);
        self.alloc_run_locked(&mut a, n)
    }

    pub(super) fn alloc_run_locked(&self, a: &mut Allocator, n: u64) -> Result<u64> {
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
    pub(super) fn release(&self, old: &L2Entry, new_host: Option<u64>, frees: &mut Vec<u64>) {
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
    pub(super) fn ensure_table(&self, l1i: u64, st: &mut SlotState) -> Result<()> {
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
}
