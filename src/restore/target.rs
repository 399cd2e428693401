//! Where a restored disk goes: a new sparse raw file, an existing file or
//! block device overwritten in place, a new standalone qcow2 image, or an
//! NBD export (a qemu-nbd or nbdkit export of production storage).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chainvault_nbd::client::ZeroRequest;
use chainvault_nbd::{Client, ClientError, ConnectOptions, NbdUri};
use chainvault_qcow::create::create;
use chainvault_qcow::{CreateOptions, Image, OpenOptions};

/// The format of a new file target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// An open target.
pub enum Target {
    /// A raw file or block device. `fresh`: created by us, so its holes
    /// already read as zeroes and zero ranges need no write.
    File {
        file: Arc<File>,
        path: PathBuf,
        fresh: bool,
        device: bool,
        /// One write at a time: concurrent writes to one file only contend
        /// for its inode lock (measured: 16% of the CPU spinning on it).
        serial: Arc<std::sync::Mutex<()>>,
        /// An existing regular file is sized to the disk in `prepare`, once
        /// every target has opened.
        resize: Option<u64>,
    },
    /// A new standalone qcow2 image.
    Qcow2 { image: Arc<Image>, path: PathBuf },
    /// An NBD export, over several connections.
    Nbd {
        clients: Vec<Arc<Client>>,
        uri: String,
    },
}

/// Why a target cannot be used: the message says what to do.
#[derive(Debug)]
pub struct TargetError(pub String);

fn bad(m: String) -> TargetError {
    TargetError(m)
}

/// Whether `p` is an image of a chainvault repository (its sidecar says so).
fn is_repository_image(p: &Path) -> bool {
    let sc = p.with_extension("json");
    std::fs::read(&sc)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["kind"] == "chainvault-point")
}

