//! NTFS through the `ntfs` crate (MFT records, attribute lists, resident
//! and non-resident data with sparse runs, B-tree directory indexes).
//!
//! NodeIds are MFT record numbers (the root is 5). The crate's handle is
//! shareable; each call gets its own [`Cursor`] over the cached volume, so
//! readers do not wait for each other. Every call into the crate runs under
//! `catch_unwind`: a panic on hostile bytes becomes an I/O error.
//!
//! What NTFS cannot give a Unix view, and what we show instead: uid and
//! gid 0; modes 0755 for directories, 0644 for files (0444 read-only),
//! 0777 for symlinks. Symlinks are Windows symlinks and junctions (reparse
//! points, `\` turned into `/`), WSL symlinks, and Interix symlinks (what
//! ntfs-3g writes). Metafiles (`$MFT`, `$Extend`, ...) are hidden.
//! Compressed files are read by our own code ([`crate::ntfs_compressed`],
//! LZNT1 in [`crate::lznt1`]): the crate does not decompress. Recently
//! decompressed units and each compressed file's data runs are cached.
//! A $DATA split over several records by an attribute list (a very
//! fragmented file) is also gathered and read by us: the crate 0.4 starts
//! it at its second piece, with size 0, when the first is in the base
//! record.
//! Encrypted (EFS) files list with their size, but reading them fails with
//! an error that says so.

use std::io::{self, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ntfs::attribute_value::{NtfsAttributeValue, NtfsNonResidentAttributeValue};
use ntfs::structured_values::{NtfsAttributeList, NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::types::NtfsPosition;
use ntfs::{NtfsAttributeFlags, NtfsAttributeType, NtfsFile, NtfsReadSeek};

use crate::cache::{Listing, Lru, DIR_CACHE_ENTRIES};
use crate::disk::Cursor;
use crate::ntfs_compressed::{Layout, Run, RunMap};
use crate::{Attr, DirEntry, Disk, GuestFs, Kind, NodeId};

const ROOT: NodeId = 5;
const INTERIX: &[u8] = b"IntxLNK\x01";
const TAG_SYMLINK: u32 = 0xA000_000C;
const TAG_MOUNT_POINT: u32 = 0xA000_0003;
const TAG_LX_SYMLINK: u32 = 0xA000_001D;
/// Offset of the compression unit exponent in a non-resident attribute
/// header.
const COMPRESSION_UNIT_AT: u64 = 0x22;
/// Decompressed units kept, in bytes (32 units of 64 KiB): sequential
/// reads smaller than a unit decompress it once, several readers at once
/// keep theirs.
const UNIT_CACHE_BYTES: usize = 2 << 20;
/// Data runs kept for files we read ourselves, in runs.
const MAP_CACHE_RUNS: usize = 1 << 18;

pub struct Ntfs {
    ntfs: ntfs::Ntfs,
    dev: Disk,
    dirs: Lru<NodeId, Arc<Listing>>,
    /// How to read compressed files and files split by an attribute list.
    maps: Lru<NodeId, Arc<DataMap>>,
    /// Decompressed units: (file, unit index) -> file bytes.
    units: Lru<(NodeId, u64), Arc<[u8]>>,
}

fn err(e: ntfs::NtfsError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NTFS: {e}"))
}

fn guarded<T>(what: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the NTFS reader failed on damaged metadata while {what}"),
        )),
    }
}

fn nt_time(t: ntfs::NtfsTime) -> SystemTime {
    // 100 ns units since 1601-01-01.
    const EPOCH_DIFF: u64 = 116_444_736_000_000_000;
    let t = t.nt_timestamp();
    if t >= EPOCH_DIFF {
        let d = t - EPOCH_DIFF;
        UNIX_EPOCH + Duration::new(d / 10_000_000, (d % 10_000_000) as u32 * 100)
    } else {
        let d = EPOCH_DIFF - t;
        UNIX_EPOCH - Duration::new(d / 10_000_000, (d % 10_000_000) as u32 * 100)
    }
}

fn utf16le(b: &[u8]) -> String {
    let v: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&v)
}

