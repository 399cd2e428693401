//! Import: adopt existing qcow2 files (made by qemu-img, or the plain qcow2
//! chains of the system chainvault replaces) as the next points of one disk.
//!
//! Everything is checked before anything is adopted: each image opens and
//! `check`s clean, has the disk's virtual size, and has the right backing
//! file (the first: none, or one holding the same bytes as the disk's newest
//! point; each later one: the image before it). The times must be later
//! than the disk's newest point, increasing, and not in the future.
//!
//! Then, for each image in order: copied to `<backup_id>.qcow2` in the
//! disk's directory under a hidden temporary name, its backing name
//! rewritten to the parent's file name, fsynced, checked again, given a
//! "running" sidecar and renamed into place. One catalog transaction then
//! records every point and moves the chain head; the sidecars follow. A
//! crash before the transaction leaves files whose sidecars say "running",
//! which start-up recovery removes; the sources are removed (`move`) only
//! after the transaction.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chainvault_qcow::chain::read_header;
use chainvault_qcow::merge::{header_with_backing, write_header};
use chainvault_qcow::{check, Chain, ChainOptions, CheckOptions, Image, OpenOptions};
use tracing::info;

use super::{cat, repo, validate_vm_name, Engine, EngineError, EngineResult};
use crate::catalog::Change;
use crate::model::*;

/// The most images one import takes.
pub const MAX_IMPORT: usize = 10_000;

fn bad(msg: String) -> EngineError {
    EngineError::BadRequest(msg)
}

fn parse_time(s: &str, what: &str) -> EngineResult<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339).map_err(
        |e| {
            bad(format!(
                "{what}: {s:?} is not an RFC 3339 time such as 2026-03-01T02:00:00Z ({e})"
            ))
        },
    )
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where a header's backing name points, resolved like QEMU does (relative
/// to the image's directory).
fn backing_target(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    }
}

