//! Instant recovery: a point served read-write over NBD through a scratch
//! overlay whose backing file is the point, so a hypervisor can boot the VM
//! from its backup at once while the point itself never changes.
//!
//! ```text
//! <data>/instant/<restore_id>-disk<N>.qcow2   the overlay (backing file: the point's image)
//! <data>/instant/<restore_id>.json            what it is: the point, the export's name
//! ```
//!
//! The record is written (atomically) after the overlay exists and before
//! the export is added; at start the daemon adds every recorded export again
//! under the same name, so a hypervisor reconnects to the same URI. Closing
//! removes the export (draining requests), flushes the overlay, optionally
//! writes the point with the overlay's writes merged in as a standalone
//! image (`keep_as`), then removes the record and the overlay. A point with
//! an instant restore is not removed (delete and prune answer 409), also by
//! a command that opens the repository without the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chainvault_qcow::create::create;
use chainvault_qcow::{
    check, BackingFormat, BackingSpec, Chain, CheckOptions, CreateOptions, Image, OpenOptions,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{lock, repo, Engine, EngineError, EngineResult, RestoreEntry};
use crate::export::QcowExport;
use crate::model::*;

/// What `<data>/instant/<restore_id>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstantRecord {
    /// Always "chainvault-instant-restore".
    pub kind: String,
    pub version: u32,
    pub restore_id: String,
    pub backup_id: String,
    pub disk_id: u32,
    pub vm_name: String,
    pub export_name: String,
    /// The overlay, relative to the repository.
    pub overlay: String,
    pub size: u64,
    pub created_at: String,
}

pub fn instant_dir(data: &Path) -> PathBuf {
    data.join("instant")
}

/// Every instant restore recorded in the repository.
pub fn records(data: &Path) -> Vec<InstantRecord> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(instant_dir(data)) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<InstantRecord>(&b).map_err(|e| e.to_string())
            }) {
                Ok(r) => out.push(r),
                Err(e) => {
                    warn!(path = %p.display(), error = %e, "unreadable instant restore record")
                }
            }
        }
    }
    out.sort_by(|a, b| a.restore_id.cmp(&b.restore_id));
    out
}

