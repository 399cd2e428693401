//! Where a disk is read from.
//!
//! * An NBD URI (`nbd://`, `nbd+unix://`): any NBD server, typically
//!   `qemu-nbd -B BITMAP` or a running VM's `block-export-add` with its
//!   bitmaps. One connection carries every read and block-status request
//!   (qemu-nbd serves one client unless started with `-e`).
//! * A local qcow2 file: served by a private `qemu-nbd` on a unix socket, so
//!   that its persistent dirty bitmaps and backing chain are read by QEMU
//!   itself. The image must not be in use (qemu refuses to open it then).
//! * A local raw file or block device: read with `pread`, holes found with
//!   `SEEK_DATA`/`SEEK_HOLE`; no dirty bitmaps.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainvault_nbd::client::{dirty_bitmap_context, DIRTY_BITMAP_PREFIX};
use chainvault_nbd::proto::{CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use chainvault_nbd::{Client, ConnectOptions, Extent, NbdUri};

/// What a `--disk` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// An NBD URI.
    Nbd(String),
    /// A local qcow2 image.
    Qcow2(PathBuf),
    /// A local raw image file.
    RawFile(PathBuf),
    /// A block device.
    BlockDevice(PathBuf),
}

impl SourceKind {
    /// Whether the source can carry dirty bitmaps.
    pub fn has_bitmaps(&self) -> bool {
        matches!(self, SourceKind::Nbd(_) | SourceKind::Qcow2(_))
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            SourceKind::Nbd(u) => format!("NBD export {u}"),
            SourceKind::Qcow2(p) => format!("qcow2 file {}", p.display()),
            SourceKind::RawFile(p) => format!("raw file {}", p.display()),
            SourceKind::BlockDevice(p) => format!("block device {}", p.display()),
        }
    }
}

/// Decide what `src` is: an NBD URI, or a file whose first bytes say its
/// format. Errors name the argument and the fix.
pub fn classify(src: &str) -> Result<SourceKind, String> {
    if src.contains("://") {
        let _: NbdUri = src
            .parse()
            .map_err(|e| format!("--disk {src:?}: {e} (e.g. nbd+unix:///?socket=/run/vm1-vda.sock or nbd://127.0.0.1:10810/vda)"))?;
        return Ok(SourceKind::Nbd(src.to_string()));
    }
    let path = PathBuf::from(src);
    let meta = std::fs::metadata(&path).map_err(|e| {
        format!("--disk {src:?}: cannot open it: {e} (give an existing file, block device or nbd:// URI)")
    })?;
    if meta.file_type().is_block_device() {
        return Ok(SourceKind::BlockDevice(path));
    }
    if !meta.is_file() {
        return Err(format!(
            "--disk {src:?} is neither a regular file nor a block device"
        ));
    }
    let mut magic = [0u8; 8];
    let n = File::open(&path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| format!("--disk {src:?}: cannot read it: {e}"))?;
    let m = &magic[..n];
    if m.starts_with(b"QFI\xfb") {
        return Ok(SourceKind::Qcow2(path));
    }
    let other = [
        (&b"KDMV"[..], "VMDK"),
        (&b"vhdxfile"[..], "VHDX"),
        (&b"conectix"[..], "VHD"),
        (&b"<<< "[..], "VDI"),
    ];
    if let Some((_, name)) = other.iter().find(|(mg, _)| m.starts_with(mg)) {
        return Err(format!(
            "--disk {src:?} is a {name} image: export it with `qemu-nbd -r -f {} -k SOCKET {src}` \
             and pass nbd+unix:///?socket=SOCKET, or convert it to qcow2",
            name.to_lowercase()
        ));
    }
    Ok(SourceKind::RawFile(path))
}

// ---------------------------------------------------------------------------
// A private qemu-nbd

/// A directory under the system temp dir, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let p = std::env::temp_dir().join(format!(
            "chainvault-backup-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        Ok(PrivateDir(p))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `qemu-nbd` serving one local image read-only on a private unix socket.
/// It dies with the client (PR_SET_PDEATHSIG), and is stopped on drop.
pub struct QemuNbd {
    child: tokio::process::Child,
    dir: PrivateDir,
    image: PathBuf,
}

