//! An image and its backing files, opened through a gate.
//!
//! The gate: every backing file name an image carries is resolved against the
//! directory of the image that names it, canonicalised (following symlinks),
//! and must then lie inside an allowed root directory. A file already in the
//! chain is a cycle. The number of layers below the top is bounded. A backing
//! name is data from a file, and is never trusted further than that.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::header::{Header, MAGIC};
use crate::image::{push_extent, Extent, ExtentKind, Image, OpenOptions};
use crate::raw::RawFile;

/// Limits on following backing files.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// Backing files must resolve inside this directory. None: the top image's directory.
    pub root: Option<PathBuf>,
    /// Most layers below the top that may be followed.
    pub max_depth: usize,
    /// Open the top layer read-write.
    pub writable: bool,
    pub l2_cache_bytes: u64,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            root: None,
            max_depth: 256,
            writable: false,
            l2_cache_bytes: 32 << 20,
        }
    }
}

/// One layer of a chain.
#[derive(Clone, Debug)]
pub enum Layer {
    Qcow(Arc<Image>),
    Raw(Arc<RawFile>),
}

impl Layer {
    pub fn size(&self) -> u64 {
        match self {
            Layer::Qcow(i) => i.size(),
            Layer::Raw(r) => r.size(),
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            Layer::Qcow(i) => i.path(),
            Layer::Raw(r) => r.path(),
        }
    }
    pub fn format(&self) -> &'static str {
        match self {
            Layer::Qcow(_) => "qcow2",
            Layer::Raw(_) => "raw",
        }
    }
}

/// Format of a file in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

/// Sniff a file's format from its first bytes.
pub fn probe_format(path: &Path) -> Result<Format> {
    let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::io(path, "read", e)),
        }
    }
    Ok(if n == 4 && u32::from_be_bytes(magic) == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Read and parse just the header of a qcow2 file.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let len = f.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    let mut buf = vec![0u8; len.min(2 << 20) as usize];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| Error::io(path, "read header", e))?;
    Header::parse(&buf, path)
}

/// A top image and the layers below it; layer 0 is the top.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
}

/// The files of a chain, top first, as resolved by the gate.
pub fn resolve(top: &Path, opts: &ChainOptions) -> Result<Vec<(PathBuf, Format)>> {
    let top_c = top.canonicalize().map_err(|e| Error::io(top, "open", e))?;
    let root = match &opts.root {
        Some(r) => r
            .canonicalize()
            .map_err(|e| Error::io(r, "resolve allowed root", e))?,
        None => top_c
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/")),
    };
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut cur = top_c;
    let mut fmt = probe_format(&cur)?;
    loop {
        seen.insert(cur.clone());
        files.push((cur.clone(), fmt));
        if fmt == Format::Raw {
            break;
        }
        let h = read_header(&cur)?;
        let Some(name) = h.backing_file.clone() else {
            break;
        };
        let refuse = |reason: String| Error::BackingRefused {
            path: cur.clone(),
            backing: name.clone(),
            reason,
        };
        if files.len() > opts.max_depth {
            return Err(refuse(format!(
                "the chain is deeper than the limit of {} layers below the top",
                opts.max_depth
            )));
        }
        let p = Path::new(&name);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            cur.parent().unwrap_or(Path::new("/")).join(p)
        };
        let canon = joined
            .canonicalize()
            .map_err(|e| refuse(format!("it cannot be opened as {}: {e}", joined.display())))?;
        if !canon.starts_with(&root) {
            return Err(refuse(format!(
                "it resolves to {}, outside the allowed directory {}",
                canon.display(),
                root.display()
            )));
        }
        if seen.contains(&canon) {
            return Err(refuse(format!(
                "backing cycle: {} is already in the chain",
                canon.display()
            )));
        }
        fmt = match h.backing_format() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(other) => {
                return Err(refuse(format!(
                    "backing format {other:?} is not supported (qcow2 or raw)"
                )))
            }
            None => probe_format(&canon)?,
        };
        cur = canon;
    }
    Ok(files)
}

