//! The engine: the one place that creates images, links chains, records
//! change_ids, fails, expires, recovers and prunes. Handlers and the CLI call
//! it; nothing else writes state.

mod error;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::{EngineError, EngineResult};

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

/// The backup engine (state lives in the catalog and the repository directory).
pub struct Engine {
    _cfg: EngineConfig,
}

impl Engine {
    /// Open the repository, recover from any crash, and start the NBD listener.
    pub async fn open(_cfg: EngineConfig) -> EngineResult<Arc<Engine>> {
        todo!()
    }
    pub async fn start_backup(&self, _req: StartRequest) -> EngineResult<StartResponse> {
        todo!()
    }
    pub async fn complete_disk(&self, _backup_id: &str, _req: CompleteRequest) -> EngineResult<CompleteResponse> {
        todo!()
    }
    pub async fn fail_backup(&self, _backup_id: &str, _reason: &str) -> EngineResult<BackupView> {
        todo!()
    }
    pub fn previous_change_id(&self, _vm_name: &str, _disk_id: u32) -> EngineResult<ChangeIdResponse> {
        todo!()
    }
    pub fn list_backups(&self, _vm_name: Option<&str>, _status: Option<Status>) -> EngineResult<Vec<BackupView>> {
        todo!()
    }
    pub fn get_backup(&self, _backup_id: &str) -> EngineResult<BackupView> {
        todo!()
    }
    pub fn chain(&self, _vm_name: &str, _disk_id: u32) -> EngineResult<ChainView> {
        todo!()
    }
    pub async fn delete_backup(&self, _backup_id: &str) -> EngineResult<()> {
        todo!()
    }
    pub async fn open_restore(&self, _req: RestoreRequest) -> EngineResult<RestoreView> {
        todo!()
    }
    pub async fn close_restore(&self, _restore_id: &str) -> EngineResult<()> {
        todo!()
    }
    pub fn metrics(&self) -> Metrics {
        todo!()
    }
    pub fn verify(&self, _vm_name: Option<&str>) -> EngineResult<VerifyReport> {
        todo!()
    }
    /// Open the repository read-only for inspection when no daemon runs (no NBD,
    /// no recovery). Fails with a clear message if the daemon holds the catalog.
    pub fn open_offline(_data_dir: &std::path::Path) -> EngineResult<Arc<Engine>> {
        todo!()
    }
    /// Rebuild the catalog from the sidecars in the repository directory alone
    /// (the daemon must not be running). Returns what was found.
    pub fn rebuild_catalog(_data_dir: &std::path::Path) -> EngineResult<RebuildReport> {
        todo!()
    }
    /// Stop accepting work, drain NBD, flush, mark in-flight jobs interrupted.
    pub async fn shutdown(&self) {
        todo!()
    }
}
