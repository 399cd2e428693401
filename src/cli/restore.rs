//! `chainvault restore`: a point in time of a VM's disks, written to files,
//! block devices, new qcow2 images or NBD exports (src/restore/).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::inspect::{Source, SourceArgs};
use crate::model::*;
use crate::restore::{self, exit, Format, Reader, RestoreReport, Target};

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The VM.
    #[arg(long, value_name = "VM")]
    pub vm: String,
    /// A disk to restore (repeat for several); default: every disk of the point.
    #[arg(long = "disk", value_name = "N")]
    pub disks: Vec<u32>,
    /// The point: a backup id, `latest`, or an RFC 3339 UTC time (the newest
    /// backup at or before it).
    #[arg(long, value_name = "POINT", default_value = "latest")]
    pub at: String,
    /// Where each disk goes, in disk order: a file (created sparse, or
    /// overwritten), a block device, or an NBD URI.
    #[arg(
        long = "to",
        value_name = "TARGET",
        required_unless_present = "instant"
    )]
    pub targets: Vec<String>,
    /// Instant recovery: serve each disk of the point read-write over NBD
    /// (through a scratch overlay; the point never changes) and print the
    /// URIs. Close with `chainvault restores close RESTORE_ID [--keep-as PATH]`.
    #[arg(long, conflicts_with_all = ["targets", "verify", "format"])]
    pub instant: bool,
    /// Format of new file targets.
    #[arg(short = 'O', value_name = "FORMAT", default_value = "raw", value_parser = ["raw", "qcow2"])]
    pub format: String,
    /// Read every byte back and compare it with the point.
    #[arg(long)]
    pub verify: bool,
    /// Quick rollback: the targets hold this earlier point (a backup id or a
    /// time) of the same chain; write only the blocks that changed since.
    #[arg(long, value_name = "POINT")]
    pub since: Option<String>,
    /// With --since: first compare samples of each target with that point,
    /// and refuse a target that does not hold it.
    #[arg(long, requires = "since")]
    pub check: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bars (they are shown only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> anyhow::Result<u8> {
    eprintln!("chainvault restore: {msg}");
    Ok(code)
}

/// Exit code for an error talking to the daemon.
fn daemon_code(e: &anyhow::Error) -> u8 {
    let m = format!("{e:#}");
    if m.contains("no daemon at") || m.contains("cannot talk to the daemon") || m.contains("HTTP 5")
    {
        exit::DAEMON
    } else {
        exit::USAGE
    }
}

pub fn run(a: RestoreArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(a))
}