impl QemuNbd {
    /// Serve `image` (qcow2) with `bitmaps` exported as
    /// `qemu:dirty-bitmap:NAME` contexts.
    pub async fn start(image: &Path, bitmaps: &[String]) -> Result<QemuNbd, String> {
        let dir = PrivateDir::new().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let socket = dir.0.join("nbd.sock");
        let mut c = tokio::process::Command::new("qemu-nbd");
        c.args([
            "--read-only",
            "--persistent",
            "--format=qcow2",
            "--export-name=",
        ])
        .arg(format!("--socket={}", socket.display()));
        for b in bitmaps {
            c.arg(format!("--bitmap={b}"));
        }
        c.arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; the child only sets its
        // parent-death signal before exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = c.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "`qemu-nbd` is not installed: local qcow2 sources are read through it; install \
                 the Debian package qemu-utils"
                    .to_string()
            } else {
                format!("cannot start qemu-nbd: {e}")
            }
        })?;
        let t0 = Instant::now();
        loop {
            if socket.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                let err = err.trim().to_string();
                let hint = if err.contains("lock") {
                    " (the image is in use: a running VM? back it up through an NBD export of \
                     the VM instead, see docs/client.md)"
                } else {
                    ""
                };
                return Err(format!(
                    "qemu-nbd could not serve {} ({st}): {err}{hint}",
                    image.display()
                ));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "qemu-nbd did not open its socket for {} within 30 s",
                    image.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(QemuNbd {
            child,
            dir,
            image: image.to_path_buf(),
        })
    }

    /// The URI of its export.
    pub fn uri(&self) -> String {
        NbdUri::unix(self.dir.0.join("nbd.sock"), "").to_string()
    }

    /// SIGTERM, and wait for it to exit (so the image's lock is released).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling the child this process started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(image = %self.image.display(), "qemu-nbd did not exit on SIGTERM; killing it");
            let _ = self.child.kill().await;
        }
    }
}

// ---------------------------------------------------------------------------
// Sources

/// An open source disk.
pub enum Source {
    /// Read over NBD (from a URI, or from our own qemu-nbd).
    Nbd {
        client: Client,
        server: Option<Box<QemuNbd>>,
        uri: String,
    },
    /// Read a local raw file or block device directly.
    File {
        file: Arc<File>,
        size: u64,
        path: PathBuf,
    },
}

impl Source {
    /// Connect to an NBD source, asking for `base:allocation` and the dirty
    /// bitmaps `bitmaps`, and listing every bitmap the export offers (for
    /// messages). `server` is kept alive with the connection.
    pub async fn open_nbd(
        uri: &str,
        bitmaps: &[String],
        server: Option<QemuNbd>,
    ) -> Result<Source, String> {
        let parsed: NbdUri = uri.parse().map_err(|e| format!("{e}"))?;
        let mut contexts = vec![CONTEXT_BASE_ALLOCATION.to_string()];
        contexts.extend(bitmaps.iter().map(|b| dirty_bitmap_context(b)));
        let opts = crate::tls::nbd_options(ConnectOptions {
            meta_contexts: contexts,
            list_meta_contexts: vec![DIRTY_BITMAP_PREFIX.to_string()],
            ..ConnectOptions::default()
        });
        // Our own qemu-nbd binds its socket a moment before it listens.
        let retry_until =
            Instant::now() + Duration::from_secs(if server.is_some() { 10 } else { 0 });
        let client = loop {
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                Client::connect_uri(&parsed, opts.clone()),
            )
            .await
            .map_err(|_| format!("connecting to the source {uri}: no answer within 60 s (is another client connected? qemu-nbd serves one client unless started with -e N)"))?;
            match r {
                Ok(c) => break c,
                Err(chainvault_nbd::ClientError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < retry_until =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("connecting to the source {uri}: {e}")),
            }
        };
        Ok(Source::Nbd {
            client,
            server: server.map(Box::new),
            uri: uri.to_string(),
        })
    }

    /// Open a raw file or block device for reading.
    pub fn open_file(path: &Path) -> Result<Source, String> {
        let mut f = File::open(path)
            .map_err(|e| format!("cannot open {} for reading: {e}", path.display()))?;
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("cannot find the size of {}: {e}", path.display()))?;
        Ok(Source::File {
            file: Arc::new(f),
            size,
            path: path.to_path_buf(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Source::Nbd { client, .. } => client.size(),
            Source::File { size, .. } => *size,
        }
    }

    /// For messages.
    pub fn name(&self) -> String {
        match self {
            Source::Nbd {
                server: Some(s), ..
            } => s.image.display().to_string(),
            Source::Nbd { uri, .. } => uri.clone(),
            Source::File { path, .. } => path.display().to_string(),
        }
    }

    /// Whether the dirty bitmap `name` is readable (its context was granted).
    pub fn has_bitmap(&self, name: &str) -> bool {
        match self {
            Source::Nbd { client, .. } => client.info().has_context(&dirty_bitmap_context(name)),
            Source::File { .. } => false,
        }
    }

    /// The bitmaps the source listed, if it could list them.
    pub fn listed_bitmaps(&self) -> Vec<String> {
        match self {
            Source::Nbd { client, .. } => client.info().listed_dirty_bitmaps(),
            Source::File { .. } => Vec::new(),
        }
    }

    /// The allocation map (`base:allocation` or SEEK_DATA/SEEK_HOLE); `None`
    /// when the source cannot tell (then everything is read).
    pub async fn allocation(&self) -> Result<Option<Vec<Extent>>, String> {
        match self {
            Source::Nbd { client, uri, .. } => {
                if !client.info().has_context(CONTEXT_BASE_ALLOCATION) {
                    return Ok(None);
                }
                client
                    .extents(CONTEXT_BASE_ALLOCATION, 0, client.size())
                    .await
                    .map(Some)
                    .map_err(|e| format!("block status (base:allocation) of {uri}: {e}"))
            }
            Source::File { file, size, path } => {
                let (file, size, path) = (Arc::clone(file), *size, path.clone());
                tokio::task::spawn_blocking(move || seek_map(&file, size))
                    .await
                    .map_err(|e| format!("mapping {}: {e}", path.display()))?
                    .map_err(|e| format!("mapping the holes of {}: {e}", path.display()))
            }
        }
    }

    /// The `qemu:dirty-bitmap:NAME` map.
    pub async fn dirty(&self, name: &str) -> Result<Vec<Extent>, String> {
        match self {
            Source::Nbd { client, uri, .. } => client
                .extents(&dirty_bitmap_context(name), 0, client.size())
                .await
                .map_err(|e| format!("block status of bitmap {name:?} on {uri}: {e}")),
            Source::File { path, .. } => Err(format!(
                "{} is a raw source: it has no dirty bitmaps",
                path.display()
            )),
        }
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        match self {
            Source::Nbd { client, uri, .. } => client
                .read(offset, len)
                .await
                .map_err(|e| format!("reading {len} bytes at {offset} from {uri}: {e}")),
            Source::File { file, path, .. } => {
                let file = Arc::clone(file);
                let r = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset).map(|_| buf)
                })
                .await
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
                r.map_err(|e| {
                    format!(
                        "reading {len} bytes at {offset} from {}: {e}",
                        path.display()
                    )
                })
            }
        }
    }

    /// Disconnect and stop our qemu-nbd, if any.
    pub async fn close(self) {
        if let Source::Nbd { client, server, .. } = self {
            let _ = tokio::time::timeout(Duration::from_secs(10), client.disconnect()).await;
            if let Some(s) = server {
                s.stop().await;
            }
        }
    }
}

