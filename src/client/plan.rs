//! What to copy: the source's maps turned into a list of pieces.
//!
//! A full reads what the allocation map calls data and skips holes; an
//! incremental reads the extents the dirty bitmap marks, and turns the dirty
//! extents the allocation map calls zero into write-zeroes. The transfer
//! then splits data pieces into requests and finds all-zero blocks inside
//! them.

use chainvault_nbd::client::STATE_DIRTY;
use chainvault_nbd::proto::STATE_ZERO;
use chainvault_nbd::Extent;

/// What to do with a range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read it from the source and write it to the target.
    Data,
    /// It reads as zeroes: write zeroes to the target, read nothing.
    Zero,
}

/// One range of the disk and what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub kind: Kind,
}

/// The pieces of one disk's transfer with their totals.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub pieces: Vec<Piece>,
    /// Bytes to read from the source.
    pub data_bytes: u64,
    /// Bytes to write as zeroes.
    pub zero_bytes: u64,
}

impl Plan {
    fn push(&mut self, offset: u64, len: u64, kind: Kind) {
        if len == 0 {
            return;
        }
        match kind {
            Kind::Data => self.data_bytes += len,
            Kind::Zero => self.zero_bytes += len,
        }
        if let Some(l) = self.pieces.last_mut() {
            if l.kind == kind && l.offset + l.len == offset {
                l.len += len;
                return;
            }
        }
        self.pieces.push(Piece { offset, len, kind });
    }

    /// Split pieces so that none is longer than `data_max` (data) or
    /// `zero_max` (zeroes), cutting data at multiples of `data_max` so that
    /// requests stay aligned.
    pub fn split(&self, data_max: u64, zero_max: u64) -> Vec<Piece> {
        let mut out = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            let max = match p.kind {
                Kind::Data => data_max,
                Kind::Zero => zero_max,
            };
            let mut off = p.offset;
            let end = p.offset + p.len;
            while off < end {
                let next = ((off / max) + 1) * max;
                let stop = next.min(end);
                out.push(Piece {
                    offset: off,
                    len: stop - off,
                    kind: p.kind,
                });
                off = stop;
            }
        }
        out
    }
}

impl Plan {
    /// The same plan on whole blocks of `block` bytes (the last block of the
    /// disk may be shorter), so that every block read can be hashed whole:
    /// a block the plan touches only in part is read whole (the rest comes
    /// from the source as it is), and a block is written as zeroes only if
    /// zero pieces cover all of it.
    pub fn aligned(&self, size: u64, block: u64) -> Plan {
        let mut out = Plan::default();
        // A block seen only in part so far: (index, zero bytes, any data).
        let mut pend: Option<(u64, u64, bool)> = None;
        let block_end = |i: u64| ((i + 1) * block).min(size);
        let flush = |out: &mut Plan, pend: Option<(u64, u64, bool)>| {
            if let Some((i, zeros, data)) = pend {
                let len = block_end(i) - i * block;
                let kind = if !data && zeros == len {
                    Kind::Zero
                } else {
                    Kind::Data
                };
                out.push(i * block, len, kind);
            }
        };
        for p in &self.pieces {
            let end = (p.offset + p.len).min(size);
            let mut pos = p.offset;
            while pos < end {
                let i = pos / block;
                let stop = end.min(block_end(i));
                if pos == i * block && stop == block_end(i) {
                    // Whole blocks: as many as the piece covers.
                    if pend.is_some_and(|x| x.0 != i) {
                        flush(&mut out, pend.take());
                    }
                    let run_end = if end >= size {
                        size
                    } else {
                        end / block * block
                    };
                    out.push(pos, run_end - pos, p.kind);
                    pos = run_end;
                    continue;
                }
                if pend.map(|x| x.0) != Some(i) {
                    flush(&mut out, pend.take());
                    pend = Some((i, 0, false));
                }
                if let Some(x) = pend.as_mut() {
                    match p.kind {
                        Kind::Zero => x.1 += stop - pos,
                        Kind::Data => x.2 = true,
                    }
                }
                pos = stop;
            }
        }
        flush(&mut out, pend);
        out
    }
}

/// Extents (length, flags) laid end to end from 0, as absolute ranges.
fn absolute(ext: &[Extent]) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
    let mut pos = 0u64;
    ext.iter().map(move |e| {
        let r = (pos, e.length, e.flags);
        pos += e.length;
        r
    })
}

/// A full read. `alloc` is the `base:allocation` map (None: everything is
/// data). Zero extents are skipped when the target is a fresh image
/// (`zeroes_needed == false`) and written as zeroes when the target has a
/// backing chain whose data they must hide (a full kept as an overlay).
pub fn full(size: u64, alloc: Option<&[Extent]>, zeroes_needed: bool) -> Plan {
    let mut plan = Plan::default();
    match alloc {
        None => plan.push(0, size, Kind::Data),
        Some(ext) => {
            for (off, len, flags) in absolute(ext) {
                let len = len.min(size.saturating_sub(off));
                if flags & STATE_ZERO != 0 {
                    if zeroes_needed {
                        plan.push(off, len, Kind::Zero);
                    }
                } else {
                    plan.push(off, len, Kind::Data);
                }
            }
        }
    }
    plan
}

