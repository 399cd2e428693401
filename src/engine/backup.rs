//! The life of a disk backup: start (mode, image, catalog, writable
//! export), complete (drain, fsync, check, one transaction that records the
//! change_id and moves the head), fail, and the timeout of idle disks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chainvault_qcow::create::create;
use chainvault_qcow::{BackingFormat, BackingSpec, Chain, CreateOptions};
use tracing::{info, info_span, warn, Instrument};

use super::{
    cat, crash_point, lock, repo, validate_vm_name, Engine, EngineError, EngineResult, RunningDisk,
};
use crate::catalog::Change;
use crate::digest::PointDigest;
use crate::export::{now_ms, Activity, QcowExport};
use crate::model::*;

impl Engine {
    // ----------------------------------------------------------------- start

    pub async fn start_backup(&self, req: StartRequest) -> EngineResult<StartResponse> {
        self.check_open()?;
        validate_vm_name(&req.vm_name)?;
        if let Some(disks) = &req.disks {
            if disks.is_empty() {
                return Err(EngineError::BadRequest(
                    "disks must list at least one disk".into(),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for d in disks {
                if !seen.insert(d.disk_id) {
                    return Err(EngineError::BadRequest(format!(
                        "disk_id {} is listed twice",
                        d.disk_id
                    )));
                }
                if let Some(c) = d.capacity_bytes {
                    if c == 0 || c % 512 != 0 {
                        return Err(EngineError::BadRequest(format!(
                            "disk {}: capacity_bytes {c} must be a positive multiple of 512",
                            d.disk_id
                        )));
                    }
                }
            }
        }
        let _op = self.op.lock().await;
        self.check_open()?;
        let vm_name = req.vm_name.clone();
        if let Some(b) = self.catalog.running_backup_of(&vm_name).map_err(cat)? {
            return Err(EngineError::Conflict(format!(
                "backup {} of VM {vm_name:?} is still running; complete or fail it first",
                b.backup_id
            )));
        }

        // The VM's disks: from the request, or as the catalog knows them.
        let known = self.catalog.vm(&vm_name).map_err(cat)?;
        let now = now();
        let vm = match (&req.disks, known) {
            (None, None) => {
                return Err(EngineError::BadRequest(format!(
                    "VM {vm_name:?} is not known yet: the first start request must list its disks \
                     (\"disks\": [{{\"disk_id\": 0, \"disk_key\": \"disk-2000\", \"capacity_bytes\": ...}}])"
                )))
            }
            (None, Some(vm)) => vm,
            (Some(specs), known) => {
                let mut disks: Vec<VmDisk> = known.as_ref().map(|v| v.disks.clone()).unwrap_or_default();
                for s in specs {
                    let prev = disks.iter().position(|d| d.disk_id == s.disk_id);
                    let capacity = match (s.capacity_bytes, prev) {
                        (Some(c), _) => c,
                        (None, Some(i)) => disks[i].capacity_bytes,
                        (None, None) => {
                            return Err(EngineError::BadRequest(format!(
                                "disk {} of VM {vm_name:?} is new: capacity_bytes is required",
                                s.disk_id
                            )))
                        }
                    };
                    let d = VmDisk {
                        disk_id: s.disk_id,
                        disk_key: s.disk_key.clone().or_else(|| prev.and_then(|i| disks[i].disk_key.clone())),
                        capacity_bytes: capacity,
                    };
                    match prev {
                        Some(i) => disks[i] = d,
                        None => disks.push(d),
                    }
                }
                disks.sort_by_key(|d| d.disk_id);
                VmRecord {
                    name: vm_name.clone(),
                    disks,
                    created_at: known.map(|v| v.created_at).unwrap_or_else(|| now.clone()),
                }
            }
        };
        // Disks in this backup: the ones the request lists, or all the VM has.
        let selected: Vec<(VmDisk, Option<&DiskSpec>)> = match &req.disks {
            Some(specs) => specs
                .iter()
                .filter_map(|s| {
                    vm.disks
                        .iter()
                        .find(|d| d.disk_id == s.disk_id)
                        .map(|d| (d.clone(), Some(s)))
                })
                .collect(),
            None => vm.disks.iter().map(|d| (d.clone(), None)).collect(),
        };

        let backup_id = repo::new_backup_id();
        let backup = BackupRecord {
            backup_id: backup_id.clone(),
            vm_name: vm_name.clone(),
            backup_type: req.backup_type,
            status: Status::Running,
            repository_id: req.repository_id.clone(),
            tags: req.tags.clone(),
            disk_ids: selected.iter().map(|(d, _)| d.disk_id).collect(),
            created_at: now.clone(),
            finished_at: None,
            error: None,
            protected: false,
            note: None,
        };

        // Decide each disk's mode and create its image.
        let mut records = Vec::new();
        let mut plans = Vec::new();
        let mut created: Vec<PathBuf> = Vec::new();
        let result = (|| -> EngineResult<()> {
            for (disk, spec) in &selected {
                let asked = spec.and_then(|s| s.mode).unwrap_or(req.backup_type);
                let compare = spec.is_some_and(|s| s.compare_with_parent);
                let head = self.catalog.head(&vm_name, disk.disk_id).map_err(cat)?;
                let head = head.filter(|h| {
                    let img = repo::image_rel(&vm_name, disk.disk_id, &h.head_backup_id);
                    self.data.join(img).exists()
                });
                // A head that failed deep verify is never built on.
                let bad_head = match &head {
                    Some(h) => self
                        .catalog
                        .disk(&h.head_backup_id, disk.disk_id)
                        .map_err(cat)?
                        .filter(|d| d.is_bad())
                        .map(|d| {
                            format!(
                                "the newest point {} failed deep verify ({}); a full starts a new chain",
                                d.backup_id,
                                d.deep_verify.and_then(|v| v.message).unwrap_or_default()
                            )
                        }),
                    None => None,
                };
                let head = if bad_head.is_some() { None } else { head };
                let (mode, reason, parent, chain_id, prev_change) = match (asked, &head) {
                    (BackupType::Incremental, Some(h)) => (
                        BackupType::Incremental,
                        None,
                        Some(h.head_backup_id.clone()),
                        h.chain_id.clone(),
                        h.head_change_id.clone(),
                    ),
                    (BackupType::Incremental, None) => (
                        BackupType::Full,
                        Some(bad_head.clone().unwrap_or_else(|| {
                            "no completed backup of this disk to build on".to_string()
                        })),
                        None,
                        format!("c-{}", repo::random_hex(6)),
                        String::new(),
                    ),
                    (BackupType::Full, Some(h)) if compare => (
                        BackupType::Full,
                        Some(
                            "full read stored as the clusters that differ from the previous point"
                                .to_string(),
                        ),
                        Some(h.head_backup_id.clone()),
                        h.chain_id.clone(),
                        String::new(),
                    ),
                    (BackupType::Full, _) => {
                        let reason = (req.backup_type == BackupType::Incremental).then(|| {
                            format!(
                                "full requested for disk {} (changed-block tracking reset)",
                                disk.disk_id
                            )
                        });
                        (
                            BackupType::Full,
                            reason,
                            None,
                            format!("c-{}", repo::random_hex(6)),
                            String::new(),
                        )
                    }
                };
                let rel = repo::image_rel(&vm_name, disk.disk_id, &backup_id);
                let abs = self.data.join(&rel);
                if let Some(dir) = abs.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        EngineError::Internal(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                create(
                    &abs,
                    &CreateOptions {
                        size: disk.capacity_bytes,
                        cluster_size: self.cfg.cluster_size,
                        extended_l2: self.cfg.extended_l2,
                        refcount_bits: 16,
                        backing: parent.as_ref().map(|p| BackingSpec {
                            name: format!("{p}.qcow2"),
                            format: BackingFormat::Qcow2,
                        }),
                    },
                )?;
                created.push(abs.clone());
                let record = DiskBackupRecord {
                    backup_id: backup_id.clone(),
                    disk_id: disk.disk_id,
                    vm_name: vm_name.clone(),
                    disk_key: disk.disk_key.clone(),
                    capacity_bytes: disk.capacity_bytes,
                    mode,
                    reason,
                    parent_backup_id: parent,
                    chain_id,
                    image: rel.to_string_lossy().into_owned(),
                    status: Status::Running,
                    change_id: None,
                    digest: None,
                    deep_verify: None,
                    bytes_transferred: None,
                    size_on_disk: None,
                    started_at: now.clone(),
                    completed_at: None,
                    error: None,
                };
                repo::write_sidecar(&abs, &repo::Sidecar::new(&backup, &record)).map_err(|e| {
                    EngineError::Internal(format!("cannot write sidecar of {}: {e}", abs.display()))
                })?;
                plans.push((prev_change, compare && record.parent_backup_id.is_some()));
                records.push(record);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in &created {
                repo::remove_point(p);
            }
            return Err(e);
        }

        let mut changes = vec![Change::PutVm(vm.clone()), Change::PutBackup(backup.clone())];
        changes.extend(records.iter().cloned().map(Change::PutDisk));
        if let Err(e) = self.catalog.apply(&changes) {
            for p in &created {
                repo::remove_point(p);
            }
            return Err(cat(e));
        }

        // Open the exports.
        let mut targets = Vec::new();
        for (rec, (prev_change, compare)) in records.iter().zip(plans) {
            match self.open_disk_export(rec, compare) {
                Ok(t) => targets.push(DiskTarget {
                    disk_id: rec.disk_id,
                    disk_key: rec.disk_key.clone(),
                    capacity_bytes: rec.capacity_bytes,
                    mode: rec.mode,
                    reason: rec.reason.clone(),
                    export_name: t.0,
                    nbd_uri: t.1,
                    previous_change_id: prev_change,
                    parent_backup_id: rec.parent_backup_id.clone(),
                    compare_with_parent: compare,
                }),
                Err(e) => {
                    let msg = format!("cannot open the NBD export of disk {}: {e}", rec.disk_id);
                    self.fail_locked(&backup_id, &msg, Status::Failed).await?;
                    return Err(EngineError::Internal(msg));
                }
            }
        }
        for r in &records {
            info!(backup = %backup_id, vm = %vm_name, disk = r.disk_id, mode = ?r.mode, parent = ?r.parent_backup_id, "disk backup started");
        }
        Ok(StartResponse {
            backup_id,
            vm_name,
            backup_type: req.backup_type,
            status: Status::Running,
            created_at: now,
            disks: targets,
        })
    }

    fn open_disk_export(
        &self,
        rec: &DiskBackupRecord,
        compare: bool,
    ) -> EngineResult<(String, String)> {
        let server = self.server()?;
        let abs = self.abs(&rec.image);
        let chain = Arc::new(Chain::open(&abs, &self.chain_options(true))?);
        let activity = Arc::new(Activity::default());
        activity.touch();
        let name = format!(
            "{}-d{}-{}",
            rec.backup_id,
            rec.disk_id,
            repo::random_hex(16)
        );
        let export = QcowExport::new(
            chain.clone(),
            format!("{} disk {} ({})", rec.vm_name, rec.disk_id, rec.backup_id),
        )
        .compare_with_backing(compare)
        .with_activity(activity.clone());
        server
            .add_unlisted_export(name.clone(), Arc::new(export))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let uri = self.export_uri(&name);
        lock(&self.running).insert(
            (rec.backup_id.clone(), rec.disk_id),
            RunningDisk {
                export_name: name.clone(),
                chain,
                activity,
                completing: false,
            },
        );
        Ok((name, uri))
    }

    // -------------------------------------------------------------- complete

    pub async fn complete_disk(
        &self,
        backup_id: &str,
        req: CompleteRequest,
    ) -> EngineResult<CompleteResponse> {
        let change_id = match req.change_id.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => {
                return Err(EngineError::BadRequest(
                    "change_id is required: it is what the next incremental backup of this disk starts from".into(),
                ))
            }
        };
        let disk_id = req.disk_id.ok_or_else(|| {
            EngineError::BadRequest(
                "disk_id is required: every disk of a backup completes on its own".into(),
            )
        })?;
        let claimed = match req.digest.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(d) => Some(d.parse::<PointDigest>().map_err(EngineError::BadRequest)?),
        };
        let span = info_span!("complete", backup = %backup_id, disk = disk_id);
        self.complete_inner(
            backup_id,
            disk_id,
            change_id,
            req.bytes_transferred,
            claimed,
        )
        .instrument(span)
        .await
    }

    async fn complete_inner(
        &self,
        backup_id: &str,
        disk_id: u32,
        change_id: String,
        bytes: Option<u64>,
        claimed: Option<PointDigest>,
    ) -> EngineResult<CompleteResponse> {
        // Phase 1: validate and claim.
        let (export_name, chain, image_rel) = {
            let _op = self.op.lock().await;
            let backup = self
                .catalog
                .backup(backup_id)
                .map_err(cat)?
                .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
            let disk = self.disk_record(backup_id, disk_id)?;
            match disk.status {
                Status::Completed => {
                    let stored = disk.change_id.clone().unwrap_or_default();
                    if stored == change_id {
                        return Ok(CompleteResponse {
                            status: "completed".into(),
                            backup_id: backup_id.to_string(),
                            disk_id,
                            change_id,
                            digest: disk.digest.clone(),
                            message: format!("disk {disk_id} of backup {backup_id} was already completed with this change_id"),
                            timestamp: disk.completed_at.unwrap_or_default(),
                            backup_status: backup.status,
                        });
                    }
                    return Err(EngineError::Conflict(format!(
                        "disk {disk_id} of backup {backup_id} was already completed with change_id {stored:?}; \
                         a different change_id cannot replace it"
                    )));
                }
                Status::Failed | Status::Interrupted => {
                    return Err(EngineError::Conflict(format!(
                        "disk {disk_id} of backup {backup_id} is {}{}; start a new backup",
                        disk.status.as_str(),
                        disk.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    )))
                }
                Status::Running => {}
            }
            self.check_open()?;
            let mut running = lock(&self.running);
            let r = running
                .get_mut(&(backup_id.to_string(), disk_id))
                .ok_or_else(|| {
                    EngineError::Internal(format!(
                        "disk {disk_id} of backup {backup_id} is running but has no export"
                    ))
                })?;
            if r.completing {
                return Err(EngineError::Conflict(format!(
                    "disk {disk_id} of backup {backup_id} is already being completed"
                )));
            }
            r.completing = true;
            (r.export_name.clone(), r.chain.clone(), disk.image.clone())
        };

        // Phase 2: close to writes, make durable, check. No engine lock held.
        let outcome = self.seal(&export_name, chain).await;
        let size_on_disk = match outcome {
            Ok(size) => size,
            Err(msg) => {
                // The image is not good: this disk, and so the backup, failed.
                // Every other running disk's export is closed and its image removed.
                let _op = self.op.lock().await;
                lock(&self.running).remove(&(backup_id.to_string(), disk_id));
                self.fail_locked(backup_id, &msg, Status::Failed).await?;
                return Err(EngineError::Internal(msg));
            }
        };
        // The block digests: the layer's file, the point's digest, and the
        // comparison with the client's.
        let digests = match self.digest_completed(&image_rel, claimed).await {
            Ok(Ok(d)) => d,
            Ok(Err(msg)) | Err(msg) => {
                let mismatch = msg.starts_with("the stored disk does not match");
                let _op = self.op.lock().await;
                lock(&self.running).remove(&(backup_id.to_string(), disk_id));
                self.fail_locked(backup_id, &msg, Status::Failed).await?;
                return Err(if mismatch {
                    EngineError::Conflict(format!(
                        "disk {disk_id} of backup {backup_id} failed: {msg}; no change_id was recorded"
                    ))
                } else {
                    EngineError::Internal(msg)
                });
            }
        };
        crash_point("complete:after-check");

        // Phase 3: one transaction records it all.
        let _op = self.op.lock().await;
        let mut disk = self.disk_record(backup_id, disk_id)?;
        let mut backup = self
            .catalog
            .backup(backup_id)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
        let now = now();
        disk.status = Status::Completed;
        disk.change_id = Some(change_id.clone());
        disk.digest = Some(digests.digest.to_string());
        disk.bytes_transferred = bytes;
        disk.size_on_disk = Some(size_on_disk);
        disk.completed_at = Some(now.clone());
        let head = ChainHead {
            vm_name: disk.vm_name.clone(),
            disk_id,
            chain_id: disk.chain_id.clone(),
            head_backup_id: backup_id.to_string(),
            head_change_id: change_id.clone(),
        };
        let others = self.catalog.disks_of(backup_id).map_err(cat)?;
        let all_done = others
            .iter()
            .all(|d| d.disk_id == disk_id || d.status == Status::Completed);
        let mut changes = vec![Change::PutDisk(disk.clone()), Change::PutHead(head)];
        if all_done && backup.status == Status::Running {
            backup.status = Status::Completed;
            backup.finished_at = Some(now.clone());
            changes.push(Change::PutBackup(backup.clone()));
        }
        self.catalog.apply(&changes).map_err(cat)?;
        crash_point("complete:after-commit");
        lock(&self.running).remove(&(backup_id.to_string(), disk_id));
        let abs = self.abs(&disk.image);
        if let Err(e) = repo::write_sidecar(&abs, &repo::Sidecar::new(&backup, &disk)) {
            warn!(error = %e, "sidecar update failed; recovery will rewrite it");
        }
        // Keep the other disks' sidecars in step with the backup's status.
        if backup.status == Status::Completed {
            for d in others.iter().filter(|d| d.disk_id != disk_id) {
                let _ = repo::write_sidecar(&self.abs(&d.image), &repo::Sidecar::new(&backup, d));
            }
        }
        if let Some(b) = bytes {
            self.bytes_received.fetch_add(b, Ordering::Relaxed);
        }
        if backup.status == Status::Completed {
            self.prune_soon(&backup.vm_name);
        }
        info!(change_id = %change_id, size_on_disk, "disk backup completed");
        Ok(CompleteResponse {
            status: "completed".into(),
            backup_id: backup_id.to_string(),
            disk_id,
            change_id,
            digest: disk.digest.clone(),
            message: if backup.status == Status::Completed {
                format!("disk {disk_id} completed; backup {backup_id} is complete")
            } else {
                format!("disk {disk_id} completed; the backup waits for its other disks")
            },
            timestamp: now,
            backup_status: backup.status,
        })
    }

    /// Remove the export (draining in-flight requests), flush and fsync the
    /// image, and check it. Returns its size on disk, or why it is not good.
    async fn seal(&self, export_name: &str, chain: Arc<Chain>) -> Result<u64, String> {
        if let Some(s) = &self.nbd {
            s.remove_export(export_name).await;
        }
        tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let path = chain.layers()[0].path().to_path_buf();
            chain
                .flush()
                .map_err(|e| format!("flushing {} failed: {e}", path.display()))?;
            drop(chain);
            let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            f.sync_all()
                .map_err(|e| format!("fsync of {} failed: {e}", path.display()))?;
            let report =
                chainvault_qcow::check(&path, &Default::default()).map_err(|e| e.to_string())?;
            if report.exit_code() != 0 {
                let first = report
                    .problems
                    .first()
                    .map(|p| p.message.clone())
                    .unwrap_or_default();
                return Err(format!(
                    "image {} failed its consistency check ({}): {first}",
                    path.display(),
                    report.summary().lines().next().unwrap_or("")
                ));
            }
            use std::os::unix::fs::MetadataExt;
            Ok(f.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        })
        .await
        .map_err(|e| format!("internal error: {e}"))?
    }

    // ------------------------------------------------------------------ fail

    pub async fn fail_backup(&self, backup_id: &str, reason: &str) -> EngineResult<BackupView> {
        let reason = if reason.trim().is_empty() {
            "failed by the client"
        } else {
            reason
        };
        {
            let _op = self.op.lock().await;
            let b = self
                .catalog
                .backup(backup_id)
                .map_err(cat)?
                .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
            if b.status == Status::Completed {
                return Err(EngineError::Conflict(format!(
                    "backup {backup_id} is completed: every disk is durable and recorded, so there is nothing to fail                      (DELETE it to remove it)"
                )));
            }
            self.fail_locked(backup_id, reason, Status::Failed).await?;
        }
        self.get_backup(backup_id)
    }

    /// Fail (or interrupt) every running disk of a backup, closing its export
    /// and removing its image, and mark the backup if it still runs. Disks
    /// being completed right now are left to finish. Caller holds `op`.
    pub(super) async fn fail_locked(
        &self,
        backup_id: &str,
        reason: &str,
        status: Status,
    ) -> EngineResult<()> {
        if self.catalog.backup(backup_id).map_err(cat)?.is_none() {
            return Err(EngineError::not_found("backup", backup_id));
        }
        let disks = self.catalog.disks_of(backup_id).map_err(cat)?;
        let mut ids = Vec::new();
        for d in &disks {
            if d.status != Status::Running {
                continue;
            }
            let r = {
                let running = lock(&self.running);
                running
                    .get(&(backup_id.to_string(), d.disk_id))
                    .map(|r| (r.export_name.clone(), r.completing))
            };
            if let Some((_, true)) = r {
                // Being completed right now: let that finish.
                continue;
            }
            if let (Some((name, _)), Some(s)) = (r, &self.nbd) {
                s.remove_export(&name).await;
            }
            lock(&self.running).remove(&(backup_id.to_string(), d.disk_id));
            ids.push(d.disk_id);
        }
        self.fail_disks(backup_id, &ids, reason, status)
    }

    /// Record disks as failed/interrupted, remove their images, and mark the
    /// backup (if it still runs). Does nothing when there is nothing to change.
    pub(super) fn fail_disks(
        &self,
        backup_id: &str,
        disk_ids: &[u32],
        reason: &str,
        status: Status,
    ) -> EngineResult<()> {
        let mut backup = self
            .catalog
            .backup(backup_id)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
        let now = now();
        let mut changes = Vec::new();
        for d in self.catalog.disks_of(backup_id).map_err(cat)? {
            if !disk_ids.contains(&d.disk_id) || d.status != Status::Running {
                continue;
            }
            repo::remove_point(&self.abs(&d.image));
            let mut d = d;
            d.status = status;
            d.error = Some(reason.to_string());
            d.completed_at = Some(now.clone());
            warn!(backup = %backup_id, disk = d.disk_id, status = status.as_str(), %reason, "disk backup ended without completing");
            changes.push(Change::PutDisk(d));
        }
        if backup.status == Status::Running {
            backup.status = status;
            backup.error = Some(reason.to_string());
            backup.finished_at = Some(now);
            changes.push(Change::PutBackup(backup));
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.catalog.apply(&changes).map_err(cat)
    }

    /// Fail disk backups idle for longer than the disk timeout.
    pub(super) async fn expire(&self) {
        let limit = self.cfg.disk_timeout.as_millis() as u64;
        let now = now_ms();
        let idle: Vec<(String, u32, u64)> = lock(&self.running)
            .iter()
            .filter(|(_, r)| !r.completing)
            .filter_map(|((b, d), r)| {
                let last = r.activity.last_ms.load(Ordering::Relaxed);
                (now.saturating_sub(last) > limit).then(|| (b.clone(), *d, now - last))
            })
            .collect();
        for (b, d, idle_ms) in idle {
            let reason = format!(
                "disk {d} timed out: no NBD activity and no completion for {:.0} s (disk timeout {:?})",
                idle_ms as f64 / 1000.0,
                self.cfg.disk_timeout
            );
            let _op = self.op.lock().await;
            if let Err(e) = self.fail_locked(&b, &reason, Status::Failed).await {
                warn!(backup = %b, error = %e, "could not fail a timed-out backup");
            }
        }
    }
}
