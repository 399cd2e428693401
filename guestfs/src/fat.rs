//! FAT12/16/32 through the `fatfs` crate.
//!
//! fatfs wants `Read + Write + Seek` storage and its `FileSystem` is not
//! `Sync`: we hand it a [`Cursor`] whose writes fail and keep it behind a
//! mutex (FAT volumes are small and their readers are not the hot path).
//! FAT has no inode numbers, so NodeIds are interned paths, handed out as
//! directories are listed. Every call into fatfs runs under
//! `catch_unwind`, so a panic on hostile bytes becomes an I/O error.
//!
//! FAT stores local time with no zone; we read it as UTC (what a guest that
//! keeps its clock in UTC wrote; others are off by their zone's offset).
//! Modes are 0755 for directories and 0644 for files (0444 when the
//! read-only attribute is set); uid and gid are 0.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fatfs::{FatType, FileSystem, FsOptions};

use crate::cache::{Listing, Lru, DIR_CACHE_ENTRIES};
use crate::disk::Cursor;
use crate::{Attr, DirEntry, Disk, GuestFs, Kind, NodeId};

const ROOT: NodeId = 1;

#[derive(Clone)]
struct Node {
    path: String,
    kind: Kind,
    size: u64,
    read_only: bool,
    mtime: SystemTime,
    atime: SystemTime,
    ctime: SystemTime,
}

#[derive(Default)]
struct Nodes {
    by_path: HashMap<String, NodeId>,
    list: Vec<Node>,
}

/// Short (8.3) names are stored in an OEM code page; Linux reads them as
/// code page 437 by default (vfat `codepage=437`), and so do we: mtools
/// stores `café` as a short name with `é` = 0x82.
#[derive(Debug)]
struct Cp437;

const CP437_HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■ ";

impl fatfs::OemCpConverter for Cp437 {
    fn decode(&self, c: u8) -> char {
        if c < 0x80 {
            c as char
        } else {
            CP437_HIGH
                .chars()
                .nth(c as usize - 0x80)
                .unwrap_or('\u{FFFD}')
        }
    }

    fn encode(&self, u: char) -> Option<u8> {
        if (u as u32) < 0x80 {
            return Some(u as u8);
        }
        CP437_HIGH
            .chars()
            .position(|c| c == u)
            .map(|i| (i + 0x80) as u8)
    }
}

static CP437: Cp437 = Cp437;

/// fatfs's `FileSystem` is not `Send` only because it keeps
/// `&'static dyn OemCpConverter` and `&'static dyn TimeProvider`, traits
/// without a `Sync` bound. Ours are stateless: our own [`Cp437`] and the
/// crate's `DefaultTimeProvider` (unit structs with no interior
/// mutability), and the handle is only ever used under our mutex.
struct SendFs(FileSystem<Cursor>);
// SAFETY: see above: the non-Send fields point at immutable, stateless
// statics; everything else in FileSystem (RefCell, Cell, Cursor) is Send,
// and all access is serialised by `Fat::fs`.
unsafe impl Send for SendFs {}

pub struct Fat {
    fs: Mutex<SendFs>,
    format: &'static str,
    nodes: Mutex<Nodes>,
    dirs: Lru<NodeId, Arc<Listing>>,
}

fn guarded<T>(what: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the FAT reader (fatfs) failed on damaged metadata while {what}"),
        )),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn fat_time(d: fatfs::Date, t: fatfs::Time) -> SystemTime {
    if d.month == 0 || d.day == 0 {
        return UNIX_EPOCH;
    }
    let days = days_from_civil(d.year as i64, d.month.min(12) as i64, d.day.min(31) as i64);
    let secs = days * 86400 + t.hour as i64 * 3600 + t.min as i64 * 60 + t.sec as i64;
    if secs < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_millis(t.millis.min(999) as u64)
}