impl Engine {
    /// Open a writable instant restore of one disk of a point.
    pub(super) async fn open_instant(&self, d: &DiskBackupRecord) -> EngineResult<RestoreView> {
        let server = self.server()?;
        // Under the engine lock: a gc (which takes it) never sees the
        // overlay before its record exists.
        let _op = self.op.lock().await;
        let restore_id = format!("r-{}", repo::random_hex(8));
        let name = format!("instant-{}", repo::random_hex(16));
        let dir = instant_dir(&self.data);
        std::fs::create_dir_all(&dir).map_err(EngineError::internal)?;
        let overlay_rel = format!("instant/{restore_id}-disk{}.qcow2", d.disk_id);
        let overlay = self.data.join(&overlay_rel);
        let backing = format!("../{}", d.image);
        let opts = CreateOptions {
            size: d.capacity_bytes,
            cluster_size: self.cfg.cluster_size,
            extended_l2: self.cfg.extended_l2,
            refcount_bits: 16,
            backing: Some(BackingSpec {
                name: backing,
                format: BackingFormat::Qcow2,
            }),
        };
        create(&overlay, &opts)?;
        let chain = match Chain::open(&overlay, &self.chain_options(true)) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let _ = std::fs::remove_file(&overlay);
                return Err(e.into());
            }
        };
        let rec = InstantRecord {
            kind: "chainvault-instant-restore".into(),
            version: 1,
            restore_id: restore_id.clone(),
            backup_id: d.backup_id.clone(),
            disk_id: d.disk_id,
            vm_name: d.vm_name.clone(),
            export_name: name.clone(),
            overlay: overlay_rel,
            size: chain.size(),
            created_at: now(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).map_err(EngineError::internal)?;
        if let Err(e) = repo::write_atomic(&dir.join(format!("{restore_id}.json")), &bytes) {
            let _ = std::fs::remove_file(&overlay);
            return Err(EngineError::Internal(format!(
                "cannot record the instant restore: {e}"
            )));
        }
        let view = self.add_instant_export(server, &rec, chain)?;
        info!(restore = %restore_id, backup = %d.backup_id, disk = d.disk_id, "instant restore opened (writable)");
        Ok(view)
    }

    fn add_instant_export(
        &self,
        server: &chainvault_nbd::Server,
        rec: &InstantRecord,
        chain: Arc<Chain>,
    ) -> EngineResult<RestoreView> {
        let export = QcowExport::new(
            chain.clone(),
            format!(
                "{} disk {} at {} (instant restore, writable overlay)",
                rec.vm_name, rec.disk_id, rec.backup_id
            ),
        );
        server
            .add_unlisted_export(rec.export_name.clone(), Arc::new(export))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let view = RestoreView {
            restore_id: rec.restore_id.clone(),
            backup_id: rec.backup_id.clone(),
            vm_name: rec.vm_name.clone(),
            disk_id: rec.disk_id,
            export_name: rec.export_name.clone(),
            nbd_uri: self.export_uri(&rec.export_name),
            size: rec.size,
            created_at: rec.created_at.clone(),
            writable: true,
            overlay_bytes: None,
        };
        lock(&self.restores).insert(
            rec.restore_id.clone(),
            RestoreEntry {
                view: view.clone(),
                chain: Some(chain),
            },
        );
        Ok(view)
    }

    /// At start: serve every recorded instant restore again, under its name.
    pub(super) fn reopen_instants(&self) {
        let Ok(server) = self.server() else { return };
        for rec in records(&self.data) {
            let overlay = self.data.join(&rec.overlay);
            let res = Chain::open(&overlay, &self.chain_options(true))
                .map_err(EngineError::from)
                .and_then(|c| self.add_instant_export(server, &rec, Arc::new(c)));
            match res {
                Ok(_) => {
                    info!(restore = %rec.restore_id, backup = %rec.backup_id, "instant restore served again")
                }
                Err(e) => {
                    warn!(restore = %rec.restore_id, error = %e, "cannot serve an instant restore again; its overlay is kept in instant/")
                }
            }
        }
    }

    /// Close an instant restore: the export goes, the overlay is flushed,
    /// kept as a standalone image at `keep_as` if asked, and removed.
    pub(super) async fn close_instant(
        &self,
        entry: RestoreEntry,
        keep_as: Option<&str>,
    ) -> EngineResult<Option<String>> {
        let keep = match keep_as {
            None => None,
            Some(k) => Some(self.check_keep_as(k)?),
        };
        if let Some(s) = &self.nbd {
            s.remove_export(&entry.view.export_name).await;
        }
        let chain = entry.chain.clone();
        if let Some(c) = &chain {
            c.flush()?;
        }
        drop(chain);
        let rec_path = instant_dir(&self.data).join(format!("{}.json", entry.view.restore_id));
        let overlay = records(&self.data)
            .into_iter()
            .find(|r| r.restore_id == entry.view.restore_id)
            .map(|r| self.data.join(r.overlay));
        let mut kept = None;
        if let (Some(path), Some(ov)) = (keep, &overlay) {
            let opts = CreateOptions {
                size: entry.view.size,
                cluster_size: 64 << 10,
                extended_l2: false,
                refcount_bits: 16,
                backing: None,
            };
            let (ov, path2, chain_opts) = (ov.clone(), path.clone(), self.chain_options(false));
            tokio::task::spawn_blocking(move || -> EngineResult<()> {
                let chain = Chain::open(&ov, &chain_opts)?;
                let tmp = path2.with_file_name(format!(
                    ".{}.tmp",
                    path2
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                create(&tmp, &opts)?;
                let res = (|| -> EngineResult<()> {
                    let dst = Image::open(
                        &tmp,
                        &OpenOptions {
                            writable: true,
                            ..Default::default()
                        },
                    )?;
                    super::depth::flatten_into(&chain, &dst)?;
                    drop(dst);
                    std::fs::File::open(&tmp)
                        .and_then(|f| f.sync_all())
                        .map_err(EngineError::internal)?;
                    let rep = check(&tmp, &CheckOptions::default())?;
                    if rep.exit_code() != 0 {
                        return Err(EngineError::Internal(format!(
                            "the kept image {} does not check clean",
                            path2.display()
                        )));
                    }
                    std::fs::rename(&tmp, &path2).map_err(EngineError::internal)
                })();
                if res.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                res
            })
            .await
            .map_err(EngineError::internal)??;
            kept = Some(path.display().to_string());
        }
        let _ = std::fs::remove_file(&rec_path);
        if let Some(ov) = overlay {
            let _ = std::fs::remove_file(ov);
        }
        let _ = repo::sync_dir(&instant_dir(&self.data));
        info!(restore = %entry.view.restore_id, kept = ?kept, "instant restore closed");
        Ok(kept)
    }

    pub(super) fn check_keep_as_path(&self, k: &str) -> EngineResult<()> {
        self.check_keep_as(k).map(|_| ())
    }

    /// `keep_as` must be a new file outside the repository, in an existing directory.
    fn check_keep_as(&self, k: &str) -> EngineResult<PathBuf> {
        let p = PathBuf::from(k);
        if !p.is_absolute() {
            return Err(EngineError::BadRequest(format!(
                "keep_as {k:?}: give an absolute path on the daemon's machine"
            )));
        }
        if p.exists() {
            return Err(EngineError::BadRequest(format!(
                "keep_as {k:?} exists; choose a new file name"
            )));
        }
        let parent = p.parent().unwrap_or(Path::new("/"));
        let parent = parent.canonicalize().map_err(|e| {
            EngineError::BadRequest(format!(
                "keep_as {k:?}: the directory {} does not exist ({e})",
                parent.display()
            ))
        })?;
        if parent.starts_with(&self.data) {
            return Err(EngineError::BadRequest(format!(
                "keep_as {k:?} is inside the repository; keep the image somewhere else"
            )));
        }
        Ok(parent.join(p.file_name().unwrap_or_default()))
    }

    /// The instant restores that hold `backup_id` (from the repository's
    /// records, so that a command without the daemon sees them too).
    pub(super) fn instant_restores_of(&self, backup_id: &str) -> Vec<String> {
        records(&self.data)
            .into_iter()
            .filter(|r| r.backup_id == backup_id)
            .map(|r| r.restore_id)
            .collect()
    }

    /// Bytes an open restore's overlay occupies.
    pub(super) fn overlay_bytes(&self, restore_id: &str) -> Option<u64> {
        records(&self.data)
            .into_iter()
            .find(|r| r.restore_id == restore_id)
            .map(|r| super::space::allocated(&self.data.join(r.overlay)))
    }
}
