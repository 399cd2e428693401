//! Points straight from the repository directory: the sidecars say which
//! points exist and are completed; each point is its qcow2 chain, opened
//! read-only. The sled catalog is never opened (the daemon holds its lock).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use chainvault_fuse::guestfs::Disk;
use chainvault_fuse::{ChainDisk, PointInfo, Source};

use crate::engine::repo::{self, Sidecar};
use crate::model::Status;

/// Per-layer L2 cache of each open chain: reads of one point stay fast while
/// hundreds of open points stay small.
const L2_CACHE_PER_LAYER: u64 = 4 << 20;

/// A sidecar as last read, kept while its file is unchanged.
struct Seen {
    mtime: SystemTime,
    len: u64,
    sidecar: Option<Sidecar>,
}

pub struct DataSource {
    data: PathBuf,
    vm: Option<String>,
    seen: Mutex<HashMap<PathBuf, Seen>>,
}

impl DataSource {
    pub fn new(dir: &Path, vm: Option<String>) -> anyhow::Result<DataSource> {
        let data = dir.canonicalize().with_context(|| {
            format!(
                "repository {} cannot be opened; pass --data DIR (the daemon's --data) or --server URL",
                dir.display()
            )
        })?;
        if !data.join("vms").is_dir() && !data.join("catalog").is_dir() {
            anyhow::bail!(
                "{} is not a chainvault repository (no vms/ or catalog/ in it); pass the daemon's --data DIR",
                data.display()
            );
        }
        Ok(DataSource {
            data,
            vm,
            seen: Mutex::new(HashMap::new()),
        })
    }
}

impl Source for DataSource {
    fn describe(&self) -> String {
        format!("repository {}", self.data.display())
    }

    fn list(&self) -> Result<Vec<PointInfo>, String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep = Vec::new();
        let mut live = Vec::new();
        for path in repo::all_sidecars(&self.data) {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let fresh = seen
                .get(&path)
                .is_some_and(|s| s.mtime == mtime && s.len == meta.len());
            if !fresh {
                let sidecar = match repo::read_sidecar(&path) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable sidecar");
                        None
                    }
                };
                seen.insert(
                    path.clone(),
                    Seen {
                        mtime,
                        len: meta.len(),
                        sidecar,
                    },
                );
            }
            live.push(path.clone());
            let Some(s) = seen.get(&path).and_then(|s| s.sidecar.as_ref()) else {
                continue;
            };
            if s.disk.status != Status::Completed {
                continue;
            }
            if self.vm.as_ref().is_some_and(|v| *v != s.disk.vm_name) {
                continue;
            }
            keep.push(path.clone());
        }
        let live: std::collections::HashSet<PathBuf> = live.into_iter().collect();
        seen.retain(|p, _| live.contains(p));
        let recs: Vec<_> = keep
            .iter()
            .filter_map(|p| seen.get(p).and_then(|s| s.sidecar.as_ref()))
            .map(|s| (&s.backup, &s.disk))
            .collect();
        Ok(super::point_infos(&recs))
    }

    fn open(&self, p: &PointInfo) -> io::Result<Disk> {
        let image = self
            .data
            .join(repo::image_rel(&p.vm, p.disk_id, &p.backup_id));
        let d = ChainDisk::open(&image, &self.data, L2_CACHE_PER_LAYER)?;
        Ok(std::sync::Arc::new(d))
    }
}
