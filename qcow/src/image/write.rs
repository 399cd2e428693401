//! Writing guest data: planning a write within one L2 table (allocate,
//! fill subclusters, copy on write from the backing chain) and carrying it out.

use super::*;

impl Image {
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
    pub(super) fn plan_write(&self, st: &SlotState, start: u64, end: u64) -> Result<Vec<Action>> {
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

    pub(super) fn write_table(&self, l1i: u64, data: &[u8], start: u64) -> Result<()> {
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
    pub(super) fn execute(&self, plan: &mut [Action], data: &[u8], start: u64) -> Result<()> {
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
    pub(super) fn fill_old(&self, old: &L2Entry, cbase: u64, x: u64, out: &mut [u8]) -> Result<()> {
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

    pub(super) fn read_backing(&self, out: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_padded(out, guest),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }
}