/// The target of a reparse point we show as a symlink, or None.
fn reparse_target(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 8 {
        return None;
    }
    let tag = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    let le16 = |o: usize| {
        v.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let (buf_at, relative) = match tag {
        TAG_SYMLINK => (20, v.get(16).is_some_and(|f| f & 1 == 1)),
        TAG_MOUNT_POINT => (16, false),
        TAG_LX_SYMLINK => return v.get(12..).map(|t| t.to_vec()),
        _ => return None,
    };
    // Prefer the print name, fall back to the substitute name.
    let (so, sl, po, pl) = (le16(8)?, le16(10)?, le16(12)?, le16(14)?);
    let pick = |o: usize, l: usize| {
        v.get(buf_at + o..buf_at + o + l)
            .map(utf16le)
            .filter(|s| !s.is_empty())
    };
    let mut s = pick(po, pl).or_else(|| pick(so, sl))?;
    if let Some(rest) = s.strip_prefix("\\??\\") {
        s = rest.to_string();
    }
    let s = s.replace('\\', "/");
    let _ = relative;
    Some(s.into_bytes())
}

impl Ntfs {
    pub fn probe(boot: &[u8]) -> bool {
        boot.len() >= 11 && &boot[3..11] == b"NTFS    "
    }

    pub fn open(dev: Disk) -> Result<Self, String> {
        let mut c = Cursor {
            disk: dev.clone(),
            pos: 0,
        };
        let r = catch_unwind(AssertUnwindSafe(|| -> Result<ntfs::Ntfs, String> {
            let mut n =
                ntfs::Ntfs::new(&mut c).map_err(|e| format!("NTFS boot sector is invalid: {e}"))?;
            n.read_upcase_table(&mut c)
                .map_err(|e| format!("cannot read the NTFS $UpCase table: {e}"))?;
            Ok(n)
        }));
        let ntfs = match r {
            Ok(r) => r?,
            Err(_) => return Err("the NTFS reader failed on a damaged boot sector or $MFT".into()),
        };
        let me = Ntfs {
            ntfs,
            dev,
            dirs: Lru::new(DIR_CACHE_ENTRIES),
            maps: Lru::new(MAP_CACHE_RUNS),
            units: Lru::new(UNIT_CACHE_BYTES),
        };
        me.list(ROOT)
            .map_err(|e| format!("cannot list the NTFS root directory: {e}"))?;
        Ok(me)
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            disk: self.dev.clone(),
            pos: 0,
        }
    }

    fn file<'n>(&'n self, c: &mut Cursor, node: NodeId) -> io::Result<NtfsFile<'n>> {
        let f = self.ntfs.file(c, node).map_err(err)?;
        if node != ROOT && node < 16 {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(f)
    }

    /// The unnamed $DATA stream's bytes, whole (small values only).
    fn small_data(&self, c: &mut Cursor, f: &NtfsFile, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(item) = f.data(c, "") else {
            return Ok(None);
        };
        let item = item.map_err(err)?;
        let a = item.to_attribute().map_err(err)?;
        let len = a.value_length();
        if len > limit {
            return Ok(None);
        }
        let mut v = a.value(c).map_err(err)?;
        let mut buf = vec![0u8; len as usize];
        v.read_exact(c, &mut buf).map_err(err)?;
        Ok(Some(buf))
    }

    fn reparse(&self, c: &mut Cursor, f: &NtfsFile) -> io::Result<Option<Vec<u8>>> {
        let mut it = f.attributes();
        while let Some(item) = it.next(c) {
            let item = item.map_err(err)?;
            let a = item.to_attribute().map_err(err)?;
            if a.ty().map_err(err)? != NtfsAttributeType::ReparsePoint {
                continue;
            }
            if a.value_length() > 16 * 1024 {
                return Ok(None);
            }
            let mut v = a.value(c).map_err(err)?;
            let mut buf = vec![0u8; a.value_length() as usize];
            v.read_exact(c, &mut buf).map_err(err)?;
            return Ok(reparse_target(&buf));
        }
        Ok(None)
    }

    /// Kind and, for symlinks, the target.
    fn classify(&self, c: &mut Cursor, f: &NtfsFile) -> io::Result<(Kind, Option<Vec<u8>>)> {
        let flags = f.info().map_err(err)?.file_attributes();
        if flags.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
            if let Some(t) = self.reparse(c, f)? {
                return Ok((Kind::Symlink, Some(t)));
            }
        }
        if f.is_directory() {
            return Ok((Kind::Dir, None));
        }
        if flags.contains(NtfsFileAttributeFlags::SYSTEM) {
            if let Some(d) = self.small_data(c, f, 8 + 2 * 4096)? {
                if d.starts_with(INTERIX) {
                    return Ok((
                        Kind::Symlink,
                        Some(utf16le(&d[INTERIX.len()..]).into_bytes()),
                    ));
                }
            }
        }
        Ok((Kind::File, None))
    }

    fn list(&self, dir: NodeId) -> io::Result<Arc<Listing>> {
        if let Some(l) = self.dirs.get(&dir) {
            return Ok(l);
        }
        let entries = guarded("listing a directory", || {
            let mut c = self.cursor();
            let f = self.file(&mut c, dir)?;
            if !f.is_directory() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            let index = f.directory_index(&mut c).map_err(err)?;
            let mut it = index.entries();
            let mut out = Vec::new();
            while let Some(e) = it.next(&mut c) {
                let e = e.map_err(err)?;
                let Some(key) = e.key() else { continue };
                let key = key.map_err(err)?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let node = e.file_reference().file_record_number();
                let name = key.name().to_string_lossy();
                if node < 16 || (dir == ROOT && name.starts_with('$')) || name == "." {
                    continue; // metafiles
                }
                let fa = key.file_attributes();
                let kind = if fa.contains(NtfsFileAttributeFlags::REPARSE_POINT)
                    || (fa.contains(NtfsFileAttributeFlags::SYSTEM) && !key.is_directory())
                {
                    let f = self.file(&mut c, node)?;
                    self.classify(&mut c, &f)?.0
                } else if key.is_directory() {
                    Kind::Dir
                } else {
                    Kind::File
                };
                out.push(DirEntry {
                    name: name.into_bytes(),
                    node,
                    kind,
                });
            }
            Ok(out)
        })?;
        let l = Listing::new(entries);
        self.dirs.insert(dir, l.clone(), l.weight());
        Ok(l)
    }
}

