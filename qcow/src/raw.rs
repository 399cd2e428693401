//! Raw files as the bottom layer of a chain.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A raw disk image used read-only as a backing layer.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    pub fn open(path: &Path) -> Result<RawFile> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read; bytes past the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let avail = self.size.saturating_sub(off).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        self.file
            .read_exact_at(head, off)
            .map_err(|e| Error::io(&self.path, "read", e))?;
        tail.fill(0);
        Ok(())
    }

    /// Is `[off, off+len)` data (true) or a hole (false), and for how long from `off`?
    /// Uses SEEK_DATA/SEEK_HOLE; a file system without them reports all data.
    pub fn probe(&self, off: u64, len: u64) -> (bool, u64) {
        if off >= self.size {
            return (false, len);
        }
        let fd = self.file.as_raw_fd();
        let end = (off + len).min(self.size);
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(libc::ENXIO) {
                // No data at or after off: the rest is a hole.
                return (false, len);
            }
            return (true, end - off);
        }
        let data = data as u64;
        if data > off {
            return (false, (data - off).min(len));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        (true, hole.max(off + 1).min(end) - off)
    }
}
