//! The engine: the one place that creates images, links chains, records
//! change_ids, fails, expires, recovers, removes and consolidates. Handlers and the CLI call
//! it; nothing else writes state.
//!
//! # The life of a disk backup
//!
//! 1. **start**: the engine decides the disk's mode (full, or an overlay on the
//!    chain head), creates the image and its sidecar, records the backup and
//!    its disks in one catalog transaction, and opens a writable NBD export
//!    with an unguessable name.
//! 2. **complete**: the export is removed (new requests refused, in-flight ones
//!    drained), the image is flushed and fsynced, `check` must pass, and then
//!    one catalog transaction marks the disk completed, stores its change_id
//!    and bytes_transferred, and advances the chain head. The sidecar follows.
//! 3. **fail / timeout / shutdown / crash**: the disk's export is removed and
//!    its image deleted; it is never listed as a restore point. Completed disks
//!    are never touched.

mod depth;
mod error;
pub mod import;
pub mod lifecycle;
pub mod prune;
pub mod repo;
pub mod retention;
pub mod space;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chainvault_nbd::{ListenAddr, Server, ServerConfig};
use chainvault_qcow::create::create;
use chainvault_qcow::{BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions};
pub use error::{EngineError, EngineResult};
use tracing::{info, info_span, warn, Instrument};

use crate::catalog::{Catalog, CatalogError, Change};
use crate::export::{now_ms, Activity, QcowExport};
use crate::model::*;

/// Where the daemon keeps things and how it serves NBD.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Repository root: the catalog and the images live under it.
    pub data_dir: PathBuf,
    /// NBD listener: a TCP address (loopback by default) ...
    pub nbd_listen: Option<std::net::SocketAddr>,
    /// ... or a unix socket.
    pub nbd_socket: Option<PathBuf>,
    /// A disk backup with no NBD activity and no completion for this long is failed.
    pub disk_timeout: Duration,
    /// Cluster size of new images.
    pub cluster_size: u64,
    /// Extended L2 (subclusters) in new images.
    pub extended_l2: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from("chainvault-data"),
            nbd_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 10809))),
            nbd_socket: None,
            disk_timeout: Duration::from_secs(3600),
            cluster_size: 128 << 10,
            extended_l2: true,
        }
    }
}

/// What a catalog rebuild found.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct RebuildReport {
    pub vms: u64,
    pub backups: u64,
    pub disk_backups: u64,
    pub chains: u64,
    pub skipped: Vec<String>,
}

/// A disk backup being written.
struct RunningDisk {
    export_name: String,
    chain: Arc<Chain>,
    activity: Arc<Activity>,
    completing: bool,
}

struct RestoreEntry {
    view: RestoreView,
}

/// The backup engine (state lives in the catalog and the repository directory).
pub struct Engine {
    cfg: EngineConfig,
    data: PathBuf,
    catalog: Catalog,
    nbd: Option<Server>,
    nbd_addr: Option<ListenAddr>,
    /// Serialises state changes (short sections; heavy I/O happens outside).
    op: tokio::sync::Mutex<()>,
    running: Mutex<HashMap<(String, u32), RunningDisk>>,
    restores: Mutex<HashMap<String, RestoreEntry>>,
    /// Backups whose files a removal is consolidating right now.
    merging: Mutex<std::collections::HashSet<String>>,
    /// One prune at a time.
    prune_lock: tokio::sync::Mutex<()>,
    /// VMs whose policy is applied at the next turn of the prune task.
    prune_due: Mutex<std::collections::HashSet<String>>,
    /// When each VM's scheduled prune last ran (seconds since the epoch).
    schedule_runs: Mutex<HashMap<String, i64>>,
    bytes_received: AtomicU64,
    shutting_down: AtomicBool,
}