/// The unnamed $DATA of a file split by an attribute list (see
/// [`Ntfs::listed_data`]).
struct Listed {
    size: u64,
    flags: NtfsAttributeFlags,
    /// Position of the first piece's header.
    at: NtfsPosition,
    map: RunMap,
}

/// How we read a file's data ourselves instead of through the crate.
enum DataMap {
    /// Compressed (LZNT1 units).
    Compressed(Layout),
    /// Plain, split by an attribute list.
    Plain { size: u64, map: RunMap },
}

impl DataMap {
    fn size(&self) -> u64 {
        match self {
            DataMap::Compressed(l) => l.size,
            DataMap::Plain { size, .. } => *size,
        }
    }

    fn weight(&self) -> usize {
        match self {
            DataMap::Compressed(l) => l.weight(),
            DataMap::Plain { map, .. } => map.weight(),
        }
    }
}

fn encrypted(node: NodeId) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("NTFS file record {node} is encrypted (EFS): its contents cannot be read without the user's key"),
    )
}

/// Appends the data runs of one non-resident attribute (or one piece of it
/// when an attribute list splits it) that starts at cluster `vcn`.
fn push_runs(
    v: &NtfsNonResidentAttributeValue,
    mut vcn: u64,
    cluster: u64,
    runs: &mut Vec<Run>,
) -> io::Result<()> {
    for r in v.data_runs() {
        let r = r.map_err(err)?;
        let clusters = r.allocated_size() / cluster;
        // The crate gives no position for a sparse run (nor for LCN 0,
        // the boot sector, which never holds file data).
        let at = r.data_position().value().map(|p| p.get());
        runs.push(Run { vcn, clusters, at });
        vcn = vcn.checked_add(clusters).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "NTFS: a data run is too long")
        })?;
    }
    Ok(())
}