/// Where an entry has no long name, fatfs builds its name from the 8.3
/// name and the two "lower-case base/extension" flags (byte 12, as Windows
/// NT and mtools write them for `readme.txt` or `ABC.txt`), but lowers with
/// ASCII rules only (`CAFÉ` becomes `cafÉ`); Linux and Windows lower the
/// whole part. Redo that lowering, and only that: a long name is shown
/// exactly as stored (`Docs`, `Makefile`), even where it differs from its
/// short name only by case.
///
/// fatfs does not say whether a long name was present, so this tells the
/// two apart by shape: a name made from the flags has each part equal to
/// the short name's part or to its ASCII lowering. A long name of exactly
/// that shape and with non-ASCII capitals (`cafÉ.txt` for `CAFÉ.TXT`) is
/// the one case recased wrongly; a guest cannot tell it from a flagged
/// short name either without reading the slots, and none writes it.
fn fix_case(name: String, short: &str) -> String {
    fn parts(s: &str) -> (&str, Option<&str>) {
        match s.rsplit_once('.') {
            Some((b, x)) => (b, Some(x)),
            None => (s, None),
        }
    }
    /// The part as Linux shows it, or None when `n` is no flag form of `s`.
    fn part(n: &str, s: &str) -> Option<String> {
        if n == s {
            Some(n.to_string())
        } else if n == s.to_ascii_lowercase() {
            Some(s.to_lowercase())
        } else {
            None
        }
    }
    if name == short {
        return name;
    }
    let ((nb, nx), (sb, sx)) = (parts(&name), parts(short));
    let fixed = match (nx, sx) {
        (None, None) => part(nb, sb),
        (Some(nx), Some(sx)) => part(nb, sb)
            .zip(part(nx, sx))
            .map(|(b, x)| format!("{b}.{x}")),
        _ => None,
    };
    fixed.unwrap_or(name)
}

impl Fat {
    /// True when `boot` (the first sector) looks like a FAT boot sector.
    pub fn probe(boot: &[u8]) -> bool {
        if boot.len() < 512 || boot[510] != 0x55 || boot[511] != 0xAA {
            return false;
        }
        let bps = u16::from_le_bytes([boot[11], boot[12]]);
        let spc = boot[13];
        let reserved = u16::from_le_bytes([boot[14], boot[15]]);
        let fats = boot[16];
        let sane = matches!(bps, 512 | 1024 | 2048 | 4096)
            && spc != 0
            && spc.is_power_of_two()
            && reserved != 0
            && (1..=4).contains(&fats);
        sane && (&boot[54..57] == b"FAT"
            || &boot[82..87] == b"FAT32"
            || boot[0] == 0xEB
            || boot[0] == 0xE9)
    }

    pub fn open(dev: Disk) -> Result<Self, String> {
        let cursor = Cursor { disk: dev, pos: 0 };
        let fs = match catch_unwind(AssertUnwindSafe(|| {
            FileSystem::new(cursor, FsOptions::new().oem_cp_converter(&CP437))
        })) {
            Ok(Ok(fs)) => fs,
            Ok(Err(e)) => return Err(format!("FAT boot sector or FAT is invalid: {e}")),
            Err(_) => return Err("the FAT reader (fatfs) failed on a damaged boot sector".into()),
        };
        let format = match fs.fat_type() {
            FatType::Fat12 => "fat12",
            FatType::Fat16 => "fat16",
            FatType::Fat32 => "fat32",
        };
        let root = Node {
            path: String::new(),
            kind: Kind::Dir,
            size: 0,
            read_only: false,
            mtime: UNIX_EPOCH,
            atime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
        };
        let mut nodes = Nodes::default();
        nodes.by_path.insert(String::new(), ROOT);
        nodes.list.push(root);
        let me = Fat {
            fs: Mutex::new(SendFs(fs)),
            format,
            nodes: Mutex::new(nodes),
            dirs: Lru::new(DIR_CACHE_ENTRIES),
        };
        me.read_dir(ROOT)
            .map_err(|e| format!("cannot list the FAT root directory: {e}"))?;
        Ok(me)
    }

