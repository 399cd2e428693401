//! Space: what each point occupies and what removing it would free
//! (`usage`), and the files no catalog record or journal accounts for
//! (orphans, the leftovers of crashes), which `gc` removes and `verify`
//! reports.
//!
//! What the repository holds, and who accounts for it:
//!
//! | file | accounted for by |
//! |---|---|
//! | `vms/<vm>/disk<N>/<id>.qcow2` | a disk record of the catalog with that image |
//! | `vms/<vm>/disk<N>/<id>.json` | the same record (it is that image's sidecar) |
//! | `vms/<vm>/disk<N>/<id>.digests` | the same record (that image's block digests) |
//! | `vms/<vm>/disk<N>/<id>.source-digests` | the same record, while its disk backup runs |
//! | `journal/<id>-disk<N>.json` | itself: a removal to finish (never an orphan) |
//! | `journal/<id>-disk<N>.header` | its journal |
//! | `journal/<id>-disk<N>.flatten` | itself: a depth-limit rewrite to finish |
//! | `instant/<restore_id>.json` | itself: an open instant restore |
//! | `instant/<restore_id>-disk<N>.qcow2` | that record (its scratch overlay) |
//! | `catalog/`, the NBD socket, anything outside `vms/` and `journal/` | not ours to judge |
//!
//! Everything else under `vms/` and `journal/` is an orphan: an image or
//! sidecar without a record, a hidden temporary file of an interrupted
//! write, copy or import, a saved header whose journal is gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chainvault_qcow::{ExtentKind, Image, OpenOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{cat, lock, Engine, EngineError, EngineResult};
use crate::model::*;

/// Bytes a file occupies on disk.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Guest ranges an image's own layer holds (data or recorded zeros), merged.
pub(super) fn own_ranges(path: &Path) -> Vec<(u64, u64)> {
    let Ok(img) = Image::open(path, &OpenOptions::default()) else {
        return Vec::new();
    };
    let Ok(ext) = img.block_status(0, img.size()) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in ext {
        if e.kind == ExtentKind::Unallocated {
            continue;
        }
        match out.last_mut() {
            Some(l) if l.0 + l.1 == e.offset => l.1 += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

/// Bytes of `a` not covered by `b` (both sorted, merged).
pub(super) fn uncovered(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut j = 0;
    for &(s, l) in a {
        let e = s + l;
        let mut pos = s;
        while j < b.len() && b[j].0 + b[j].1 <= pos {
            j += 1;
        }
        let mut k = j;
        while pos < e {
            match b.get(k) {
                Some(&(bs, bl)) if bs < e => {
                    if bs > pos {
                        total += bs - pos;
                    }
                    pos = pos.max(bs + bl);
                    k += 1;
                }
                _ => {
                    total += e - pos;
                    pos = e;
                }
            }
        }
    }
    total
}

/// Union of two sorted, merged range lists.
pub(super) fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, l) in all {
        match out.last_mut() {
            Some(o) if s <= o.0 + o.1 => o.1 = o.1.max(s + l - o.0),
            _ => out.push((s, l)),
        }
    }
    out
}

/// A file no record or journal accounts for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Orphan {
    /// Relative to the repository.
    pub path: String,
    pub bytes: u64,
    pub reason: String,
}

/// `POST /api/v1/gc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub orphans: Vec<Orphan>,
    /// Bytes the orphans occupy (freed unless a dry run).
    pub bytes: u64,
    pub removed: u64,
    /// Empty directories removed.
    pub directories_removed: u64,
}

/// One point in a usage report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointUsage {
    pub backup_id: String,
    pub created_at: String,
    /// Bytes its image occupies.
    pub bytes: u64,
    /// Bytes removing this point alone would free (estimate: what a later
    /// point still reads through it moves into the chain).
    pub frees: u64,
    pub protected: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskUsage {
    pub disk_id: u32,
    pub bytes: u64,
    /// Oldest first.
    pub points: Vec<PointUsage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmUsage {
    pub vm_name: String,
    pub bytes: u64,
    pub points: u64,
    pub disks: Vec<DiskUsage>,
}

/// `GET /api/v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsageReport {
    pub vms: Vec<VmUsage>,
    /// Images of every VM listed.
    pub bytes: u64,
    /// The whole repository directory: images, sidecars, journals, catalog.
    pub repository_bytes: u64,
    /// Free space of the file system the repository is on (for unprivileged users).
    pub free_bytes: u64,
    /// Size of that file system.
    pub filesystem_bytes: u64,
}

