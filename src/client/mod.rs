//! The reference transfer client: `chainvault backup`.
//!
//! One run backs up one VM: it asks the daemon for each disk's previous
//! change_id, looks at each source for the dirty bitmap that change_id
//! names, starts one VM-level backup (a disk whose bitmap is gone is asked
//! for in full, the others stay incremental), copies each disk over the NBD
//! target the daemon returns, flushes, and completes each disk with the name
//! of its new checkpoint bitmap as change_id. Any failure fails the backup
//! through the API. See docs/client.md for the operator's view.
//!
//! * [`api`]: the HTTP calls.
//! * [`source`]: NBD URIs, local qcow2 (through a private qemu-nbd), raw
//!   files and block devices.
//! * [`bitmap`]: checkpoint names and `qemu-img bitmap`.
//! * [`plan`]: maps → pieces to copy (on whole 64 KiB blocks); `copy.rs`:
//!   one disk's source, plan and copy; [`transfer`]: the parallel copy.
//! * [`digests`]: the block digests of what was read (docs/layout.md,
//!   "Block digests"), uploaded and sent with the completion.
//! * [`report`]: the summary and its JSON.

pub mod api;
pub mod bitmap;
mod copy;
pub mod digests;
pub mod plan;
pub mod report;
pub mod source;
pub mod transfer;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chainvault_nbd::{Client, ConnectOptions, NbdUri};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::model::{
    BackupType, ChangeIdResponse, DiskSpec, DiskTarget, StartRequest, StartResponse,
};
use api::{Api, ApiError};
use bitmap::NO_CHECKPOINT_PREFIX;
use copy::copy_disk;
use report::{BackupReport, DiskReport};
use source::{QemuNbd, Source, SourceKind};
use transfer::{Counters, RateLimit};

/// Exit codes (docs/client.md). A scheduler retries 3, 4 and 5 later, and
/// needs a human for 2.
pub mod exit {
    /// Every disk completed; every change_id recorded.
    pub const OK: u8 = 0;
    /// A bug or an unexpected condition.
    pub const INTERNAL: u8 = 1;
    /// Bad arguments or an unusable source (missing file, bitmap to record
    /// not on the source, image in use): fix the command; retrying will not help.
    pub const USAGE: u8 = 2;
    /// The daemon is unreachable, answered 5xx, or went away during the run.
    pub const DAEMON: u8 = 3;
    /// Another backup of this VM is running (HTTP 409): retry later.
    pub const BUSY: u8 = 4;
    /// The transfer failed (source or target I/O); the backup was failed
    /// through the API and nothing was recorded for the unfinished disks.
    pub const FAILED: u8 = 5;
    /// Some disks completed (their change_ids are recorded), others failed.
    pub const PARTIAL: u8 = 6;
    /// Stopped by SIGINT (128 + 2); SIGTERM gives 143. The backup was failed.
    pub const INTERRUPTED: u8 = 130;
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub disk_id: u32,
    pub source: String,
}

/// Parse `--disk` values: `SRC` (disk index = position) or `N=SRC`.
pub fn parse_disks(values: &[String]) -> Result<Vec<DiskArg>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, v) in values.iter().enumerate() {
        let (id, src) = match v.split_once('=') {
            Some((n, s)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (
                n.parse::<u32>()
                    .map_err(|_| format!("--disk {v:?}: disk index {n} is too large"))?,
                s.to_string(),
            ),
            _ => (i as u32, v.clone()),
        };
        if src.is_empty() {
            return Err(format!("--disk {v:?}: no source given"));
        }
        if !seen.insert(id) {
            return Err(format!(
                "--disk {v:?}: disk {id} is given twice (the position of --disk is the disk index unless written N=SOURCE)"
            ));
        }
        out.push(DiskArg {
            disk_id: id,
            source: src,
        });
    }
    if out.is_empty() {
        return Err("give at least one --disk SOURCE".into());
    }
    Ok(out)
}

