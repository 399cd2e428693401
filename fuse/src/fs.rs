//! The FUSE filesystem: the tree of VMs, disks, points, volumes and guest
//! files over a [`Catalog`].
//!
//! * Dynamic directories (`/`, `/<vm>`, `/<vm>/disk<N>`, `/by-id`) get short
//!   entry and attribute TTLs, and the catalog is rescanned when its listing is
//!   older than its TTL: new backups appear without a remount.
//! * Everything inside a point is immutable (long TTLs, `FOPEN_KEEP_CACHE`)
//!   but its `info.json` and `WARNING.txt`, which follow the listing (a deep
//!   verify can mark a mounted point bad): short TTLs and direct I/O.
//! * Directory listings are taken once per `opendir` and kept with the handle;
//!   readdir offsets are indexes into that listing, so a 100k-entry directory
//!   lists completely and consistently however the kernel pages through it.
//! * Guest readers run under a panic guard: a damaged volume gives EIO (or an
//!   `ERROR.txt`), never a dead mount.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chainvault_guestfs::{self as guestfs, GuestFs, Kind, NodeId};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::catalog::{Catalog, Snapshot};
use crate::disk::{guard, read_clamped};
use crate::inodes::{Inodes, Node};
use crate::point::{Point, Vol};

/// Tunables of the tree.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    /// TTL of entries and attributes of dynamic directories.
    pub dynamic_ttl: Duration,
    /// TTL of everything inside a point (immutable).
    pub static_ttl: Duration,
    /// Owner shown for the tree's own directories and files.
    pub uid: u32,
    pub gid: u32,
    /// Largest read the kernel may send (bytes).
    pub max_read: u32,
}

impl Default for TreeOptions {
    fn default() -> Self {
        TreeOptions {
            dynamic_ttl: Duration::from_secs(1),
            static_ttl: Duration::from_secs(300),
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            max_read: 1 << 20,
        }
    }
}

/// One entry of a directory listing as the tree hands it to the kernel.
struct Entry {
    name: OsString,
    node: Node,
    kind: FileType,
}

/// The restore tree.
pub struct RestoreFs {
    catalog: Arc<Catalog>,
    inodes: Inodes,
    opts: TreeOptions,
    dirs: Mutex<HashMap<u64, Arc<Vec<Entry>>>>,
    next_fh: AtomicU64,
    mounted_at: SystemTime,
}

type Res<T> = Result<T, Errno>;

fn enoent<T>() -> Res<T> {
    Err(Errno::ENOENT)
}

