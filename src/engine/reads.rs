//! Reads of the catalog (change_ids, listings, chains), restore exports
//! (read-only NBD exports of one point) and the numbers for /metrics.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chainvault_qcow::Chain;

use super::{cat, lock, repo, validate_vm_name, Engine, EngineError, EngineResult, RestoreEntry};
use crate::export::QcowExport;
use crate::model::*;

impl Engine {
    // ---------------------------------------------------------------- reads

    pub fn previous_change_id(
        &self,
        vm_name: &str,
        disk_id: u32,
    ) -> EngineResult<ChangeIdResponse> {
        validate_vm_name(vm_name)?;
        let head = self.catalog.head(vm_name, disk_id).map_err(cat)?;
        if let Some(h) = &head {
            let bad = self.catalog.disk(&h.head_backup_id, disk_id).map_err(cat)?;
            if let Some(d) = bad.filter(|d| d.is_bad()) {
                return Ok(ChangeIdResponse {
                    vm_name: vm_name.to_string(),
                    disk_id,
                    change_id: String::new(),
                    backup_id: String::new(),
                    message: format!(
                        "the last backup of disk {disk_id} ({}) failed deep verify: the next backup is a full",
                        d.backup_id
                    ),
                });
            }
        }
        Ok(match head {
            Some(h) => ChangeIdResponse {
                vm_name: vm_name.to_string(),
                disk_id,
                change_id: h.head_change_id,
                backup_id: h.head_backup_id.clone(),
                message: format!("change_id of the last completed backup of disk {disk_id} ({})", h.head_backup_id),
            },
            None => ChangeIdResponse {
                vm_name: vm_name.to_string(),
                disk_id,
                change_id: String::new(),
                backup_id: String::new(),
                message: format!("no completed backup of disk {disk_id} of VM {vm_name:?}: the next backup is a full"),
            },
        })
    }

    pub fn list_backups(
        &self,
        vm_name: Option<&str>,
        status: Option<Status>,
    ) -> EngineResult<Vec<BackupView>> {
        let mut out = Vec::new();
        let backups = self.catalog.backups().map_err(cat)?;
        let wanted = |b: &BackupRecord| {
            vm_name.is_none_or(|v| v == b.vm_name) && status.is_none_or(|s| s == b.status)
        };
        if vm_name.is_some() || backups.len() < 64 {
            for b in backups.into_iter().filter(|b| wanted(b)) {
                let disks = self.catalog.disks_of(&b.backup_id).map_err(cat)?;
                out.push(BackupView { backup: b, disks });
            }
            return Ok(out);
        }
        // Many backups: one pass over all disk records (both trees are in
        // backup id order) instead of one lookup per backup.
        let mut disks = self
            .catalog
            .all_disks()
            .map_err(cat)?
            .into_iter()
            .peekable();
        for b in backups {
            let mut mine = Vec::new();
            while let Some(d) = disks.peek() {
                if d.backup_id < b.backup_id {
                    disks.next();
                } else if d.backup_id == b.backup_id {
                    mine.extend(disks.next());
                } else {
                    break;
                }
            }
            if wanted(&b) {
                out.push(BackupView {
                    backup: b,
                    disks: mine,
                });
            }
        }
        Ok(out)
    }

    pub fn get_backup(&self, backup_id: &str) -> EngineResult<BackupView> {
        let b = self
            .catalog
            .backup(backup_id)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
        let disks = self.catalog.disks_of(backup_id).map_err(cat)?;
        Ok(BackupView { backup: b, disks })
    }

