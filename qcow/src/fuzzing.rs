//! Entry points for fuzzing (cargo-fuzz targets in `qcow/fuzz/` call these; a
//! regular test runs them on random inputs too).

use std::io::Write;

use crate::image::{Image, OpenOptions};

/// Treat `data` as an image file: parse the header, open it read-only, read and
/// map the first few MiB of the virtual disk, and run the checker. Nothing here
/// may panic, hang or allocate without bound, whatever `data` holds.
pub fn open_and_read(data: &[u8]) {
    let _ = crate::header::Header::parse(data, std::path::Path::new("fuzz"));
    let Ok(mut f) = tempfile_in_memory() else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    let path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::unix::io::AsRawFd::as_raw_fd(&f)
    ));
    if let Ok(img) = Image::open(&path, &OpenOptions::default()) {
        let n = img.size().min(4 << 20);
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < n {
            let len = (n - off).min(buf.len() as u64) as usize;
            if img.read_at(&mut buf[..len], off).is_err() {
                break;
            }
            off += len as u64;
        }
        let _ = img.block_status(0, n);
    }
    let _ = crate::check::check(&path, &Default::default());
}

fn tempfile_in_memory() -> std::io::Result<std::fs::File> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: memfd_create with a static NUL-terminated name; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"chainvault-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}
