//! Computing block digests from images: the top layer of a chain at
//! completion (only the blocks it holds, read through the chain), and every
//! block of any chain.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use chainvault_qcow::{Chain, ExtentKind};

use super::file::{self, FileWriter, Kind, Resolved};
use super::{blocks, hash_blocks, BlockDigest, PointDigest, BLOCK};

/// Blocks read and hashed per task.
const BATCH_BLOCKS: u64 = 64;
/// Tasks handed out between two writes of their results.
const WINDOW: usize = 64;

/// Ranges of blocks `[start, end)`, ascending and disjoint.
pub type Runs = Vec<(u64, u64)>;

/// Add `[a, b)` to ascending `runs`, joining it to the last run it touches.
pub fn push_run(runs: &mut Runs, a: u64, b: u64) {
    match runs.last_mut() {
        Some(l) if l.1 >= a => l.1 = l.1.max(b),
        _ => runs.push((a, b)),
    }
}

/// The blocks touched by the extents `keep` selects.
fn block_runs(ext: &[chainvault_qcow::Extent], keep: impl Fn(ExtentKind) -> bool) -> Runs {
    let mut runs = Runs::new();
    for e in ext.iter().filter(|e| e.length > 0 && keep(e.kind)) {
        push_run(
            &mut runs,
            e.offset / BLOCK,
            (e.offset + e.length).div_ceil(BLOCK),
        );
    }
    runs
}

/// The blocks the top layer of `chain` holds anything for (data or zero
/// clusters, whole or in part).
pub fn own_blocks(chain: &Chain) -> Result<Runs, String> {
    let size = chain.size();
    let Some(img) = chain.top_image() else {
        // A raw top layer holds every block.
        return Ok(vec![(0, blocks(size))]);
    };
    let ext = img
        .block_status(0, size)
        .map_err(|e| format!("reading the allocation of {}: {e}", img.path().display()))?;
    Ok(block_runs(&ext, |k| k != ExtentKind::Unallocated))
}

/// The blocks that hold data anywhere in `chain` (zero and unallocated
/// ranges of every layer are zero blocks, and need not be read).
pub fn data_blocks(chain: &Chain) -> Result<Runs, String> {
    let ext = chain.block_status(0, chain.size()).map_err(|e| {
        format!(
            "reading the allocation of {}: {e}",
            chain.top().path().display()
        )
    })?;
    Ok(block_runs(&ext, |k| k == ExtentKind::Data))
}

/// The digest of each block of one batch, or why that block could not be
/// read.
type BatchResult = Vec<(u64, Result<BlockDigest, String>)>;

/// Total blocks in `runs`.
pub fn count(runs: &Runs) -> u64 {
    runs.iter().map(|r| r.1 - r.0).sum()
}

/// Read blocks `[a, b)` through `chain` and hash them. When the batch
/// cannot be read in one go, each block is read alone, so that one
/// unreadable block (a damaged compressed cluster, say) is named and the
/// others are still hashed.
fn hash_batch(chain: &Chain, a: u64, b: u64, buf: &mut Vec<u8>) -> BatchResult {
    let size = chain.size();
    let off = a * BLOCK;
    let len = ((b * BLOCK).min(size) - off) as usize;
    buf.resize(len, 0);
    let mut v = Vec::with_capacity((b - a) as usize);
    if chain.read_at(buf, off).is_ok() {
        hash_blocks(size, a, buf, |i, d| v.push((i, Ok(d))));
        return v;
    }
    for i in a..b {
        let off = i * BLOCK;
        let len = super::block_len(size, i);
        buf.resize(len, 0);
        match chain.read_at(buf, off) {
            Ok(()) => hash_blocks(size, i, buf, |j, d| v.push((j, Ok(d)))),
            Err(e) => v.push((i, Err(format!("reading {len} bytes at offset {off}: {e}")))),
        }
    }
    v
}

/// Takes each block's digest, or why the block could not be read.
pub type BlockSink<'a> = dyn FnMut(u64, Result<&BlockDigest, &str>) -> Result<(), String> + 'a;

