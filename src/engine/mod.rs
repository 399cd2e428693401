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
//!
//! # Where each part lives
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the engine's state, opening a repository, shutdown |
//! | `backup.rs` | start, complete, fail and time out disk backups |
//! | `reads.rs` | change_ids, listings, chains, restore exports, metrics |
//! | `recovery.rs` | verify, start-up recovery, catalog rebuild |
//! | `lifecycle.rs` | removing any point: journals and consolidation; protect, note |
//! | `retention.rs` | which backups a retention policy keeps (pure) |
//! | `prune.rs` | policies, prune, the daemon's own prune task |
//! | `depth.rs` | the chain depth limit |
//! | `import.rs` | adopting existing qcow2 files as points |
//! | `instant.rs` | instant recovery: writable restores through scratch overlays |
//! | `digests.rs` | block digests at completion: the client's upload, the comparison |
//! | `scrub.rs` | deep verify: every stored block against its digest, bad blocks named |
//! | `space.rs` | usage, orphans, gc |
//! | `tokens.rs` | API tokens: create, list, revoke, look up by secret |
//! | `repo.rs` | the repository's paths, sidecars, atomic writes, ids |

mod backup;
mod depth;
pub mod digests;
mod error;
pub mod import;
pub mod instant;
pub mod lifecycle;
pub mod prune;
mod reads;
mod recovery;
pub mod repo;
pub mod retention;
mod scrub;
pub mod space;
pub mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chainvault_nbd::{ListenAddr, Server, ServerConfig};
use chainvault_qcow::{Chain, ChainOptions};
pub use error::{EngineError, EngineResult};
use tracing::warn;

use crate::catalog::{Catalog, CatalogError};
use crate::export::Activity;
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
    /// Scheduled deep verify: every point with block digests is read and
    /// checked at least once in this period (None: only when asked).
    pub verify_every: Option<Duration>,
    /// The scheduled deep verify reads at most this many MiB per second.
    pub verify_rate_mib_s: u64,
    /// The NBD server's limits and TLS (`nbd.tls`); exports' URIs say
    /// `nbds://` when TLS is on or required.
    pub nbd: ServerConfig,
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
            verify_every: None,
            verify_rate_mib_s: 64,
            nbd: ServerConfig::default(),
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
    /// An instant restore's writable chain (flushed when it closes).
    chain: Option<Arc<Chain>>,
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
    /// One deep verify at a time; the flag tells a running one to stop.
    scrub_lock: tokio::sync::Mutex<()>,
    scrub_stop: Arc<AtomicBool>,
    /// Imports copying files that are not in the catalog yet.
    imports_running: std::sync::atomic::AtomicUsize,
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
        let server = Server::new(cfg.nbd.clone());
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
            scrub_lock: tokio::sync::Mutex::new(()),
            scrub_stop: Arc::new(AtomicBool::new(false)),
            imports_running: Default::default(),
            bytes_received: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        });
        engine.recover()?;
        // Instant restores come back under their names (engine/instant.rs).
        engine.reopen_instants();
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
        // Scheduled deep verify.
        if let Some(every) = engine.cfg.verify_every {
            let weak = Arc::downgrade(&engine);
            tokio::spawn(async move {
                let turn = (every / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
                loop {
                    tokio::time::sleep(turn).await;
                    let Some(e) = weak.upgrade() else { break };
                    if e.shutting_down.load(Ordering::Acquire) {
                        break;
                    }
                    e.scheduled_verify(every).await;
                }
            });
        }
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
            scrub_lock: tokio::sync::Mutex::new(()),
            scrub_stop: Arc::new(AtomicBool::new(false)),
            imports_running: Default::default(),
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

    /// Whether clients reach the NBD exports over TLS (`nbds://`).
    pub fn nbd_tls(&self) -> bool {
        self.cfg
            .nbd
            .tls
            .as_ref()
            .is_some_and(|t| t.mode != chainvault_nbd::tls::TlsMode::Off)
    }

    /// The NBD URI of export `name` (empty when the repository is offline).
    pub(crate) fn export_uri(&self, name: &str) -> String {
        self.nbd_addr
            .as_ref()
            .map(|a| a.nbd_uri(name, self.nbd_tls()).to_string())
            .unwrap_or_default()
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

    /// One disk of a backup, or 404 naming both.
    fn disk_record(&self, backup_id: &str, disk_id: u32) -> EngineResult<DiskBackupRecord> {
        self.catalog
            .disk(backup_id, disk_id)
            .map_err(cat)?
            .ok_or_else(|| {
                EngineError::not_found("disk", format!("{disk_id} of backup {backup_id}"))
            })
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

    // -------------------------------------------------------------- shutdown

    /// Stop accepting work, drain NBD, flush, mark in-flight jobs interrupted.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.scrub_stop.store(true, Ordering::Release);
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
        let restores: Vec<(String, bool)> = lock(&self.restores)
            .iter()
            .map(|(k, v)| (k.clone(), v.view.writable))
            .collect();
        for (r, writable) in restores {
            if writable {
                // Instant restores outlive the daemon: flushed, not closed.
                let entry = lock(&self.restores).remove(&r);
                if let (Some(e), Some(s)) = (entry, &self.nbd) {
                    s.remove_export(&e.view.export_name).await;
                    if let Some(c) = e.chain {
                        if let Err(err) = c.flush() {
                            warn!(restore = %r, error = %err, "flushing an instant restore's overlay");
                        }
                    }
                }
            } else {
                let _ = self.close_restore(&r, None).await;
            }
        }
        if let Some(s) = &self.nbd {
            s.shutdown(Duration::from_secs(10)).await;
        }
        if let Err(e) = self.catalog.flush() {
            warn!(error = %e, "catalog flush at shutdown failed");
        }
    }
}
