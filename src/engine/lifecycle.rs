//! Removing points anywhere in a chain: the base, a middle point, the
//! newest. A point with a child is consolidated: what the child still
//! reads through it is merged so that every kept point reads exactly the
//! bytes it read before, at every moment.
//!
//! # The protocol (docs/architecture.md, "Consolidation")
//!
//! For each disk of the backup being removed, one journal file
//! `<data>/journal/<backup>-disk<N>.json` says what is done to which files.
//! 1. The journals are written and fsynced first. From here on the removal
//!    happens: a crash at any later moment is rolled forward at the next
//!    start, never back.
//! 2. One catalog transaction removes the point's records, links the child
//!    to the removed point's parent and moves the head if needed. Listings
//!    no longer show the point.
//! 3. The files (no engine lock held; each step is idempotent, so recovery
//!    simply runs them again):
//!    - first the removed point's sidecar goes, so that a mount reading
//!      the repository directory no longer lists it;
//!    - **leaf** (no child): the image and its sidecar are removed.
//!    - **commit into parent** (the child holds less than the removed
//!      point, e.g. the 2 GiB base under a 40 MiB incremental): the
//!      child's own ranges are copied into the removed point's file, which
//!      then reads as the child (the child's clusters shadow those ranges
//!      in every reader all along), and is renamed over the child's file:
//!      one atomic step. Readers holding the old file keep reading it.
//!    - **pull into child** (the removed point holds less): the removed
//!      point's ranges are copied into the child only where the child holds
//!      nothing (the child read exactly those bytes through it anyway); then
//!      the child's header names the removed point's parent (the new header
//!      cluster is first saved beside the journal, so a torn write is redone
//!      from it); then the removed file goes.
//!    - the child's sidecar is rewritten with its new parent, and the
//!      journal removed.

use std::path::{Path, PathBuf};

use chainvault_qcow::merge::{copy_own, header_with_backing, write_header, CopyMode};
use chainvault_qcow::{Chain, ChainOptions, Image, OpenOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::repo;
use super::{cat, crash_point, lock, Engine, EngineError, EngineResult};
use crate::catalog::Change;
use crate::model::*;

/// What is done to the files of one disk of a removed backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// No child: remove the image.
    RemoveLeaf,
    /// Copy the child into the removed image, rename it over the child.
    CommitIntoParent,
    /// Copy the removed image into the child's holes, rebase the child.
    PullIntoChild,
}

/// A journal entry: one disk of one removed backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub kind: String,
    pub version: u32,
    pub action: Action,
    pub vm_name: String,
    pub disk_id: u32,
    pub backup_id: String,
    /// The removed point's image, relative to the repository.
    pub image: String,
    /// The child, when there is one.
    pub child_backup_id: Option<String>,
    pub child_image: Option<String>,
    /// The removed point's parent: the child's parent afterwards.
    pub new_parent_backup_id: Option<String>,
    pub started_at: String,
}

/// Longest note kept on a backup.
pub const MAX_NOTE_BYTES: usize = 4096;

pub fn journal_dir(data: &Path) -> PathBuf {
    data.join("journal")
}

fn journal_path(data: &Path, backup_id: &str, disk_id: u32) -> PathBuf {
    journal_dir(data).join(format!("{backup_id}-disk{disk_id}.json"))
}

fn header_path(journal: &Path) -> PathBuf {
    journal.with_extension("header")
}

/// Every journal left in the repository, oldest first.
pub fn pending(data: &Path) -> Vec<(PathBuf, Result<Journal, String>)> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(journal_dir(data)) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let j = std::fs::read(&p)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|b| {
                    serde_json::from_slice::<Journal>(&b)
                        .map_err(|e| format!("{}: not a chainvault journal: {e}", p.display()))
                });
            (p, j)
        })
        .collect()
}

use super::space::allocated;

fn chain_opts(data: &Path) -> ChainOptions {
    ChainOptions {
        root: Some(data.to_path_buf()),
        max_depth: 4096,
        writable: true,
        l2_cache_bytes: 32 << 20,
    }
}

