//! The listing of points: which VMs, disks and points exist, rescanned from
//! the [`Source`] when it is older than a short TTL, so that backups that
//! complete while mounted appear without a remount.
//!
//! Points live in an append-only registry: a point that disappears from the
//! listing (deleted) keeps its id, so inode numbers never point at the wrong
//! thing; it is just no longer reachable by name.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::naming::{dedupe, point_name, safe_component};
use crate::point::{Point, PointId};
use crate::source::{PointInfo, Source};

/// One disk's points, oldest first: (directory name, point).
pub type DiskPoints = Vec<(Arc<str>, PointId)>;

/// Where one disk of a backup is: (disk, VM directory name, point name).
pub type IdHit = (u32, Arc<str>, Arc<str>);

/// What the tree shows at one moment.
#[derive(Default)]
pub struct Snapshot {
    /// VM directory name → disk index → points.
    pub vms: BTreeMap<Arc<str>, BTreeMap<u32, DiskPoints>>,
    /// Backup id → (disk, VM directory name, point directory name).
    pub by_id: BTreeMap<Arc<str>, Vec<IdHit>>,
}

impl Snapshot {
    pub fn disk(&self, vm: &str, disk: u32) -> Option<&DiskPoints> {
        self.vms.get(vm).and_then(|d| d.get(&disk))
    }
    /// The newest point's name of a disk.
    pub fn latest(&self, vm: &str, disk: u32) -> Option<Arc<str>> {
        self.disk(vm, disk)
            .and_then(|p| p.last())
            .map(|(n, _)| n.clone())
    }
}

struct Registry {
    points: Vec<Arc<Point>>,
    index: HashMap<(String, u32, String), PointId>,
}

/// The catalog as the tree sees it.
pub struct Catalog {
    source: Arc<dyn Source>,
    ttl: Duration,
    reg: RwLock<Registry>,
    snap: RwLock<Arc<Snapshot>>,
    /// Time of the last scan; held while scanning so one thread scans.
    scanned: Mutex<Option<Instant>>,
}

impl Catalog {
    pub fn new(source: Arc<dyn Source>, ttl: Duration) -> Catalog {
        Catalog {
            source,
            ttl,
            reg: RwLock::new(Registry {
                points: Vec::new(),
                index: HashMap::new(),
            }),
            snap: RwLock::new(Arc::new(Snapshot::default())),
            scanned: Mutex::new(None),
        }
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// The current listing, rescanned first when older than the TTL.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        {
            let mut last = self.scanned.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= self.ttl) {
                match self.source.list() {
                    Ok(list) => self.install(list),
                    Err(e) => tracing::warn!(
                        source = %self.source.describe(), error = %e,
                        "cannot list points; showing the previous listing"
                    ),
                }
                *last = Some(Instant::now());
            }
        }
        self.snap.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Scan now (at mount time, so errors show before the mount is used).
    pub fn scan_now(&self) -> Result<usize, String> {
        let list = self.source.list()?;
        let n = list.len();
        self.install(list);
        *self.scanned.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(n)
    }

    pub fn point(&self, id: PointId) -> Option<Arc<Point>> {
        self.reg
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .points
            .get(id as usize)
            .cloned()
    }

    /// Every point ever seen (for idle closing).
    pub fn all_points(&self) -> Vec<Arc<Point>> {
        self.reg
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .points
            .clone()
    }

    fn install(&self, mut list: Vec<PointInfo>) {
        list.sort_by(|a, b| {
            (&a.vm, a.disk_id, a.created, &a.backup_id).cmp(&(
                &b.vm,
                b.disk_id,
                b.created,
                &b.backup_id,
            ))
        });
        // Group per (vm, disk) and name the points.
        let mut groups: BTreeMap<(String, u32), Vec<PointInfo>> = BTreeMap::new();
        for p in list {
            groups.entry((p.vm.clone(), p.disk_id)).or_default().push(p);
        }
        let mut snap = Snapshot::default();
        let mut reg = self.reg.write().unwrap_or_else(|e| e.into_inner());
        for ((vm, disk), points) in groups {
            let vm_dir: Arc<str> = vm_dir_name(&vm).into();
            let mut names: Vec<(String, String)> = points
                .iter()
                .map(|p| (point_name(p.created), id_suffix(&p.backup_id)))
                .collect();
            dedupe(&mut names);
            let mut dp = DiskPoints::new();
            for (p, (name, _)) in points.into_iter().zip(names) {
                let key = (vm.clone(), disk, p.backup_id.clone());
                let id = match reg.index.get(&key) {
                    Some(&id) => {
                        reg.points[id as usize].refresh(&p);
                        id
                    }
                    None => {
                        let id = reg.points.len() as PointId;
                        let point = Point::new(id, p.clone(), name.clone(), self.source.clone());
                        reg.points.push(Arc::new(point));
                        reg.index.insert(key, id);
                        id
                    }
                };
                // A point keeps the name it was first given.
                let name: Arc<str> = reg.points[id as usize].name.as_str().into();
                snap.by_id
                    .entry(p.backup_id.as_str().into())
                    .or_default()
                    .push((disk, vm_dir.clone(), name.clone()));
                dp.push((name, id));
            }
            snap.vms.entry(vm_dir).or_default().insert(disk, dp);
        }
        drop(reg);
        *self.snap.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }
}

/// A VM's directory name: safe, and never `by-id` (that is the tree's own).
pub fn vm_dir_name(vm: &str) -> String {
    let s = safe_component(vm);
    if s == "by-id" {
        "%62y-id".into()
    } else {
        s
    }
}

/// The random part of a backup id (`...Z-9e890d06` → `9e890d06`).
fn id_suffix(id: &str) -> String {
    id.rsplit('-').next().unwrap_or(id).to_string()
}