    pub fn chain(&self, vm_name: &str, disk_id: u32) -> EngineResult<ChainView> {
        validate_vm_name(vm_name)?;
        let vm = self
            .catalog
            .vm(vm_name)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("VM", vm_name))?;
        if !vm.disks.iter().any(|d| d.disk_id == disk_id) {
            return Err(EngineError::not_found(
                "disk",
                format!("{disk_id} of VM {vm_name}"),
            ));
        }
        Ok(ChainView {
            vm_name: vm_name.to_string(),
            disk_id,
            head: self.catalog.head(vm_name, disk_id).map_err(cat)?,
            points: self.catalog.points_of(vm_name, disk_id).map_err(cat)?,
        })
    }

    // -------------------------------------------------------------- restores

    pub async fn open_restore(&self, req: RestoreRequest) -> EngineResult<RestoreView> {
        self.check_open()?;
        let d = self
            .catalog
            .disk(&req.backup_id, req.disk_id)
            .map_err(cat)?
            .ok_or_else(|| {
                EngineError::not_found(
                    "disk",
                    format!("{} of backup {}", req.disk_id, req.backup_id),
                )
            })?;
        if d.status != Status::Completed {
            return Err(EngineError::Conflict(format!(
                "disk {} of backup {} is {}, not a restore point",
                req.disk_id,
                req.backup_id,
                d.status.as_str()
            )));
        }
        if req.writable {
            return self.open_instant(&d).await;
        }
        // The earlier points of the same chain, nearest first: the export
        // offers `qemu:dirty-bitmap:since-<id>` for each (what changed since).
        let mut ancestors = Vec::new();
        let mut cur = d.parent_backup_id.clone();
        while let Some(p) = cur {
            if ancestors.len() >= 10_000 {
                break;
            }
            cur = self
                .catalog
                .disk(&p, d.disk_id)
                .map_err(cat)?
                .and_then(|x| x.parent_backup_id);
            ancestors.push(p);
        }
        let abs = self.abs(&d.image);
        let opts = self.chain_options(false);
        let (chain, dirty) = tokio::task::spawn_blocking(move || -> EngineResult<_> {
            let chain = Chain::open(&abs, &opts)?;
            let mut dirty = Vec::new();
            let mut acc: Vec<(u64, u64)> = Vec::new();
            for (k, id) in ancestors.iter().enumerate() {
                // Layer k is the point k levels above ancestor k.
                let own = crate::export::changed_ranges_of_layer(&chain, k)?;
                acc = super::space::union(&acc, &own);
                dirty.push((format!("since-{id}"), acc.clone()));
            }
            Ok((chain, dirty))
        })
        .await
        .map_err(EngineError::internal)??;
        let chain = Arc::new(chain);
        let size = chain.size();
        let restore_id = format!("r-{}", repo::random_hex(8));
        let name = format!("restore-{}", repo::random_hex(16));
        let export = QcowExport::new(
            chain,
            format!(
                "{} disk {} at {} (read-only)",
                d.vm_name, d.disk_id, d.backup_id
            ),
        )
        .with_dirty_bitmaps(dirty);
        self.server()?
            .add_unlisted_export(name.clone(), Arc::new(export))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let view = RestoreView {
            restore_id: restore_id.clone(),
            backup_id: req.backup_id.clone(),
            vm_name: d.vm_name.clone(),
            disk_id: req.disk_id,
            export_name: name.clone(),
            nbd_uri: self.export_uri(&name),
            size,
            created_at: now(),
            writable: false,
            overlay_bytes: None,
        };
        lock(&self.restores).insert(
            restore_id,
            RestoreEntry {
                view: view.clone(),
                chain: None,
            },
        );
        Ok(view)
    }

    /// Close a restore. An instant restore's overlay is discarded, or with
    /// `keep_as` first written out as a standalone image (its path returned).
    pub async fn close_restore(
        &self,
        restore_id: &str,
        keep_as: Option<&str>,
    ) -> EngineResult<Option<String>> {
        let writable = {
            let r = lock(&self.restores);
            let e = r
                .get(restore_id)
                .ok_or_else(|| EngineError::not_found("restore", restore_id))?;
            e.view.writable
        };
        if !writable && keep_as.is_some() {
            return Err(EngineError::BadRequest(
                "keep_as is for instant (writable) restores; a read-only restore has nothing to keep"
                    .into(),
            ));
        }
        if writable {
            if let Some(k) = keep_as {
                // Refuse a bad path before the export goes away.
                self.check_keep_as_path(k)?;
            }
        }
        let entry = lock(&self.restores)
            .remove(restore_id)
            .ok_or_else(|| EngineError::not_found("restore", restore_id))?;
        if writable {
            return self.close_instant(entry, keep_as).await;
        }
        if let Some(s) = &self.nbd {
            s.remove_export(&entry.view.export_name).await;
        }
        Ok(None)
    }

    /// Every open restore, instant ones with their overlay's size.
    pub fn restores(&self) -> Vec<RestoreView> {
        let mut v: Vec<RestoreView> = lock(&self.restores)
            .values()
            .map(|r| r.view.clone())
            .collect();
        for r in v.iter_mut().filter(|r| r.writable) {
            r.overlay_bytes = self.overlay_bytes(&r.restore_id);
        }
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        v
    }

    // --------------------------------------------------------------- metrics

    pub fn metrics(&self) -> Metrics {
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for s in ["running", "completed", "failed", "interrupted"] {
            counts.insert(s, 0);
        }
        if let Ok(all) = self.catalog.backups() {
            for b in all {
                *counts.entry(b.status.as_str()).or_default() += 1;
            }
        }
        let mut backups_by_status: Vec<(String, u64)> = counts
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        backups_by_status.sort();
        // One guard at a time: each count is read into a local first.
        let (live, running) = {
            let r = lock(&self.running);
            (
                r.values()
                    .map(|x| x.activity.bytes_written.load(Ordering::Relaxed))
                    .sum::<u64>(),
                r.len() as u64,
            )
        };
        let restores = lock(&self.restores).len() as u64;
        let usage = self.usage(None, false).ok();
        let mut verified = (0, 0, 0);
        for d in self.catalog.all_disks().unwrap_or_default() {
            if d.status == Status::Completed {
                match &d.deep_verify {
                    None => verified.0 += 1,
                    Some(v) if v.ok => verified.1 += 1,
                    Some(_) => verified.2 += 1,
                }
            }
        }
        Metrics {
            deep_verify: verified,
            backups_by_status,
            bytes_received: self.bytes_received.load(Ordering::Relaxed) + live,
            active_exports: running + restores,
            active_restores: restores,
            vms: usage
                .as_ref()
                .map(|u| {
                    u.vms
                        .iter()
                        .map(|v| (v.vm_name.clone(), v.bytes, v.points))
                        .collect()
                })
                .unwrap_or_default(),
            repository_bytes: usage.as_ref().map(|u| u.repository_bytes).unwrap_or(0),
            free_bytes: usage.as_ref().map(|u| u.free_bytes).unwrap_or(0),
        }
    }
}
