//! Copy one disk's plan from its source to its NBD target.
//!
//! Workers take pieces from a shared list in order. Each reads its piece
//! from the source (one shared connection, requests in flight side by side),
//! looks for all-zero blocks, and writes the rest to one of the target
//! connections (the daemon's exports allow multi-conn: one image behind
//! them, one flush covers all). All-zero blocks are skipped when the target
//! is a fresh image and written as zeroes when it has a backing chain.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainvault_nbd::client::ZeroRequest;
use chainvault_nbd::Client;
use indicatif::ProgressBar;

use super::digests::SourceDigests;
use super::plan::{Kind, Piece};
use super::source::Source;

/// Granularity of zero detection: QEMU's default bitmap and cluster size.
pub const ZERO_BLOCK: usize = 64 << 10;

/// Byte counts of one disk's transfer.
#[derive(Debug, Default)]
pub struct Counters {
    /// Read from the source.
    pub read: AtomicU64,
    /// Sent as data (NBD WRITE payload).
    pub written: AtomicU64,
    /// Sent as NBD WRITE_ZEROES.
    pub zeroed: AtomicU64,
    /// All-zero data not sent at all (fresh target).
    pub skipped: AtomicU64,
}

/// A shared bandwidth limit (bytes per second) over every disk.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    start: Instant,
    sent: Mutex<u64>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1),
            start: Instant::now(),
            sent: Mutex::new(0),
        }
    }

    /// Account for `n` bytes and wait until sending them keeps the average
    /// rate at the limit, or until `stop` is set.
    pub async fn take(&self, n: u64, stop: &AtomicBool) {
        let due = {
            let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            *s += n;
            Duration::from_secs_f64(*s as f64 / self.bytes_per_sec as f64)
        };
        loop {
            let elapsed = self.start.elapsed();
            if due <= elapsed || stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep((due - elapsed).min(Duration::from_millis(100))).await;
        }
    }
}

/// Why a copy stopped.
#[derive(Debug)]
pub struct CopyError {
    pub message: String,
    /// The target's connection is gone (the daemon stopped or died).
    pub target_gone: bool,
}

fn target_err(what: String, e: chainvault_nbd::ClientError) -> CopyError {
    let target_gone = matches!(
        e,
        chainvault_nbd::ClientError::Disconnected(_) | chainvault_nbd::ClientError::Io(_)
    );
    CopyError {
        message: format!("target: {what}: {e}"),
        target_gone,
    }
}

/// How to copy.
pub struct CopyConfig {
    /// Pieces in flight at once.
    pub in_flight: usize,
    /// The target has no backing chain: zeroes need not be written.
    pub fresh_target: bool,
    pub limit: Option<Arc<RateLimit>>,
    /// Block digests of what is read (pieces start on block boundaries).
    pub digests: Option<Arc<SourceDigests>>,
    /// A test of the end-to-end check: the data piece holding this offset
    /// is read and hashed but never written (`CHAINVAULT_FAULT_DROP_WRITE`).
    pub drop_write_at: Option<u64>,
}

pub use crate::digest::is_zero;

