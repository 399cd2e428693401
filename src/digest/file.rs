//! The block digests of one layer, in a file beside its image
//! (`<backup_id>.digests` beside `<backup_id>.qcow2`), and resolving them
//! through a chain the way reads resolve through the images.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CVBLKDG2` |
//! | 4 | version, 2 |
//! | 4 | block size, 65536 |
//! | 8 | disk size in bytes |
//! | 4 | kind: 0 = layer (blocks absent here resolve through the backing file), 1 = whole (blocks absent are zero blocks) |
//! | 4 | zero |
//! | 40 × n | entries: block index (8), block digest (32), indexes strictly ascending |
//! | 32 | BLAKE3 hash of everything before it |
//!
//! A layer file lists exactly the blocks its image holds anything for (data
//! or zero clusters, whole or in part); a whole file may list any blocks and
//! stops the resolution.
//!
//! Files of the first construction (magic `CVBLKDG1`, SHA-256) count as
//! absent: the point's digests are then not known, as for a point made
//! before digests, and the next backup of the disk writes a whole file.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::{block_len, blocks, zero_digest, BlockDigest, PointDigest, RootHasher, BLOCK};

const MAGIC: &[u8; 8] = b"CVBLKDG2";
const OLD_MAGIC: &[u8; 8] = b"CVBLKDG1";
const VERSION: u32 = 2;
const HEADER: usize = 32;
const ENTRY: usize = 40;
const TRAILER: usize = 32;

/// What a file's absent blocks mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Resolve through the backing file.
    Layer,
    /// Zero blocks: the resolution stops here.
    Whole,
}

/// The digest file of an image: `<image stem>.digests` beside it.
pub fn path_of(image: &Path) -> PathBuf {
    image.with_extension("digests")
}

/// Whether `image` has a digest file of the current construction (absent,
/// or of the first construction, is false; a damaged file is true, and
/// reading it says what is wrong).
pub fn has_current(image: &Path) -> bool {
    let mut m = [0u8; 8];
    match File::open(path_of(image)) {
        Err(_) => false,
        Ok(mut f) => !(f.read_exact(&mut m).is_ok() && &m == OLD_MAGIC),
    }
}

fn header(size: u64, kind: Kind) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    let k: u32 = match kind {
        Kind::Layer => 0,
        Kind::Whole => 1,
    };
    h[24..28].copy_from_slice(&k.to_le_bytes());
    h
}

/// Entries read or written (and hashed) at a time: 1638 entries, 64 KiB.
const CHUNK: usize = (64 << 10) / ENTRY * ENTRY;

/// Writes a digest file (or its bytes, to any writer).
pub struct Writer<W: Write> {
    w: W,
    h: blake3::Hasher,
    /// Entries not yet hashed and written (hashing 64 KiB at a time is
    /// several times faster than 40 bytes at a time).
    pending: Vec<u8>,
    size: u64,
    last: Option<u64>,
    pub entries: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(mut w: W, size: u64, kind: Kind) -> std::io::Result<Writer<W>> {
        let hd = header(size, kind);
        w.write_all(&hd)?;
        let mut h = blake3::Hasher::new();
        h.update(&hd);
        Ok(Writer {
            w,
            h,
            pending: Vec::with_capacity(CHUNK),
            size,
            last: None,
            entries: 0,
        })
    }

