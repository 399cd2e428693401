//! The client's block digests of what it read from the source: one per
//! block of the disk, from the parent point's digests (an incremental) or
//! zero blocks (a full), overwritten by the blocks it read or zeroed. They
//! give the source's digest (docs/layout.md) and the list of blocks read,
//! which the daemon compares with what it stored.
//!
//! Memory: 32 bytes per 64 KiB block of the disk (1 MiB per 2 GiB) and one
//! bit per block.

use std::sync::Mutex;

use crate::digest::file::{Kind, Writer};
use crate::digest::{
    block_len, blocks, hash_blocks, zero_digest, BlockDigest, PointDigest, RootHasher, BLOCK,
};

pub struct SourceDigests {
    size: u64,
    /// The digests of blocks the client did not read are known (a parent's
    /// digests, or a full).
    pub complete: bool,
    inner: Mutex<Inner>,
}

struct Inner {
    dense: Vec<BlockDigest>,
    touched: Vec<u64>,
}

impl SourceDigests {
    /// `parent`: the parent point's block digests, one per block; None for
    /// a full (`complete`) or when the parent has none (`!complete`).
    pub fn new(size: u64, parent: Option<Vec<BlockDigest>>, complete: bool) -> SourceDigests {
        let n = blocks(size) as usize;
        let dense = parent.filter(|p| p.len() == n).unwrap_or_else(|| {
            (0..n as u64)
                .map(|i| zero_digest(block_len(size, i)))
                .collect()
        });
        SourceDigests {
            size,
            complete,
            inner: Mutex::new(Inner {
                dense,
                touched: vec![0; n.div_ceil(64)],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes read at `offset` (a block boundary).
    pub fn record(&self, offset: u64, buf: &[u8]) {
        let mut got = Vec::with_capacity(buf.len().div_ceil(BLOCK as usize));
        hash_blocks(self.size, offset / BLOCK, buf, |i, d| got.push((i, d)));
        let mut g = self.lock();
        for (i, d) in got {
            g.dense[i as usize] = d;
            g.touched[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Zeroes written over `[offset, offset + len)` (whole blocks).
    pub fn record_zero(&self, offset: u64, len: u64) {
        let mut g = self.lock();
        let first = offset / BLOCK;
        let end = (offset + len).div_ceil(BLOCK).min(blocks(self.size));
        for i in first..end {
            g.dense[i as usize] = zero_digest(block_len(self.size, i));
            g.touched[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// The source's digest, when every block's digest is known.
    pub fn root(&self) -> Option<PointDigest> {
        if !self.complete {
            return None;
        }
        let g = self.lock();
        let mut r = RootHasher::new(self.size);
        for d in &g.dense {
            r.push(d);
        }
        Some(r.finish())
    }

    /// The blocks read or zeroed, as a digest file's bytes (kind layer).
    pub fn upload(&self) -> Vec<u8> {
        let g = self.lock();
        let mut w = match Writer::new(Vec::new(), self.size, Kind::Layer) {
            Ok(w) => w,
            Err(_) => return Vec::new(),
        };
        for (i, d) in g.dense.iter().enumerate() {
            if g.touched[i / 64] & (1 << (i % 64)) != 0 && w.push(i as u64, d).is_err() {
                return Vec::new();
            }
        }
        w.finish().unwrap_or_default()
    }

    /// Blocks read or zeroed.
    pub fn touched(&self) -> u64 {
        self.lock()
            .touched
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum()
    }
}