fn rel(data: &Path, p: &Path) -> String {
    p.strip_prefix(data)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// Every file under `dir`, recursively, with the directories (deepest first).
fn walk(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                walk(&p, files, dirs);
                dirs.push(p);
            }
            Ok(_) => files.push(p),
            Err(_) => {}
        }
    }
}

/// Free and total bytes of the file system holding `p`.
fn statvfs(p: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; c is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let f = s.f_frsize as u64;
    (s.f_bavail as u64 * f, s.f_blocks as u64 * f)
}

impl Engine {
    /// Every file under `dir` (sorted) that `why` gives a reason for, as an orphan.
    fn scan(
        &self,
        dir: &Path,
        out: &mut Vec<Orphan>,
        why: impl Fn(&Path, &str) -> Option<&'static str>,
    ) {
        let mut files = Vec::new();
        walk(dir, &mut files, &mut Vec::new());
        files.sort();
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(reason) = why(&f, &name) {
                out.push(Orphan {
                    path: rel(&self.data, &f),
                    bytes: allocated(&f),
                    reason: reason.into(),
                });
            }
        }
    }

    /// The orphans of the repository (see the module docs).
    pub fn orphans(&self) -> EngineResult<Vec<Orphan>> {
        let disks = self.catalog.all_disks().map_err(cat)?;
        let known: HashSet<PathBuf> = disks.iter().map(|d| self.abs(&d.image)).collect();
        let running: HashSet<PathBuf> = disks
            .iter()
            .filter(|d| d.status == Status::Running)
            .map(|d| self.abs(&d.image))
            .collect();
        let named: HashSet<PathBuf> = super::instant::records(&self.data)
            .into_iter()
            .map(|r| self.data.join(r.overlay))
            .collect();
        let mut out = Vec::new();
        self.scan(&self.data.join("vms"), &mut out, |f, name| {
            if name.starts_with('.') {
                Some("temporary file of an interrupted write, copy or import")
            } else if name.ends_with(".qcow2") {
                (!known.contains(f)).then_some("image without a catalog record")
            } else if name.ends_with(".json") {
                (!known.contains(&f.with_extension("qcow2")))
                    .then_some("sidecar of an image without a catalog record")
            } else if name.ends_with(".source-digests") {
                (!running.contains(&f.with_extension("qcow2")))
                    .then_some("a client's block digests for a disk backup that is not running")
            } else if name.ends_with(".digests") {
                (!known.contains(&f.with_extension("qcow2")))
                    .then_some("block digests of an image without a catalog record")
            } else {
                Some("not a file chainvault writes here")
            }
        });
        self.scan(&self.data.join("journal"), &mut out, |f, name| {
            if name.starts_with('.') {
                Some("temporary file of an interrupted journal write")
            } else if name.ends_with(".json") || name.ends_with(".flatten") {
                // A removal or a depth-limit rewrite to finish: never an orphan.
                None
            } else if name.ends_with(".header") {
                (!f.with_extension("json").exists()).then_some("saved header whose journal is gone")
            } else {
                Some("not a file chainvault writes here")
            }
        });
        // Instant restores: overlays their records name.
        self.scan(
            &super::instant::instant_dir(&self.data),
            &mut out,
            |f, name| {
                if name.starts_with('.') {
                    Some("temporary file of an interrupted write")
                } else if name.ends_with(".json") {
                    None
                } else if name.ends_with(".qcow2") {
                    (!named.contains(f)).then_some("instant-restore overlay without its record")
                } else {
                    Some("not a file chainvault writes here")
                }
            },
        );
        Ok(out)
    }

    /// Find the orphans and, unless `dry_run`, remove them (and empty
    /// directories under `vms/`). Refused while a consolidation runs.
    pub async fn gc(&self, dry_run: bool) -> EngineResult<GcReport> {
        self.check_not_stopping()?;
        // Under the engine lock nothing creates a point's files meanwhile
        // (start, import); merges run outside it, so none may be running.
        let _op = self.op.lock().await;
        if !lock(&self.merging).is_empty() {
            return Err(EngineError::Conflict(
                "a removal is consolidating a chain; run gc again when it ends".into(),
            ));
        }
        if self
            .imports_running
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            return Err(EngineError::Conflict(
                "an import is copying files into the repository; run gc again when it ends".into(),
            ));
        }
        let orphans = self.orphans()?;
        let bytes = orphans.iter().map(|o| o.bytes).sum();
        let mut removed = 0;
        let mut dirs_removed = 0;
        if !dry_run {
            for o in &orphans {
                let p = self.data.join(&o.path);
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        removed += 1;
                        info!(path = %p.display(), reason = %o.reason, "gc removed an orphan");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(EngineError::Internal(format!(
                            "gc cannot remove {}: {e}",
                            p.display()
                        )))
                    }
                }
            }
            // Empty directories of VMs and disks that have no point left.
            let mut dirs = Vec::new();
            walk(&self.data.join("vms"), &mut Vec::new(), &mut dirs);
            for d in dirs {
                if std::fs::remove_dir(&d).is_ok() {
                    dirs_removed += 1;
                }
            }
            if let Err(e) = super::repo::sync_dir(&self.data.join("vms")) {
                warn!(error = %e, "fsync of the vms directory");
            }
        }
        Ok(GcReport {
            dry_run,
            orphans,
            bytes,
            removed,
            directories_removed: dirs_removed,
        })
    }

    /// What each VM, disk and point occupies, and (with `frees`) what
    /// removing each point frees, which reads the images' cluster maps.
    pub fn usage(&self, vm_name: Option<&str>, frees: bool) -> EngineResult<UsageReport> {
        let vms = match vm_name {
            Some(v) => vec![self
                .catalog
                .vm(v)
                .map_err(cat)?
                .ok_or_else(|| EngineError::not_found("VM", v))?],
            None => self.catalog.vms().map_err(cat)?,
        };
        let backups: std::collections::HashMap<String, BackupRecord> = self
            .catalog
            .backups()
            .map_err(cat)?
            .into_iter()
            .map(|b| (b.backup_id.clone(), b))
            .collect();
        let mut out = Vec::new();
        for vm in vms {
            let mut disks = Vec::new();
            for d in &vm.disks {
                let pts: Vec<DiskBackupRecord> = self
                    .catalog
                    .points_of(&vm.name, d.disk_id)
                    .map_err(cat)?
                    .into_iter()
                    .filter(|p| p.status == Status::Completed)
                    .collect();
                let mut points = Vec::new();
                for (i, p) in pts.iter().enumerate() {
                    let img = self.abs(&p.image);
                    let bytes = allocated(&img);
                    let child = pts
                        .get(i + 1)
                        .filter(|c| c.parent_backup_id.as_deref() == Some(p.backup_id.as_str()));
                    let frees = match child {
                        _ if !frees => 0,
                        None => bytes,
                        Some(c) => {
                            let moved =
                                uncovered(&own_ranges(&img), &own_ranges(&self.abs(&c.image)));
                            bytes.saturating_sub(moved)
                        }
                    };
                    let b = backups.get(&p.backup_id);
                    points.push(PointUsage {
                        backup_id: p.backup_id.clone(),
                        created_at: b.map(|b| b.created_at.clone()).unwrap_or_default(),
                        bytes,
                        frees,
                        protected: b.is_some_and(|b| b.protected),
                    });
                }
                disks.push(DiskUsage {
                    disk_id: d.disk_id,
                    bytes: points.iter().map(|p| p.bytes).sum(),
                    points,
                });
            }
            out.push(VmUsage {
                vm_name: vm.name.clone(),
                bytes: disks.iter().map(|d| d.bytes).sum(),
                points: disks.iter().map(|d| d.points.len() as u64).sum(),
                disks,
            });
        }
        let (mut files, mut dirs) = (Vec::new(), Vec::new());
        walk(&self.data, &mut files, &mut dirs);
        let (free, total) = statvfs(&self.data);
        Ok(UsageReport {
            bytes: out.iter().map(|v| v.bytes).sum(),
            vms: out,
            repository_bytes: files.iter().map(|f| allocated(f)).sum(),
            free_bytes: free,
            filesystem_bytes: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let a = vec![(0, 10), (20, 10)];
        let b = vec![(5, 20)];
        assert_eq!(uncovered(&a, &b), 5 + 5);
        assert_eq!(uncovered(&a, &[]), 20);
        assert_eq!(uncovered(&[], &b), 0);
        assert_eq!(union(&a, &b), vec![(0, 30)]);
        assert_eq!(uncovered(&[(0, 100)], &[(10, 10), (30, 10), (90, 20)]), 70);
    }
}