/// Everything `chainvault backup` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub server: String,
    pub token: Option<String>,
    pub vm: String,
    pub disks: Vec<DiskArg>,
    /// Read every disk in full and start new chains (`--full`).
    pub full: bool,
    /// `Some(on)` when given; default: on for CBT-reset fallbacks, off with `--full`.
    pub compare_with_parent: Option<bool>,
    /// The checkpoint (bitmap) to record as each disk's change_id.
    pub bitmap: Option<String>,
    /// Create the new bitmap on local qcow2 sources before reading and remove
    /// the previous one after the completion is acknowledged.
    pub rotate: bool,
    /// Prefix of generated bitmap names.
    pub bitmap_prefix: String,
    /// NBD connections per disk to the daemon.
    pub connections: usize,
    /// Requests in flight per disk.
    pub requests: usize,
    /// Largest read/write request.
    pub request_size: u64,
    /// Bytes per second over all disks.
    pub limit_rate: Option<u64>,
    pub repository_id: Option<String>,
    pub tags: Vec<String>,
    /// Draw progress bars (on stderr).
    pub progress: bool,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
    fn usage(message: impl Into<String>) -> Failure {
        Failure::new(exit::USAGE, message)
    }
}

/// Exit code of an API error before anything was started.
fn api_code(e: &ApiError) -> u8 {
    match e.status() {
        None => exit::DAEMON,
        Some(409) => exit::BUSY,
        Some(401) | Some(403) => exit::USAGE,
        Some(s) if s >= 500 => exit::DAEMON,
        Some(_) => exit::USAGE,
    }
}

/// What was found out about a disk before the backup starts.
struct Prepared {
    arg: DiskArg,
    kind: SourceKind,
    size: u64,
    previous: ChangeIdResponse,
    /// The bitmap to read the changes from, when the disk can be incremental.
    read_from: Option<String>,
    /// Why a disk with a previous point is read in full.
    fallback: Option<String>,
    /// The new checkpoint to record.
    checkpoint: Option<String>,
    /// `--rotate`: create `checkpoint` before reading, remove `retire`
    /// after the completion is acknowledged.
    create: bool,
    retire: Option<String>,
    /// The disk size changed since the previous point.
    resized: bool,
    /// The open NBD source (URIs are opened while preparing: the bitmaps
    /// are checked on the connection that will read them).
    nbd: Option<Source>,
    /// Other bitmaps with our prefix that are neither read nor recorded.
    stale: Vec<String>,
}

/// Bitmaps this run created, removed again unless their disk completed.
#[derive(Default)]
struct Created {
    list: Mutex<Vec<(PathBuf, String, u32, bool)>>,
}