fn qerr(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Lower the refcounts a crash in the middle of a copy may have leaked.
fn repair_leaks(p: &Path) -> Result<(), String> {
    let rep = chainvault_qcow::check(p, &chainvault_qcow::CheckOptions { repair_leaks: true })
        .map_err(|e| qerr(&format!("checking {}", p.display()), e))?;
    if rep.exit_code() != 0 && rep.exit_code() != 3 {
        return Err(format!(
            "{} failed its check after the merge: {}",
            p.display(),
            rep.summary().lines().next().unwrap_or("")
        ));
    }
    Ok(())
}

/// Do (or finish) the file part of a journal. Idempotent; needs no catalog.
pub fn finish_files(data: &Path, jpath: &Path, j: &Journal) -> Result<(), String> {
    let removed = data.join(&j.image);
    let child = j.child_image.as_ref().map(|c| data.join(c));
    // First the removed point's sidecar: a mount reading the repository
    // directory stops listing the point before its file changes.
    let sc = repo::sidecar_of(&removed);
    match std::fs::remove_file(&sc) {
        Ok(()) => {
            if let Some(d) = sc.parent() {
                repo::sync_dir(d).map_err(|e| qerr("fsync of the disk directory", e))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(qerr(&format!("removing {}", sc.display()), e)),
    }
    match (j.action, &child) {
        (Action::RemoveLeaf, _) => repo::remove_point(&removed),
        (Action::CommitIntoParent, Some(child)) => {
            if removed.exists() {
                // The child's block digests first: true before the copy and after.
                crate::digest::file::merge_into_upper(child, &removed)?;
                {
                    let src = Image::open(child, &OpenOptions::default())
                        .map_err(|e| qerr("opening the child", e))?;
                    let dst = Chain::open(&removed, &chain_opts(data))
                        .map_err(|e| qerr("opening the removed point for writing", e))?;
                    let img = dst.top_image().ok_or("the removed point is not qcow2")?;
                    crash_point("merge:before-copy");
                    let st = copy_own(&src, img, CopyMode::Overwrite, &mut |_| {})
                        .map_err(|e| qerr("merging", e))?;
                    info!(
                        moved = st.data_bytes,
                        zeroed = st.zero_bytes,
                        "child committed into the removed point"
                    );
                }
                crash_point("merge:after-copy");
                repair_leaks(&removed)?;
                std::fs::rename(&removed, child).map_err(|e| {
                    qerr(
                        &format!("renaming {} over {}", removed.display(), child.display()),
                        e,
                    )
                })?;
                if let Some(d) = child.parent() {
                    repo::sync_dir(d).map_err(|e| qerr("fsync of the disk directory", e))?;
                }
                crash_point("merge:after-rename");
            }
            repo::remove_point(&removed); // the sidecar (the image is gone)
        }
        (Action::PullIntoChild, Some(child)) => {
            if removed.exists() {
                let hp = header_path(jpath);
                if !hp.exists() {
                    crate::digest::file::merge_into_upper(child, &removed)?;
                    {
                        let src = Image::open(&removed, &OpenOptions::default())
                            .map_err(|e| qerr("opening the removed point", e))?;
                        let dst = Chain::open(child, &chain_opts(data))
                            .map_err(|e| qerr("opening the child for writing", e))?;
                        let img = dst.top_image().ok_or("the child is not qcow2")?;
                        crash_point("merge:before-copy");
                        let st = copy_own(&src, img, CopyMode::FillHoles, &mut |_| {})
                            .map_err(|e| qerr("merging", e))?;
                        info!(
                            moved = st.data_bytes,
                            zeroed = st.zero_bytes,
                            "removed point pulled into its child"
                        );
                    }
                    crash_point("merge:after-copy");
                    repair_leaks(child)?;
                    let name = j
                        .new_parent_backup_id
                        .as_ref()
                        .map(|p| format!("{p}.qcow2"));
                    let hdr = header_with_backing(child, name.as_deref())
                        .map_err(|e| qerr("building the rebased header", e))?;
                    repo::write_atomic(&hp, &hdr).map_err(|e| qerr("saving the new header", e))?;
                }
                let hdr = std::fs::read(&hp).map_err(|e| qerr("reading the saved header", e))?;
                write_header(child, &hdr).map_err(|e| qerr("rebasing the child", e))?;
                crash_point("merge:after-rebase");
                repo::remove_point(&removed);
                let _ = std::fs::remove_file(&hp);
            } else {
                repo::remove_point(&removed);
                let _ = std::fs::remove_file(header_path(jpath));
            }
        }
        (_, None) => return Err("the journal names no child for a merge".into()),
    }
    // The child's sidecar follows its new parent.
    if let (Some(child), Some(child_id)) = (&child, &j.child_backup_id) {
        let sc = repo::sidecar_of(child);
        if let Ok(mut s) = repo::read_sidecar(&sc) {
            if s.disk.backup_id == *child_id {
                s.disk.parent_backup_id = j.new_parent_backup_id.clone();
                s.disk.size_on_disk = Some(allocated(child));
                repo::write_sidecar(child, &s)
                    .map_err(|e| qerr("updating the child's sidecar", e))?;
            }
        }
    }
    std::fs::remove_file(jpath).map_err(|e| qerr("removing the journal", e))?;
    if let Some(d) = jpath.parent() {
        let _ = repo::sync_dir(d);
    }
    Ok(())
}

impl Engine {
    /// Catalog changes that make `js` true (idempotent: records already
    /// changed are left alone).
    fn removal_changes(&self, js: &[Journal]) -> EngineResult<Vec<Change>> {
        let removed: std::collections::HashSet<(&str, u32)> = js
            .iter()
            .map(|j| (j.backup_id.as_str(), j.disk_id))
            .collect();
        let mut changes = Vec::new();
        let mut backups = std::collections::BTreeSet::new();
        for j in js {
            backups.insert(j.backup_id.clone());
            if self
                .catalog
                .disk(&j.backup_id, j.disk_id)
                .map_err(cat)?
                .is_some()
            {
                changes.push(Change::DeleteDisk {
                    vm_name: j.vm_name.clone(),
                    backup_id: j.backup_id.clone(),
                    disk_id: j.disk_id,
                });
            }
            if let Some(c) = &j.child_backup_id {
                if let Some(mut d) = self.catalog.disk(c, j.disk_id).map_err(cat)? {
                    if d.parent_backup_id.as_deref() == Some(j.backup_id.as_str()) {
                        d.parent_backup_id = j.new_parent_backup_id.clone();
                        changes.push(Change::PutDisk(d));
                    }
                }
            }
            if let Some(h) = self.catalog.head(&j.vm_name, j.disk_id).map_err(cat)? {
                if h.head_backup_id == j.backup_id {
                    let newest = self
                        .catalog
                        .points_of(&j.vm_name, j.disk_id)
                        .map_err(cat)?
                        .into_iter()
                        .rfind(|p| {
                            !removed.contains(&(p.backup_id.as_str(), j.disk_id))
                                && p.status == Status::Completed
                        });
                    changes.push(match newest {
                        Some(p) => Change::PutHead(ChainHead {
                            vm_name: j.vm_name.clone(),
                            disk_id: j.disk_id,
                            chain_id: p.chain_id.clone(),
                            head_backup_id: p.backup_id.clone(),
                            head_change_id: p.change_id.clone().unwrap_or_default(),
                        }),
                        None => Change::DeleteHead {
                            vm_name: j.vm_name.clone(),
                            disk_id: j.disk_id,
                        },
                    });
                }
            }
        }
        for b in backups {
            let left = self
                .catalog
                .disks_of(&b)
                .map_err(cat)?
                .into_iter()
                .filter(|d| !removed.contains(&(b.as_str(), d.disk_id)))
                .count();
            if left == 0 && self.catalog.backup(&b).map_err(cat)?.is_some() {
                changes.push(Change::DeleteBackup(b));
            }
        }
        Ok(changes)
    }

    /// After the files of `js` are done: the children's sizes on disk.
    fn record_child_sizes(&self, js: &[Journal]) -> EngineResult<()> {
        let mut changes = Vec::new();
        for j in js {
            if let (Some(c), Some(img)) = (&j.child_backup_id, &j.child_image) {
                if let Some(mut d) = self.catalog.disk(c, j.disk_id).map_err(cat)? {
                    d.size_on_disk = Some(allocated(&self.abs(img)));
                    changes.push(Change::PutDisk(d));
                }
            }
        }
        self.catalog.apply(&changes).map_err(cat)
    }

    /// Remove a backup (every disk of it), anywhere in its chains.
    pub async fn delete_backup(&self, backup_id: &str) -> EngineResult<()> {
        self.check_not_stopping()?;
        let (journals, paths) = {
            let _op = self.op.lock().await;
            let b = self
                .catalog
                .backup(backup_id)
                .map_err(cat)?
                .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
            if b.status == Status::Running {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} is running; fail it first (POST /api/v1/backups/{backup_id}/fail)"
                )));
            }
            if b.protected {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} is protected{}; unprotect it first (chainvault backups unprotect {backup_id})",
                    b.note.as_deref().map(|n| format!(" (note: {n})")).unwrap_or_default()
                )));
            }
            if lock(&self.merging).contains(backup_id) {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} is being consolidated with a removed neighbour; try again when that ends"
                )));
            }
            if let Some(r) = self.instant_restores_of(backup_id).first() {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} has an instant restore open ({r}); close it first \
                     (DELETE /api/v1/restores/{r}, optionally ?keep_as=PATH)"
                )));
            }
            if lock(&self.restores)
                .values()
                .any(|r| r.view.backup_id == backup_id)
            {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} has an open restore export; close it first"
                )));
            }
            let mut journals = Vec::new();
            for d in self.catalog.disks_of(backup_id).map_err(cat)? {
                let children: Vec<DiskBackupRecord> = self
                    .catalog
                    .points_of(&d.vm_name, d.disk_id)
                    .map_err(cat)?
                    .into_iter()
                    .filter(|p| p.parent_backup_id.as_deref() == Some(backup_id))
                    .collect();
                if let Some(r) = children.iter().find(|p| p.status == Status::Running) {
                    return Err(EngineError::Conflict(format!(
                        "backup {} is writing an incremental onto disk {} of backup {backup_id}; \
                         delete it after that backup ends",
                        r.backup_id, d.disk_id
                    )));
                }
                let kept: Vec<&DiskBackupRecord> = children
                    .iter()
                    .filter(|p| p.status == Status::Completed)
                    .collect();
                if kept.len() > 1 {
                    return Err(EngineError::Internal(format!(
                        "disk {} of backup {backup_id} is the parent of {} points; chains do not fork",
                        d.disk_id,
                        kept.len()
                    )));
                }
                let child = kept.first().copied();
                if let Some(c) = child {
                    if lock(&self.merging).contains(&c.backup_id) {
                        return Err(EngineError::Conflict(format!(
                            "backup {} (the next point of disk {}) is being consolidated; try again when that ends",
                            c.backup_id, d.disk_id
                        )));
                    }
                }
                let action = match child {
                    None => Action::RemoveLeaf,
                    Some(_) if d.status != Status::Completed => Action::RemoveLeaf,
                    Some(c) => {
                        let (pa, ca) = (self.abs(&d.image), self.abs(&c.image));
                        if allocated(&ca) <= allocated(&pa) {
                            Action::CommitIntoParent
                        } else {
                            Action::PullIntoChild
                        }
                    }
                };
                journals.push(Journal {
                    kind: "chainvault-journal".into(),
                    version: 1,
                    action,
                    vm_name: d.vm_name.clone(),
                    disk_id: d.disk_id,
                    backup_id: backup_id.to_string(),
                    image: d.image.clone(),
                    child_backup_id: child.map(|c| c.backup_id.clone()),
                    child_image: child.map(|c| c.image.clone()),
                    new_parent_backup_id: d.parent_backup_id.clone(),
                    started_at: now(),
                });
            }
            // 1. The journals, durable before anything changes.
            std::fs::create_dir_all(journal_dir(&self.data)).map_err(EngineError::internal)?;
            let mut paths = Vec::new();
            for j in &journals {
                let p = journal_path(&self.data, &j.backup_id, j.disk_id);
                let bytes = serde_json::to_vec_pretty(j).map_err(EngineError::internal)?;
                repo::write_atomic(&p, &bytes).map_err(|e| {
                    EngineError::Internal(format!("cannot write the journal {}: {e}", p.display()))
                })?;
                paths.push(p);
            }
            crash_point("delete:after-journal");
            // 2. The catalog: the point is gone from every listing.
            let changes = self.removal_changes(&journals)?;
            self.catalog.apply(&changes).map_err(cat)?;
            crash_point("delete:after-commit");
            let mut m = lock(&self.merging);
            for j in &journals {
                m.insert(j.backup_id.clone());
                if let Some(c) = &j.child_backup_id {
                    m.insert(c.clone());
                }
            }
            (journals, paths)
        };
        // 3. The files, without the engine lock: backups and restores go on.
        let data = self.data.clone();
        let js = journals.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(), String> {
            for (j, p) in js.iter().zip(&paths) {
                finish_files(&data, p, j)
                    .map_err(|e| format!("disk {} of backup {}: {e}", j.disk_id, j.backup_id))?;
            }
            Ok(())
        })
        .await
        .map_err(EngineError::internal)?;
        {
            let mut m = lock(&self.merging);
            for j in &journals {
                m.remove(&j.backup_id);
                if let Some(c) = &j.child_backup_id {
                    m.remove(c);
                }
            }
        }
        if let Err(e) = res {
            warn!(backup = %backup_id, error = %e, "consolidation stopped; the journal finishes it at the next start");
            return Err(EngineError::Internal(format!(
                "removing backup {backup_id} stopped: {e}. The journal in {} finishes it when the daemon next starts",
                journal_dir(&self.data).display()
            )));
        }
        self.record_child_sizes(&journals)?;
        info!(backup = %backup_id, "backup deleted");
        Ok(())
    }

    /// Set a backup's protection and/or note (`note: Some(None)` clears it).
    /// The catalog and every disk's sidecar say the same afterwards.
    pub async fn annotate_backup(
        &self,
        backup_id: &str,
        protected: Option<bool>,
        note: Option<Option<String>>,
    ) -> EngineResult<BackupView> {
        if let Some(Some(n)) = &note {
            if n.len() > MAX_NOTE_BYTES {
                return Err(EngineError::BadRequest(format!(
                    "note is {} bytes; at most {MAX_NOTE_BYTES} are kept",
                    n.len()
                )));
            }
            if n.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                return Err(EngineError::BadRequest(
                    "note must not hold control characters other than newline and tab".into(),
                ));
            }
        }
        if protected.is_none() && note.is_none() {
            return Err(EngineError::BadRequest(
                "give \"protected\" (true or false) and/or \"note\" (text, or null to clear it)"
                    .into(),
            ));
        }
        let _op = self.op.lock().await;
        let mut b = self
            .catalog
            .backup(backup_id)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
        if let Some(p) = protected {
            b.protected = p;
        }
        if let Some(n) = note {
            b.note = n.filter(|n| !n.trim().is_empty());
        }
        self.catalog
            .apply(&[Change::PutBackup(b.clone())])
            .map_err(cat)?;
        let disks = self.catalog.disks_of(backup_id).map_err(cat)?;
        for d in disks.iter().filter(|d| d.status == Status::Completed) {
            if let Err(e) = repo::write_sidecar(&self.abs(&d.image), &repo::Sidecar::new(&b, d)) {
                warn!(error = %e, "sidecar update failed; recovery will rewrite it");
            }
        }
        info!(backup = %backup_id, protected = b.protected, "backup annotated");
        Ok(BackupView { backup: b, disks })
    }

    /// Finish every journal a crash left (startup, before anything else).
    pub(super) fn finish_journals(&self) -> EngineResult<()> {
        for (p, j) in pending(&self.data) {
            let j = j.map_err(EngineError::Internal)?;
            warn!(backup = %j.backup_id, disk = j.disk_id, action = ?j.action, "finishing a removal a stop interrupted");
            let changes = self.removal_changes(std::slice::from_ref(&j))?;
            self.catalog.apply(&changes).map_err(cat)?;
            finish_files(&self.data, &p, &j).map_err(|e| {
                EngineError::Internal(format!("cannot finish the journal {}: {e}", p.display()))
            })?;
            self.record_child_sizes(std::slice::from_ref(&j))?;
        }
        Ok(())
    }
}