/// Read the blocks of `runs` through `chain` and hash them, on a few
/// threads; `out` gets every block's digest (or why it could not be read)
/// in ascending order, `progress` the bytes read so far.
pub fn hash_runs(
    chain: &Chain,
    runs: &Runs,
    out: &mut BlockSink<'_>,
    progress: &dyn Fn(u64),
) -> Result<(), String> {
    let size = chain.size();
    let mut batches: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in runs {
        let mut s = a;
        while s < b {
            let e = (s + BATCH_BLOCKS).min(b);
            batches.push((s, e));
            s = e;
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4);
    let mut done = 0u64;
    for window in batches.chunks(WINDOW) {
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<BatchResult>>> =
            window.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..threads.min(window.len()) {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(a, b)) = window.get(k) else {
                            return;
                        };
                        let r = hash_batch(chain, a, b, &mut buf);
                        *slots[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    }
                });
            }
        });
        for (slot, &(a, b)) in slots.into_iter().zip(window) {
            let v = slot
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .ok_or_else(|| "a digest task did not run".to_string())?;
            for (i, d) in &v {
                out(*i, d.as_ref().map_err(|e| e.as_str()))?;
            }
            done += ((b * BLOCK).min(size)) - a * BLOCK;
        }
        progress(done);
    }
    Ok(())
}

/// What completing a layer's digests found.
#[derive(Debug, Clone)]
pub struct LayerDigests {
    /// The point's digest.
    pub digest: PointDigest,
    /// The file was written as a whole file (the layers below had no
    /// digests), reading every data block of the point.
    pub whole: bool,
    /// Blocks read and hashed.
    pub blocks_hashed: u64,
}

/// Image paths of `chain`'s layers, top first.
pub fn layer_paths(chain: &Chain) -> Vec<PathBuf> {
    chain
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect()
}

/// Write the digest file of `chain`'s top layer and return the point's
/// digest: the blocks the top layer holds, read through the chain, over
/// the layers' files below; or, when a layer below has none, every data
/// block of the point as a whole file.
pub fn complete_layer(chain: &Chain, progress: &dyn Fn(u64)) -> Result<LayerDigests, String> {
    let size = chain.size();
    let layers = layer_paths(chain);
    let below_known = layers.len() == 1 || Resolved::open(&layers[1..], size)?.is_some();
    let (kind, runs) = if below_known {
        (Kind::Layer, own_blocks(chain)?)
    } else {
        (Kind::Whole, data_blocks(chain)?)
    };
    let path = file::path_of(&layers[0]);
    let mut w = FileWriter::create(&path, size, kind)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    hash_runs(
        chain,
        &runs,
        &mut |i, d| {
            w.push(i, d?)
                .map_err(|e| format!("writing {}: {e}", path.display()))
        },
        progress,
    )?;
    w.commit()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let digest = Resolved::open(&layers, size)?
        .ok_or_else(|| format!("{} was written but does not resolve", path.display()))?
        .root()?;
    Ok(LayerDigests {
        digest,
        whole: kind == Kind::Whole,
        blocks_hashed: count(&runs),
    })
}

/// The digest of every byte `chain` reads (no file is written).
pub fn chain_digest(chain: &Chain, progress: &dyn Fn(u64)) -> Result<PointDigest, String> {
    let mut root = super::RootHasher::new(chain.size());
    let runs = data_blocks(chain)?;
    hash_runs(
        chain,
        &runs,
        &mut |i, d| {
            root.put(i, d?);
            Ok(())
        },
        progress,
    )?;
    Ok(root.finish())
}

/// The point's digests as recorded, without reading its data: None when a
/// layer has no digest file.
pub fn recorded_digest(chain: &Chain) -> Result<Option<PointDigest>, String> {
    match Resolved::open(&layer_paths(chain), chain.size())? {
        Some(r) => r.root().map(Some),
        None => Ok(None),
    }
}
