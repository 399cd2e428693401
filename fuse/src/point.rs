//! One point in time: its disk (opened lazily, closed when idle) and its
//! volumes (found on first access to the point's directory).

use std::sync::{Arc, OnceLock, RwLock};

use chainvault_guestfs::{self as guestfs, Disk, GuestFs};

use crate::disk::{guard, LazyDisk};
use crate::naming::safe_component;
use crate::source::{PointInfo, Source};

/// Index of a point in the catalog's registry (stable for the mount's life).
pub type PointId = u32;

/// One volume of a point, as the tree shows it.
pub struct Vol {
    /// Directory name (`p1`, `p2-data`, `whole`).
    pub name: String,
    /// Its raw bytes (`volume.raw` when the filesystem cannot be read).
    pub dev: Disk,
    /// The guest filesystem, or the text of `ERROR.txt`.
    pub fs: Result<Arc<dyn GuestFs>, Vec<u8>>,
}

/// One point in time of one disk.
pub struct Point {
    pub id: PointId,
    /// The point as first listed (its `info_json` and `warning` as the
    /// latest listing has them: [`Point::info_json`], [`Point::warning`]).
    pub info: PointInfo,
    /// Directory name under `disk<N>/`.
    pub name: String,
    /// The whole disk (`disk.raw`), read through the chain in big pieces.
    pub disk: Arc<LazyDisk>,
    volumes: OnceLock<Vec<Vol>>,
    /// `info.json` and `WARNING.txt` as the latest listing has them (a
    /// deep verify may mark the point bad while it is mounted).
    live: RwLock<Live>,
}

/// What of a point changes from one listing to the next.
struct Live {
    info_json: Arc<[u8]>,
    warning: Option<Arc<str>>,
}

impl Live {
    fn of(info: &PointInfo) -> Live {
        Live {
            info_json: info.info_json.as_slice().into(),
            warning: info.warning.as_deref().map(Into::into),
        }
    }
}

impl Point {
    pub fn new(id: PointId, info: PointInfo, name: String, source: Arc<dyn Source>) -> Point {
        let what = format!(
            "disk {} of VM {:?} at backup {}",
            info.disk_id, info.vm, info.backup_id
        );
        let pi = info.clone();
        let disk = Arc::new(LazyDisk::new(
            what,
            info.size,
            Box::new(move || {
                if let Some(w) = &pi.warning {
                    tracing::warn!(
                        vm = %pi.vm, disk = pi.disk_id, point = %pi.backup_id,
                        "opening a point that may hold bad blocks: {}", w.trim_end()
                    );
                }
                source.open(&pi)
            }),
        ));
        Point {
            id,
            live: RwLock::new(Live::of(&info)),
            info,
            name,
            disk,
            volumes: OnceLock::new(),
        }
    }

    /// Take what a new listing says of this point.
    pub fn refresh(&self, info: &PointInfo) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Live::of(info);
    }

    /// The contents of `info.json`.
    pub fn info_json(&self) -> Arc<[u8]> {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .info_json
            .clone()
    }

    /// The contents of `WARNING.txt`, when the point has one.
    pub fn warning(&self) -> Option<Arc<str>> {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .warning
            .clone()
    }

    /// Whether the volumes were already looked for.
    pub fn volumes_known(&self) -> bool {
        self.volumes.get().is_some()
    }

    /// The volumes, found on first call. A scan that fails (or a reader that
    /// panics) yields one `whole` volume with the reason, never nothing.
    pub fn volumes(&self) -> &[Vol] {
        self.volumes.get_or_init(|| {
            let t0 = std::time::Instant::now();
            let whole: Disk = self.disk.clone();
            let cached: Disk = cache_for_guest(whole.clone());
            let found = guard("the partition table", || Ok(guestfs::volumes(cached)));
            let vols = match found {
                Ok(v) if !v.is_empty() => v
                    .into_iter()
                    .map(|v| Vol {
                        name: safe_component(&v.name),
                        fs: v.fs.map_err(|e| self.error_text(&v.name, &e)),
                        dev: v.dev,
                    })
                    .collect(),
                Ok(_) => vec![self.whole_error(whole, "no volumes were found on the disk")],
                Err(e) => vec![self.whole_error(whole, &e.to_string())],
            };
            tracing::info!(
                point = %self.info.backup_id, disk = self.info.disk_id,
                volumes = vols.len(), ms = t0.elapsed().as_millis() as u64,
                "scanned volumes"
            );
            vols
        })
    }

    fn whole_error(&self, dev: Disk, reason: &str) -> Vol {
        Vol {
            name: "whole".into(),
            fs: Err(self.error_text("whole", reason)),
            dev,
        }
    }

    fn error_text(&self, vol: &str, reason: &str) -> Vec<u8> {
        format!(
            "chainvault could not read the filesystem of volume {vol} on disk {} of VM {:?}\n\
             at backup {} ({}).\n\n\
             Reason: {reason}\n\n\
             The volume's raw bytes are in volume.raw next to this file; tools such as\n\
             fsck, testdisk or photorec can work on a copy of it.\n",
            self.info.disk_id, self.info.vm, self.info.backup_id, self.name
        )
        .into_bytes()
    }
}

/// The disk the guest readers see: small reads (superblocks, inodes,
/// directory blocks) go through a bounded cache so they do not each walk the
/// chain; `disk.raw` reads bypass it.
fn cache_for_guest(d: Disk) -> Disk {
    // 64 KiB blocks, 32 MiB per open point at most; big file reads bypass it.
    Arc::new(guestfs::CachedDisk::with_defaults(d))
}