/// Write `buf` (read at `offset`) to `t`: data runs as writes, all-zero
/// blocks as write-zeroes or not at all.
async fn write_piece(
    t: &Client,
    offset: u64,
    buf: &[u8],
    fresh: bool,
    c: &Counters,
) -> Result<(), CopyError> {
    let mut i = 0usize;
    while i < buf.len() {
        // Block boundaries are aligned to the disk, not to the piece.
        let block_end = |at: usize| -> usize {
            let abs = offset + at as u64;
            let next = (abs / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64;
            ((next - offset) as usize).min(buf.len())
        };
        let zero = is_zero(&buf[i..block_end(i)]);
        let mut j = block_end(i);
        while j < buf.len() && is_zero(&buf[j..block_end(j)]) == zero {
            j = block_end(j);
        }
        let (off, len) = (offset + i as u64, (j - i) as u64);
        if zero {
            if fresh {
                c.skipped.fetch_add(len, Ordering::Relaxed);
            } else {
                t.write_zeroes(off, len, ZeroRequest::default())
                    .await
                    .map_err(|e| target_err(format!("write-zeroes of {len} bytes at {off}"), e))?;
                c.zeroed.fetch_add(len, Ordering::Relaxed);
            }
        } else {
            t.write(off, &buf[i..j], false)
                .await
                .map_err(|e| target_err(format!("write of {len} bytes at {off}"), e))?;
            c.written.fetch_add(len, Ordering::Relaxed);
        }
        i = j;
    }
    Ok(())
}

/// Copy `pieces` from `source` to `targets`. Returns the first error; the
/// other workers stop at their next piece.
pub async fn copy(
    source: Arc<Source>,
    targets: Arc<Vec<Client>>,
    pieces: Arc<Vec<Piece>>,
    cfg: CopyConfig,
    counters: Arc<Counters>,
    bar: ProgressBar,
) -> Result<(), CopyError> {
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = cfg.fresh_target;
    let drop_at = cfg.drop_write_at;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..cfg.in_flight.max(1) {
        let (source, targets, pieces) = (
            Arc::clone(&source),
            Arc::clone(&targets),
            Arc::clone(&pieces),
        );
        let (next, stop, counters, bar) = (
            Arc::clone(&next),
            Arc::clone(&stop),
            Arc::clone(&counters),
            bar.clone(),
        );
        let limit = cfg.limit.clone();
        let digests = cfg.digests.clone();
        set.spawn(async move {
            let t = &targets[w % targets.len()];
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = pieces.get(i).copied() else {
                    return Ok(());
                };
                let r = async {
                    match p.kind {
                        Kind::Data => {
                            if let Some(l) = &limit {
                                l.take(p.len, &stop).await;
                                if stop.load(Ordering::Relaxed) {
                                    return Ok(());
                                }
                            }
                            let buf =
                                source.read(p.offset, p.len).await.map_err(|m| CopyError {
                                    message: format!("source: {m}"),
                                    target_gone: false,
                                })?;
                            counters.read.fetch_add(p.len, Ordering::Relaxed);
                            if let Some(d) = &digests {
                                d.record(p.offset, &buf);
                            }
                            let dropped =
                                drop_at.is_some_and(|o| o >= p.offset && o < p.offset + p.len);
                            if !dropped {
                                write_piece(t, p.offset, &buf, fresh, &counters).await?;
                            }
                            bar.inc(p.len);
                        }
                        Kind::Zero => {
                            t.write_zeroes(p.offset, p.len, ZeroRequest::default())
                                .await
                                .map_err(|e| {
                                    target_err(
                                        format!("write-zeroes of {} bytes at {}", p.len, p.offset),
                                        e,
                                    )
                                })?;
                            counters.zeroed.fetch_add(p.len, Ordering::Relaxed);
                            if let Some(d) = &digests {
                                d.record_zero(p.offset, p.len);
                            }
                        }
                    }
                    Ok::<(), CopyError>(())
                }
                .await;
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        });
    }
    let mut first = None;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap_or_else(|e| {
            Err(CopyError {
                message: format!("transfer worker failed: {e}"),
                target_gone: false,
            })
        });
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 100_003]));
        for at in [0usize, 15, 16, 17, 99_999, 100_002] {
            let mut b = vec![0u8; 100_003];
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
        }
    }

    #[tokio::test]
    async fn rate_limit_paces() {
        let l = RateLimit::new(10 << 20);
        let t0 = Instant::now();
        let stop = AtomicBool::new(false);
        for _ in 0..4 {
            l.take(1 << 20, &stop).await;
        }
        // 4 MiB at 10 MiB/s: about 0.4 s.
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(350), "{e:?}");
    }
}