    fn node(&self, id: NodeId) -> io::Result<Node> {
        let n = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        id.checked_sub(1)
            .and_then(|i| n.list.get(i as usize))
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn list(&self, dir: NodeId) -> io::Result<Arc<Listing>> {
        if let Some(l) = self.dirs.get(&dir) {
            return Ok(l);
        }
        let d = self.node(dir)?;
        if d.kind != Kind::Dir {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let found: Vec<Node> = {
            let fs = self.fs.lock().unwrap_or_else(|p| p.into_inner());
            guarded("listing a directory", || {
                let root = fs.0.root_dir();
                let dh = if d.path.is_empty() {
                    root
                } else {
                    root.open_dir(&d.path)?
                };
                let mut v = Vec::new();
                for e in dh.iter() {
                    let e = e?;
                    // A FAT directory holds at most 65536 slots; more means
                    // its cluster chain loops.
                    if v.len() > 65536 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("directory '/{}' has more entries than FAT allows: its cluster chain loops", d.path),
                        ));
                    }
                    let name = fix_case(e.file_name(), &e.short_file_name());
                    if name == "." || name == ".." || name.is_empty() {
                        continue;
                    }
                    let path = if d.path.is_empty() {
                        name
                    } else {
                        format!("{}/{}", d.path, name)
                    };
                    let m = e.modified();
                    let c = e.created();
                    v.push(Node {
                        path,
                        kind: if e.is_dir() { Kind::Dir } else { Kind::File },
                        size: if e.is_dir() { 0 } else { e.len() },
                        read_only: e.attributes().contains(fatfs::FileAttributes::READ_ONLY),
                        mtime: fat_time(m.date, m.time),
                        atime: fat_time(
                            e.accessed(),
                            fatfs::Time {
                                hour: 0,
                                min: 0,
                                sec: 0,
                                millis: 0,
                            },
                        ),
                        ctime: fat_time(c.date, c.time),
                    });
                }
                Ok(v)
            })?
        };
        let mut entries = Vec::with_capacity(found.len());
        {
            let mut n = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            for node in found {
                let name = node
                    .path
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .as_bytes()
                    .to_vec();
                let kind = node.kind;
                let id = match n.by_path.get(&node.path) {
                    Some(&id) => {
                        n.list[id as usize - 1] = node;
                        id
                    }
                    None => {
                        n.list.push(node.clone());
                        let id = n.list.len() as NodeId;
                        n.by_path.insert(node.path, id);
                        id
                    }
                };
                entries.push(DirEntry {
                    name,
                    node: id,
                    kind,
                });
            }
        }
        let l = Listing::new(entries);
        self.dirs.insert(dir, l.clone(), l.weight());
        Ok(l)
    }
}

impl GuestFs for Fat {
    fn format(&self) -> &'static str {
        self.format
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn attr(&self, node: NodeId) -> io::Result<Attr> {
        let n = self.node(node)?;
        let perm = match (n.kind, n.read_only) {
            (Kind::Dir, _) => 0o755,
            (_, true) => 0o444,
            _ => 0o644,
        };
        Ok(Attr {
            kind: n.kind,
            size: n.size,
            perm,
            uid: 0,
            gid: 0,
            nlink: if n.kind == Kind::Dir { 2 } else { 1 },
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            blocks: n.size.div_ceil(512),
            rdev: 0,
        })
    }

    fn read_dir(&self, dir: NodeId) -> io::Result<Arc<[DirEntry]>> {
        Ok(self.list(dir)?.entries.clone())
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> io::Result<Option<NodeId>> {
        Ok(self.list(dir)?.find(name))
    }

    fn read(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.node(node)?;
        if n.kind == Kind::Dir {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if offset >= n.size {
            return Ok(0);
        }
        let want = (n.size - offset).min(buf.len() as u64) as usize;
        let fs = self.fs.lock().unwrap_or_else(|p| p.into_inner());
        guarded("reading a file", || {
            let mut f = fs.0.root_dir().open_file(&n.path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut done = 0;
            while done < want {
                let k = f.read(&mut buf[done..want])?;
                if k == 0 {
                    break;
                }
                done += k;
            }
            if done < want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: the cluster chain ends before the file's size ({} bytes)",
                        n.path, n.size
                    ),
                ));
            }
            Ok(done)
        })
    }

    fn read_link(&self, _node: NodeId) -> io::Result<Vec<u8>> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::fix_case;

    #[test]
    fn long_names_keep_their_case_flagged_short_names_are_lowered_fully() {
        for (name, short, want) in [
            // long names, shown as stored
            ("Docs", "DOCS", "Docs"),
            ("Makefile", "MAKEFILE", "Makefile"),
            ("Notes.Txt", "NOTES.TXT", "Notes.Txt"),
            ("Read Me First.txt", "README~1.TXT", "Read Me First.txt"),
            ("CaFÉ.txt", "CAFÉ.TXT", "CaFÉ.txt"),
            ("a.b.c", "AB~1.C", "a.b.c"),
            // short names with the lower-case flags (fatfs lowers ASCII only)
            ("readme.txt", "README.TXT", "readme.txt"),
            ("ABC.txt", "ABC.TXT", "ABC.txt"),
            ("abc.TXT", "ABC.TXT", "abc.TXT"),
            ("cafÉ.txt", "CAFÉ.TXT", "café.txt"),
            ("cafÉ", "CAFÉ", "café"),
            ("ÉTÉ.txt", "ÉTÉ.TXT", "ÉTÉ.txt"),
            ("UPPER.TXT", "UPPER.TXT", "UPPER.TXT"),
        ] {
            assert_eq!(fix_case(name.to_string(), short), want, "{name} / {short}");
        }
    }
}
