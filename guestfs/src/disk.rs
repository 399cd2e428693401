//! Byte sources: a plain file, a window into another source, and a bounded
//! block cache for metadata reads over sources where small reads are
//! expensive (a qcow2 chain, an NBD connection).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Disk, ReadAt};

/// Checks that `len` bytes at `offset` lie inside a source of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: usize, what: &str) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{what}: read of {len} bytes at offset {offset} goes past its end ({size} bytes)"
            ),
        )),
    }
}

/// A read-only file read with `pread`: safe to share between threads.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
        Self::new(file)
    }

    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(FileDisk { file, size })
    }
}

impl ReadAt for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len(), "disk file")?;
        self.file.read_exact_at(buf, offset)
    }
}

/// A window of `len` bytes at `offset` in another source: a partition.
pub struct SliceDisk {
    inner: Disk,
    offset: u64,
    len: u64,
}

impl SliceDisk {
    /// Fails when the window does not fit inside `inner`.
    pub fn new(inner: Disk, offset: u64, len: u64) -> io::Result<Self> {
        match offset.checked_add(len) {
            Some(end) if end <= inner.size() => Ok(SliceDisk { inner, offset, len }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a volume of {len} bytes at offset {offset} does not fit in a disk of {} bytes",
                    inner.size()
                ),
            )),
        }
    }
}

impl ReadAt for SliceDisk {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len(), "volume")?;
        self.inner.read_exact_at(buf, self.offset + offset)
    }
}

/// A source held in memory (tests, and small synthetic volumes).
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len(), "memory disk")?;
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
}

/// A bounded LRU cache of fixed-size blocks in front of another source.
///
/// Filesystem metadata is read in small pieces (a 256-byte inode, a 4 KiB
/// directory block, a 1 KiB MFT record) and the same pieces again and
/// again; each such read of a qcow2 chain or an NBD export costs a lookup
/// through every layer or a network round trip. This cache turns them into
/// one read of a block (64 KiB by default) and then memory copies.
///
/// Many threads may read at once: the lock is held only to look a block up
/// or insert it, never during a read of the source. Reads of at least
/// [`CachedDisk::BYPASS`] bytes skip the cache: they are file data, read
/// once, and would only push metadata out.
pub struct CachedDisk {
    inner: Disk,
    block: u64,
    max_blocks: usize,
    state: Mutex<CacheState>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct CacheState {
    tick: u64,
    map: HashMap<u64, (Arc<[u8]>, u64)>,
}

impl CachedDisk {
    /// Reads at least this long go straight to the source.
    pub const BYPASS: usize = 256 * 1024;

    /// `block_size` must be a power of two; at most `max_bytes` are kept.
    pub fn new(inner: Disk, block_size: usize, max_bytes: usize) -> Self {
        let block = block_size.max(512).next_power_of_two() as u64;
        CachedDisk {
            inner,
            block,
            max_blocks: (max_bytes / block as usize).max(4),
            state: Mutex::new(CacheState::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// 64 KiB blocks, 32 MiB in all.
    pub fn with_defaults(inner: Disk) -> Self {
        Self::new(inner, 64 * 1024, 32 << 20)
    }

    /// (hits, misses) so far, for tests and benchmarks.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn get_block(&self, index: u64) -> io::Result<Arc<[u8]>> {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.tick += 1;
            let tick = st.tick;
            if let Some((data, used)) = st.map.get_mut(&index) {
                *used = tick;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data.clone());
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let start = index * self.block;
        let len = self.block.min(self.inner.size().saturating_sub(start)) as usize;
        let mut data = vec![0u8; len];
        self.inner.read_exact_at(&mut data, start)?;
        let data: Arc<[u8]> = data.into();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.map.len() >= self.max_blocks {
            // Evict the least recently used eighth in one pass, so that the
            // O(n) scan is paid once per many misses.
            let mut ticks: Vec<u64> = st.map.values().map(|(_, t)| *t).collect();
            let cut = ticks.len() / 8;
            ticks.select_nth_unstable(cut);
            let limit = ticks[cut];
            st.map.retain(|_, (_, t)| *t > limit);
        }
        st.tick += 1;
        let tick = st.tick;
        st.map.insert(index, (data.clone(), tick));
        Ok(data)
    }
}

impl ReadAt for CachedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len(), "disk")?;
        if buf.len() >= Self::BYPASS {
            return self.inner.read_exact_at(buf, offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.block;
            let within = (pos % self.block) as usize;
            let data = self.get_block(index)?;
            let n = (data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` into a new vector.
pub(crate) fn read_vec(disk: &dyn ReadAt, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    disk.read_exact_at(&mut v, offset)?;
    Ok(v)
}

/// A cursor over a [`ReadAt`], for crates that want `Read + Seek` (and, for
/// fatfs, `Write`: every write fails, the volume is read-only).
pub(crate) struct Cursor {
    pub disk: Disk,
    pub pos: u64,
}

impl io::Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.disk.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for Cursor {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let new = match pos {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.disk.size().checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the volume",
            )),
        }
    }
}

impl io::Write for Cursor {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "guest volumes are read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_returns_the_bytes_of_the_source_and_stays_bounded() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let src: Disk = Arc::new(MemDisk(data.clone()));
        let c = CachedDisk::new(src, 4096, 64 * 1024);
        for (off, len) in [
            (0u64, 10usize),
            (4090, 20),
            (999_990, 13),
            (123_456, 70_000),
            (5, 300_000),
        ] {
            let mut b = vec![0; len];
            c.read_exact_at(&mut b, off).unwrap();
            assert_eq!(&b[..], &data[off as usize..off as usize + len]);
        }
        let mut b = [0u8; 1];
        assert!(c.read_exact_at(&mut b, 1_000_003).is_err());
        assert!(c.state.lock().unwrap().map.len() <= 16);
        for i in 0..200u64 {
            c.read_exact_at(&mut b, i * 4096).unwrap();
        }
        assert!(c.state.lock().unwrap().map.len() <= 16);
    }

    #[test]
    fn slice_refuses_windows_past_the_end() {
        let src: Disk = Arc::new(MemDisk(vec![1; 100]));
        assert!(SliceDisk::new(src.clone(), 50, 51).is_err());
        assert!(SliceDisk::new(src.clone(), u64::MAX, 2).is_err());
        let s = SliceDisk::new(src, 50, 50).unwrap();
        let mut b = [0u8; 10];
        assert!(s.read_exact_at(&mut b, 45).is_err());
        s.read_exact_at(&mut b, 40).unwrap();
    }
}
