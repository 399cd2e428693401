//! What the client tells the user at the end: one line per disk (mode, bytes
//! read and written, data reduction, time, throughput, change_id), the notes
//! an operator must act on, and the same as JSON for scripts.

use serde::Serialize;

use crate::units::human;

/// One disk's outcome.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskReport {
    pub disk_id: u32,
    /// The `--disk` argument.
    pub source: String,
    /// `completed`, `failed`, or `not completed` (stopped by another
    /// disk's failure or a signal).
    pub status: String,
    /// `full` or `incremental`, as the daemon gave it.
    pub mode: Option<String>,
    /// Why the mode is not what was asked (CBT reset, first backup, ...).
    pub reason: Option<String>,
    /// The full read is stored as an overlay of the previous point holding
    /// only the clusters that differ.
    pub compare_with_parent: bool,
    pub previous_change_id: String,
    /// The change_id recorded at completion.
    pub change_id: Option<String>,
    /// The digest of the source as read (`cvblk2-blake3:<hex>`), sent with
    /// the completion; None when the parent point had no block digests.
    pub digest: Option<String>,
    pub backup_id: Option<String>,
    pub capacity_bytes: u64,
    /// Bytes the dirty bitmap marked (incrementals).
    pub dirty_bytes: Option<u64>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes sent as data (this is `bytes_transferred` at completion).
    pub bytes_written: u64,
    /// Bytes sent as write-zeroes (no payload).
    pub bytes_zeroed: u64,
    /// All-zero bytes read but not sent (fresh image).
    pub bytes_skipped: u64,
    /// 100 × (1 − bytes_written / capacity): how much less than a plain copy
    /// of the whole disk was sent.
    pub data_reduction_percent: f64,
    /// The image's size in the repository after completion.
    pub size_on_disk: Option<u64>,
    pub seconds: f64,
    /// Bytes read per second.
    pub throughput_bytes_per_sec: f64,
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackupReport {
    /// `completed`, `partial` (some disks completed), `failed`,
    /// `interrupted`, or `not started`.
    pub status: String,
    /// The process exit code (see docs/client.md).
    pub exit_code: u8,
    pub backup_id: Option<String>,
    pub vm_name: String,
    pub server: String,
    pub seconds: f64,
    pub error: Option<String>,
    pub disks: Vec<DiskReport>,
    /// Things to act on (stale bitmaps, no checkpoint, ...).
    pub notes: Vec<String>,
}

fn secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

impl BackupReport {
    /// The human summary.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let id = self.backup_id.as_deref().unwrap_or("(not started)");
        o.push_str(&format!(
            "backup {id} of VM {:?}: {} in {}\n",
            self.vm_name,
            self.status,
            secs(self.seconds)
        ));
        if !self.disks.is_empty() {
            o.push_str(&format!(
                "{:<5} {:<12} {:<10} {:>11} {:>11} {:>11} {:>9} {:>8} {:>12}  {}\n",
                "disk",
                "mode",
                "status",
                "read",
                "written",
                "zeroed",
                "reduction",
                "time",
                "throughput",
                "change_id"
            ));
        }
        for d in &self.disks {
            let mode = match (&d.mode, d.compare_with_parent) {
                (Some(m), true) => format!("{m}+compare"),
                (Some(m), false) => m.clone(),
                (None, _) => "-".into(),
            };
            o.push_str(&format!(
                "{:<5} {:<12} {:<10} {:>11} {:>11} {:>11} {:>8.1}% {:>8} {:>10}/s  {}\n",
                d.disk_id,
                mode,
                d.status,
                human(d.bytes_read),
                human(d.bytes_written),
                human(d.bytes_zeroed),
                d.data_reduction_percent,
                secs(d.seconds),
                human(d.throughput_bytes_per_sec as u64),
                d.change_id.as_deref().unwrap_or("-"),
            ));
        }
        for d in &self.disks {
            if let Some(r) = &d.reason {
                o.push_str(&format!("  disk {}: {r}\n", d.disk_id));
            }
            if let (Some(db), Some(m)) = (d.dirty_bytes, &d.mode) {
                if m == "incremental" {
                    o.push_str(&format!(
                        "  disk {}: the bitmap marked {} dirty",
                        d.disk_id,
                        human(db)
                    ));
                    if let Some(s) = d.size_on_disk {
                        o.push_str(&format!("; the new point stores {}", human(s)));
                    }
                    o.push('\n');
                }
            }
            if let Some(e) = &d.error {
                o.push_str(&format!("  disk {} failed: {e}\n", d.disk_id));
            }
        }
        for n in &self.notes {
            o.push_str(&format!("note: {n}\n"));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_one_line_per_disk_and_the_reasons() {
        let r = BackupReport {
            status: "completed".into(),
            backup_id: Some("b1".into()),
            vm_name: "vm".into(),
            disks: vec![
                DiskReport {
                    disk_id: 0,
                    mode: Some("incremental".into()),
                    status: "completed".into(),
                    change_id: Some("cp2".into()),
                    bytes_read: 1 << 20,
                    bytes_written: 1 << 20,
                    data_reduction_percent: 99.9,
                    dirty_bytes: Some(1 << 20),
                    ..Default::default()
                },
                DiskReport {
                    disk_id: 1,
                    mode: Some("full".into()),
                    compare_with_parent: true,
                    reason: Some("bitmap cp1 not found".into()),
                    status: "completed".into(),
                    ..Default::default()
                },
            ],
            notes: vec!["remove stale bitmap x".into()],
            ..Default::default()
        };
        let t = r.text();
        assert!(t.contains("backup b1 of VM \"vm\": completed"), "{t}");
        assert!(t.contains("incremental") && t.contains("cp2") && t.contains("99.9%"));
        assert!(t.contains("full+compare"));
        assert!(t.contains("disk 1: bitmap cp1 not found"));
        assert!(t.contains("note: remove stale bitmap x"));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["disks"][1]["compare_with_parent"], true);
    }
}