impl Ntfs {
    /// The compression unit exponent of the attribute at `pos`, read from
    /// the volume: the crate keeps it private. Attributes are 8-byte
    /// aligned in their record, so this byte is never one that the
    /// record's update sequence (fixups, the last 2 bytes of every 512)
    /// replaced on disk.
    fn unit_exponent(&self, node: NodeId, pos: NtfsPosition) -> io::Result<u8> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("NTFS file record {node}: {why}"),
            )
        };
        let p = pos
            .value()
            .ok_or_else(|| bad("the compressed $DATA attribute has no position"))?
            .get();
        if p % 8 != 0 {
            return Err(bad("the compressed $DATA attribute is not 8-byte aligned"));
        }
        let mut b = [0u8; 1];
        self.dev.read_exact_at(&mut b, p + COMPRESSION_UNIT_AT)?;
        Ok(b[0])
    }

    /// The unnamed $DATA when an attribute list splits it over several
    /// records, gathered by us: the `ntfs` crate 0.4 starts such a value at
    /// its second piece (with size 0) when the first is in the base record.
    /// None when there is no list or the data is resident.
    fn listed_data(
        &self,
        node: NodeId,
        c: &mut Cursor,
        f: &NtfsFile,
    ) -> io::Result<Option<Listed>> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("NTFS file record {node}: {why}"),
            )
        };
        let cluster = self.ntfs.cluster_size() as u64;
        for a in f.attributes_raw() {
            let a = a.map_err(err)?;
            if a.ty().map_err(err)? != NtfsAttributeType::AttributeList {
                continue;
            }
            let list = a.structured_value::<_, NtfsAttributeList>(c).map_err(err)?;
            let mut entries = list.entries();
            let mut first = None;
            let mut runs = Vec::new();
            while let Some(e) = entries.next(c) {
                let e = e.map_err(err)?;
                if e.ty().map_err(err)? != NtfsAttributeType::Data || e.name_length() != 0 {
                    continue;
                }
                let vcn = u64::try_from(e.lowest_vcn().value())
                    .map_err(|_| bad("an attribute list entry starts at a negative cluster"))?;
                let file = e.to_file(&self.ntfs, c).map_err(err)?;
                let piece = e.to_attribute(&file).map_err(err)?;
                if vcn == 0 {
                    if piece.is_resident() {
                        return Ok(None);
                    }
                    first = Some((piece.value_length(), piece.flags(), piece.position()));
                }
                match piece.value(c).map_err(err)? {
                    NtfsAttributeValue::NonResident(v) => push_runs(&v, vcn, cluster, &mut runs)?,
                    _ => return Err(bad("a piece of the listed $DATA attribute is resident")),
                }
            }
            if runs.is_empty() && first.is_none() {
                return Ok(None);
            }
            let (size, flags, at) =
                first.ok_or_else(|| bad("the attribute list has no first piece of $DATA"))?;
            let map = RunMap::new(runs, cluster).map_err(|e| bad(&e))?;
            return Ok(Some(Listed {
                size,
                flags,
                at,
                map,
            }));
        }
        Ok(None)
    }

    /// The data map of a compressed attribute (`at` is its header).
    fn compressed_map(
        &self,
        node: NodeId,
        map: RunMap,
        at: NtfsPosition,
        size: u64,
    ) -> io::Result<DataMap> {
        let exponent = self.unit_exponent(node, at)?;
        let l = Layout::new(map, exponent, size).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("NTFS file record {node}: {e}"),
            )
        })?;
        Ok(DataMap::Compressed(l))
    }

    /// Caches a data map; returns it shared.
    fn keep_map(&self, node: NodeId, m: DataMap) -> Arc<DataMap> {
        let m = Arc::new(m);
        self.maps.insert(node, m.clone(), m.weight());
        m
    }

    /// The size of the unnamed $DATA stream.
    fn data_size(&self, node: NodeId, c: &mut Cursor, f: &NtfsFile) -> io::Result<u64> {
        if let Some(m) = self.maps.get(&node) {
            return Ok(m.size());
        }
        if let Some(l) = self.listed_data(node, c, f)? {
            return Ok(l.size);
        }
        Ok(match f.data(c, "") {
            Some(item) => item
                .map_err(err)?
                .to_attribute()
                .map_err(err)?
                .value_length(),
            None => 0,
        })
    }

    /// Reads through a [`DataMap`].
    fn read_map(
        &self,
        node: NodeId,
        m: &DataMap,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        match m {
            DataMap::Plain { size, map } => map.read_plain(
                &*self.dev,
                *size,
                offset,
                buf,
                &format!("NTFS file record {node}"),
            ),
            DataMap::Compressed(l) => {
                if offset >= l.size {
                    return Ok(0);
                }
                let want = (l.size - offset).min(buf.len() as u64) as usize;
                self.read_compressed(node, l, offset, &mut buf[..want])
            }
        }
    }

    /// Fills `buf` from `offset` (both within the file), one compression
    /// unit at a time, through the unit cache.
    fn read_compressed(
        &self,
        node: NodeId,
        layout: &Layout,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let ub = layout.unit_bytes();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let k = pos / ub;
            let unit = match self.units.get(&(node, k)) {
                Some(u) => u,
                None => {
                    let what = format!("NTFS file record {node}");
                    let u: Arc<[u8]> = layout.read_unit(&*self.dev, k, &what)?.into();
                    self.units.insert((node, k), u.clone(), u.len() + 64);
                    u
                }
            };
            let o = (pos - k * ub) as usize;
            if o >= unit.len() {
                break;
            }
            let n = (unit.len() - o).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&unit[o..o + n]);
            done += n;
        }
        Ok(done)
    }
}