fn cat(e: CatalogError) -> EngineError {
    EngineError::Internal(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Abort the process at a named point when `CHAINVAULT_CRASH_AT` says so
/// (fault injection for the crash tests).
fn crash_point(name: &str) {
    if std::env::var("CHAINVAULT_CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("chainvault: CHAINVAULT_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
}

fn validate_vm_name(name: &str) -> EngineResult<()> {
    if name.trim().is_empty() {
        return Err(EngineError::BadRequest(
            "vm_name is required and must not be empty".into(),
        ));
    }
    if name.len() > 255 || name.chars().any(|c| c.is_control()) {
        return Err(EngineError::BadRequest(
            "vm_name must be at most 255 bytes without control characters".into(),
        ));
    }
    Ok(())
}

impl Engine {
    fn open_catalog(data: &Path) -> EngineResult<Catalog> {
        Catalog::open(&data.join("catalog")).map_err(|e| match e {
            CatalogError::Locked { .. } => EngineError::Conflict(e.to_string()),
            other => cat(other),
        })
    }

    /// Open the repository, recover from any crash, and start the NBD listener.
    pub async fn open(cfg: EngineConfig) -> EngineResult<Arc<Engine>> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            EngineError::Internal(format!(
                "cannot create data directory {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        let data = cfg.data_dir.canonicalize().map_err(|e| {
            EngineError::Internal(format!("data directory {}: {e}", cfg.data_dir.display()))
        })?;
        let catalog = Engine::open_catalog(&data)?;
        let server = Server::new(ServerConfig::default());
        let nbd_addr = match (&cfg.nbd_socket, cfg.nbd_listen) {
            (Some(p), _) => server.listen_unix(p).await,
            (None, Some(a)) => server.listen_tcp(a).await,
            (None, None) => {
                server
                    .listen_tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 10809)))
                    .await
            }
        }
        .map_err(|e| EngineError::Internal(format!("cannot start the NBD listener: {e}")))?;
        let engine = Arc::new(Engine {
            cfg,
            data,
            catalog,
            nbd: Some(server),
            nbd_addr: Some(nbd_addr),
            op: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            merging: Mutex::new(Default::default()),
            prune_lock: tokio::sync::Mutex::new(()),
            prune_due: Mutex::new(Default::default()),
            schedule_runs: Mutex::new(HashMap::new()),
            bytes_received: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        });
        engine.recover()?;
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(e) = weak.upgrade() else { break };
                if e.shutting_down.load(Ordering::Acquire) {
                    break;
                }
                e.expire().await;
            }
        });
        // Retention policies applied by the daemon itself (after backups, on schedules).
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(e) = weak.upgrade() else { break };
                if e.shutting_down.load(Ordering::Acquire) {
                    break;
                }
                e.auto_prune().await;
            }
        });
        Ok(engine)
    }

    /// Open the repository read-only for inspection when no daemon runs (no NBD,
    /// no recovery). Fails with a clear message if the daemon holds the catalog.
    pub fn open_offline(data_dir: &Path) -> EngineResult<Arc<Engine>> {
        let data = data_dir.canonicalize().map_err(|e| {
            EngineError::BadRequest(format!("data directory {}: {e}", data_dir.display()))
        })?;
        if !data.join("catalog").exists() {
            return Err(EngineError::BadRequest(format!(
                "{} holds no chainvault catalog (expected {}/catalog)",
                data.display(),
                data.display()
            )));
        }
        let catalog = Engine::open_catalog(&data)?;
        Ok(Arc::new(Engine {
            cfg: EngineConfig {
                data_dir: data.clone(),
                ..Default::default()
            },
            data,
            catalog,
            nbd: None,
            nbd_addr: None,
            op: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            merging: Mutex::new(Default::default()),
            prune_lock: tokio::sync::Mutex::new(()),
            prune_due: Mutex::new(Default::default()),
            schedule_runs: Mutex::new(HashMap::new()),
            bytes_received: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Open a repository no daemon serves, to change it from the command
    /// line (prune, import, delete): like [`Engine::open_offline`], then the
    /// daemon's start-up recovery (journals finished, interrupted backups
    /// marked), so the command starts from the state a daemon would.
    pub fn open_local(data_dir: &Path) -> EngineResult<Arc<Engine>> {
        let e = Engine::open_offline(data_dir)?;
        e.recover()?;
        Ok(e)
    }

    /// The repository root (canonical).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The NBD listener's address, for building URIs.
    pub fn nbd_address(&self) -> Option<&ListenAddr> {
        self.nbd_addr.as_ref()
    }

    fn server(&self) -> EngineResult<&Server> {
        self.nbd.as_ref().ok_or_else(|| {
            EngineError::Conflict(
                "the repository is open offline; start `chainvault serve` for this".into(),
            )
        })
    }

    fn check_open(&self) -> EngineResult<()> {
        self.check_not_stopping()?;
        self.server().map(|_| ())
    }

    /// For work that needs no NBD server (removals, prune, import, gc): a
    /// daemon that is stopping refuses it; an engine opened with
    /// [`Engine::open_local`] does it.
    fn check_not_stopping(&self) -> EngineResult<()> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        Ok(())
    }

    fn abs(&self, rel: &str) -> PathBuf {
        self.data.join(rel)
    }

    fn chain_options(&self, writable: bool) -> ChainOptions {
        ChainOptions {
            root: Some(self.data.clone()),
            max_depth: 4096,
            writable,
            l2_cache_bytes: 32 << 20,
        }
    }

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
                        Some("no completed backup of this disk to build on".to_string()),
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
            .add_export(name.clone(), Arc::new(export))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let uri = self
            .nbd_addr
            .as_ref()
            .map(|a| a.uri(&name))
            .unwrap_or_default();
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
        let span = info_span!("complete", backup = %backup_id, disk = disk_id);
        self.complete_inner(backup_id, disk_id, change_id, req.bytes_transferred)
            .instrument(span)
            .await
    }

    async fn complete_inner(
        &self,
        backup_id: &str,
        disk_id: u32,
        change_id: String,
        bytes: Option<u64>,
    ) -> EngineResult<CompleteResponse> {
        // Phase 1: validate and claim.
        let (export_name, chain) = {
            let _op = self.op.lock().await;
            let backup = self
                .catalog
                .backup(backup_id)
                .map_err(cat)?
                .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
            let disk = self
                .catalog
                .disk(backup_id, disk_id)
                .map_err(cat)?
                .ok_or_else(|| {
                    EngineError::not_found("disk", format!("{disk_id} of backup {backup_id}"))
                })?;
            match disk.status {
                Status::Completed => {
                    let stored = disk.change_id.clone().unwrap_or_default();
                    if stored == change_id {
                        return Ok(CompleteResponse {
                            status: "completed".into(),
                            backup_id: backup_id.to_string(),
                            disk_id,
                            change_id,
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
            (r.export_name.clone(), r.chain.clone())
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
        crash_point("complete:after-check");

        // Phase 3: one transaction records it all.
        let _op = self.op.lock().await;
        let mut disk = self
            .catalog
            .disk(backup_id, disk_id)
            .map_err(cat)?
            .ok_or_else(|| {
                EngineError::not_found("disk", format!("{disk_id} of backup {backup_id}"))
            })?;
        let mut backup = self
            .catalog
            .backup(backup_id)
            .map_err(cat)?
            .ok_or_else(|| EngineError::not_found("backup", backup_id))?;
        let now = now();
        disk.status = Status::Completed;
        disk.change_id = Some(change_id.clone());
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
    async fn fail_locked(&self, backup_id: &str, reason: &str, status: Status) -> EngineResult<()> {
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
    fn fail_disks(
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
    async fn expire(&self) {
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

    // ---------------------------------------------------------------- reads

    pub fn previous_change_id(
        &self,
        vm_name: &str,
        disk_id: u32,
    ) -> EngineResult<ChangeIdResponse> {
        validate_vm_name(vm_name)?;
        let head = self.catalog.head(vm_name, disk_id).map_err(cat)?;
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
        let abs = self.abs(&d.image);
        let opts = self.chain_options(false);
        let chain = tokio::task::spawn_blocking(move || Chain::open(&abs, &opts))
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
        );
        self.server()?
            .add_export(name.clone(), Arc::new(export))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let view = RestoreView {
            restore_id: restore_id.clone(),
            backup_id: req.backup_id.clone(),
            disk_id: req.disk_id,
            export_name: name.clone(),
            nbd_uri: self
                .nbd_addr
                .as_ref()
                .map(|a| a.uri(&name))
                .unwrap_or_default(),
            size,
            created_at: now(),
        };
        lock(&self.restores).insert(restore_id, RestoreEntry { view: view.clone() });
        Ok(view)
    }

    pub async fn close_restore(&self, restore_id: &str) -> EngineResult<()> {
        let entry = lock(&self.restores)
            .remove(restore_id)
            .ok_or_else(|| EngineError::not_found("restore", restore_id))?;
        if let Some(s) = &self.nbd {
            s.remove_export(&entry.view.export_name).await;
        }
        Ok(())
    }

    pub fn restores(&self) -> Vec<RestoreView> {
        lock(&self.restores)
            .values()
            .map(|r| r.view.clone())
            .collect()
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
        Metrics {
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
    fn recover(&self) -> EngineResult<()> {
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

    // -------------------------------------------------------------- shutdown

    /// Stop accepting work, drain NBD, flush, mark in-flight jobs interrupted.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let _op = self.op.lock().await;
        let running: Vec<String> = self
            .catalog
            .backups()
            .map(|v| {
                v.into_iter()
                    .filter(|b| b.status == Status::Running)
                    .map(|b| b.backup_id)
                    .collect()
            })
            .unwrap_or_default();
        for b in running {
            if let Err(e) = self
                .fail_locked(
                    &b,
                    "interrupted: the daemon was stopped",
                    Status::Interrupted,
                )
                .await
            {
                warn!(backup = %b, error = %e, "could not mark the backup interrupted");
            }
        }
        let restores: Vec<String> = lock(&self.restores).keys().cloned().collect();
        for r in restores {
            let _ = self.close_restore(&r).await;
        }
        if let Some(s) = &self.nbd {
            s.shutdown(Duration::from_secs(10)).await;
        }
        if let Err(e) = self.catalog.flush() {
            warn!(error = %e, "catalog flush at shutdown failed");
        }
    }
}