impl Created {
    fn add(&self, path: PathBuf, name: String, disk: u32) {
        lock(&self.list).push((path, name, disk, false));
    }
    fn commit(&self, disk: u32) {
        for e in lock(&self.list).iter_mut().filter(|e| e.2 == disk) {
            e.3 = true;
        }
    }
    fn uncommitted(&self) -> Vec<(PathBuf, String)> {
        lock(&self.list)
            .iter()
            .filter(|e| !e.3)
            .map(|e| (e.0.clone(), e.1.clone()))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared by the disk tasks.
struct Ctx {
    api: Api,
    opts: Options,
    backup_id: String,
    created: Created,
    limit: Option<Arc<RateLimit>>,
    notes: Mutex<Vec<String>>,
}

/// Run one backup. Never panics on bad input; the report carries the exit code.
pub async fn run(opts: Options) -> BackupReport {
    let t0 = Instant::now();
    let mut report = BackupReport {
        vm_name: opts.vm.clone(),
        server: opts.server.clone(),
        ..Default::default()
    };
    let code = match run_inner(&opts, &mut report).await {
        Ok(code) => code,
        Err(f) => {
            report.error = Some(f.message);
            f.code
        }
    };
    report.exit_code = code;
    if report.status.is_empty() {
        report.status = match code {
            exit::OK => "completed",
            exit::PARTIAL => "partial",
            exit::INTERRUPTED | 143 => "interrupted",
            _ if report.backup_id.is_some() => "failed",
            _ => "not started",
        }
        .into();
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

async fn run_inner(opts: &Options, report: &mut BackupReport) -> Result<u8, Failure> {
    if let Some(b) = &opts.bitmap {
        bitmap::validate_name(b).map_err(Failure::usage)?;
    }
    if !bitmap::is_checkpoint_name(&format!("{}x", opts.bitmap_prefix)) {
        return Err(Failure::usage(format!(
            "--bitmap-prefix {:?} must be made of A-Z a-z 0-9 . _ - and start with a letter or digit",
            opts.bitmap_prefix
        )));
    }
    if opts.connections == 0 || opts.requests == 0 {
        return Err(Failure::usage(
            "--connections and --requests must be at least 1",
        ));
    }
    let api = Api::new(&opts.server, opts.token.clone()).map_err(Failure::usage)?;

    let mut kinds = Vec::new();
    for d in &opts.disks {
        let k = source::classify(&d.source).map_err(Failure::usage)?;
        if opts.rotate && matches!(k, SourceKind::Nbd(_)) {
            return Err(Failure::usage(format!(
                "--rotate creates and removes bitmaps of local qcow2 files; {} is an NBD export: \
                 rotate its bitmaps where it is served (QMP block-dirty-bitmap-add/remove, see \
                 docs/client.md) and pass the new bitmap with --bitmap",
                d.source
            )));
        }
        kinds.push(k);
    }

    // Each disk's previous change_id, and whether its source still has it.
    let generated = bitmap::auto_name(&opts.bitmap_prefix);
    let mut prepared = Vec::new();
    for (d, kind) in opts.disks.iter().zip(kinds) {
        let previous = api
            .changeid(&opts.vm, d.disk_id)
            .await
            .map_err(|e| Failure::new(api_code(&e), e.to_string()))?;
        let prev_capacity = if previous.backup_id.is_empty() {
            None
        } else {
            api.backup(&previous.backup_id)
                .await
                .ok()
                .and_then(|b| b.disks.into_iter().find(|x| x.disk_id == d.disk_id))
                .map(|x| x.capacity_bytes)
        };
        let p = prepare(opts, d.clone(), kind, previous, prev_capacity, &generated).await;
        match p {
            Ok(p) => prepared.push(p),
            Err(f) => {
                for p in prepared {
                    if let Some(s) = p.nbd {
                        s.close().await;
                    }
                }
                return Err(f);
            }
        }
    }

    // Start the VM-level backup.
    let req = StartRequest {
        vm_name: opts.vm.clone(),
        backup_type: if opts.full {
            BackupType::Full
        } else {
            BackupType::Incremental
        },
        repository_id: opts.repository_id.clone(),
        tags: opts.tags.clone(),
        disks: Some(
            prepared
                .iter()
                .map(|p| {
                    let has_prev = !p.previous.change_id.is_empty();
                    let override_full = !opts.full && has_prev && p.read_from.is_none();
                    let compare =
                        has_prev && !p.resized && opts.compare_with_parent.unwrap_or(override_full);
                    DiskSpec {
                        disk_id: p.arg.disk_id,
                        disk_key: None,
                        capacity_bytes: Some(p.size),
                        mode: (opts.full || override_full).then_some(BackupType::Full),
                        compare_with_parent: compare,
                    }
                })
                .collect(),
        ),
    };
    let started: StartResponse = match api.start(&req).await {
        Ok(s) => s,
        Err(e) => {
            for p in prepared {
                if let Some(s) = p.nbd {
                    s.close().await;
                }
            }
            let msg = match e.status() {
                Some(409) => format!("{e}\nanother backup of VM {:?} is running: retry when it has finished (or fail it: POST /api/v1/backups/ID/fail)", opts.vm),
                _ => e.to_string(),
            };
            return Err(Failure::new(api_code(&e), msg));
        }
    };
    report.backup_id = Some(started.backup_id.clone());

    let ctx = Arc::new(Ctx {
        api: api.clone(),
        opts: opts.clone(),
        backup_id: started.backup_id.clone(),
        created: Created::default(),
        limit: opts.limit_rate.map(|r| Arc::new(RateLimit::new(r))),
        notes: Mutex::new(Vec::new()),
    });

    // Progress bars: one per disk, on stderr, only when asked.
    let multi = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:<22} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());

    let mut set = tokio::task::JoinSet::new();
    let mut states = Vec::new();
    for p in prepared {
        let Some(target) = started
            .disks
            .iter()
            .find(|t| t.disk_id == p.arg.disk_id)
            .cloned()
        else {
            let msg = format!(
                "the daemon's start answer has no target for disk {}",
                p.arg.disk_id
            );
            abandon(&ctx, &msg).await;
            return Err(Failure::new(exit::INTERNAL, msg));
        };
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style.clone());
        bar.set_prefix(format!(
            "disk {} {}",
            p.arg.disk_id,
            match target.mode {
                BackupType::Full => "full",
                BackupType::Incremental => "incremental",
            }
        ));
        let state = Arc::new(DiskState {
            report: Mutex::new(DiskReport {
                disk_id: p.arg.disk_id,
                source: p.arg.source.clone(),
                status: "not completed".into(),
                mode: Some(mode_name(target.mode).into()),
                // Why (the client's finding), then how (the daemon's answer).
                reason: match (&p.fallback, &target.reason) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.clone().or(b.clone()),
                },
                compare_with_parent: target.compare_with_parent,
                previous_change_id: target.previous_change_id.clone(),
                backup_id: Some(started.backup_id.clone()),
                capacity_bytes: target.capacity_bytes,
                ..Default::default()
            }),
            counters: Arc::new(Counters::default()),
            digests: Mutex::new(None),
            t0: Instant::now(),
        });
        states.push(Arc::clone(&state));
        for s in &p.stale {
            lock(&ctx.notes).push(format!(
                "disk {}: bitmap {s:?} on {} looks left behind by an earlier run (it has this \
                 client's prefix but is neither read nor recorded); it slows the VM's writes a \
                 little: remove it with `qemu-img bitmap --remove {} {s}` unless another repository uses it",
                p.arg.disk_id,
                p.arg.source,
                p.arg.source
            ));
        }
        let ctx = Arc::clone(&ctx);
        set.spawn(async move {
            let r = run_disk(&ctx, p, target, &state, bar.clone()).await;
            bar.finish_and_clear();
            r
        });
    }