impl GuestFs for Ntfs {
    fn format(&self) -> &'static str {
        "ntfs"
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn attr(&self, node: NodeId) -> io::Result<Attr> {
        guarded("reading attributes", || {
            let mut c = self.cursor();
            let f = self.file(&mut c, node)?;
            let info = f.info().map_err(err)?;
            let (kind, target) = self.classify(&mut c, &f)?;
            let size = match kind {
                Kind::Dir => 0,
                Kind::Symlink => target.as_ref().map_or(0, |t| t.len() as u64),
                _ => self.data_size(node, &mut c, &f)?,
            };
            let ro = info
                .file_attributes()
                .contains(NtfsFileAttributeFlags::READ_ONLY);
            let perm = match kind {
                Kind::Dir => 0o755,
                Kind::Symlink => 0o777,
                _ if ro => 0o444,
                _ => 0o644,
            };
            Ok(Attr {
                kind,
                size,
                perm,
                uid: 0,
                gid: 0,
                nlink: (f.hard_link_count() as u32).max(1),
                atime: nt_time(info.access_time()),
                mtime: nt_time(info.modification_time()),
                ctime: nt_time(info.mft_record_modification_time()),
                blocks: size.div_ceil(512),
                rdev: 0,
            })
        })
    }

    fn read_dir(&self, dir: NodeId) -> io::Result<Arc<[DirEntry]>> {
        Ok(self.list(dir)?.entries.clone())
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> io::Result<Option<NodeId>> {
        Ok(self.list(dir)?.find(name))
    }

    fn read(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        guarded("reading a file", || {
            let mut c = self.cursor();
            let f = self.file(&mut c, node)?;
            if f.is_directory() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            if let Some(m) = self.maps.get(&node) {
                return self.read_map(node, &m, offset, buf);
            }
            if let Some(l) = self.listed_data(node, &mut c, &f)? {
                if l.flags.contains(NtfsAttributeFlags::ENCRYPTED) {
                    return Err(encrypted(node));
                }
                let m = if l.flags.contains(NtfsAttributeFlags::COMPRESSED) {
                    self.compressed_map(node, l.map, l.at, l.size)?
                } else {
                    DataMap::Plain {
                        size: l.size,
                        map: l.map,
                    }
                };
                return self.read_map(node, &self.keep_map(node, m), offset, buf);
            }
            let Some(item) = f.data(&mut c, "") else {
                return Ok(0);
            };
            let item = item.map_err(err)?;
            let a = item.to_attribute().map_err(err)?;
            let len = a.value_length();
            if offset >= len {
                return Ok(0);
            }
            let fl = a.flags();
            if fl.contains(NtfsAttributeFlags::ENCRYPTED) {
                return Err(encrypted(node));
            }
            if fl.contains(NtfsAttributeFlags::COMPRESSED) && !a.is_resident() {
                let cluster = self.ntfs.cluster_size() as u64;
                let mut runs = Vec::new();
                match a.value(&mut c).map_err(err)? {
                    NtfsAttributeValue::NonResident(v) => push_runs(&v, 0, cluster, &mut runs)?,
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("NTFS file record {node}: the compressed $DATA attribute has no data runs of its own"),
                        ))
                    }
                }
                let map = RunMap::new(runs, cluster).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("NTFS file record {node}: {e}"),
                    )
                })?;
                let m = self.compressed_map(node, map, a.position(), len)?;
                return self.read_map(node, &self.keep_map(node, m), offset, buf);
            }
            let want = (len - offset).min(buf.len() as u64) as usize;
            let mut v = a.value(&mut c).map_err(err)?;
            v.seek(&mut c, SeekFrom::Start(offset)).map_err(err)?;
            let mut done = 0;
            while done < want {
                let k = v.read(&mut c, &mut buf[done..want]).map_err(err)?;
                if k == 0 {
                    break;
                }
                done += k;
            }
            Ok(done)
        })
    }

    fn read_link(&self, node: NodeId) -> io::Result<Vec<u8>> {
        guarded("reading a symlink", || {
            let mut c = self.cursor();
            let f = self.file(&mut c, node)?;
            match self.classify(&mut c, &f)? {
                (Kind::Symlink, Some(t)) => Ok(t),
                _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        })
    }
}