/// An I/O error as an errno, logged with what was being done.
fn io_errno(what: &str, e: &io::Error) -> Errno {
    match e.kind() {
        io::ErrorKind::NotFound => Errno::ENOENT,
        _ => {
            tracing::warn!(error = %e, "{what}");
            e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

impl RestoreFs {
    pub fn new(catalog: Arc<Catalog>, opts: TreeOptions) -> RestoreFs {
        RestoreFs {
            catalog,
            inodes: Inodes::new(),
            opts,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mounted_at: SystemTime::now(),
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    // ---------------------------------------------------------------- helpers

    fn point(&self, id: u32) -> Res<Arc<Point>> {
        self.catalog.point(id).ok_or(Errno::ENOENT)
    }

    fn vol(&self, p: &Point, v: u16) -> Res<usize> {
        if (v as usize) < p.volumes().len() {
            Ok(v as usize)
        } else {
            enoent()
        }
    }

    fn guest_fs(&self, p: &Point, v: u16) -> Res<Arc<dyn GuestFs>> {
        let i = self.vol(p, v)?;
        match &p.volumes()[i].fs {
            Ok(fs) => Ok(fs.clone()),
            Err(_) => Err(Errno::ENOENT),
        }
    }

    /// The node of a guest's node id: the volume itself for its root.
    fn guest_node(p: u32, v: u16, fs: &dyn GuestFs, id: NodeId) -> Node {
        if id == fs.root() {
            Node::Volume(p, v)
        } else {
            Node::Guest(p, v, id)
        }
    }

    fn is_dynamic(node: &Node) -> bool {
        matches!(
            node,
            Node::Root
                | Node::ById
                | Node::ByIdBackup(_)
                | Node::ByIdLink(..)
                | Node::Vm(_)
                | Node::Disk(..)
                | Node::Latest(..)
                // What a deep verify says of a point can change.
                | Node::Point(_)
                | Node::Info(_)
                | Node::Warning(_)
        )
    }

    fn ttl(&self, node: &Node) -> Duration {
        if Self::is_dynamic(node) {
            self.opts.dynamic_ttl
        } else {
            self.opts.static_ttl
        }
    }

    fn synth(&self, ino: u64, kind: FileType, size: u64, time: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: match kind {
                FileType::Directory => 0o555,
                FileType::Symlink => 0o777,
                _ => 0o444,
            },
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn point_time(p: &Point) -> SystemTime {
        p.info.completed.unwrap_or(p.info.created)
    }

    /// Where `latest` or a by-id link points.
    fn link_target(&self, node: &Node) -> Res<Vec<u8>> {
        let snap = self.catalog.snapshot();
        match node {
            Node::Latest(vm, d) => snap
                .latest(vm, *d)
                .map(|n| n.as_bytes().to_vec())
                .ok_or(Errno::ENOENT),
            Node::ByIdLink(id, d) => {
                let hits = snap.by_id.get(id).ok_or(Errno::ENOENT)?;
                let (_, vm, name) = hits.iter().find(|h| h.0 == *d).ok_or(Errno::ENOENT)?;
                Ok(format!("../../{vm}/disk{d}/{name}").into_bytes())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn attr_of(&self, node: &Node) -> Res<FileAttr> {
        let ino = self.inodes.ino(node);
        let t0 = self.mounted_at;
        Ok(match node {
            Node::Root | Node::ById | Node::ByIdBackup(_) | Node::Vm(_) | Node::Disk(..) => {
                self.synth(ino, FileType::Directory, 0, t0)
            }
            Node::Latest(..) | Node::ByIdLink(..) => {
                let t = self.link_target(node)?;
                self.synth(ino, FileType::Symlink, t.len() as u64, t0)
            }
            Node::Point(p) => {
                let p = self.point(*p)?;
                self.synth(ino, FileType::Directory, 0, Self::point_time(&p))
            }
            Node::DiskRaw(p) => {
                let p = self.point(*p)?;
                self.synth(
                    ino,
                    FileType::RegularFile,
                    p.info.size,
                    Self::point_time(&p),
                )
            }
            Node::Info(p) => {
                let p = self.point(*p)?;
                let n = p.info_json().len() as u64;
                self.synth(ino, FileType::RegularFile, n, Self::point_time(&p))
            }
            Node::Warning(p) => {
                let p = self.point(*p)?;
                let n = p.warning().ok_or(Errno::ENOENT)?.len() as u64;
                self.synth(ino, FileType::RegularFile, n, Self::point_time(&p))
            }
            Node::Volume(p, v) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *v)?;
                match &pt.volumes()[i].fs {
                    Ok(fs) => {
                        let root = fs.root();
                        self.guest_attr(ino, fs.as_ref(), root)?
                    }
                    Err(_) => self.synth(ino, FileType::Directory, 0, Self::point_time(&pt)),
                }
            }
            Node::VolRaw(p, v) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *v)?;
                let size = pt.volumes()[i].dev.size();
                self.synth(ino, FileType::RegularFile, size, Self::point_time(&pt))
            }
            Node::VolError(p, v) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *v)?;
                let n = match &pt.volumes()[i].fs {
                    Err(t) => t.len() as u64,
                    Ok(_) => return enoent(),
                };
                self.synth(ino, FileType::RegularFile, n, Self::point_time(&pt))
            }
            Node::Guest(p, v, id) => {
                let pt = self.point(*p)?;
                let fs = self.guest_fs(&pt, *v)?;
                self.guest_attr(ino, fs.as_ref(), *id)?
            }
        })
    }

    fn guest_attr(&self, ino: u64, fs: &dyn GuestFs, id: NodeId) -> Res<FileAttr> {
        let a = guard("a guest file's attributes", || fs.attr(id))
            .map_err(|e| io_errno("reading a guest file's attributes failed", &e))?;
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.blocks,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.ctime,
            kind: file_type(a.kind),
            perm: a.perm & 0o7777,
            nlink: a.nlink.max(1),
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The listing of a directory node (without `.` and `..`).
    fn list(&self, node: &Node) -> Res<Vec<Entry>> {
        let dir = |name: &str, node: Node| Entry {
            name: name.into(),
            node,
            kind: FileType::Directory,
        };
        let link = |name: &str, node: Node| Entry {
            name: name.into(),
            node,
            kind: FileType::Symlink,
        };
        let file = |name: &str, node: Node| Entry {
            name: name.into(),
            node,
            kind: FileType::RegularFile,
        };
        Ok(match node {
            Node::Root => {
                let snap = self.catalog.snapshot();
                let mut v = vec![dir("by-id", Node::ById)];
                v.extend(snap.vms.keys().map(|vm| dir(vm, Node::Vm(vm.clone()))));
                v
            }
            Node::ById => {
                let snap = self.catalog.snapshot();
                snap.by_id
                    .keys()
                    .map(|id| dir(id, Node::ByIdBackup(id.clone())))
                    .collect()
            }
            Node::ByIdBackup(id) => {
                let snap = self.catalog.snapshot();
                let hits = snap.by_id.get(id).ok_or(Errno::ENOENT)?;
                hits.iter()
                    .map(|(d, _, _)| link(&format!("disk{d}"), Node::ByIdLink(id.clone(), *d)))
                    .collect()
            }
            Node::Vm(vm) => {
                let snap = self.catalog.snapshot();
                let disks = snap.vms.get(vm).ok_or(Errno::ENOENT)?;
                disks
                    .keys()
                    .map(|d| dir(&format!("disk{d}"), Node::Disk(vm.clone(), *d)))
                    .collect()
            }
            Node::Disk(vm, d) => {
                let snap = self.catalog.snapshot();
                let points = snap.disk(vm, *d).ok_or(Errno::ENOENT)?;
                let mut v: Vec<Entry> = points
                    .iter()
                    .map(|(name, id)| dir(name, Node::Point(*id)))
                    .collect();
                if !points.is_empty() {
                    v.push(link("latest", Node::Latest(vm.clone(), *d)));
                }
                v
            }
            Node::Point(p) => {
                let pt = self.point(*p)?;
                let mut v = vec![
                    file("disk.raw", Node::DiskRaw(*p)),
                    file("info.json", Node::Info(*p)),
                ];
                if pt.warning().is_some() {
                    v.push(file("WARNING.txt", Node::Warning(*p)));
                }
                for (i, vol) in pt.volumes().iter().enumerate() {
                    v.push(dir(&vol.name, Node::Volume(*p, i as u16)));
                }
                v
            }
            Node::Volume(p, vi) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *vi)?;
                let vol: &Vol = &pt.volumes()[i];
                match &vol.fs {
                    Err(_) => vec![
                        file("volume.raw", Node::VolRaw(*p, *vi)),
                        file("ERROR.txt", Node::VolError(*p, *vi)),
                    ],
                    Ok(fs) => self.guest_list(*p, *vi, fs.as_ref(), fs.root())?,
                }
            }
            Node::Guest(p, vi, id) => {
                let pt = self.point(*p)?;
                let fs = self.guest_fs(&pt, *vi)?;
                self.guest_list(*p, *vi, fs.as_ref(), *id)?
            }
            _ => return Err(Errno::ENOTDIR),
        })
    }

    fn guest_list(&self, p: u32, v: u16, fs: &dyn GuestFs, dir: NodeId) -> Res<Vec<Entry>> {
        let list = guard("a guest directory", || fs.read_dir(dir))
            .map_err(|e| io_errno("reading a guest directory failed", &e))?;
        Ok(list
            .iter()
            .filter(|e| !e.name.is_empty() && e.name != b"." && e.name != b"..")
            .map(|e| Entry {
                name: OsString::from_vec(e.name.clone()),
                node: Self::guest_node(p, v, fs, e.node),
                kind: file_type(e.kind),
            })
            .collect())
    }

    /// Find `name` in directory `node`.
    fn find(&self, node: &Node, name: &OsStr) -> Res<Node> {
        let nb = name.as_bytes();
        match node {
            // Fast paths that do not scan the point's volumes.
            Node::Point(p) if nb == b"disk.raw" => Ok(Node::DiskRaw(*p)),
            Node::Point(p) if nb == b"info.json" => Ok(Node::Info(*p)),
            Node::Point(p) if nb == b"WARNING.txt" => {
                if self.point(*p)?.warning().is_some() {
                    Ok(Node::Warning(*p))
                } else {
                    Err(Errno::ENOENT)
                }
            }
            Node::Volume(p, vi) | Node::Guest(p, vi, _) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *vi)?;
                let vol = &pt.volumes()[i];
                let fs = match &vol.fs {
                    Ok(fs) => fs.clone(),
                    Err(_) => {
                        return match nb {
                            b"volume.raw" => Ok(Node::VolRaw(*p, *vi)),
                            b"ERROR.txt" => Ok(Node::VolError(*p, *vi)),
                            _ => enoent(),
                        }
                    }
                };
                let dir = match node {
                    Node::Guest(_, _, id) => *id,
                    _ => fs.root(),
                };
                let found = guard("a guest directory", || fs.lookup(dir, nb))
                    .map_err(|e| io_errno("looking up a guest file failed", &e))?;
                match found {
                    Some(id) => Ok(Self::guest_node(*p, *vi, fs.as_ref(), id)),
                    None => enoent(),
                }
            }
            _ => self
                .list(node)?
                .into_iter()
                .find(|e| e.name == name)
                .map(|e| e.node)
                .ok_or(Errno::ENOENT),
        }
    }

    fn read_node(&self, node: &Node, offset: u64, size: u32) -> Res<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = match node {
            Node::DiskRaw(p) => {
                let pt = self.point(*p)?;
                read_clamped(pt.disk.as_ref(), &mut buf, offset)
                    .map_err(|e| io_errno("reading disk.raw failed", &e))?
            }
            Node::Info(p) => {
                let pt = self.point(*p)?;
                copy_from(&pt.info_json(), &mut buf, offset)
            }
            Node::Warning(p) => {
                let pt = self.point(*p)?;
                let w = pt.warning().ok_or(Errno::ENOENT)?;
                copy_from(w.as_bytes(), &mut buf, offset)
            }
            Node::VolError(p, v) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *v)?;
                match &pt.volumes()[i].fs {
                    Err(t) => copy_from(t, &mut buf, offset),
                    Ok(_) => return enoent(),
                }
            }
            Node::VolRaw(p, v) => {
                let pt = self.point(*p)?;
                let i = self.vol(&pt, *v)?;
                let dev = pt.volumes()[i].dev.clone();
                guard("volume.raw", || {
                    read_clamped(dev.as_ref(), &mut buf, offset)
                })
                .map_err(|e| io_errno("reading volume.raw failed", &e))?
            }
            Node::Guest(p, v, id) => {
                let pt = self.point(*p)?;
                let fs = self.guest_fs(&pt, *v)?;
                let mut done = 0;
                while done < buf.len() {
                    let k = guard("a guest file", || {
                        fs.read(*id, offset + done as u64, &mut buf[done..])
                    })
                    .map_err(|e| io_errno("reading a guest file failed", &e))?;
                    if k == 0 {
                        break;
                    }
                    done += k;
                }
                done
            }
            Node::Latest(..) | Node::ByIdLink(..) => return Err(Errno::EINVAL),
            _ => return Err(Errno::EISDIR),
        };
        buf.truncate(n);
        Ok(buf)
    }

    fn is_file(node: &Node) -> bool {
        matches!(
            node,
            Node::DiskRaw(_)
                | Node::Info(_)
                | Node::Warning(_)
                | Node::VolRaw(..)
                | Node::VolError(..)
        )
    }

    fn node(&self, ino: INodeNo) -> Res<Node> {
        self.inodes.node(ino.0).ok_or(Errno::ENOENT)
    }
}