    /// Add block `i`; indexes must ascend.
    pub fn push(&mut self, i: u64, d: &BlockDigest) -> std::io::Result<()> {
        if self.last.is_some_and(|l| i <= l) || i >= blocks(self.size) {
            return Err(std::io::Error::other(format!(
                "block digest {i} out of order or past the disk's end"
            )));
        }
        self.last = Some(i);
        self.pending.extend_from_slice(&i.to_le_bytes());
        self.pending.extend_from_slice(d);
        self.entries += 1;
        if self.pending.len() >= CHUNK {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> std::io::Result<()> {
        self.h.update(&self.pending);
        self.w.write_all(&self.pending)?;
        self.pending.clear();
        Ok(())
    }

    /// Write the trailer; returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush_pending()?;
        let t: [u8; 32] = self.h.finalize().into();
        self.w.write_all(&t)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A digest file being written under a temporary name, renamed into place
/// (after an fsync) by [`FileWriter::commit`].
pub struct FileWriter {
    inner: Writer<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl FileWriter {
    pub fn create(path: &Path, size: u64, kind: Kind) -> std::io::Result<FileWriter> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let f = File::create(&tmp)?;
        Ok(FileWriter {
            inner: Writer::new(BufWriter::with_capacity(1 << 20, f), size, kind)?,
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn push(&mut self, i: u64, d: &BlockDigest) -> std::io::Result<()> {
        self.inner.push(i, d)
    }

    pub fn commit(self) -> std::io::Result<()> {
        let w = self.inner.finish()?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path)?;
        if let Some(d) = self.path.parent() {
            File::open(d)?.sync_all()?;
        }
        Ok(())
    }
}

/// Reads a digest file's entries in order, checking its trailer at the end.
pub struct Reader<R: Read> {
    r: R,
    h: blake3::Hasher,
    /// Entries read (and hashed) but not yet returned, from `at`.
    chunk: Vec<u8>,
    at: usize,
    /// Entries not yet read from `r`; u64::MAX once the trailer checked out.
    left: u64,
    last: Option<u64>,
    pub size: u64,
    pub kind: Kind,
    name: String,
}

/// What went wrong with a digest file: the message names the file.
fn bad(name: &str, why: impl std::fmt::Display) -> String {
    format!("block digests {name}: {why}")
}

impl Reader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, String> {
        let name = path.display().to_string();
        let f = File::open(path).map_err(|e| bad(&name, e))?;
        let len = f.metadata().map_err(|e| bad(&name, e))?.len();
        Reader::new(BufReader::with_capacity(256 << 10, f), len, name)
    }
}

impl<R: Read> Reader<R> {
    /// `len` is the whole stream's length.
    pub fn new(mut r: R, len: u64, name: String) -> Result<Self, String> {
        if len < (HEADER + TRAILER) as u64
            || !(len - (HEADER + TRAILER) as u64).is_multiple_of(ENTRY as u64)
        {
            return Err(bad(
                &name,
                format!("{len} bytes is not a digest file's length"),
            ));
        }
        let mut hd = [0u8; HEADER];
        r.read_exact(&mut hd).map_err(|e| bad(&name, e))?;
        if &hd[..8] == OLD_MAGIC {
            return Err(bad(
                &name,
                "is of the first construction (cvblk1-sha256), which this chainvault no longer reads",
            ));
        }
        if &hd[..8] != MAGIC {
            return Err(bad(&name, "not a chainvault block digest file (bad magic)"));
        }
        let u32at = |a: usize| u32::from_le_bytes(hd[a..a + 4].try_into().unwrap_or_default());
        if u32at(8) != VERSION {
            return Err(bad(&name, format!("version {} is not {VERSION}", u32at(8))));
        }
        if u32at(12) as u64 != BLOCK {
            return Err(bad(
                &name,
                format!("block size {} is not {BLOCK}", u32at(12)),
            ));
        }
        let kind = match u32at(24) {
            0 => Kind::Layer,
            1 => Kind::Whole,
            k => return Err(bad(&name, format!("unknown kind {k}"))),
        };
        let size = u64::from_le_bytes(hd[16..24].try_into().unwrap_or_default());
        let mut h = blake3::Hasher::new();
        h.update(&hd);
        Ok(Reader {
            r,
            h,
            chunk: Vec::new(),
            at: 0,
            left: (len - (HEADER + TRAILER) as u64) / ENTRY as u64,
            last: None,
            size,
            kind,
            name,
        })
    }

    /// The next entry, or None after the last (whose trailer then checked out).
    pub fn next_entry(&mut self) -> Result<Option<(u64, BlockDigest)>, String> {
        if self.at == self.chunk.len() && !self.fill()? {
            return Ok(None);
        }
        let e = &self.chunk[self.at..self.at + ENTRY];
        self.at += ENTRY;
        let i = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
        if self.last.is_some_and(|l| i <= l) || i >= blocks(self.size) {
            return Err(bad(
                &self.name,
                format!("entry for block {i} is out of order or past the disk's end"),
            ));
        }
        self.last = Some(i);
        let mut d = [0u8; 32];
        d.copy_from_slice(&e[8..]);
        Ok(Some((i, d)))
    }

    /// Read the next chunk of entries; false (after checking the trailer)
    /// when none are left.
    fn fill(&mut self) -> Result<bool, String> {
        if self.left == u64::MAX {
            return Ok(false);
        }
        if self.left == 0 {
            let mut t = [0u8; TRAILER];
            self.r.read_exact(&mut t).map_err(|e| bad(&self.name, e))?;
            let want: [u8; 32] = self.h.finalize().into();
            if t != want {
                return Err(bad(
                    &self.name,
                    "damaged: its checksum does not match its contents",
                ));
            }
            self.left = u64::MAX;
            return Ok(false);
        }
        let n = (self.left as usize).min(CHUNK / ENTRY);
        self.chunk.resize(n * ENTRY, 0);
        self.r
            .read_exact(&mut self.chunk)
            .map_err(|e| bad(&self.name, e))?;
        self.h.update(&self.chunk);
        self.left -= n as u64;
        self.at = 0;
        Ok(true)
    }
}

/// The block digests of a point: its layers' files merged, the upper one
/// winning, in ascending block order. Blocks it does not yield are zero
/// blocks.
pub struct Resolved {
    readers: Vec<Reader<BufReader<File>>>,
    heads: Vec<Option<(u64, BlockDigest)>>,
    heap: BinaryHeap<std::cmp::Reverse<(u64, usize)>>,
    pub size: u64,
}

impl Resolved {
    /// Open the files of `layers` (image paths, top first). None when a
    /// layer between the top and the first whole file (or the bottom) has
    /// no digest file or another disk size: the point's digests are then
    /// not known without reading it.
    pub fn open(layers: &[PathBuf], size: u64) -> Result<Option<Resolved>, String> {
        let mut readers = Vec::new();
        for l in layers {
            let p = path_of(l);
            if !has_current(l) {
                return Ok(None);
            }
            let r = Reader::open(&p)?;
            if r.size != size {
                return Ok(None);
            }
            let whole = r.kind == Kind::Whole;
            readers.push(r);
            if whole {
                break;
            }
        }
        if readers.is_empty() {
            return Ok(None);
        }
        let mut me = Resolved {
            heads: vec![None; readers.len()],
            readers,
            heap: BinaryHeap::new(),
            size,
        };
        for k in 0..me.readers.len() {
            me.advance(k)?;
        }
        Ok(Some(me))
    }

    fn advance(&mut self, k: usize) -> Result<(), String> {
        self.heads[k] = self.readers[k].next_entry()?;
        if let Some((i, _)) = self.heads[k] {
            self.heap.push(std::cmp::Reverse((i, k)));
        }
        Ok(())
    }

    /// The next block that some layer lists, with the digest of the upper one.
    pub fn next_entry(&mut self) -> Result<Option<(u64, BlockDigest)>, String> {
        let Some(std::cmp::Reverse((i, k))) = self.heap.pop() else {
            return Ok(None);
        };
        let d = self.heads[k].map(|h| h.1).unwrap_or_default();
        self.advance(k)?;
        // Lower layers' entries for the same block are hidden.
        while let Some(std::cmp::Reverse((j, kk))) = self.heap.peek().copied() {
            if j != i {
                break;
            }
            self.heap.pop();
            self.advance(kk)?;
        }
        Ok(Some((i, d)))
    }

    /// Drain everything into the point's digest (checking every file).
    pub fn root(mut self) -> Result<PointDigest, String> {
        let mut r = RootHasher::new(self.size);
        while let Some((i, d)) = self.next_entry()? {
            r.put(i, &d);
        }
        Ok(r.finish())
    }

    /// Block digests of the point as one whole file's bytes (zero blocks left
    /// out), for clients that build on it.
    pub fn to_whole_bytes(mut self) -> Result<Vec<u8>, String> {
        let zero = zero_digest(BLOCK as usize);
        let mut w = Writer::new(Vec::new(), self.size, Kind::Whole).map_err(|e| e.to_string())?;
        while let Some((i, d)) = self.next_entry()? {
            if d == zero || d == zero_digest(block_len(self.size, i)) {
                continue;
            }
            w.push(i, &d).map_err(|e| e.to_string())?;
        }
        w.finish().map_err(|e| e.to_string())
    }
}

/// Make the digest file of `upper` (an image) describe what it reads once
/// `lower`, its backing file, is merged into it (either way round): the
/// union of both files, `upper` winning. Where that is not known (a file is
/// missing, or the sizes differ) `upper`'s file is removed instead, so that
/// nothing claims digests it does not have. Before the merge the union is
/// already true (its extra entries are what `upper` reads through `lower`),
/// so this runs first, and again after a crash.
pub fn merge_into_upper(upper: &Path, lower: &Path) -> Result<(), String> {
    let (up, low) = (path_of(upper), path_of(lower));
    if !up.exists() {
        return Ok(());
    }
    let mut u = Reader::open(&up)?;
    if u.kind == Kind::Whole {
        return Ok(());
    }
    let l = match low.exists() {
        true => Some(Reader::open(&low)?),
        false => None,
    };
    let Some(mut l) = l.filter(|l| l.size == u.size) else {
        return std::fs::remove_file(&up).map_err(|e| bad(&up.display().to_string(), e));
    };
    let mut w =
        FileWriter::create(&up, u.size, l.kind).map_err(|e| bad(&up.display().to_string(), e))?;
    let (mut a, mut b) = (u.next_entry()?, l.next_entry()?);
    loop {
        let take = match (a, b) {
            (None, None) => break,
            (Some(x), None) => {
                a = u.next_entry()?;
                x
            }
            (None, Some(y)) => {
                b = l.next_entry()?;
                y
            }
            (Some(x), Some(y)) => {
                if x.0 <= y.0 {
                    if x.0 == y.0 {
                        b = l.next_entry()?;
                    }
                    a = u.next_entry()?;
                    x
                } else {
                    b = l.next_entry()?;
                    y
                }
            }
        };
        w.push(take.0, &take.1)
            .map_err(|e| bad(&up.display().to_string(), e))?;
    }
    w.commit().map_err(|e| bad(&up.display().to_string(), e))
}

/// Give `image` a whole file holding what `layers` (its chain, top first)
/// resolve to: for an image rewritten as a standalone full. Without known
/// digests its file is removed.
pub fn write_whole(image: &Path, layers: &[PathBuf], size: u64) -> Result<(), String> {
    let p = path_of(image);
    match Resolved::open(layers, size)? {
        Some(mut r) => {
            let mut w = FileWriter::create(&p, size, Kind::Whole)
                .map_err(|e| bad(&p.display().to_string(), e))?;
            while let Some((i, d)) = r.next_entry()? {
                w.push(i, &d)
                    .map_err(|e| bad(&p.display().to_string(), e))?;
            }
            w.commit().map_err(|e| bad(&p.display().to_string(), e))
        }
        None => match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(bad(&p.display().to_string(), e)),
        },
    }
}

/// A point's block digests as a dense list (one per block), from whole-file
/// bytes such as `GET .../digests` returns.
pub fn dense_from_bytes(bytes: &[u8], size: u64, name: &str) -> Result<Vec<BlockDigest>, String> {
    let mut r = Reader::new(bytes, bytes.len() as u64, name.to_string())?;
    if r.size != size {
        return Err(bad(
            name,
            format!("covers a disk of {} bytes, not {size}", r.size),
        ));
    }
    let n = blocks(size);
    let mut out: Vec<BlockDigest> = (0..n).map(|i| zero_digest(block_len(size, i))).collect();
    while let Some((i, d)) = r.next_entry()? {
        out[i as usize] = d;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, size: u64, kind: Kind, e: &[(u64, u8)]) -> PathBuf {
        let img = dir.join(format!("{name}.qcow2"));
        let mut w = FileWriter::create(&path_of(&img), size, kind).unwrap();
        for &(i, b) in e {
            w.push(i, &[b; 32]).unwrap();
        }
        w.commit().unwrap();
        img
    }

    #[test]
    fn upper_layers_win_and_whole_files_stop() {
        let t = tempfile::tempdir().unwrap();
        let size = 10 * BLOCK;
        let base = write(t.path(), "a", size, Kind::Layer, &[(0, 1), (3, 1), (9, 1)]);
        let mid = write(t.path(), "b", size, Kind::Whole, &[(3, 2), (5, 2)]);
        let top = write(t.path(), "c", size, Kind::Layer, &[(0, 3), (5, 3)]);
        let mut r = Resolved::open(&[top.clone(), base.clone()], size)
            .unwrap()
            .unwrap();
        let mut got = Vec::new();
        while let Some((i, d)) = r.next_entry().unwrap() {
            got.push((i, d[0]));
        }
        assert_eq!(got, vec![(0, 3), (3, 1), (5, 3), (9, 1)]);
        let mut r = Resolved::open(&[top, mid, base], size).unwrap().unwrap();
        let mut got = Vec::new();
        while let Some((i, d)) = r.next_entry().unwrap() {
            got.push((i, d[0]));
        }
        assert_eq!(got, vec![(0, 3), (3, 2), (5, 3)]);
    }

    #[test]
    fn a_flipped_byte_in_the_file_is_found() {
        let t = tempfile::tempdir().unwrap();
        let img = write(t.path(), "a", 4 * BLOCK, Kind::Layer, &[(1, 7), (2, 8)]);
        let p = path_of(&img);
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER + 20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let r = Resolved::open(&[img], 4 * BLOCK).unwrap().unwrap();
        assert!(r.root().unwrap_err().contains("damaged"));
    }

    #[test]
    fn merging_keeps_what_the_upper_layer_reads() {
        let t = tempfile::tempdir().unwrap();
        let size = 8 * BLOCK;
        let low = write(t.path(), "a", size, Kind::Layer, &[(0, 1), (2, 1), (7, 1)]);
        let up = write(t.path(), "b", size, Kind::Layer, &[(2, 2), (3, 2)]);
        let before = Resolved::open(&[up.clone(), low.clone()], size)
            .unwrap()
            .unwrap()
            .root()
            .unwrap();
        merge_into_upper(&up, &low).unwrap();
        merge_into_upper(&up, &low).unwrap(); // again, as after a crash
        let after = Resolved::open(std::slice::from_ref(&up), size)
            .unwrap()
            .unwrap()
            .root()
            .unwrap();
        assert_eq!(before, after);
        std::fs::remove_file(path_of(&low)).unwrap();
        merge_into_upper(&up, &low).unwrap();
        assert!(
            !path_of(&up).exists(),
            "a union with unknown digests is not kept"
        );
    }

    #[test]
    fn a_missing_layer_file_means_unknown() {
        let t = tempfile::tempdir().unwrap();
        let top = write(t.path(), "b", 4 * BLOCK, Kind::Layer, &[(1, 7)]);
        let base = t.path().join("a.qcow2");
        assert!(Resolved::open(&[top, base], 4 * BLOCK).unwrap().is_none());
    }

    #[test]
    fn a_file_of_the_first_construction_counts_as_absent() {
        let t = tempfile::tempdir().unwrap();
        let top = write(t.path(), "b", 4 * BLOCK, Kind::Layer, &[(1, 7)]);
        let base = write(t.path(), "a", 4 * BLOCK, Kind::Whole, &[(0, 3)]);
        assert!(Resolved::open(&[top.clone(), base.clone()], 4 * BLOCK)
            .unwrap()
            .is_some());
        // The base as development builds wrote it: same shape, old magic.
        let p = path_of(&base);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(OLD_MAGIC);
        std::fs::write(&p, &bytes).unwrap();
        assert!(!has_current(&base));
        assert!(has_current(&top));
        assert!(Resolved::open(&[top, base], 4 * BLOCK).unwrap().is_none());
        let e = Reader::open(&p).err().unwrap();
        assert!(e.contains("first construction"), "{e}");
    }
}
