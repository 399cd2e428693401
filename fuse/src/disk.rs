//! Byte sources under the tree: a qcow2 chain, a disk that is opened on
//! first use and closed when idle, and the guard around guest readers.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use chainvault_guestfs::{Disk, ReadAt};
use chainvault_qcow::{Chain, ChainOptions};

/// A qcow2 chain (an image and its backing files) as a [`ReadAt`].
pub struct ChainDisk {
    chain: Chain,
}

impl ChainDisk {
    /// Open `top` read-only; backing files must resolve inside `root`.
    /// `l2_cache_bytes` bounds each layer's L2 table cache.
    pub fn open(top: &Path, root: &Path, l2_cache_bytes: u64) -> io::Result<ChainDisk> {
        let opts = ChainOptions {
            root: Some(root.to_path_buf()),
            writable: false,
            l2_cache_bytes,
            ..ChainOptions::default()
        };
        let chain = Chain::open(top, &opts).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ChainDisk { chain })
    }
}

impl ReadAt for ChainDisk {
    fn size(&self) -> u64 {
        self.chain.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.chain.size())
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} is past the end of the disk ({} bytes)",
                    buf.len(),
                    self.chain.size()
                ),
            ));
        }
        self.chain
            .read_at(buf, offset)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Something that can (re)open a disk: a point's [`crate::Source::open`].
pub type Opener = Box<dyn Fn() -> io::Result<Disk> + Send + Sync>;

/// A disk opened on first read and dropped again after it was idle for a
/// while. Guest readers keep a `LazyDisk`, so closing the underlying chain or
/// restore export never invalidates their node ids: the bytes are the same
/// when it is opened again.
///
/// Why: a mount may touch hundreds of points; each open chain holds a file
/// descriptor per layer, and each open restore export in `--server` mode
/// keeps the daemon from deleting that backup.
pub struct LazyDisk {
    size: u64,
    what: String,
    opener: Opener,
    inner: RwLock<Option<Disk>>,
    /// Serialises opening so two first readers open once.
    opening: Mutex<()>,
    /// Milliseconds since `epoch` of the last read.
    last_use: AtomicU64,
    epoch: Instant,
}

impl LazyDisk {
    /// `size` is the catalog's size of the disk; opening checks it.
    pub fn new(what: String, size: u64, opener: Opener) -> LazyDisk {
        LazyDisk {
            size,
            what,
            opener,
            inner: RwLock::new(None),
            opening: Mutex::new(()),
            last_use: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        self.last_use
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The disk if it is open now.
    fn current(&self) -> Option<Disk> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The open disk, opening it if needed.
    pub fn get(&self) -> io::Result<Disk> {
        self.touch();
        if let Some(d) = self.current() {
            return Ok(d);
        }
        let _g = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = self.current() {
            return Ok(d);
        }
        let d = guard(&self.what, || (self.opener)())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", self.what)))?;
        if d.size() != self.size {
            return Err(io::Error::other(format!(
                "{}: the disk is {} bytes but the catalog says {}",
                self.what,
                d.size(),
                self.size
            )));
        }
        tracing::debug!(what = %self.what, "opened");
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some(d.clone());
        Ok(d)
    }

    /// Whether it is open now.
    pub fn is_open(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Close it if it was not used for `idle`. Readers holding the disk
    /// finish first (they hold their own reference).
    pub fn close_if_idle(&self, idle: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        if now.saturating_sub(self.last_use.load(Ordering::Relaxed)) < idle.as_millis() as u64 {
            return false;
        }
        let _g = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        let closed = self
            .inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        if closed {
            tracing::debug!(what = %self.what, "closed after being idle");
        }
        closed
    }

    /// Close it now.
    pub fn close(&self) {
        let _g = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl ReadAt for LazyDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.get()?;
        let r = d.read_exact_at(buf, offset);
        if let Err(e) = &r {
            // A broken connection or file: open afresh on the next read.
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::warn!(what = %self.what, error = %e, "read failed; reopening on the next read");
                self.close();
            }
        }
        r
    }
}

/// Run a guest reader (or opener) so that a panic in it becomes an I/O
/// error: a damaged guest filesystem must never bring the mount down.
pub fn guard<T>(what: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(io::Error::other(format!(
            "reading {what} failed: the reader panicked: {}",
            panic_text(&p)
        ))),
    }
}

/// A panic payload as text.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Fill `buf` from a disk at `offset`, clamped to its size; returns the count.
pub fn read_clamped(d: &dyn ReadAt, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let size = d.size();
    if offset >= size {
        return Ok(0);
    }
    let n = ((size - offset).min(buf.len() as u64)) as usize;
    d.read_exact_at(&mut buf[..n], offset)?;
    Ok(n)
}