fn copy_from(src: &[u8], buf: &mut [u8], offset: u64) -> usize {
    if offset >= src.len() as u64 {
        return 0;
    }
    let s = &src[offset as usize..];
    let n = s.len().min(buf.len());
    buf[..n].copy_from_slice(&s[..n]);
    n
}

impl Filesystem for RestoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Big reads: fewer round trips through the kernel for disk.raw and
        // large guest files (the kernel caps this at its own max_pages).
        let _ = config.set_max_readahead(self.opts.max_read);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.node(parent).and_then(|dir| {
            let child = self.find(&dir, name)?;
            let attr = self.attr_of(&child)?;
            Ok((child, attr))
        });
        match r {
            Ok((child, mut attr)) => {
                let ino = self.inodes.lookup(&child);
                attr.ino = INodeNo(ino);
                reply.entry(&self.ttl(&child), &attr, Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| Ok((self.attr_of(&n)?, n))) {
            Ok((mut a, n)) => {
                a.ino = ino;
                reply.attr(&self.ttl(&n), &a)
            }
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.node(ino).and_then(|n| match &n {
            Node::Latest(..) | Node::ByIdLink(..) => self.link_target(&n),
            Node::Guest(p, v, id) => {
                let pt = self.point(*p)?;
                let fs = self.guest_fs(&pt, *v)?;
                guard("a guest symlink", || fs.read_link(*id))
                    .map_err(|e| io_errno("reading a guest symlink failed", &e))
            }
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let r = self.node(ino).and_then(|n| match &n {
            n if Self::is_file(n) => Ok(()),
            Node::Guest(..) => match self.attr_of(&n)?.kind {
                FileType::Directory => Err(Errno::EISDIR),
                _ => Ok(()),
            },
            _ => Err(Errno::EISDIR),
        });
        match (r, self.node(ino)) {
            // info.json and WARNING.txt change with the listing: read them
            // afresh each time, whatever size the kernel last saw.
            (Ok(()), Ok(Node::Info(_) | Node::Warning(_))) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
            }
            // Content never changes: let the page cache keep it across opens.
            (Ok(()), _) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            (Err(e), _) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self
            .node(ino)
            .and_then(|n| self.read_node(&n, offset, size))
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino).and_then(|n| self.list(&n)) {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
        {
            Some(e) => e,
            None => return reply.error(Errno::EBADF),
        };
        // Offsets: 1 and 2 are after `.` and `..`; k + 3 is after entry k.
        let mut off = offset;
        if off == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            // The parent's number does not matter to the kernel (it resolves
            // `..` itself); the directory's own keeps it valid.
            if reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            off = 2;
        }
        let start = (off - 2) as usize;
        for (k, e) in entries.iter().enumerate().skip(start) {
            let child = self.inodes.ino(&e.node);
            if reply.add(INodeNo(child), k as u64 + 3, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    /// Everything is readable by whoever can reach the mount; nothing is
    /// writable.
    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if self.inodes.node(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// No extended attributes: ENOSYS makes the kernel stop asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.inodes.len() as u64, 0, 4096, 255, 4096);
    }
}

/// For tests and tools: the snapshot the tree would show now.
pub fn snapshot_of(fs: &RestoreFs) -> Arc<Snapshot> {
    fs.catalog.snapshot()
}

#[allow(unused)]
fn _kinds(_: guestfs::Kind) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_from_clamps() {
        let mut b = [0u8; 4];
        assert_eq!(copy_from(b"hello", &mut b, 0), 4);
        assert_eq!(&b, b"hell");
        assert_eq!(copy_from(b"hello", &mut b, 3), 2);
        assert_eq!(copy_from(b"hello", &mut b, 9), 0);
    }
}