impl Target {
    /// Open (or create) `spec` for a disk of `size` bytes. `repo`: the
    /// repository directory when it is known, which no target may be inside.
    pub async fn open(
        spec: &str,
        size: u64,
        format: Format,
        repo: Option<&Path>,
    ) -> Result<Target, TargetError> {
        if spec.contains("://") {
            if format == Format::Qcow2 {
                return Err(bad(format!(
                    "{spec}: -O qcow2 writes a new image file; an NBD target takes the disk's bytes (drop -O)"
                )));
            }
            let uri: NbdUri = spec
                .parse()
                .map_err(|e| bad(format!("{spec} is not an NBD URI: {e}")))?;
            let connect = || async {
                tokio::time::timeout(
                std::time::Duration::from_secs(30),
                Client::connect_uri(&uri, crate::tls::nbd_options(ConnectOptions::default())),
            )
                .await
                .map_err(|_| bad(format!("NBD target {spec}: no answer within 30 s")))?
                .map_err(|e| match e {
                    ClientError::Io(io) => bad(format!(
                        "NBD target {spec} is unreachable ({io}): is its server running and the URI right?"
                    )),
                    e => bad(format!("NBD target {spec}: {e}")),
                })
            };
            let client = connect().await?;
            if client.info().is_read_only() {
                return Err(bad(format!(
                    "NBD target {spec} is read-only: serve it writable (qemu-nbd without -r)"
                )));
            }
            if client.size() < size {
                return Err(bad(format!(
                    "NBD target {spec} holds {} bytes; the disk needs {size}",
                    client.size()
                )));
            }
            // More connections where the server takes them (qemu-nbd -e N,
            // nbdkit); one is enough where it does not.
            let mut clients = vec![Arc::new(client)];
            for _ in 1..super::CONNECTIONS {
                match connect().await {
                    Ok(c) => clients.push(Arc::new(c)),
                    Err(_) => break,
                }
            }
            return Ok(Target::Nbd {
                clients,
                uri: spec.to_string(),
            });
        }
        let path = PathBuf::from(spec);
        let abs = std::path::absolute(&path).unwrap_or(path.clone());
        if let (Some(r), Some(parent)) = (repo, abs.parent()) {
            let parent = parent.canonicalize().unwrap_or(parent.to_path_buf());
            if parent.starts_with(r) {
                return Err(bad(format!(
                    "{spec} is inside the repository {}; restore somewhere else",
                    r.display()
                )));
            }
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() => {
                if format == Format::Qcow2 {
                    return Err(bad(format!(
                        "{spec} is a block device: -O qcow2 writes a new file"
                    )));
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        bad(format!(
                            "cannot open the block device {spec} for writing: {e}"
                        ))
                    })?;
                let dev_size = {
                    use std::io::{Seek, SeekFrom};
                    let mut f = &file;
                    f.seek(SeekFrom::End(0))
                        .map_err(|e| bad(format!("{spec}: {e}")))?
                };
                if dev_size < size {
                    return Err(bad(format!(
                        "block device {spec} holds {dev_size} bytes; the disk needs {size}"
                    )));
                }
                Ok(Target::File {
                    file: Arc::new(file),
                    path,
                    fresh: false,
                    device: true,
                    serial: Default::default(),
                    resize: None,
                })
            }
            Ok(m) if m.is_file() => {
                if is_repository_image(&path) {
                    return Err(bad(format!(
                        "{spec} is an image of a chainvault repository (it has a point's sidecar); \
                         restore somewhere else"
                    )));
                }
                if format == Format::Qcow2 {
                    return Err(bad(format!(
                        "{spec} exists: -O qcow2 writes a new image; remove it or choose another name"
                    )));
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| bad(format!("cannot open {spec} for writing: {e}")))?;
                Ok(Target::File {
                    file: Arc::new(file),
                    path,
                    fresh: false,
                    device: false,
                    serial: Default::default(),
                    resize: Some(size),
                })
            }
            Ok(_) => Err(bad(format!("{spec} is neither a file nor a block device"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = abs.parent() {
                    if !parent.is_dir() {
                        return Err(bad(format!(
                            "{spec}: the directory {} does not exist",
                            parent.display()
                        )));
                    }
                }
                match format {
                    Format::Raw => {
                        let file = std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .map_err(|e| bad(format!("cannot create {spec}: {e}")))?;
                        file.set_len(size)
                            .map_err(|e| bad(format!("cannot size {spec} to {size} bytes: {e}")))?;
                        Ok(Target::File {
                            file: Arc::new(file),
                            path,
                            fresh: true,
                            device: false,
                            serial: Default::default(),
                            resize: None,
                        })
                    }
                    Format::Qcow2 => {
                        create(
                            &path,
                            &CreateOptions {
                                size,
                                cluster_size: 64 << 10,
                                extended_l2: false,
                                refcount_bits: 16,
                                backing: None,
                            },
                        )
                        .map_err(|e| bad(format!("cannot create the qcow2 image {spec}: {e}")))?;
                        let image = Image::open(
                            &path,
                            &OpenOptions {
                                writable: true,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| bad(format!("cannot open {spec}: {e}")))?;
                        Ok(Target::Qcow2 {
                            image: Arc::new(image),
                            path,
                        })
                    }
                }
            }
            Err(e) => Err(bad(format!("{spec}: {e}"))),
        }
    }

    /// Changes made before the first write: an existing file takes the
    /// disk's size.
    pub fn prepare(&self) -> Result<(), String> {
        if let Target::File {
            file,
            path,
            resize: Some(n),
            ..
        } = self
        {
            file.set_len(*n)
                .map_err(|e| format!("cannot size {} to {n} bytes: {e}", path.display()))?;
        }
        Ok(())
    }

    pub fn name(&self) -> String {
        match self {
            Target::File { path, .. } | Target::Qcow2 { path, .. } => path.display().to_string(),
            Target::Nbd { uri, .. } => uri.clone(),
        }
    }

    /// Zero ranges need no write: the target reads zeroes there already.
    pub fn fresh(&self) -> bool {
        match self {
            Target::File { fresh, .. } => *fresh,
            Target::Qcow2 { .. } => true,
            Target::Nbd { .. } => false,
        }
    }

    /// Write on connection `lane` (taken modulo the connections).
    /// Hands the buffer back once written, for the next read.
    pub async fn write(&self, lane: usize, off: u64, buf: Vec<u8>) -> Result<Vec<u8>, String> {
        match self {
            Target::File {
                file, path, serial, ..
            } => {
                let (f, p, m) = (Arc::clone(file), path.clone(), Arc::clone(serial));
                tokio::task::spawn_blocking(move || {
                    let _one = m.lock().unwrap_or_else(|e| e.into_inner());
                    f.write_all_at(&buf, off).map(|_| buf)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("writing {}: {e}", p.display()))
            }
            Target::Qcow2 { image, path } => {
                let (i, p) = (Arc::clone(image), path.clone());
                tokio::task::spawn_blocking(move || i.write_at(&buf, off).map(|_| buf))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("writing {}: {e}", p.display()))
            }
            Target::Nbd { clients, uri } => {
                clients[lane % clients.len()]
                    .write(off, &buf, false)
                    .await
                    .map_err(|e| format!("writing {} bytes at {off} to {uri}: {e}", buf.len()))?;
                Ok(buf)
            }
        }
    }

    /// Make `len` bytes at `off` read as zeroes.
    pub async fn zero(&self, lane: usize, off: u64, len: u64) -> Result<(), String> {
        if self.fresh() {
            return Ok(());
        }
        match self {
            Target::File {
                file, path, device, ..
            } => {
                let (f, p, device) = (Arc::clone(file), path.clone(), *device);
                tokio::task::spawn_blocking(move || zero_file(&f, off, len, device))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("zeroing {len} bytes at {off} of {}: {e}", p.display()))
            }
            Target::Qcow2 { .. } => Ok(()),
            Target::Nbd { clients, uri } => {
                let client = &clients[lane % clients.len()];
                if client.info().can_zero() {
                    client
                        .write_zeroes(off, len, ZeroRequest::default())
                        .await
                        .map_err(|e| format!("write-zeroes of {len} bytes at {off} to {uri}: {e}"))
                } else {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(4 << 20);
                        client
                            .write(off + done, &vec![0u8; n as usize], false)
                            .await
                            .map_err(|e| format!("writing zeroes at {off} to {uri}: {e}"))?;
                        done += n;
                    }
                    Ok(())
                }
            }
        }
    }

