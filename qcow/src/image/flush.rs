//! Flush: making writes durable with metadata in crash-safe order (see the
//! crash-safety notes of the parent module).

use super::*;

impl Image {
    pub(super) fn maybe_flush_for_cache(&self) -> Result<()> {
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

    pub(super) fn flush_inner(&self) -> Result<()> {
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

    pub(super) fn snapshot_refcounts(&self) -> RefcountWrites {
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
    pub(super) fn write_refcounts(&self, w: &RefcountWrites) -> Result<Vec<u64>> {
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

    pub(super) fn sync(&self, what: &'static str) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, what, e))
    }
}

pub(super) struct TableMove {
    new_offset: u64,
    new_clusters: u64,
    table: Vec<u8>,
    old_offset: u64,
    old_clusters: u64,
}

pub(super) struct RefcountWrites {
    blocks: Vec<(u64, Vec<u8>)>,
    entries: Vec<(usize, u64)>,
    table_offset: u64,
    moved: Option<TableMove>,
}