/// Whether two chains read the same bytes everywhere.
fn same_bytes(a: &Chain, b: &Chain) -> chainvault_qcow::Result<bool> {
    if a.size() != b.size() {
        return Ok(false);
    }
    let mut x = vec![0u8; 4 << 20];
    let mut y = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < a.size() {
        let n = ((a.size() - off) as usize).min(x.len());
        a.read_at(&mut x[..n], off)?;
        b.read_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// One image, checked and ready to adopt.
struct Checked {
    source: PathBuf,
    /// No backing file: a full that starts a new chain.
    full: bool,
    created: time::OffsetDateTime,
}

/// What an import builds on: compared again before its transaction.
#[derive(Clone)]
struct ImportState {
    vm: Option<VmRecord>,
    head: Option<ChainHead>,
    /// created_at of the VM's newest backup.
    newest: Option<String>,
}

impl ImportState {
    fn same_as(&self, o: &ImportState) -> bool {
        self.head == o.head
            && self.newest == o.newest
            && serde_json::to_value(&self.vm).ok() == serde_json::to_value(&o.vm).ok()
    }
}

/// Counts running imports (gc does not run while one does: its files are
/// not in the catalog yet).
struct ImportGuard<'a>(&'a Engine);

impl<'a> ImportGuard<'a> {
    fn new(e: &'a Engine) -> Self {
        e.imports_running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ImportGuard(e)
    }
}

impl Drop for ImportGuard<'_> {
    fn drop(&mut self) {
        self.0
            .imports_running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Engine {
    fn import_state(&self, vm: &str, disk_id: u32) -> EngineResult<ImportState> {
        if let Some(b) = self.catalog.running_backup_of(vm).map_err(cat)? {
            return Err(EngineError::Conflict(format!(
                "backup {} of VM {vm:?} is running; import after it ends",
                b.backup_id
            )));
        }
        Ok(ImportState {
            vm: self.catalog.vm(vm).map_err(cat)?,
            head: self.catalog.head(vm, disk_id).map_err(cat)?,
            newest: self
                .catalog
                .backups()
                .map_err(cat)?
                .into_iter()
                .filter(|b| b.vm_name == vm)
                .map(|b| b.created_at)
                .max(),
        })
    }

    /// Import `req.images` as the next points of one disk (see the module docs).
    pub async fn import(&self, req: ImportRequest) -> EngineResult<ImportReport> {
        self.check_not_stopping()?;
        validate_vm_name(&req.vm_name)?;
        if req.images.is_empty() {
            return Err(bad(
                "images must list at least one qcow2 file, oldest first".into(),
            ));
        }
        if req.images.len() > MAX_IMPORT {
            return Err(bad(format!(
                "{} images in one import; at most {MAX_IMPORT}",
                req.images.len()
            )));
        }
        if let Some(c) = &req.change_id {
            if c.trim().is_empty() || c.len() > 1024 || c.chars().any(char::is_control) {
                return Err(bad(
                    "change_id must be 1 to 1024 bytes without control characters".into(),
                ));
            }
        }
        let vm = req.vm_name.clone();
        let disk_id = req.disk_id;
        // What the import builds on, read under the engine lock; the checks
        // and copies run without it, and the transaction at the end happens
        // only if this is still what the catalog says.
        // Counted under the lock, so that a gc (which takes it) either runs
        // before this import writes anything or refuses while it runs.
        let (state, _counted) = {
            let _op = self.op.lock().await;
            self.check_not_stopping()?;
            (self.import_state(&vm, disk_id)?, ImportGuard::new(self))
        };
        let (known, head, newest_backup) =
            (state.vm.clone(), state.head.clone(), state.newest.clone());
        let known_disk = known
            .as_ref()
            .and_then(|v| v.disks.iter().find(|d| d.disk_id == disk_id).cloned());
        let head_rec = match &head {
            Some(h) => self.catalog.disk(&h.head_backup_id, disk_id).map_err(cat)?,
            None => None,
        };

        // 1. Check everything; adopt nothing yet.
        let mut checked: Vec<Checked> = Vec::new();
        let mut capacity = known_disk.as_ref().map(|d| d.capacity_bytes);
        let mut prev_time: Option<time::OffsetDateTime> = match &newest_backup {
            Some(t) => Some(parse_time(t, "the VM's newest backup")?),
            None => None,
        };
        let now_t = time::OffsetDateTime::now_utc();
        for (i, im) in req.images.iter().enumerate() {
            let src = PathBuf::from(&im.path);
            let name = || format!("image {} ({})", i + 1, src.display());
            if !src.is_absolute() {
                return Err(bad(format!(
                    "{}: give an absolute path (it is opened by the daemon)",
                    name()
                )));
            }
            let meta = std::fs::metadata(&src)
                .map_err(|e| bad(format!("{}: cannot be read: {e}", name())))?;
            if !meta.is_file() {
                return Err(bad(format!("{} is not a regular file", name())));
            }
            let src = src
                .canonicalize()
                .map_err(|e| bad(format!("{}: {e}", name())))?;
            if src.starts_with(&self.data) {
                return Err(bad(format!(
                    "{} is inside the repository; import files from outside it",
                    name()
                )));
            }
            let header = read_header(&src).map_err(|e| {
                bad(format!(
                    "{} is not a qcow2 image chainvault can read: {e}",
                    name()
                ))
            })?;
            if header.version < 3 {
                return Err(bad(format!(
                    "{} is a version 2 (compat=0.10) image; upgrade it first with qemu-img amend -o compat=1.1",
                    name()
                )));
            }
            let img = Image::open(&src, &OpenOptions::default())
                .map_err(|e| bad(format!("{} cannot be opened: {e}", name())))?;
            let size = img.size();
            drop(img);
            let rep = check(&src, &CheckOptions::default())
                .map_err(|e| bad(format!("{}: check failed: {e}", name())))?;
            if rep.corruptions > 0 || rep.check_errors > 0 {
                let first = rep
                    .problems
                    .first()
                    .map(|p| p.message.clone())
                    .unwrap_or_default();
                return Err(bad(format!(
                    "{} is corrupt: check found {} corruption(s) and {} error(s) (first: {first}); \
                     repair or replace it (qemu-img check -r all) before importing",
                    name(),
                    rep.corruptions,
                    rep.check_errors
                )));
            }
            match capacity {
                Some(c) if c != size => {
                    return Err(bad(format!(
                    "{} has a virtual size of {size} bytes; disk {disk_id} of VM {vm:?} has {c}",
                    name()
                )))
                }
                _ => capacity = Some(size),
            }
            // The backing file.
            match (i, &header.backing_file) {
                (0, None) => {}
                (0, Some(b)) => {
                    let target = backing_target(&src, b);
                    let Some(h) = &head_rec else {
                        return Err(bad(format!(
                            "{} is an overlay (backing file {b:?}), but disk {disk_id} of VM {vm:?} has no point \
                             to build on: import its backing file first",
                            name()
                        )));
                    };
                    let head_abs = self.abs(&h.image);
                    let canon = target.canonicalize().ok();
                    if canon.as_deref() != Some(head_abs.as_path()) {
                        let outside = canon
                            .as_ref()
                            .is_none_or(|c| !c.starts_with(src.parent().unwrap_or(Path::new("/"))));
                        let any_root = ChainOptions {
                            root: Some(PathBuf::from("/")),
                            ..Default::default()
                        };
                        let same = match (
                            Chain::open(canon.as_deref().unwrap_or(&target), &any_root),
                            Chain::open(&head_abs, &self.chain_options(false)),
                        ) {
                            (Ok(theirs), Ok(ours)) => same_bytes(&theirs, &ours).unwrap_or(false),
                            _ => false,
                        };
                        if !same {
                            return Err(bad(format!(
                                "{}: its backing file {b:?} ({}) {} and does not hold the same bytes as the newest \
                                 point of disk {disk_id} of VM {vm:?} ({}); an imported overlay must build on that point",
                                name(),
                                target.display(),
                                if outside {
                                    "points outside the image's directory"
                                } else {
                                    "is not that point"
                                },
                                h.backup_id
                            )));
                        }
                    }
                }
                (_, None) => {
                    return Err(bad(format!(
                        "{} has no backing file; each image after the first must have the image before it as its backing file",
                        name()
                    )))
                }
                (_, Some(b)) => {
                    let target = backing_target(&src, b);
                    let before = &checked[i - 1].source;
                    if target.canonicalize().ok().as_ref() != Some(before) {
                        return Err(bad(format!(
                            "{}: its backing file {b:?} resolves to {}, not to the image before it ({})",
                            name(),
                            target.display(),
                            before.display()
                        )));
                    }
                }
            }
            if header.backing_file.is_some()
                && header.backing_format().is_some_and(|f| f != "qcow2")
            {
                return Err(bad(format!(
                    "{}: backing format {:?}; only qcow2 backing files are imported",
                    name(),
                    header.backing_format().unwrap_or_default()
                )));
            }
            // The time.
            let created = match &im.created_at {
                Some(t) => parse_time(t, &format!("created_at of {}", name()))?,
                None => time::OffsetDateTime::from_unix_timestamp(meta.mtime())
                    .map_err(|e| bad(format!("{}: mtime: {e}", name())))?,
            };
            if created > now_t + time::Duration::minutes(5) {
                return Err(bad(format!(
                    "{}: created_at {} is in the future",
                    name(),
                    rfc3339(created)
                )));
            }
            if let Some(p) = prev_time {
                if created <= p {
                    return Err(bad(format!(
                        "{}: created_at {} is not later than {} (the point before it); \
                         imported points come after the disk's newest point, oldest first",
                        name(),
                        rfc3339(created),
                        rfc3339(p)
                    )));
                }
            }
            prev_time = Some(created);
            checked.push(Checked {
                full: header.backing_file.is_none(),
                source: src,
                created,
            });
        }
        let capacity = capacity.unwrap_or(0);

        // 2. Copy, rewrite, check, place; nothing is in the catalog yet.
        let dir = self.data.join(repo::disk_dir(&vm, disk_id));
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let vm_rec = match known {
            Some(mut v) => {
                if known_disk.is_none() {
                    v.disks.push(VmDisk {
                        disk_id,
                        disk_key: None,
                        capacity_bytes: capacity,
                    });
                    v.disks.sort_by_key(|d| d.disk_id);
                }
                v
            }
            None => VmRecord {
                name: vm.clone(),
                disks: vec![VmDisk {
                    disk_id,
                    disk_key: None,
                    capacity_bytes: capacity,
                }],
                created_at: now(),
            },
        };
        let disk_key = vm_rec
            .disks
            .iter()
            .find(|d| d.disk_id == disk_id)
            .and_then(|d| d.disk_key.clone());
        let mut parent = head.as_ref().map(|h| h.head_backup_id.clone());
        let mut chain_id = head
            .as_ref()
            .map(|h| h.chain_id.clone())
            .unwrap_or_default();
        let mut placed: Vec<PathBuf> = Vec::new();
        let mut records: Vec<(BackupRecord, DiskBackupRecord)> = Vec::new();
        let mut bytes_copied = 0;
        let n = checked.len();
        let res = (|| -> EngineResult<()> {
            for (i, c) in checked.iter().enumerate() {
                let id = repo::backup_id_at((c.created.unix_timestamp_nanos() / 1_000_000) as i64);
                let full = i == 0 && c.full;
                if full {
                    parent = None;
                    chain_id = format!("c-{}", repo::random_hex(6));
                }
                let rel = repo::image_rel(&vm, disk_id, &id);
                let abs = self.data.join(&rel);
                let tmp = dir.join(format!(".import-{id}.qcow2.tmp"));
                bytes_copied += std::fs::copy(&c.source, &tmp).map_err(|e| {
                    EngineError::Internal(format!(
                        "cannot copy {} to {}: {e}",
                        c.source.display(),
                        tmp.display()
                    ))
                })?;
                placed.push(tmp.clone());
                let backing = parent.as_ref().map(|p| format!("{p}.qcow2"));
                let cluster = header_with_backing(&tmp, backing.as_deref())?;
                write_header(&tmp, &cluster)?;
                let created_at = rfc3339(c.created);
                let backup = BackupRecord {
                    backup_id: id.clone(),
                    vm_name: vm.clone(),
                    backup_type: if full {
                        BackupType::Full
                    } else {
                        BackupType::Incremental
                    },
                    status: Status::Completed,
                    repository_id: None,
                    tags: vec!["imported".into()],
                    disk_ids: vec![disk_id],
                    created_at: created_at.clone(),
                    finished_at: Some(created_at.clone()),
                    error: None,
                    protected: false,
                    note: None,
                };
                let mut disk = DiskBackupRecord {
                    backup_id: id.clone(),
                    disk_id,
                    vm_name: vm.clone(),
                    disk_key: disk_key.clone(),
                    capacity_bytes: capacity,
                    mode: backup.backup_type,
                    reason: Some(format!("imported from {}", c.source.display())),
                    parent_backup_id: parent.clone(),
                    chain_id: chain_id.clone(),
                    image: rel.to_string_lossy().into_owned(),
                    status: Status::Running,
                    change_id: (i + 1 == n).then(|| req.change_id.clone()).flatten(),
                    digest: None,
                    deep_verify: None,
                    bytes_transferred: None,
                    size_on_disk: None,
                    started_at: created_at.clone(),
                    completed_at: Some(created_at),
                    error: None,
                };
                // A crash from here to the catalog transaction: recovery
                // removes the file, because its sidecar says "running".
                repo::write_sidecar(&abs, &repo::Sidecar::new(&backup, &disk))
                    .map_err(EngineError::internal)?;
                std::fs::rename(&tmp, &abs).map_err(EngineError::internal)?;
                placed.pop();
                placed.push(abs.clone());
                let rep = check(&abs, &CheckOptions::default())?;
                if rep.corruptions > 0 || rep.check_errors > 0 {
                    return Err(EngineError::Internal(format!(
                        "the copy {} of {} does not check clean",
                        abs.display(),
                        c.source.display()
                    )));
                }
                // Block digests, as a completion records them: the blocks
                // this layer holds, over the digests of the points below
                // (a whole file when those have none).
                let chain = Chain::open(&abs, &self.chain_options(false))?;
                let got = crate::digest::compute::complete_layer(&chain, &|_| {}).map_err(|e| {
                    EngineError::Internal(format!(
                        "computing the block digests of {}: {e}",
                        abs.display()
                    ))
                })?;
                disk.digest = Some(got.digest.to_string());
                disk.status = Status::Completed;
                disk.size_on_disk = Some(super::space::allocated(&abs));
                parent = Some(id);
                records.push((backup, disk));
            }
            if let Some(d) = self.data.join(repo::disk_dir(&vm, disk_id)).parent() {
                let _ = repo::sync_dir(d);
            }
            repo::sync_dir(&dir).map_err(EngineError::internal)?;
            Ok(())
        })();
        if let Err(e) = res {
            for p in &placed {
                repo::remove_point(p);
            }
            return Err(e);
        }

        // 3. One transaction adopts them all, if nothing moved meanwhile.
        let _op = self.op.lock().await;
        let now_state = self.import_state(&vm, disk_id);
        let moved = match &now_state {
            Ok(n) => !n.same_as(&state),
            Err(_) => true,
        };
        if moved {
            for p in &placed {
                repo::remove_point(p);
            }
            return Err(match now_state {
                Err(e) => e,
                Ok(_) => EngineError::Conflict(format!(
                    "disk {disk_id} of VM {vm:?} changed while the images were imported (a backup or \
                     another import ended); nothing was adopted: run the import again"
                )),
            });
        }
        let mut changes = vec![Change::PutVm(vm_rec)];
        for (b, d) in &records {
            changes.push(Change::PutBackup(b.clone()));
            changes.push(Change::PutDisk(d.clone()));
        }
        let (_, last) = records.last().expect("at least one image");
        changes.push(Change::PutHead(ChainHead {
            vm_name: vm.clone(),
            disk_id,
            chain_id: last.chain_id.clone(),
            head_backup_id: last.backup_id.clone(),
            head_change_id: last.change_id.clone().unwrap_or_default(),
        }));
        if let Err(e) = self.catalog.apply(&changes) {
            for p in &placed {
                repo::remove_point(p);
            }
            return Err(cat(e));
        }
        super::crash_point("import:after-commit");
        for (b, d) in &records {
            let _ = repo::write_sidecar(&self.abs(&d.image), &repo::Sidecar::new(b, d));
        }
        if req.move_files {
            for c in &checked {
                if let Err(e) = std::fs::remove_file(&c.source) {
                    tracing::warn!(path = %c.source.display(), error = %e, "imported, but the source could not be removed");
                }
            }
        }
        info!(vm = %vm, disk = disk_id, points = records.len(), bytes_copied, "imported");
        Ok(ImportReport {
            vm_name: vm,
            disk_id,
            points: records.into_iter().map(|(_, d)| d).collect(),
            bytes_copied,
            moved: req.move_files,
        })
    }
}
