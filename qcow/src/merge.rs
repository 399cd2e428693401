//! The pieces a consolidation is built from: copy what one layer holds
//! into another, and point an image at a different backing file.
//!
//! Neither knows about catalogs or journals; the daemon's engine orders
//! them so that every kept point reads the same bytes at every moment
//! (docs/architecture.md, "Consolidation").
//!
//! - [`copy_own`] copies the ranges a source layer itself holds (data, or
//!   zeros it records) into a destination image, either everywhere
//!   ([`CopyMode::Overwrite`]: committing a child into its parent) or only
//!   where the destination itself holds nothing ([`CopyMode::FillHoles`]:
//!   pulling a parent's data up into its child). Both are idempotent: run
//!   again after a crash, they leave the same result.
//! - [`header_with_backing`] builds the header cluster of an image with a
//!   new backing file name (or none), and [`write_header`] writes it. The
//!   caller keeps the built cluster (in its journal), so that a write torn
//!   by a crash is redone from it without reading the torn header.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{Extension, Header};
use crate::image::{ExtentKind, Image};

/// Where [`copy_own`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Every range the source holds replaces the destination's.
    Overwrite,
    /// Only ranges the destination layer itself does not hold.
    FillHoles,
}

/// Bytes moved by a copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Data bytes read from the source and written.
    pub data_bytes: u64,
    /// Bytes recorded as zeros in the destination.
    pub zero_bytes: u64,
}

const WINDOW: u64 = 256 << 20;
const PIECE: usize = 4 << 20;

/// Copy what `src` itself holds (its own layer, not its backing files) into
/// `dst`, which must be writable and opened with its backing chain (so a
/// partial cluster is completed from what it reads below). Both images have
/// the same virtual size. `progress` is called with the bytes done so far.
pub fn copy_own(
    src: &Image,
    dst: &Image,
    mode: CopyMode,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats> {
    if src.size() != dst.size() {
        return Err(Error::unsupported(
            dst.path(),
            format!(
                "cannot merge {} ({} bytes) into an image of {} bytes: virtual sizes differ",
                src.path().display(),
                src.size(),
                dst.size()
            ),
        ));
    }
    let size = src.size();
    let mut stats = CopyStats::default();
    let mut buf = Vec::new();
    let mut off = 0u64;
    while off < size {
        let win = (size - off).min(WINDOW);
        for e in src.block_status(off, win)? {
            if e.kind == ExtentKind::Unallocated {
                continue;
            }
            let targets: Vec<(u64, u64)> = match mode {
                CopyMode::Overwrite => vec![(e.offset, e.length)],
                CopyMode::FillHoles => dst
                    .block_status(e.offset, e.length)?
                    .into_iter()
                    .filter(|d| d.kind == ExtentKind::Unallocated)
                    .map(|d| (d.offset, d.length))
                    .collect(),
            };
            for (t, len) in targets {
                if e.kind == ExtentKind::Zero {
                    dst.write_zeroes(t, len, false)?;
                    stats.zero_bytes += len;
                    continue;
                }
                let mut p = t;
                while p < t + len {
                    let n = ((t + len - p) as usize).min(PIECE);
                    buf.resize(n, 0);
                    src.read_at(&mut buf[..n], p)?;
                    dst.write_at(&buf[..n], p)?;
                    stats.data_bytes += n as u64;
                    p += n as u64;
                }
            }
        }
        off += win;
        progress(off);
    }
    dst.flush()?;
    Ok(stats)
}

/// The header cluster of the image at `path` with its backing file set to
/// `backing` (a name relative to the image's directory, format qcow2), or
/// removed. Everything else in the header stays as it is.
pub fn header_with_backing(path: &Path, backing: Option<&str>) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let len = f.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    let mut first = vec![0u8; (2u64 << 20).min(len) as usize];
    f.read_exact_at(&mut first, 0)
        .map_err(|e| Error::io(path, "read header", e))?;
    let mut h = Header::parse(&first, path)?;
    if h.version < 3 {
        return Err(Error::unsupported(
            path,
            "version 2 images cannot be rebased by chainvault (upgrade with qemu-img amend -o compat=1.1)",
        ));
    }
    h.extensions
        .retain(|e| !matches!(e, Extension::BackingFormat(_)));
    match backing {
        Some(name) => {
            h.backing_file = Some(name.to_string());
            h.extensions
                .insert(0, Extension::BackingFormat("qcow2".into()));
        }
        None => h.backing_file = None,
    }
    h.to_cluster()
        .map_err(|d| Error::format(path, "backing_file", d))
}

/// Write a header cluster made by [`header_with_backing`] at the start of
/// the image and make it durable.
pub fn write_header(path: &Path, cluster: &[u8]) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    f.write_all_at(cluster, 0)
        .map_err(|e| Error::io(path, "write header", e))?;
    f.sync_all().map_err(|e| Error::io(path, "fsync", e))
}
