//! The chain depth limit: a policy's `max_chain_length`.
//!
//! When a completed backup leaves a disk's current chain longer than the
//! limit, the newest point (the chain head) is rewritten as a standalone full
//! image holding exactly the bytes it reads (a synthetic full), and a new
//! chain starts at it. No point is lost and none changes what it reads: the
//! head is a leaf, so nothing reads through it, and the older points keep
//! their chain as it was; retention removes them in its own time. The next
//! incremental then builds on a chain of one.
//!
//! Steps: the full is written under a hidden name beside the head, flushed,
//! fsynced and checked; a marker `journal/<id>-disk<N>.flatten` is written;
//! the full is renamed over the head's file (one atomic step: readers holding
//! the old file keep reading it, new opens see the full); one catalog
//! transaction then gives the point no parent and a new chain id, the sidecar
//! follows and the marker goes. A crash before the rename leaves a temporary
//! file (`chainvault gc` removes it); a crash after it leaves a head whose
//! file has no backing file while the catalog still names a parent, which
//! start-up recovery completes from the marker ([`Engine::finish_flattens`]):
//! start-up reads no image header unless a marker names it.

use std::sync::Arc;

use chainvault_qcow::create::create;
use chainvault_qcow::{check, Chain, CheckOptions, CreateOptions, ExtentKind, Image, OpenOptions};
use tracing::{info, warn};

use super::{cat, lock, repo, Engine, EngineError, EngineResult};
use crate::catalog::Change;
use crate::model::*;

/// `journal/<backup_id>-disk<N>.flatten`: written just before the rename,
/// removed after the catalog transaction; start-up looks only at these.
fn marker(data: &std::path::Path, backup_id: &str, disk_id: u32) -> std::path::PathBuf {
    super::lifecycle::journal_dir(data).join(format!("{backup_id}-disk{disk_id}.flatten"))
}

/// Copy every byte `chain` reads into the empty image `dst`.
pub(super) fn flatten_into(chain: &Chain, dst: &Image) -> chainvault_qcow::Result<()> {
    let size = chain.size();
    let mut buf = Vec::new();
    let mut off = 0u64;
    const WINDOW: u64 = 256 << 20;
    const PIECE: u64 = 4 << 20;
    while off < size {
        let win = (size - off).min(WINDOW);
        for e in chain.block_status(off, win)? {
            if e.kind != ExtentKind::Data {
                continue;
            }
            let mut p = e.offset;
            while p < e.offset + e.length {
                let n = (e.offset + e.length - p).min(PIECE) as usize;
                buf.resize(n, 0);
                chain.read_at(&mut buf[..n], p)?;
                if buf[..n].iter().any(|b| *b != 0) {
                    dst.write_at(&buf[..n], p)?;
                }
                p += n as u64;
            }
        }
        off += win;
    }
    dst.flush()
}

impl Engine {
    /// Length of the current chain of one disk: the head and its ancestors.
    fn chain_length(
        &self,
        vm: &str,
        disk_id: u32,
    ) -> EngineResult<Option<(DiskBackupRecord, usize)>> {
        let Some(h) = self.catalog.head(vm, disk_id).map_err(cat)? else {
            return Ok(None);
        };
        let Some(head) = self.catalog.disk(&h.head_backup_id, disk_id).map_err(cat)? else {
            return Ok(None);
        };
        let mut n = 1;
        let mut cur = head.parent_backup_id.clone();
        while let Some(p) = cur {
            n += 1;
            cur = self
                .catalog
                .disk(&p, disk_id)
                .map_err(cat)?
                .and_then(|d| d.parent_backup_id);
            if n > 1_000_000 {
                return Err(EngineError::Internal(format!(
                    "disk {disk_id} of VM {vm:?}: the chain's parents loop"
                )));
            }
        }
        Ok(Some((head, n)))
    }

