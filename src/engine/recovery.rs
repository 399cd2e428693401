//! Verify (catalog against files), start-up recovery, and rebuilding the
//! catalog from the sidecars alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chainvault_qcow::Chain;
use tracing::{info, warn};

use super::lifecycle;
use super::{cat, repo, Engine, EngineError, EngineResult, RebuildReport};
use crate::catalog::{Catalog, Change};
use crate::model::*;

impl Engine {
    // ---------------------------------------------------------------- verify

    /// Check every completed point: image consistency, backing links, and
    /// agreement between catalog, sidecar and file.
    pub fn verify(&self, vm_name: Option<&str>) -> EngineResult<VerifyReport> {
        let mut rep = VerifyReport::default();
        let all = self.catalog.all_disks().map_err(cat)?;
        for d in all
            .iter()
            .filter(|d| vm_name.is_none_or(|v| v == d.vm_name))
        {
            let abs = self.abs(&d.image);
            let what = format!("{} disk {} backup {}", d.vm_name, d.disk_id, d.backup_id);
            if d.status != Status::Completed {
                if abs.exists() && d.status != Status::Running {
                    rep.problems.push(format!(
                        "{what}: {} but its image {} still exists",
                        d.status.as_str(),
                        abs.display()
                    ));
                }
                continue;
            }
            rep.points_checked += 1;
            if !abs.exists() {
                rep.problems
                    .push(format!("{what}: image {} is missing", abs.display()));
                continue;
            }
            match chainvault_qcow::check(&abs, &Default::default()) {
                Ok(r) if r.exit_code() == 0 => {}
                Ok(r) => rep.problems.push(format!(
                    "{what}: {}",
                    r.summary().lines().next().unwrap_or("check failed")
                )),
                Err(e) => rep.problems.push(format!("{what}: {e}")),
            }
            match chainvault_qcow::chain::read_header(&abs) {
                Ok(h) => {
                    let want = d.parent_backup_id.as_ref().map(|p| format!("{p}.qcow2"));
                    if h.backing_file != want {
                        rep.problems.push(format!(
                            "{what}: backing file is {:?}, the catalog says {:?}",
                            h.backing_file, want
                        ));
                    }
                }
                Err(e) => rep.problems.push(format!("{what}: {e}")),
            }
            if let Err(e) = Chain::open(&abs, &self.chain_options(false)) {
                rep.problems
                    .push(format!("{what}: chain does not open: {e}"));
            }
            if let Some(p) = &d.parent_backup_id {
                match self.catalog.disk(p, d.disk_id).map_err(cat)? {
                    Some(pd) if pd.status == Status::Completed => {}
                    Some(pd) => rep
                        .problems
                        .push(format!("{what}: parent {p} is {}", pd.status.as_str())),
                    None => rep
                        .problems
                        .push(format!("{what}: parent {p} is not in the catalog")),
                }
            }
            match repo::read_sidecar(&repo::sidecar_of(&abs)) {
                Ok(s) => {
                    let sd = &s.disk;
                    if sd.status != d.status
                        || sd.change_id != d.change_id
                        || sd.parent_backup_id != d.parent_backup_id
                        || sd.chain_id != d.chain_id
                    {
                        rep.problems.push(format!(
                            "{what}: sidecar disagrees with the catalog (sidecar: {} {:?}, catalog: {} {:?})",
                            sd.status.as_str(),
                            sd.change_id,
                            d.status.as_str(),
                            d.change_id
                        ));
                    }
                }
                Err(e) => rep.problems.push(format!("{what}: {e}")),
            }
        }
        for h in self.catalog.heads().map_err(cat)? {
            if vm_name.is_some_and(|v| v != h.vm_name) {
                continue;
            }
            match self
                .catalog
                .disk(&h.head_backup_id, h.disk_id)
                .map_err(cat)?
            {
                Some(d)
                    if d.status == Status::Completed
                        && d.change_id.as_deref() == Some(h.head_change_id.as_str()) => {}
                _ => rep.problems.push(format!(
                    "{} disk {}: chain head {} is not a completed point with change_id {:?}",
                    h.vm_name, h.disk_id, h.head_backup_id, h.head_change_id
                )),
            }
        }
        // Files no record or journal accounts for (engine/space.rs).
        let scope = vm_name.map(|v| format!("vms/{}/", repo::encode_vm(v)));
        for o in self.orphans()? {
            if scope
                .as_ref()
                .is_none_or(|s| o.path.starts_with(s.as_str()))
            {
                rep.problems.push(format!(
                    "orphan {} ({}, {} bytes): `chainvault gc` removes it",
                    o.path, o.reason, o.bytes
                ));
            }
        }
        Ok(rep)
    }

