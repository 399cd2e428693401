//! Computing block digests from images: the top layer of a chain at
//! completion (only the blocks it holds, read through the chain), and every
//! block of any chain.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use chainvault_qcow::{Chain, ExtentKind};

use super::file::{self, FileWriter, Kind, Resolved};
use super::{blocks, hash_blocks, BlockDigest, PointDigest, BLOCK};

/// Blocks read and hashed per task (2 MiB).
const BATCH_BLOCKS: u64 = 32;
/// Batches the workers may be ahead of the results handed on.
const WINDOW: usize = 256;

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

/// Read the blocks of one batch (ranges `[a, b)`) through `chain` and hash
/// them. When a range cannot be read in one go, each of its blocks is read
/// alone, so that one unreadable block (a damaged compressed cluster, say)
/// is named and the others are still hashed.
fn hash_batch(chain: &Chain, batch: &[(u64, u64)], buf: &mut Vec<u8>) -> BatchResult {
    let size = chain.size();
    let mut v = Vec::new();
    for &(a, b) in batch {
        let off = a * BLOCK;
        let len = ((b * BLOCK).min(size) - off) as usize;
        buf.resize(len, 0);
        if chain.read_at(buf, off).is_ok() {
            hash_blocks(size, a, buf, |i, d| v.push((i, Ok(d))));
            continue;
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
    }
    v
}

/// Takes each block's digest, or why the block could not be read.
pub type BlockSink<'a> = dyn FnMut(u64, Result<&BlockDigest, &str>) -> Result<(), String> + 'a;

/// Cut `runs` into batches of about [`BATCH_BLOCKS`] blocks each, in
/// order; a batch may gather several short runs (an incremental's scattered
/// blocks), so that there are few batches to hand round.
fn batches_of(runs: &Runs) -> Vec<Vec<(u64, u64)>> {
    let mut batches = Vec::new();
    let mut cur: Vec<(u64, u64)> = Vec::new();
    let mut n = 0u64;
    for &(a, b) in runs {
        let mut s = a;
        while s < b {
            let e = (s + (BATCH_BLOCKS - n)).min(b);
            cur.push((s, e));
            n += e - s;
            s = e;
            if n == BATCH_BLOCKS {
                batches.push(std::mem::take(&mut cur));
                n = 0;
            }
        }
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Bytes of the disk a batch covers.
fn batch_bytes(batch: &[(u64, u64)], size: u64) -> u64 {
    batch
        .iter()
        .map(|&(a, b)| (b * BLOCK).min(size) - a * BLOCK)
        .sum()
}

/// How far the workers may run ahead of the results handed out: the batch
/// a worker may start, and whether to stop.
struct Gate {
    state: Mutex<(usize, bool)>,
    moved: Condvar,
}

impl Gate {
    /// Wait until batch `k` is within [`WINDOW`] of the next one to hand
    /// out; false when the work is stopped.
    fn wait_for(&self, k: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while k >= st.0 + WINDOW && !st.1 {
            st = self.moved.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.1
    }

    fn delivered(&self, n: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = n;
        self.moved.notify_all();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.moved.notify_all();
    }
}

/// Stops the others when a worker's thread unwinds, so none waits forever
/// for the batch it did not finish.
struct StopOnPanic<'a>(&'a Gate);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop();
        }
    }
}

/// Read the blocks of `runs` through `chain` and hash them, on a few
/// threads; `out` gets every block's digest (or why it could not be read)
/// in ascending order, `progress` the bytes read so far.
///
/// The workers take batches in order and hand their results to this
/// thread, which passes them on in order; a worker waits rather than run
/// more than [`WINDOW`] batches ahead, so memory stays bounded. (One set of
/// threads for the whole run: starting and joining a set per window cost
/// a third of the time of a 2% incremental's digests.)
pub fn hash_runs(
    chain: &Chain,
    runs: &Runs,
    out: &mut BlockSink<'_>,
    progress: &dyn Fn(u64),
) -> Result<(), String> {
    let size = chain.size();
    let batches = batches_of(runs);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
        .min(batches.len().max(1));
    let next = AtomicUsize::new(0);
    let gate = Gate {
        state: Mutex::new((0, false)),
        moved: Condvar::new(),
    };
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, BatchResult)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, gate, batches) = (&next, &gate, &batches);
            s.spawn(move || {
                let _guard = StopOnPanic(gate);
                let mut buf = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(k) else {
                        return;
                    };
                    if !gate.wait_for(k) {
                        return;
                    }
                    if tx.send((k, hash_batch(chain, batch, &mut buf))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, BatchResult> = BTreeMap::new();
        let mut handed = 0usize;
        let mut done = 0u64;
        let mut shown = 0usize;
        let mut deliver = || -> Result<(), String> {
            for (k, r) in rx.iter() {
                waiting.insert(k, r);
                let before = handed;
                while let Some(v) = waiting.remove(&handed) {
                    for (i, d) in &v {
                        out(*i, d.as_ref().map_err(|e| e.as_str()))?;
                    }
                    done += batch_bytes(&batches[handed], size);
                    handed += 1;
                }
                if handed != before {
                    gate.delivered(handed);
                    if handed >= shown + 32 || handed == batches.len() {
                        shown = handed;
                        progress(done);
                    }
                }
            }
            if handed != batches.len() {
                return Err("a digest task did not run".to_string());
            }
            Ok(())
        };
        let r = deliver();
        // On an error the workers stop at their next batch.
        gate.stop();
        r
    })
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