/// Data and holes of a file via SEEK_DATA/SEEK_HOLE, as base:allocation-like
/// extents (holes: HOLE|ZERO). Filesystems or devices without support answer
/// as one data extent.
fn seek_map(file: &File, size: u64) -> std::io::Result<Option<Vec<Extent>>> {
    let fd = file.as_raw_fd();
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |len: u64, flags: u32| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(l) if l.flags == flags => l.length += len,
            _ => out.push(Extent { length: len, flags }),
        }
    };
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => {
                    push(size - pos, STATE_HOLE | STATE_ZERO);
                    break;
                }
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if pos == 0 => return Ok(None),
                _ => return Err(e),
            }
        }
        let data = (data as u64).min(size);
        push(data - pos, STATE_HOLE | STATE_ZERO);
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(size).max(data + 1);
        push(hole - data, 0);
        pos = hole;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn classify_sources() {
        let dir = std::env::temp_dir().join(format!("cv-classify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("raw");
        std::fs::write(&raw, b"hello").unwrap();
        assert_eq!(
            classify(raw.to_str().unwrap()).unwrap(),
            SourceKind::RawFile(raw.clone())
        );
        let q = dir.join("q");
        std::fs::File::create(&q)
            .unwrap()
            .write_all(b"QFI\xfb\0\0\0\x03")
            .unwrap();
        assert_eq!(
            classify(q.to_str().unwrap()).unwrap(),
            SourceKind::Qcow2(q.clone())
        );
        let v = dir.join("v");
        std::fs::write(&v, b"KDMV....").unwrap();
        assert!(classify(v.to_str().unwrap()).unwrap_err().contains("VMDK"));
        assert!(classify(dir.join("missing").to_str().unwrap())
            .unwrap_err()
            .contains("cannot open"));
        assert!(classify("nbd+unix:///x").unwrap_err().contains("socket"));
        assert_eq!(
            classify("nbd://127.0.0.1:10810/vda").unwrap(),
            SourceKind::Nbd("nbd://127.0.0.1:10810/vda".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seek_map_finds_holes() {
        let dir = std::env::temp_dir().join(format!("cv-seek-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sparse");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mib = 1u64 << 20;
        f.set_len(64 * mib).unwrap();
        f.write_all_at(&vec![7u8; mib as usize], 8 * mib).unwrap();
        f.write_all_at(&vec![9u8; mib as usize], 40 * mib).unwrap();
        let map = seek_map(&f, 64 * mib)
            .unwrap()
            .expect("SEEK_DATA works here");
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), 64 * mib);
        let data: u64 = map.iter().filter(|e| e.flags == 0).map(|e| e.length).sum();
        // Filesystems may round data up to their block size, never below.
        assert!((2 * mib..=4 * mib).contains(&data), "{map:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