    // -------------------------------------------------------------- recovery

    /// After a crash or stop: running jobs become interrupted and their images
    /// are removed; completed points are kept and their sidecars brought up to date.
    pub(super) fn recover(&self) -> EngineResult<()> {
        // Removals a crash cut off are finished first (engine/lifecycle.rs).
        self.finish_journals()?;
        // A depth-limit rewrite cut off between its rename and its catalog
        // transaction (engine/depth.rs).
        self.finish_flattens()?;
        for b in self.catalog.backups().map_err(cat)? {
            if b.status != Status::Running {
                continue;
            }
            let running: Vec<u32> = self
                .catalog
                .disks_of(&b.backup_id)
                .map_err(cat)?
                .iter()
                .filter(|d| d.status == Status::Running)
                .map(|d| d.disk_id)
                .collect();
            warn!(backup = %b.backup_id, vm = %b.vm_name, "backup was running when the daemon stopped: marking it interrupted");
            self.fail_disks(
                &b.backup_id,
                &running,
                "interrupted: the daemon stopped while it ran",
                Status::Interrupted,
            )?;
        }
        // Sidecars of completed points follow the catalog (a crash may fall
        // between the catalog transaction and the sidecar update).
        for d in self.catalog.all_disks().map_err(cat)? {
            let abs = self.abs(&d.image);
            if d.status != Status::Completed || !abs.exists() {
                continue;
            }
            let stale = match repo::read_sidecar(&repo::sidecar_of(&abs)) {
                Ok(s) => {
                    let b = self.catalog.backup(&d.backup_id).map_err(cat)?;
                    s.disk.status != d.status
                        || s.disk.change_id != d.change_id
                        || s.disk.parent_backup_id != d.parent_backup_id
                        || b.is_some_and(|b| {
                            b.protected != s.backup.protected || b.note != s.backup.note
                        })
                }
                Err(_) => true,
            };
            if stale {
                if let Some(b) = self.catalog.backup(&d.backup_id).map_err(cat)? {
                    info!(image = %abs.display(), "bringing the sidecar up to date with the catalog");
                    let _ = repo::write_sidecar(&abs, &repo::Sidecar::new(&b, &d));
                }
            }
        }
        // Images whose start never reached the catalog.
        let known: std::collections::HashSet<PathBuf> = self
            .catalog
            .all_disks()
            .map_err(cat)?
            .iter()
            .map(|d| self.abs(&d.image))
            .collect();
        for img in repo::all_images(&self.data) {
            if known.contains(&img) {
                continue;
            }
            let sc = repo::read_sidecar(&repo::sidecar_of(&img));
            if matches!(&sc, Ok(s) if s.disk.status == Status::Running) {
                warn!(image = %img.display(), "removing an image whose backup never started");
                repo::remove_point(&img);
            }
        }
        Ok(())
    }