    pub async fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        match self {
            Target::File { file, path, .. } => {
                let (f, p) = (Arc::clone(file), path.clone());
                tokio::task::spawn_blocking(move || {
                    let mut b = vec![0u8; len as usize];
                    f.read_exact_at(&mut b, off).map(|_| b)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading back {}: {e}", p.display()))
            }
            Target::Qcow2 { image, path } => {
                let (i, p) = (Arc::clone(image), path.clone());
                tokio::task::spawn_blocking(move || {
                    let mut b = vec![0u8; len as usize];
                    i.read_at(&mut b, off).map(|_| b)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading back {}: {e}", p.display()))
            }
            Target::Nbd { clients, uri } => clients[0]
                .read(off, len)
                .await
                .map_err(|e| format!("reading back {uri}: {e}")),
        }
    }

    /// Make everything written durable.
    pub async fn finish(&self) -> Result<(), String> {
        match self {
            Target::File { file, path, .. } => {
                let (f, p) = (Arc::clone(file), path.clone());
                tokio::task::spawn_blocking(move || f.sync_all())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("fsync of {}: {e}", p.display()))
            }
            Target::Qcow2 { image, path } => {
                let (i, p) = (Arc::clone(image), path.clone());
                tokio::task::spawn_blocking(move || -> Result<(), String> {
                    i.flush().map_err(|e| e.to_string())?;
                    std::fs::File::open(i.path())
                        .and_then(|f| f.sync_all())
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("flushing {}: {e}", p.display()))
            }
            Target::Nbd { clients, uri } => {
                // Every connection: a server without multi-conn only
                // promises that a flush covers its own connection's writes.
                for client in clients {
                    if client.info().can_flush() {
                        client
                            .flush()
                            .await
                            .map_err(|e| format!("flush of {uri}: {e}"))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Zero a range of a file (punch a hole, so it stays sparse) or a device
/// (BLKZEROOUT; plain zero writes where that is refused).
fn zero_file(f: &File, off: u64, len: u64, device: bool) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    if !device {
        // SAFETY: fallocate on our own open descriptor with a valid range.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    } else {
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKZEROOUT reads a [start, len] pair of u64 from the pointer.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        if r == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; (len.min(4 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