    // Wait for the disks; the first failure or a signal stops the others.
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut first_error: Option<DiskFailure> = None;
    let mut interrupted: Option<(u8, &str)> = None;
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(f))) => {
                    if first_error.is_none() && interrupted.is_none() {
                        set.abort_all();
                        first_error = Some(f);
                    }
                }
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => {
                    if first_error.is_none() {
                        set.abort_all();
                        first_error = Some(DiskFailure { message: format!("a disk task failed: {e}"), daemon_gone: false });
                    }
                }
            },
            _ = sigint.recv(), if interrupted.is_none() => { interrupted = Some((exit::INTERRUPTED, "SIGINT")); set.abort_all(); }
            _ = sigterm.recv(), if interrupted.is_none() => { interrupted = Some((143, "SIGTERM")); set.abort_all(); }
        }
    }
    let _ = multi.clear();

    // Fill in the counters.
    for s in &states {
        let mut r = lock(&s.report);
        let c = &s.counters;
        r.bytes_read = c.read.load(Ordering::Relaxed);
        r.bytes_written = c.written.load(Ordering::Relaxed);
        r.bytes_zeroed = c.zeroed.load(Ordering::Relaxed);
        r.bytes_skipped = c.skipped.load(Ordering::Relaxed);
        if r.seconds == 0.0 {
            r.seconds = s.t0.elapsed().as_secs_f64();
        }
        r.throughput_bytes_per_sec = if r.seconds > 0.0 {
            r.bytes_read as f64 / r.seconds
        } else {
            0.0
        };
        r.data_reduction_percent = if r.capacity_bytes > 0 {
            100.0 * (1.0 - r.bytes_written as f64 / r.capacity_bytes as f64)
        } else {
            0.0
        };
    }
    let completed = states
        .iter()
        .filter(|s| lock(&s.report).status == "completed")
        .count();

    let outcome = if let Some((code, sig)) = interrupted {
        let reason = format!("the transfer client was stopped by {sig}");
        let daemon_gone = abandon(&ctx, &reason).await;
        let mut msg = reason;
        if daemon_gone {
            msg.push_str(
                "; the daemon could not be told (it fails the backup after its disk timeout)",
            );
        }
        Err(Failure::new(code, msg))
    } else if let Some(f) = first_error {
        let api_gone = abandon(&ctx, &f.message).await;
        let mut msg = f.message.clone();
        if f.daemon_gone || api_gone {
            if api_gone {
                msg.push_str(&format!(
                    "\nthe chainvault daemon at {} went away: nothing more is recorded for this backup; \
                     the daemon marks it interrupted when it restarts (or failed after its disk timeout). \
                     Retry when the daemon is back.",
                    ctx.api.base()
                ));
            }
            Err(Failure::new(exit::DAEMON, msg))
        } else if completed > 0 {
            Err(Failure::new(exit::PARTIAL, format!("{msg}\n{completed} disk(s) completed and keep their change_ids; the backup was failed for the others")))
        } else {
            Err(Failure::new(exit::FAILED, format!("{msg}\nthe backup was failed through the API; chains and change_ids are unchanged")))
        }
    } else {
        Ok(exit::OK)
    };

    // Bitmaps created for disks that did not complete are removed.
    for (path, name) in ctx.created.uncommitted() {
        if let Err(e) = bitmap::remove(&path, &name).await {
            lock(&ctx.notes).push(format!(
                "could not remove the unused bitmap {name:?} from {}: {e}; remove it with `qemu-img bitmap --remove {} {name}`",
                path.display(),
                path.display()
            ));
        }
    }

    // What the repository stores now.
    if let Ok(view) = ctx.api.backup(&ctx.backup_id).await {
        for s in &states {
            let mut r = lock(&s.report);
            if let Some(d) = view.disks.iter().find(|d| d.disk_id == r.disk_id) {
                r.size_on_disk = d.size_on_disk;
            }
        }
    }
    report.disks = states.iter().map(|s| lock(&s.report).clone()).collect();
    report.disks.sort_by_key(|d| d.disk_id);
    report.notes.extend(lock(&ctx.notes).drain(..));
    if matches!(&outcome, Err(f) if f.code == exit::PARTIAL) {
        report.status = "partial".into();
    }
    outcome
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, Failure> {
    tokio::signal::unix::signal(kind).map_err(|e| {
        Failure::new(
            exit::INTERNAL,
            format!("cannot install a signal handler: {e}"),
        )
    })
}