impl Chain {
    /// Open `top` and every backing file below it, through the gate.
    pub fn open(top: &Path, opts: &ChainOptions) -> Result<Chain> {
        let files = resolve(top, opts)?;
        let ro = OpenOptions {
            writable: false,
            l2_cache_bytes: opts.l2_cache_bytes,
        };
        let mut layers: Vec<Layer> = Vec::with_capacity(files.len());
        for (path, fmt) in files.iter().skip(1) {
            layers.push(match fmt {
                Format::Qcow2 => Layer::Qcow(Arc::new(Image::open(path, &ro)?)),
                Format::Raw => Layer::Raw(Arc::new(RawFile::open(path)?)),
            });
        }
        let (top_path, top_fmt) = &files[0];
        let top_layer = match top_fmt {
            Format::Qcow2 => {
                let backing = if layers.is_empty() {
                    None
                } else {
                    Some(Arc::new(Chain {
                        layers: layers.clone(),
                    }))
                };
                let o = OpenOptions {
                    writable: opts.writable,
                    l2_cache_bytes: opts.l2_cache_bytes,
                };
                Layer::Qcow(Arc::new(Image::open_with_backing(top_path, &o, backing)?))
            }
            Format::Raw => {
                if opts.writable {
                    return Err(Error::unsupported(
                        top_path,
                        "raw files are opened read-only",
                    ));
                }
                Layer::Raw(Arc::new(RawFile::open(top_path)?))
            }
        };
        layers.insert(0, top_layer);
        Ok(Chain { layers })
    }

    /// Layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The top image, when the top layer is qcow2.
    pub fn top_image(&self) -> Option<&Arc<Image>> {
        match &self.layers[0] {
            Layer::Qcow(i) => Some(i),
            Layer::Raw(_) => None,
        }
    }

    /// Virtual size: the top layer's.
    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    /// Read guest data through the chain.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = self.size();
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                path: self.layers[0].path().to_path_buf(),
                offset: off,
                len: buf.len() as u64,
                size,
            });
        }
        self.read_padded(buf, off)
    }

    /// Read; anything past a layer's end reads as zeros (used for copy-on-write
    /// fills from a backing file smaller than its overlay).
    pub(crate) fn read_padded(&self, buf: &mut [u8], off: u64) -> Result<()> {
        // Work list of (layer, guest offset, start in buf, length).
        let mut work = vec![(0usize, off, 0usize, buf.len())];
        let mut holes = Vec::new();
        while let Some((li, o, bs, len)) = work.pop() {
            let layer = &self.layers[li];
            let lsize = layer.size();
            let inside = if o >= lsize {
                0
            } else {
                (lsize - o).min(len as u64) as usize
            };
            buf[bs + inside..bs + len].fill(0);
            if inside == 0 {
                continue;
            }
            let b = &mut buf[bs..bs + inside];
            match layer {
                Layer::Raw(r) => r.read_at(b, o)?,
                Layer::Qcow(img) => {
                    holes.clear();
                    let last = li + 1 == self.layers.len();
                    img.read_own(b, o, &mut holes, last)?;
                    if !last {
                        for &(h, hl) in &holes {
                            work.push((li + 1, h, bs + (h - o) as usize, hl as usize));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Block status through the chain: for every range, which layer supplies it
    /// and whether it is data, zero, or unallocated everywhere.
    pub fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                path: self.layers[0].path().to_path_buf(),
                offset: off,
                len,
                size,
            });
        }
        let bottom = (self.layers.len() - 1) as u32;
        let mut found: Vec<Extent> = Vec::new();
        let mut work = vec![(0usize, off, len)];
        while let Some((li, o, l)) = work.pop() {
            let layer = &self.layers[li];
            let lsize = layer.size();
            let inside = if o >= lsize { 0 } else { (lsize - o).min(l) };
            if inside < l {
                found.push(Extent {
                    offset: o + inside,
                    length: l - inside,
                    kind: ExtentKind::Unallocated,
                    depth: bottom,
                    host_offset: None,
                    compressed: false,
                });
            }
            if inside == 0 {
                continue;
            }
            match layer {
                Layer::Raw(r) => {
                    let mut p = o;
                    while p < o + inside {
                        let (data, n) = r.probe(p, o + inside - p);
                        let n = n.max(1).min(o + inside - p);
                        found.push(Extent {
                            offset: p,
                            length: n,
                            kind: if data {
                                ExtentKind::Data
                            } else {
                                ExtentKind::Zero
                            },
                            depth: li as u32,
                            host_offset: data.then_some(p),
                            compressed: false,
                        });
                        p += n;
                    }
                }
                Layer::Qcow(img) => {
                    for e in img.block_status(o, inside)? {
                        if e.kind == ExtentKind::Unallocated && li + 1 < self.layers.len() {
                            work.push((li + 1, e.offset, e.length));
                        } else {
                            found.push(Extent {
                                depth: if e.kind == ExtentKind::Unallocated {
                                    bottom
                                } else {
                                    li as u32
                                },
                                ..e
                            });
                        }
                    }
                }
            }
        }
        found.sort_by_key(|e| e.offset);
        let mut out = Vec::with_capacity(found.len());
        for e in found {
            push_extent(&mut out, e);
        }
        Ok(out)
    }

    /// Flush the top layer (no-op when read-only).
    pub fn flush(&self) -> Result<()> {
        match &self.layers[0] {
            Layer::Qcow(i) => i.flush(),
            Layer::Raw(_) => Ok(()),
        }
    }
}