async fn run_async(a: RestoreArgs) -> anyhow::Result<u8> {
    let source = match Source::open(&a.source) {
        Ok(s) => s,
        Err(e) => return fail(daemon_code(&e), format!("{e:#}")),
    };
    let backups = match source.list_backups(Some(&a.vm), None) {
        Ok(b) => b,
        Err(e) => return fail(daemon_code(&e), format!("{e:#}")),
    };
    if backups.is_empty() {
        return fail(
            exit::USAGE,
            format!(
                "VM {:?} has no backups (chainvault backups list shows the VMs)",
                a.vm
            ),
        );
    }
    let point = match restore::choose_point(&a.vm, &backups, &a.at, &a.disks) {
        Ok(p) => p.clone(),
        Err(m) => return fail(exit::USAGE, m),
    };
    let disks: Vec<DiskBackupRecord> = if a.disks.is_empty() {
        point
            .disks
            .iter()
            .filter(|d| d.status == Status::Completed)
            .cloned()
            .collect()
    } else {
        a.disks
            .iter()
            .filter_map(|n| point.disks.iter().find(|d| d.disk_id == *n).cloned())
            .collect()
    };
    // A point that failed deep verify, or reads through one that did, may
    // hold bad blocks: say so before reading it.
    for d in &disks {
        let mut cur = Some(d.clone());
        while let Some(c) = cur {
            if let Some(v) = c.deep_verify.as_ref().filter(|v| !v.ok) {
                eprintln!(
                    "warning: disk {} of {} reads through point {}, which failed deep verify at {} ({}); \
                     restored bytes may be wrong where it is bad (chainvault verify --deep names the blocks)",
                    d.disk_id,
                    point.backup.backup_id,
                    c.backup_id,
                    v.at,
                    v.message.as_deref().unwrap_or("bad blocks")
                );
                break;
            }
            cur = c.parent_backup_id.as_ref().and_then(|pid| {
                backups
                    .iter()
                    .find(|b| b.backup.backup_id == *pid)
                    .and_then(|b| b.disks.iter().find(|x| x.disk_id == d.disk_id).cloned())
            });
        }
    }
    if a.instant {
        return instant(&a, &source, &point, &disks);
    }
    let since: Option<BackupView> = match &a.since {
        None => None,
        Some(x) => {
            let ids: Vec<u32> = disks.iter().map(|d| d.disk_id).collect();
            match restore::choose_point(&a.vm, &backups, x, &ids) {
                Ok(p) if p.backup.backup_id < point.backup.backup_id => Some(p.clone()),
                Ok(p) => {
                    return fail(
                        exit::USAGE,
                        format!(
                            "--since {} is not earlier than the point restored ({}): a rollback goes from an older point to a newer one",
                            p.backup.backup_id, point.backup.backup_id
                        ),
                    )
                }
                Err(m) => return fail(exit::USAGE, format!("--since: {m}")),
            }
        }
    };
    if since.is_some() {
        if a.format == "qcow2" {
            return fail(
                exit::USAGE,
                "--since rolls an existing target forward; -O qcow2 makes a new image",
            );
        }
        for t in &a.targets {
            if !t.contains("://") && !std::path::Path::new(t).exists() {
                return fail(
                    exit::USAGE,
                    format!("--since rolls an existing target forward, and {t} does not exist: restore it in full"),
                );
            }
        }
    }
    if disks.len() != a.targets.len() {
        return fail(
            exit::USAGE,
            format!(
                "backup {} has {} disk(s) to restore ({}) but {} --to target(s) were given: one per disk, in disk order",
                point.backup.backup_id,
                disks.len(),
                disks.iter().map(|d| d.disk_id.to_string()).collect::<Vec<_>>().join(", "),
                a.targets.len()
            ),
        );
    }
    let format = if a.format == "qcow2" {
        Format::Qcow2
    } else {
        Format::Raw
    };
    let repo: Option<PathBuf> = match &source {
        Source::Offline(e) => Some(e.data_dir().to_path_buf()),
        Source::Http(_) => None,
    };

    // Every target opens (and every new file is created) before anything is written.
    let mut targets = Vec::new();
    let mut created: Vec<PathBuf> = Vec::new();
    for (d, spec) in disks.iter().zip(&a.targets) {
        let existed = std::path::Path::new(spec).exists() || spec.contains("://");
        match Target::open(spec, d.capacity_bytes, format, repo.as_deref()).await {
            Ok(t) => {
                if !existed {
                    created.push(PathBuf::from(spec));
                }
                targets.push(Arc::new(t));
            }
            Err(e) => {
                for p in &created {
                    let _ = std::fs::remove_file(p);
                }
                return fail(exit::USAGE, format!("disk {}: {}", d.disk_id, e.0));
            }
        }
    }

    // The readers: restore exports of the daemon, or the chains themselves.
    let mut readers = Vec::new();
    let mut restores: Vec<String> = Vec::new();
    let mut only: Vec<Option<Vec<(u64, u64)>>> = Vec::new();
    let since_ctx = since
        .as_ref()
        .map(|p| format!("qemu:dirty-bitmap:since-{}", p.backup.backup_id));
    for d in &disks {
        let r = match &source {
            Source::Offline(e) => Reader::local(e.data_dir(), &d.image)
                .map_err(|m| format!("disk {} of backup {}: {m}", d.disk_id, d.backup_id))
                .and_then(|r| match (&since, &r) {
                    (Some(a_pt), Reader::Local(c)) => {
                        // How many layers above the earlier point this one is.
                        let mut k = 0usize;
                        let mut cur = Some(d.clone());
                        let mut found = false;
                        while let Some(x) = cur {
                            if x.backup_id == a_pt.backup.backup_id {
                                found = true;
                                break;
                            }
                            k += 1;
                            cur = x
                                .parent_backup_id
                                .as_ref()
                                .and_then(|p| e.get_backup(p).ok())
                                .and_then(|b| b.disks.into_iter().find(|y| y.disk_id == d.disk_id));
                        }
                        if !found {
                            return Err(format!(
                                "NOTCHAIN:{} is not an earlier point of the same chain as {} for disk {}",
                                a_pt.backup.backup_id, d.backup_id, d.disk_id
                            ));
                        }
                        let ranges = crate::export::changed_ranges(c, k).map_err(|e| e.to_string())?;
                        only.push(Some(ranges));
                        Ok(r)
                    }
                    _ => {
                        only.push(None);
                        Ok(r)
                    }
                }),
            Source::Http(h) => {
                let body = serde_json::json!({ "backup_id": d.backup_id, "disk_id": d.disk_id });
                match h.call::<RestoreView>("POST", "/api/v1/restores", &[], Some(&body)) {
                    Ok(v) => {
                        restores.push(v.restore_id.clone());
                        match Reader::connect_with(&v.nbd_uri, restore::CONNECTIONS, since_ctx.as_deref()).await {
                            Ok(r) => match &since_ctx {
                                Some(ctx) if !r.has_context(ctx) => Err(format!(
                                    "NOTCHAIN:{} is not an earlier point of the same chain as {} for disk {} \
                                     (a full was taken between them): restore in full",
                                    since.as_ref().map(|p| p.backup.backup_id.clone()).unwrap_or_default(),
                                    d.backup_id,
                                    d.disk_id
                                )),
                                Some(ctx) => match r.dirty_map(ctx).await {
                                    Ok(m) => {
                                        only.push(Some(m));
                                        Ok(r)
                                    }
                                    Err(e) => Err(e),
                                },
                                None => {
                                    only.push(None);
                                    Ok(r)
                                }
                            },
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        };
        match r {
            Ok(r) => readers.push(Arc::new(r)),
            Err(m) => {
                close(&source, &restores);
                for p in &created {
                    let _ = std::fs::remove_file(p);
                }
                return match m.strip_prefix("NOTCHAIN:") {
                    Some(m) => fail(exit::USAGE, m),
                    None => fail(exit::FAILED, m),
                };
            }
        }
    }
    if let (Some(a_pt), true) = (&since, a.check) {
        if let Err(m) = check_targets(&source, a_pt, &disks, &targets).await {
            close(&source, &restores);
            return fail(exit::USAGE, m);
        }
    }

    let multi = MultiProgress::with_draw_target(
        if !a.no_progress && !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    let style = ProgressStyle::with_template(
        "{prefix:<12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta} {msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut set = tokio::task::JoinSet::new();
    for (((d, r), t), only) in disks.iter().zip(readers).zip(targets).zip(only) {
        let bar = multi.add(ProgressBar::new(d.capacity_bytes));
        bar.set_style(style.clone());
        bar.set_prefix(format!("disk {}", d.disk_id));
        let (id, verify) = (d.disk_id, a.verify);
        set.spawn(async move { restore::restore_disk(id, r, t, verify, only, bar).await });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.context("a restore worker failed")?);
    }
    results.sort_by_key(|r| r.disk_id);
    if let Some(p) = &since {
        for r in &mut results {
            r.since = Some(p.backup.backup_id.clone());
        }
    }
    close(&source, &restores);
    let report = RestoreReport {
        vm_name: a.vm.clone(),
        backup_id: point.backup.backup_id.clone(),
        created_at: point.backup.created_at.clone(),
        disks: results,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.exit_code())
}

/// Close the restore exports this run opened.
fn close(source: &Source, restores: &[String]) {
    if let Source::Http(h) = source {
        for id in restores {
            let _ =
                h.call::<serde_json::Value>("DELETE", &format!("/api/v1/restores/{id}"), &[], None);
        }
    }
}

/// `restore --instant`: a writable restore per disk.
fn instant(
    a: &RestoreArgs,
    source: &Source,
    point: &BackupView,
    disks: &[DiskBackupRecord],
) -> anyhow::Result<u8> {
    let Source::Http(h) = source else {
        return fail(
            exit::USAGE,
            "instant recovery serves the disks over NBD from the daemon: run it without --data",
        );
    };
    let mut views = Vec::new();
    for d in disks {
        let body =
            serde_json::json!({ "backup_id": d.backup_id, "disk_id": d.disk_id, "writable": true });
        match h.call::<RestoreView>("POST", "/api/v1/restores", &[], Some(&body)) {
            Ok(v) => views.push(v),
            Err(e) => {
                for v in &views {
                    let _ = h.call::<serde_json::Value>(
                        "DELETE",
                        &format!("/api/v1/restores/{}", v.restore_id),
                        &[],
                        None,
                    );
                }
                return fail(daemon_code(&e), format!("{e:#}"));
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        println!(
            "VM {} at backup {} ({}), served read-write; the point itself does not change:",
            a.vm, point.backup.backup_id, point.backup.created_at
        );
        for v in &views {
            println!(
                "disk {}: {}  (restore {})",
                v.disk_id, v.nbd_uri, v.restore_id
            );
        }
        println!(
            "close each with: chainvault restores close RESTORE_ID [--keep-as /path/disk.qcow2]"
        );
    }
    Ok(exit::OK)
}

/// `chainvault restores ...`
#[derive(Debug, clap::Subcommand)]
pub enum RestoresCmd {
    /// Every open restore export; instant ones with their overlay's size.
    List(RestoresListArgs),
    /// Close a restore. An instant restore's writes are discarded, or with
    /// --keep-as written out with the point as a standalone qcow2 image.
    Close(RestoresCloseArgs),
}

#[derive(Debug, Args)]
pub struct RestoresListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: super::DaemonArgs,
}

#[derive(Debug, Args)]
pub struct RestoresCloseArgs {
    #[arg(value_name = "RESTORE_ID")]
    pub restore_id: String,
    /// Keep the point with the instant restore's writes as this new qcow2
    /// file (absolute path on the daemon's machine, outside the repository).
    #[arg(long, value_name = "PATH")]
    pub keep_as: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: super::DaemonArgs,
}

pub fn run_restores(cmd: RestoresCmd) -> anyhow::Result<u8> {
    match cmd {
        RestoresCmd::List(a) => {
            let h = super::inspect::HttpSource::new(&a.daemon.server, a.daemon.token.clone());
            let v: serde_json::Value = h.call("GET", "/api/v1/restores", &[], None)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let list: Vec<RestoreView> = serde_json::from_value(v["restores"].clone())?;
            if list.is_empty() {
                println!("no open restores");
            }
            for r in list {
                println!(
                    "{}  backup {} disk {}  {}  {}{}",
                    r.restore_id,
                    r.backup_id,
                    r.disk_id,
                    if r.writable {
                        "instant (writable)"
                    } else {
                        "read-only"
                    },
                    r.nbd_uri,
                    r.overlay_bytes
                        .map(|b| format!("  overlay {}", crate::units::human(b)))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        RestoresCmd::Close(a) => {
            let h = super::inspect::HttpSource::new(&a.daemon.server, a.daemon.token.clone());
            let mut q = Vec::new();
            if let Some(k) = &a.keep_as {
                let abs = std::path::absolute(k).with_context(|| k.display().to_string())?;
                q.push(("keep_as", abs.to_string_lossy().into_owned()));
            }
            let r: crate::api::handlers::DeletedResponse = h.call(
                "DELETE",
                &format!("/api/v1/restores/{}", a.restore_id),
                &q,
                None,
            )?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}", r.message);
            }
            Ok(0)
        }
    }
}

/// `--check`: 32 samples of 64 KiB of each target must equal point `a_pt`.
async fn check_targets(
    source: &Source,
    a_pt: &BackupView,
    disks: &[DiskBackupRecord],
    targets: &[Arc<Target>],
) -> Result<(), String> {
    for (d, t) in disks.iter().zip(targets) {
        let Some(ad) = a_pt.disks.iter().find(|x| x.disk_id == d.disk_id) else {
            return Err(format!(
                "point {} has no disk {}",
                a_pt.backup.backup_id, d.disk_id
            ));
        };
        let mut restore_id = None;
        let r = match source {
            Source::Offline(e) => Reader::local(e.data_dir(), &ad.image)?,
            Source::Http(h) => {
                let body = serde_json::json!({ "backup_id": ad.backup_id, "disk_id": ad.disk_id });
                let v: RestoreView = h
                    .call("POST", "/api/v1/restores", &[], Some(&body))
                    .map_err(|e| format!("{e:#}"))?;
                restore_id = Some(v.restore_id.clone());
                Reader::connect(&v.nbd_uri, 1).await?
            }
        };
        let size = r.size();
        let block = (64u64 << 10).min(size);
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size;
        let mut bad = None;
        for _ in 0..32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size / block).max(1)) * block;
            let (p, q) = (r.read(0, off, block).await?, t.read(off, block).await?);
            if p != q {
                bad = Some(off);
                break;
            }
        }
        if let (Source::Http(h), Some(id)) = (source, restore_id) {
            let _ =
                h.call::<serde_json::Value>("DELETE", &format!("/api/v1/restores/{id}"), &[], None);
        }
        if let Some(off) = bad {
            return Err(format!(
                "disk {}: {} does not hold point {} (it differs at byte {off}): restore in full, or give --since the point it holds",
                d.disk_id,
                t.name(),
                a_pt.backup.backup_id
            ));
        }
    }
    Ok(())
}