    /// Apply the VM's depth limit to each of its disks (see the module docs).
    /// Returns the points rewritten as fulls.
    pub async fn enforce_depth(&self, vm: &str, max: u32) -> EngineResult<Vec<String>> {
        let mut done = Vec::new();
        let disks = self
            .catalog
            .vm(vm)
            .map_err(cat)?
            .map(|v| v.disks)
            .unwrap_or_default();
        for d in disks {
            let (head, chain_id, opts) = {
                let _op = self.op.lock().await;
                let Some((head, n)) = self.chain_length(vm, d.disk_id)? else {
                    continue;
                };
                if n <= max as usize || head.status != Status::Completed {
                    continue;
                }
                let mut m = lock(&self.merging);
                if m.contains(&head.backup_id) {
                    continue;
                }
                m.insert(head.backup_id.clone());
                info!(vm = %vm, disk = d.disk_id, backup = %head.backup_id, length = n, max, "the chain is longer than its limit: the newest point becomes a full");
                let opts = CreateOptions {
                    size: head.capacity_bytes,
                    cluster_size: self.cfg.cluster_size,
                    extended_l2: self.cfg.extended_l2,
                    refcount_bits: 16,
                    backing: None,
                };
                (head, format!("c-{}", repo::random_hex(6)), opts)
            };
            let res = self.flatten(&head, opts).await;
            lock(&self.merging).remove(&head.backup_id);
            match res {
                Ok(()) => {
                    self.finish_flatten(&head.backup_id, head.disk_id, &chain_id, max)
                        .await?;
                    done.push(head.backup_id.clone());
                }
                Err(e) => {
                    warn!(backup = %head.backup_id, error = %e, "the depth limit could not rewrite the newest point; the chain stays as it is");
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Write the full beside the head and rename it over the head's file.
    async fn flatten(&self, head: &DiskBackupRecord, opts: CreateOptions) -> EngineResult<()> {
        let img = self.abs(&head.image);
        let tmp = img.with_file_name(format!(".flatten-{}.qcow2.tmp", head.backup_id));
        let chain_opts = self.chain_options(false);
        let mark = marker(&self.data, &head.backup_id, head.disk_id);
        tokio::task::spawn_blocking(move || -> EngineResult<()> {
            let _ = std::fs::remove_file(&tmp);
            let chain = Arc::new(Chain::open(&img, &chain_opts)?);
            create(&tmp, &opts)?;
            let res = (|| -> EngineResult<()> {
                let dst = Image::open(
                    &tmp,
                    &OpenOptions {
                        writable: true,
                        ..Default::default()
                    },
                )?;
                flatten_into(&chain, &dst)?;
                drop(dst);
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(EngineError::internal)?;
                let rep = check(&tmp, &CheckOptions::default())?;
                if rep.exit_code() != 0 {
                    return Err(EngineError::Internal(format!(
                        "the full written for {} does not check clean",
                        img.display()
                    )));
                }
                if let Some(dir) = mark.parent() {
                    std::fs::create_dir_all(dir).map_err(EngineError::internal)?;
                }
                repo::write_atomic(&mark, b"{}").map_err(EngineError::internal)?;
                // The head's block digests become a whole file: true of the
                // chain it reads now and of the full that replaces it.
                crate::digest::file::write_whole(
                    &img,
                    &crate::digest::compute::layer_paths(&chain),
                    chain.size(),
                )
                .map_err(EngineError::Internal)?;
                super::crash_point("depth:before-rename");
                std::fs::rename(&tmp, &img).map_err(EngineError::internal)?;
                if let Some(dir) = img.parent() {
                    repo::sync_dir(dir).map_err(EngineError::internal)?;
                }
                Ok(())
            })();
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res
        })
        .await
        .map_err(EngineError::internal)?
    }

    /// Remove the marker of a finished rewrite.
    fn clear_marker(&self, backup_id: &str, disk_id: u32) {
        let m = marker(&self.data, backup_id, disk_id);
        match std::fs::remove_file(&m) {
            Ok(()) => {
                if let Some(d) = m.parent() {
                    let _ = repo::sync_dir(d);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %m.display(), error = %e, "cannot remove a depth-limit marker"),
        }
    }

    /// The catalog side of a flatten: the point has no parent and starts
    /// `chain_id`; points built on it meanwhile follow.
    async fn finish_flatten(
        &self,
        backup_id: &str,
        disk_id: u32,
        chain_id: &str,
        max: u32,
    ) -> EngineResult<()> {
        super::crash_point("depth:after-rename");
        let _op = self.op.lock().await;
        self.flatten_catalog(backup_id, disk_id, chain_id, Some(max))?;
        self.clear_marker(backup_id, disk_id);
        Ok(())
    }

    fn flatten_catalog(
        &self,
        backup_id: &str,
        disk_id: u32,
        chain_id: &str,
        max: Option<u32>,
    ) -> EngineResult<()> {
        let Some(mut d) = self.catalog.disk(backup_id, disk_id).map_err(cat)? else {
            return Ok(());
        };
        let old_chain = d.chain_id.clone();
        d.parent_backup_id = None;
        d.chain_id = chain_id.to_string();
        d.reason = Some(match max {
            Some(m) => format!("rewritten as a full: the chain passed its limit of {m} points"),
            None => "rewritten as a full (depth limit; finished at start-up)".into(),
        });
        d.size_on_disk = Some(super::space::allocated(&self.abs(&d.image)));
        let mut changes = vec![Change::PutDisk(d.clone())];
        for c in self.catalog.points_of(&d.vm_name, disk_id).map_err(cat)? {
            if c.parent_backup_id.as_deref() == Some(backup_id) && c.chain_id == old_chain {
                let mut c = c;
                c.chain_id = chain_id.to_string();
                changes.push(Change::PutDisk(c));
            }
        }
        if let Some(mut h) = self.catalog.head(&d.vm_name, disk_id).map_err(cat)? {
            if h.chain_id == old_chain {
                h.chain_id = chain_id.to_string();
                changes.push(Change::PutHead(h));
            }
        }
        self.catalog.apply(&changes).map_err(cat)?;
        if let Some(b) = self.catalog.backup(backup_id).map_err(cat)? {
            let _ = repo::write_sidecar(&self.abs(&d.image), &repo::Sidecar::new(&b, &d));
        }
        Ok(())
    }

    /// Start-up: each marker names a rewrite a stop cut off. Its point's
    /// file with no backing file while the catalog still names a parent was
    /// renamed: the catalog's side is finished. Otherwise the rename never
    /// happened and the marker simply goes (the temporary file is for gc).
    pub(super) fn finish_flattens(&self) -> EngineResult<()> {
        let Ok(rd) = std::fs::read_dir(super::lifecycle::journal_dir(&self.data)) else {
            return Ok(());
        };
        let mut marks: Vec<std::path::PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "flatten"))
            .collect();
        marks.sort();
        for m in marks {
            let stem = m
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((backup_id, disk_id)) = stem
                .rsplit_once("-disk")
                .and_then(|(b, n)| n.parse::<u32>().ok().map(|n| (b.to_string(), n)))
            else {
                warn!(path = %m.display(), "a depth-limit marker with an unreadable name: ignored");
                continue;
            };
            if let Some(d) = self.catalog.disk(&backup_id, disk_id).map_err(cat)? {
                let abs = self.abs(&d.image);
                let renamed = d.status == Status::Completed
                    && d.parent_backup_id.is_some()
                    && chainvault_qcow::chain::read_header(&abs)
                        .is_ok_and(|h| h.backing_file.is_none());
                if renamed {
                    warn!(backup = %d.backup_id, disk = d.disk_id, "finishing a depth-limit rewrite a stop interrupted");
                    let chain_id = format!("c-{}", repo::random_hex(6));
                    self.flatten_catalog(&d.backup_id, d.disk_id, &chain_id, None)?;
                }
            }
            self.clear_marker(&backup_id, disk_id);
        }
        Ok(())
    }
}