/// An incremental read: the dirty extents of `dirty` (a
/// `qemu:dirty-bitmap:NAME` map), as data, except where `alloc` says the
/// source reads as zeroes there.
pub fn incremental(size: u64, dirty: &[Extent], alloc: Option<&[Extent]>) -> Plan {
    let mut plan = Plan::default();
    let zero_runs: Vec<(u64, u64)> = alloc
        .map(|a| {
            absolute(a)
                .filter(|e| e.2 & STATE_ZERO != 0)
                .map(|e| (e.0, e.0 + e.1))
                .collect()
        })
        .unwrap_or_default();
    let mut zi = 0usize;
    for (off, len, flags) in absolute(dirty) {
        if flags & STATE_DIRTY == 0 {
            continue;
        }
        let end = (off + len).min(size);
        let mut pos = off;
        while pos < end {
            while zi < zero_runs.len() && zero_runs[zi].1 <= pos {
                zi += 1;
            }
            match zero_runs.get(zi) {
                Some(&(zs, ze)) if zs <= pos => {
                    let stop = ze.min(end);
                    plan.push(pos, stop - pos, Kind::Zero);
                    pos = stop;
                }
                Some(&(zs, _)) => {
                    let stop = zs.min(end);
                    plan.push(pos, stop - pos, Kind::Data);
                    pos = stop;
                }
                None => {
                    plan.push(pos, end - pos, Kind::Data);
                    pos = end;
                }
            }
        }
    }
    plan
}

/// Bytes a dirty-bitmap map marks dirty.
pub fn dirty_bytes(dirty: &[Extent]) -> u64 {
    dirty
        .iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| e.length)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: &[(u64, u32)]) -> Vec<Extent> {
        v.iter()
            .map(|&(length, flags)| Extent { length, flags })
            .collect()
    }

    fn p(offset: u64, len: u64, kind: Kind) -> Piece {
        Piece { offset, len, kind }
    }

    #[test]
    fn full_skips_holes_on_a_fresh_target_and_zeroes_them_over_a_parent() {
        let alloc = ext(&[(100, 0), (50, 3), (30, 0), (20, 2)]);
        let fresh = full(200, Some(&alloc), false);
        assert_eq!(
            fresh.pieces,
            vec![p(0, 100, Kind::Data), p(150, 30, Kind::Data)]
        );
        assert_eq!((fresh.data_bytes, fresh.zero_bytes), (130, 0));
        let over = full(200, Some(&alloc), true);
        assert_eq!(
            over.pieces,
            vec![
                p(0, 100, Kind::Data),
                p(100, 50, Kind::Zero),
                p(150, 30, Kind::Data),
                p(180, 20, Kind::Zero)
            ]
        );
        assert_eq!(full(64, None, false).pieces, vec![p(0, 64, Kind::Data)]);
    }

    #[test]
    fn incremental_reads_dirty_data_and_zeroes_dirty_holes() {
        // dirty: [10,40) and [60,100)
        let dirty = ext(&[(10, 0), (30, 1), (20, 0), (40, 1)]);
        // zero: [30,70)
        let alloc = ext(&[(30, 0), (40, 3), (30, 0)]);
        let plan = incremental(100, &dirty, Some(&alloc));
        assert_eq!(
            plan.pieces,
            vec![
                p(10, 20, Kind::Data),
                p(30, 10, Kind::Zero),
                p(60, 10, Kind::Zero),
                p(70, 30, Kind::Data)
            ]
        );
        assert_eq!(plan.data_bytes + plan.zero_bytes, dirty_bytes(&dirty));
        // Without an allocation map, everything dirty is data.
        let plan = incremental(100, &dirty, None);
        assert_eq!(
            plan.pieces,
            vec![p(10, 30, Kind::Data), p(60, 40, Kind::Data)]
        );
        // Nothing dirty: nothing to do.
        assert!(incremental(100, &ext(&[(100, 0)]), Some(&alloc))
            .pieces
            .is_empty());
    }

    #[test]
    fn aligned_plans_cover_whole_blocks_and_zero_only_whole_zero_blocks() {
        let plan = Plan {
            pieces: vec![
                p(3, 5, Kind::Data),  // block 0 in part
                p(8, 8, Kind::Zero),  // block 1 whole
                p(16, 4, Kind::Zero), // block 2 in part ...
                p(20, 4, Kind::Zero), // ... and the rest of it: still zero
                p(24, 2, Kind::Zero), // block 3 in part, with data after
                p(28, 2, Kind::Data),
                p(40, 16, Kind::Data), // blocks 5 and 6 whole
                p(60, 2, Kind::Zero),  // block 7 (short: the disk ends at 62) in part
            ],
            data_bytes: 0,
            zero_bytes: 0,
        };
        let a = plan.aligned(62, 8);
        assert_eq!(
            a.pieces,
            vec![
                p(0, 8, Kind::Data),
                p(8, 16, Kind::Zero),
                p(24, 8, Kind::Data),
                p(40, 22, Kind::Data)
            ]
        );
        assert_eq!((a.data_bytes, a.zero_bytes), (38, 16));
    }

    #[test]
    fn split_cuts_at_aligned_boundaries() {
        let plan = Plan {
            pieces: vec![p(3, 20, Kind::Data), p(23, 25, Kind::Zero)],
            data_bytes: 20,
            zero_bytes: 25,
        };
        assert_eq!(
            plan.split(8, 100),
            vec![
                p(3, 5, Kind::Data),
                p(8, 8, Kind::Data),
                p(16, 7, Kind::Data),
                p(23, 25, Kind::Zero)
            ]
        );
    }
}
