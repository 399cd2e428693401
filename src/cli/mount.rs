//! `chainvault mount MOUNTPOINT [--data DIR | --server URL] [--vm VM]`: every
//! completed point in time as a read-only FUSE tree (see docs/restore.md).
//!
//! The tree itself is the `chainvault-fuse` crate. This command picks where
//! points come from, behind its [`Source`](chainvault_fuse::Source) trait:
//! * [`data`]: the repository directory, read-only, through the sidecars and
//!   the qcow2 chains. It never opens the catalog, so it works while the
//!   daemon runs (the daemon holds the catalog's lock).
//! * [`server`]: a running daemon: the catalog over HTTP, and each point
//!   through a restore export read with the NBD client.

mod data;
mod server;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use chainvault_fuse::catalog::Catalog;
use chainvault_fuse::mount::Ended;
use chainvault_fuse::{
    block_termination_signals, mount_foreground, MountOptions, RestoreFs, Source, TreeOptions,
};

use crate::model::{BackupRecord, DiskBackupRecord};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// An empty directory to mount the tree on.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Read the repository directory directly (read-only; fine while the
    /// daemon runs). The default when --server is not given.
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    pub data: Option<PathBuf>,
    /// Read through a running daemon's API and restore exports instead.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token of the daemon, if it has one (with --server).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CHAINVAULT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Only this VM.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// How often (at most) the list of points is refreshed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub rescan_ms: u64,
    /// Close a point's disk (files, restore export) after this many seconds
    /// without reads.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub idle_close: u64,
    /// FUSE threads serving requests.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub threads: usize,
    /// Let other users read the tree (non-root needs user_allow_other in
    /// /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
}

pub fn run(a: MountArgs) -> anyhow::Result<u8> {
    // Before any thread exists (the --server runtime included): only the
    // mount's signal thread may take SIGINT/SIGTERM.
    block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    // Each open chain holds a file per layer.
    super::raise_fd_limit();
    check_mountpoint(&a.mountpoint)?;

    let source: Arc<dyn Source> = match &a.server {
        Some(url) => Arc::new(server::ServerSource::new(
            url,
            a.token.clone(),
            a.vm.clone(),
        )?),
        None => {
            let dir = a
                .data
                .clone()
                .unwrap_or_else(|| PathBuf::from("chainvault-data"));
            Arc::new(data::DataSource::new(&dir, a.vm.clone())?)
        }
    };
    let what = source.describe();
    let catalog = Arc::new(Catalog::new(source, Duration::from_millis(a.rescan_ms)));
    let n = catalog
        .scan_now()
        .map_err(|e| anyhow::anyhow!("cannot list the points of {what}: {e}"))?;
    tracing::info!(points = n, source = %what, "listed points");

    let fs = RestoreFs::new(catalog, TreeOptions::default());
    let opts = MountOptions {
        threads: a.threads.max(1),
        idle_close: Duration::from_secs(a.idle_close.max(1)),
        fsname: "chainvault".into(),
        allow_other: a.allow_other,
    };
    let mp = a.mountpoint.clone();
    let ended = mount_foreground(fs, &a.mountpoint, &opts, || {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "mounted {} ({n} points from {what}); Ctrl-C or `fusermount3 -u {}` to leave",
            mp.display(),
            mp.display()
        );
        let _ = out.flush();
    })
    .map_err(anyhow::Error::from)?;
    match ended {
        Ended::Signal(_) => eprintln!("unmounted {}", a.mountpoint.display()),
        Ended::Unmounted => eprintln!("{} was unmounted", a.mountpoint.display()),
    }
    Ok(0)
}

fn check_mountpoint(p: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "mount point {} is not a directory: give an empty directory",
            p.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {} is a dead FUSE mount (its process is gone): run `fusermount3 -u {}` first",
            p.display(),
            p.display()
        ),
        Err(e) => bail!(
            "mount point {}: {e}; create an empty directory there first",
            p.display()
        ),
    }
}

/// `info.json` of one point: what a person restoring wants to know.
pub(crate) fn info_json(b: &BackupRecord, d: &DiskBackupRecord) -> Vec<u8> {
    let v = serde_json::json!({
        "vm_name": d.vm_name,
        "disk_id": d.disk_id,
        "disk_key": d.disk_key,
        "backup_id": d.backup_id,
        "backup_type": b.backup_type,
        "mode": d.mode,
        "reason": d.reason,
        "parent_backup_id": d.parent_backup_id,
        "chain_id": d.chain_id,
        "change_id": d.change_id,
        "capacity_bytes": d.capacity_bytes,
        "bytes_transferred": d.bytes_transferred,
        "size_on_disk": d.size_on_disk,
        "created_at": b.created_at,
        "started_at": d.started_at,
        "completed_at": d.completed_at,
        "finished_at": b.finished_at,
        "status": d.status,
        "tags": b.tags,
        "repository_id": b.repository_id,
        "image": d.image,
        "digest": d.digest,
        "deep_verify": d.deep_verify,
    });
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// An RFC 3339 time as a `SystemTime` (the Unix epoch when unreadable).
pub(crate) fn parse_time(s: &str) -> std::time::SystemTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(std::time::SystemTime::from)
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The points of the tree, one per completed disk of `recs`, each with its
/// warning when it failed deep verify or reads through a point that did.
pub(crate) fn point_infos(
    recs: &[(&BackupRecord, &DiskBackupRecord)],
) -> Vec<chainvault_fuse::PointInfo> {
    let by_id: std::collections::HashMap<(&str, u32), &DiskBackupRecord> = recs
        .iter()
        .map(|(_, d)| ((d.backup_id.as_str(), d.disk_id), *d))
        .collect();
    recs.iter()
        .map(|(b, d)| {
            let mut info = point_info(b, d);
            let mut cur = Some(*d);
            let mut hops = 0;
            while let Some(c) = cur.filter(|_| hops <= by_id.len()) {
                if let Some(v) = c.deep_verify.as_ref().filter(|v| !v.ok) {
                    let whose = if c.backup_id == d.backup_id {
                        "This point".to_string()
                    } else {
                        format!("This point reads through point {}, which", c.backup_id)
                    };
                    info.warning = Some(format!(
                        "WARNING: disk {} of VM {:?} at backup {} may hold bad blocks.\n\n\
                         {whose} failed deep verify at {}:\n  {}\n\n\
                         Files and disk.raw here may read wrong bytes where it is bad;\n\
                         `chainvault verify --deep` names the blocks and the points they affect.\n",
                        d.disk_id,
                        d.vm_name,
                        d.backup_id,
                        v.at,
                        v.message.as_deref().unwrap_or("bad blocks")
                    ));
                    break;
                }
                cur = c
                    .parent_backup_id
                    .as_deref()
                    .and_then(|p| by_id.get(&(p, d.disk_id)).copied());
                hops += 1;
            }
            info
        })
        .collect()
}

/// The point of one disk of one backup, for the tree.
fn point_info(b: &BackupRecord, d: &DiskBackupRecord) -> chainvault_fuse::PointInfo {
    chainvault_fuse::PointInfo {
        vm: d.vm_name.clone(),
        disk_id: d.disk_id,
        backup_id: d.backup_id.clone(),
        created: parse_time(&b.created_at),
        completed: d.completed_at.as_deref().map(parse_time),
        size: d.capacity_bytes,
        info_json: info_json(b, d),
        warning: None,
    }
}