    /// Rebuild the catalog from the sidecars in the repository directory alone
    /// (the daemon must not be running). Returns what was found.
    pub fn rebuild_catalog(data_dir: &Path) -> EngineResult<RebuildReport> {
        let data = data_dir.canonicalize().map_err(|e| {
            EngineError::BadRequest(format!("data directory {}: {e}", data_dir.display()))
        })?;
        let mut rep = RebuildReport::default();
        // A removal a crash cut off is finished on the files first, so the
        // sidecars say what the catalog will.
        for (p, j) in lifecycle::pending(&data) {
            let j = j.map_err(EngineError::Internal)?;
            lifecycle::finish_files(&data, &p, &j).map_err(|e| {
                EngineError::Internal(format!("cannot finish the journal {}: {e}", p.display()))
            })?;
        }
        let mut points: Vec<repo::Sidecar> = Vec::new();
        for sc in repo::all_sidecars(&data) {
            match repo::read_sidecar(&sc) {
                Ok(s)
                    if s.disk.status == Status::Completed
                        && sc.with_extension("qcow2").exists() =>
                {
                    points.push(s)
                }
                Ok(s) => rep.skipped.push(format!(
                    "{}: status {}",
                    sc.display(),
                    s.disk.status.as_str()
                )),
                Err(e) => rep.skipped.push(e),
            }
        }
        let cat_dir = data.join("catalog");
        if cat_dir.exists() {
            // Make sure no daemon holds it, then keep it aside.
            drop(Catalog::open(&cat_dir).map_err(|e| EngineError::Conflict(e.to_string()))?);
            let aside = data.join(format!("catalog.replaced-{}", repo::new_backup_id()));
            std::fs::rename(&cat_dir, &aside).map_err(EngineError::internal)?;
            rep.skipped.push(format!(
                "the previous catalog was moved to {}",
                aside.display()
            ));
        }
        let catalog = Catalog::open(&cat_dir).map_err(cat)?;
        let mut vms: HashMap<String, VmRecord> = HashMap::new();
        let mut backups: HashMap<String, BackupRecord> = HashMap::new();
        let mut changes = Vec::new();
        for p in &points {
            let vm = vms
                .entry(p.disk.vm_name.clone())
                .or_insert_with(|| VmRecord {
                    name: p.disk.vm_name.clone(),
                    disks: Vec::new(),
                    created_at: p.backup.created_at.clone(),
                });
            if let Some(d) = vm.disks.iter_mut().find(|d| d.disk_id == p.disk.disk_id) {
                // The newest point's capacity wins (points are in id order).
                d.capacity_bytes = p.disk.capacity_bytes;
            } else {
                vm.disks.push(VmDisk {
                    disk_id: p.disk.disk_id,
                    disk_key: p.disk.disk_key.clone(),
                    capacity_bytes: p.disk.capacity_bytes,
                });
            }
            backups
                .entry(p.backup.backup_id.clone())
                .or_insert_with(|| p.backup.clone());
            changes.push(Change::PutDisk(p.disk.clone()));
            rep.disk_backups += 1;
        }
        for b in backups.values_mut() {
            let done = points
                .iter()
                .filter(|p| p.disk.backup_id == b.backup_id)
                .count();
            b.status = if done == b.disk_ids.len() {
                Status::Completed
            } else {
                Status::Failed
            };
            if b.status == Status::Failed && b.error.is_none() {
                b.error = Some("rebuilt from sidecars: some disks have no completed point".into());
            }
            changes.push(Change::PutBackup(b.clone()));
        }
        // Heads: the newest completed point of each disk.
        let mut heads: HashMap<(String, u32), &repo::Sidecar> = HashMap::new();
        for p in &points {
            let k = (p.disk.vm_name.clone(), p.disk.disk_id);
            let newer = heads
                .get(&k)
                .is_none_or(|h| h.disk.backup_id < p.disk.backup_id);
            if newer {
                heads.insert(k, p);
            }
        }
        for p in heads.values() {
            changes.push(Change::PutHead(ChainHead {
                vm_name: p.disk.vm_name.clone(),
                disk_id: p.disk.disk_id,
                chain_id: p.disk.chain_id.clone(),
                head_backup_id: p.disk.backup_id.clone(),
                head_change_id: p.disk.change_id.clone().unwrap_or_default(),
            }));
        }
        for mut v in vms.into_values() {
            v.disks.sort_by_key(|d| d.disk_id);
            changes.push(Change::PutVm(v));
            rep.vms += 1;
        }
        rep.backups = backups.len() as u64;
        rep.chains = heads.len() as u64;
        catalog.apply(&changes).map_err(cat)?;
        Ok(rep)
    }
}
