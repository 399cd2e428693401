//! The repository directory: where images and their sidecars live.
//!
//! ```text
//! <data>/catalog/                               sled database
//! <data>/vms/<vm>/disk<N>/<backup_id>.qcow2     the image of disk N at that point
//! <data>/vms/<vm>/disk<N>/<backup_id>.json      its sidecar
//! ```
//!
//! `<vm>` is the VM name with every byte outside `[A-Za-z0-9_-]` (and a leading
//! dot) written as `%XX`, so any name is one safe path component. An overlay's
//! backing file name is `<parent_backup_id>.qcow2`: relative, in the same
//! directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{BackupRecord, DiskBackupRecord};

/// Encode a VM name as one safe path component.
pub fn encode_vm(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Directory of one disk's images, relative to the data dir.
pub fn disk_dir(vm: &str, disk_id: u32) -> PathBuf {
    PathBuf::from("vms")
        .join(encode_vm(vm))
        .join(format!("disk{disk_id}"))
}

/// Image path of a point, relative to the data dir.
pub fn image_rel(vm: &str, disk_id: u32, backup_id: &str) -> PathBuf {
    disk_dir(vm, disk_id).join(format!("{backup_id}.qcow2"))
}

/// Sidecar path of an image.
pub fn sidecar_of(image: &Path) -> PathBuf {
    image.with_extension("json")
}

/// What a sidecar holds: enough to rebuild the catalog from the directory alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    /// Always "chainvault-point".
    pub kind: String,
    pub version: u32,
    pub backup: BackupRecord,
    pub disk: DiskBackupRecord,
}

impl Sidecar {
    pub fn new(backup: &BackupRecord, disk: &DiskBackupRecord) -> Sidecar {
        Sidecar {
            kind: "chainvault-point".into(),
            version: 1,
            backup: backup.clone(),
            disk: disk.clone(),
        }
    }
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

pub fn write_sidecar(image_abs: &Path, s: &Sidecar) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
    write_atomic(&sidecar_of(image_abs), &bytes)
}

pub fn read_sidecar(path: &Path) -> Result<Sidecar, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&b)
        .map_err(|e| format!("{}: not a chainvault sidecar: {e}", path.display()))
}

/// Remove an image, its sidecar and its block digests (missing files are fine),
/// and the temporary files of a sidecar or digest write a crash cut off
/// (`.<name>.tmp`, see [`write_atomic`] and `digest::file::FileWriter`).
pub fn remove_point(image_abs: &Path) {
    let files = [
        sidecar_of(image_abs),
        crate::digest::file::path_of(image_abs),
    ];
    let temps = files.iter().filter_map(|f| {
        let name = f.file_name()?.to_string_lossy().into_owned();
        Some(f.with_file_name(format!(".{name}.tmp")))
    });
    let all: Vec<PathBuf> = std::iter::once(image_abs.to_path_buf())
        .chain(files.iter().cloned())
        .chain(temps)
        .collect();
    for p in all {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove"),
        }
    }
    if let Some(d) = image_abs.parent() {
        let _ = sync_dir(d);
    }
}

/// Every file in a disk directory, `<data>/vms/<vm>/disk<N>/*`, sorted.
fn point_files(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(vms) = std::fs::read_dir(data.join("vms")) else {
        return out;
    };
    for vm in vms.flatten() {
        let Ok(disks) = std::fs::read_dir(vm.path()) else {
            continue;
        };
        for disk in disks.flatten() {
            let Ok(files) = std::fs::read_dir(disk.path()) else {
                continue;
            };
            out.extend(files.flatten().map(|f| f.path()));
        }
    }
    out.sort();
    out
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e == ext)
        && !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// Every sidecar under `<data>/vms`.
pub fn all_sidecars(data: &Path) -> Vec<PathBuf> {
    point_files(data)
        .into_iter()
        .filter(|p| has_ext(p, "json"))
        .collect()
}

/// Every image under `<data>/vms`.
pub fn all_images(data: &Path) -> Vec<PathBuf> {
    point_files(data)
        .into_iter()
        .filter(|p| has_ext(p, "qcow2"))
        .collect()
}

/// A new backup id: UTC time to the millisecond, then randomness. Ids sort in
/// creation order: within one process they strictly increase even when the
/// clock does not move (or steps back).
pub fn new_backup_id() -> String {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(0);
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut ms = now_ms;
    let _ = LAST_MS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
        ms = now_ms.max(last + 1);
        Some(ms)
    });
    backup_id_at(ms)
}

/// A backup id for a point taken at `ms` (milliseconds since the epoch):
/// imported points get the id of their own time, so ids still sort by time.
pub fn backup_id_at(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]");
    let stamp = t.format(&fmt).unwrap_or_default();
    format!("{stamp}.{:03}Z-{}", t.millisecond(), random_hex(4))
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_become_safe_components() {
        assert_eq!(encode_vm("pgtest1"), "pgtest1");
        assert_eq!(encode_vm("../etc"), "%2E.%2Fetc");
        assert_eq!(encode_vm("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_vm(".hidden"), "%2Ehidden");
        assert!(!encode_vm("x/../../y").contains('/'));
    }

    #[test]
    fn ids_sort_by_time() {
        let a = new_backup_id();
        assert_eq!(a.len(), "20261123T175800.123Z-".len() + 8);
        assert!(a.contains('T') && a.contains("Z-"));
        let ids: Vec<String> = (0..200).map(|_| new_backup_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }
}