fn mode_name(m: BackupType) -> &'static str {
    match m {
        BackupType::Full => "full",
        BackupType::Incremental => "incremental",
    }
}

/// Fail the backup through the API. Returns true when the daemon could not
/// be reached.
async fn abandon(ctx: &Ctx, reason: &str) -> bool {
    match ctx.api.fail(&ctx.backup_id, reason).await {
        Ok(_) => false,
        Err(e @ ApiError::Unreachable { .. }) => {
            tracing::info!(backup = %ctx.backup_id, error = %e, "could not fail the backup");
            true
        }
        Err(e) => {
            // 409: it already completed or failed on its own; nothing to do.
            tracing::warn!(backup = %ctx.backup_id, error = %e, "fail request refused");
            false
        }
    }
}

/// Learn a disk's source, decide incremental or full, and check the
/// checkpoint to record, before anything is started on the daemon.
async fn prepare(
    opts: &Options,
    arg: DiskArg,
    kind: SourceKind,
    previous: ChangeIdResponse,
    prev_capacity: Option<u64>,
    generated: &str,
) -> Result<Prepared, Failure> {
    let prev = previous.change_id.clone();
    let prev_is_ours = bitmap::is_checkpoint_name(&prev);
    let mut p = Prepared {
        arg: arg.clone(),
        kind: kind.clone(),
        size: 0,
        previous,
        read_from: None,
        fallback: None,
        checkpoint: None,
        create: false,
        retire: None,
        resized: false,
        nbd: None,
        stale: Vec::new(),
    };
    let d = arg.disk_id;
    let mut missing: Option<String> = None;
    match &kind {
        SourceKind::Nbd(uri) => {
            let mut wanted = Vec::new();
            if prev_is_ours && !opts.full {
                wanted.push(prev.clone());
            }
            if let Some(n) = &opts.bitmap {
                if !wanted.contains(n) {
                    wanted.push(n.clone());
                }
            }
            let src = Source::open_nbd(uri, &wanted, None)
                .await
                .map_err(|e| Failure::usage(format!("disk {d}: {e}")))?;
            p.size = src.size();
            let listed = src.listed_bitmaps();
            if let Some(n) = &opts.bitmap {
                if !src.has_bitmap(n) {
                    let msg = format!(
                        "disk {d}: the source {uri} does not export the bitmap {n:?} to record as the \
                         new checkpoint (it exports: {}). Create it at the moment the backup's point \
                         in time is taken (QMP block-dirty-bitmap-add, in one transaction with the \
                         snapshot) and export it too (qemu-nbd -B {n} / block-export-add \
                         \"bitmaps\"), see docs/client.md",
                        list_or_none(&listed)
                    );
                    src.close().await;
                    return Err(Failure::usage(msg));
                }
                p.checkpoint = Some(n.clone());
            }
            if prev_is_ours && !opts.full {
                if src.has_bitmap(&prev) {
                    p.read_from = Some(prev.clone());
                } else {
                    missing = Some(format!(
                        "the source does not export bitmap {prev:?} (it exports: {})",
                        list_or_none(&listed)
                    ));
                }
            }
            p.nbd = Some(src);
        }
        SourceKind::Qcow2(path) => {
            let info = bitmap::image_info(path)
                .await
                .map_err(|e| Failure::usage(format!("disk {d}: {e}")))?;
            if info.format != "qcow2" {
                return Err(Failure::usage(format!(
                    "disk {d}: {} looks like qcow2 but qemu-img says {}",
                    path.display(),
                    info.format
                )));
            }
            p.size = info.virtual_size;
            if prev_is_ours && !opts.full {
                match info.bitmap(&prev) {
                    Some(b) if !b.in_use => p.read_from = Some(prev.clone()),
                    Some(_) => {
                        missing = Some(format!(
                            "bitmap {prev:?} on {} is marked in-use (the image was not closed \
                             cleanly while it recorded writes, so it may have missed some)",
                            path.display()
                        ))
                    }
                    None => {
                        missing = Some(format!(
                            "bitmap {prev:?} is not on {} (it has: {})",
                            path.display(),
                            list_or_none(&info.names())
                        ))
                    }
                }
            }
            if opts.rotate {
                let n = match &opts.bitmap {
                    Some(n) => n.clone(),
                    None => {
                        // One generated name for every disk of the run; it
                        // never collides: add a counter if needed.
                        let base = generated.to_string();
                        let mut n = base.clone();
                        let mut i = 1;
                        while info.bitmap(&n).is_some() {
                            n = format!("{base}-{i}");
                            i += 1;
                        }
                        n
                    }
                };
                if info.bitmap(&n).is_some() {
                    return Err(Failure::usage(format!(
                        "disk {d}: bitmap {n:?} already exists on {}; --rotate creates the new \
                         checkpoint itself: choose another --bitmap name (or leave it out for a \
                         generated one), or remove the old one with `qemu-img bitmap --remove {} {n}` \
                         if an interrupted run left it behind",
                        path.display(),
                        path.display()
                    )));
                }
                p.checkpoint = Some(n.clone());
                p.create = true;
                if prev_is_ours && info.bitmap(&prev).is_some() {
                    p.retire = Some(prev.clone());
                }
                p.stale = info
                    .names()
                    .into_iter()
                    .filter(|b| b.starts_with(&opts.bitmap_prefix) && *b != prev && *b != n)
                    .collect();
            } else if let Some(n) = &opts.bitmap {
                match info.bitmap(n) {
                    Some(b) if !b.in_use => p.checkpoint = Some(n.clone()),
                    Some(_) => {
                        return Err(Failure::usage(format!(
                            "disk {d}: bitmap {n:?} on {} is marked in-use (inconsistent); it \
                             cannot be a checkpoint: remove it and create a new one, or use --rotate",
                            path.display()
                        )))
                    }
                    None => {
                        return Err(Failure::usage(format!(
                            "disk {d}: bitmap {n:?} to record as the new checkpoint is not on {} \
                             (it has: {}); create it (`qemu-img bitmap --add {} {n}`) at the \
                             point in time you back up, or let --rotate do it",
                            path.display(),
                            list_or_none(&info.names()),
                            path.display()
                        )))
                    }
                }
            }
        }
        SourceKind::RawFile(path) | SourceKind::BlockDevice(path) => {
            let src =
                Source::open_file(path).map_err(|e| Failure::usage(format!("disk {d}: {e}")))?;
            p.size = src.size();
            if !p.previous.change_id.is_empty() && !opts.full {
                missing = Some(format!(
                    "{} is a raw source: raw files and block devices carry no dirty bitmaps",
                    path.display()
                ));
            }
        }
    }
    if p.size == 0 || !p.size.is_multiple_of(512) {
        if let Some(s) = p.nbd.take() {
            s.close().await;
        }
        return Err(Failure::usage(format!(
            "disk {d}: {} is {} bytes, not a positive multiple of 512 (VM disks are); \
             pad it (truncate -s %512 FILE) or give the right source",
            kind.describe(),
            p.size
        )));
    }
    let has_prev = !p.previous.change_id.is_empty();
    if has_prev && !opts.full {
        if !prev_is_ours && missing.is_none() {
            missing = Some(format!(
                "the previous change_id {prev:?} does not name a checkpoint bitmap (it was recorded \
                 without one, or by another client)"
            ));
        }
        if let Some(old) = prev_capacity.filter(|c| *c != p.size) {
            p.read_from = None;
            p.resized = true;
            missing = Some(format!(
                "the disk size changed from {old} to {} bytes since the previous point",
                p.size
            ));
        }
        if let Some(m) = missing {
            p.read_from = None;
            p.fallback = Some(format!(
                "read in full: {m}; changed-block tracking restarts from this backup"
            ));
        }
    }
    Ok(p)
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One disk's live state.
struct DiskState {
    report: Mutex<DiskReport>,
    counters: Arc<Counters>,
    /// The block digests of what was read, once the copy has run.
    digests: Mutex<Option<Arc<digests::SourceDigests>>>,
    t0: Instant,
}

#[derive(Debug)]
struct DiskFailure {
    message: String,
    /// The target connection or the API went away.
    daemon_gone: bool,
}

/// Copy one disk and complete it.
async fn run_disk(
    ctx: &Ctx,
    mut p: Prepared,
    target: DiskTarget,
    state: &DiskState,
    bar: ProgressBar,
) -> Result<(), DiskFailure> {
    let d = p.arg.disk_id;
    let (source, result) = copy_disk(ctx, &mut p, &target, state, bar).await;
    let change_id = p
        .checkpoint
        .clone()
        .unwrap_or_else(|| format!("{NO_CHECKPOINT_PREFIX}{}", ctx.backup_id));
    if let Err(e) = result {
        close(source).await;
        lock(&state.report).error = Some(strip_disk(&e.message, d));
        return Err(e);
    }
    // Complete while the source is still open: an exported bitmap is busy in
    // QEMU (it cannot be removed), and a local image stays locked, so the
    // checkpoint recorded is the one that was read beside.
    let written = state.counters.written.load(Ordering::Relaxed);
    // The block digests of what was read go first, then the source's digest
    // with the completion: the daemon refuses a disk that differs.
    let sd = lock(&state.digests).clone();
    let mut digest = None;
    if let Some(sd) = sd {
        digest = sd.root().map(|r| r.to_string());
        lock(&state.report).digest = digest.clone();
        if !sd.complete {
            lock(&ctx.notes).push(format!(
                "disk {d}: the parent point has no block digests, so the source's digest is not                  known from an incremental; the blocks read are still checked"
            ));
        }
        if let Err(e) = ctx
            .api
            .put_source_digests(&ctx.backup_id, d, sd.upload())
            .await
        {
            if e.status() != Some(404) {
                close(source).await;
                let f = DiskFailure {
                    message: format!("disk {d}: the daemon refused the block digests: {e}"),
                    daemon_gone: matches!(e, ApiError::Unreachable { .. }),
                };
                lock(&state.report).error = Some(strip_disk(&f.message, d));
                return Err(f);
            }
            // A daemon without digests: complete without them.
            digest = None;
        }
    }
    let done = ctx
        .api
        .complete(&ctx.backup_id, d, &change_id, written, digest)
        .await;
    close(source).await;
    let done = match done {
        Ok(r) => r,
        Err(e) => {
            let f = DiskFailure {
                message: format!("disk {d}: completion refused: {e}"),
                daemon_gone: matches!(e, ApiError::Unreachable { .. }),
            };
            lock(&state.report).error = Some(strip_disk(&f.message, d));
            return Err(f);
        }
    };
    ctx.created.commit(d);
    {
        let mut r = lock(&state.report);
        r.status = "completed".into();
        r.change_id = Some(done.change_id.clone());
        r.seconds = state.t0.elapsed().as_secs_f64();
    }
    if p.checkpoint.is_none() {
        lock(&ctx.notes).push(format!(
            "disk {d}: no new checkpoint was recorded (change_id {change_id:?}): its next backup \
             is a full read; pass --rotate (local qcow2) or --bitmap NAME to keep it incremental"
        ));
    }
    // The previous checkpoint is retired only now that the daemon holds the
    // new one.
    if let (Some(old), SourceKind::Qcow2(path)) = (&p.retire, &p.kind) {
        if Some(old) != p.checkpoint.as_ref() {
            if let Err(e) = bitmap::remove(path, old).await {
                lock(&ctx.notes).push(format!(
                    "disk {d}: the previous bitmap {old:?} could not be removed ({e}); remove it \
                     with `qemu-img bitmap --remove {} {old}`",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// A message without its leading "disk N: " (the report line names the disk).
fn strip_disk(m: &str, d: u32) -> String {
    m.strip_prefix(&format!("disk {d}: "))
        .unwrap_or(m)
        .to_string()
}

/// Close a source once the transfer's workers have let go of it.
async fn close(source: Option<Arc<Source>>) {
    if let Some(s) = source.and_then(|s| Arc::try_unwrap(s).ok()) {
        s.close().await;
    }
}
