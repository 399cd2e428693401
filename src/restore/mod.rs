//! `chainvault restore`: write a point in time of a VM's disks to files,
//! block devices, new qcow2 images or NBD exports.
//!
//! * The point: a backup id, a UTC time (the newest backup at or before
//!   it), or `latest`; the disks: the ones named, or every disk of the point.
//! * The data is read from a restore export of the daemon (`--server`), or
//!   from the repository's chain directly (`--data`).
//! * Only what holds data is written: the point's allocation map says where
//!   data is, and all-zero blocks inside data are not written either. On a
//!   new file or qcow2 image zero ranges stay holes; on an existing file they
//!   are punched, on a device zeroed (BLKZEROOUT), on an NBD target sent as
//!   WRITE_ZEROES.
//! * Disks run in parallel, each with several requests in flight; `--verify`
//!   reads every byte back and compares it with the point.

pub mod target;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use chainvault_nbd::proto::{CONTEXT_BASE_ALLOCATION, STATE_ZERO};
use chainvault_nbd::{Client, ConnectOptions, NbdUri};
use chainvault_qcow::{Chain, ExtentKind};
use indicatif::ProgressBar;
use serde::Serialize;

pub use target::{Format, Target};

/// Exit codes of `chainvault restore`.
pub mod exit {
    /// Every disk restored (and verified, with --verify).
    pub const OK: u8 = 0;
    /// A bug or an unexpected condition.
    pub const INTERNAL: u8 = 1;
    /// Bad arguments: unknown VM or point, a time before the first backup, a
    /// target that is too small, read-only, unreachable or inside the
    /// repository. Nothing was written.
    pub const USAGE: u8 = 2;
    /// The daemon is unreachable or answered 5xx.
    pub const DAEMON: u8 = 3;
    /// Reading the point or writing a target failed.
    pub const FAILED: u8 = 5;
    /// Some disks were restored, others failed.
    pub const PARTIAL: u8 = 6;
    /// --verify found a difference between a target and the point.
    pub const MISMATCH: u8 = 7;
}

/// Bytes per request to a file or qcow2 target: fewer, larger writes.
const PIECE: u64 = 1 << 20;
/// Bytes per request to an NBD target. Servers like qemu-nbd take a fresh
/// buffer for each request, and 1 MiB ones cost them a map, page faults and
/// an unmap each: a paired A/B into qemu-nbd gave 256 KiB pieces 0.85x the
/// time of 1 MiB ones, while a file target was 1.15x slower with them.
const NBD_PIECE: u64 = 256 << 10;
/// NBD connections to the restore export, and to an NBD target.
pub const CONNECTIONS: usize = 4;
/// All-zero blocks of this size inside data are not written.
const ZERO_BLOCK: usize = 64 << 10;
/// Bytes in flight per disk (spread over the connections).
const IN_FLIGHT_BYTES: u64 = 16 << 20;

/// Where a disk's bytes are read from.
pub enum Reader {
    /// The repository's chain, opened here.
    Local(Arc<Chain>),
    /// A restore export of the daemon, over several connections.
    Nbd(Vec<Arc<Client>>),
}

impl Reader {
    /// The chain of `image` (relative to the repository `data`), opened here.
    pub fn local(data: &std::path::Path, image: &str) -> Result<Reader, String> {
        Chain::open(
            &data.join(image),
            &chainvault_qcow::ChainOptions {
                root: Some(data.to_path_buf()),
                ..Default::default()
            },
        )
        .map(|c| Reader::Local(Arc::new(c)))
        .map_err(|e| format!("opening {image}: {e}"))
    }

    /// `conns` connections to the restore export at `uri`.
    pub async fn connect(uri: &str, conns: usize) -> Result<Reader, String> {
        Reader::connect_with(uri, conns, None).await
    }

    /// The same, also asking for the metadata context `extra` (a dirty
    /// bitmap) on the first connection.
    pub async fn connect_with(
        uri: &str,
        conns: usize,
        extra: Option<&str>,
    ) -> Result<Reader, String> {
        let parsed: NbdUri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
        let mut v = Vec::new();
        for i in 0..conns.max(1) {
            let mut ctx = vec![CONTEXT_BASE_ALLOCATION.to_string()];
            if let (0, Some(x)) = (i, extra) {
                ctx.push(x.to_string());
            }
            let c = Client::connect_uri(
                &parsed,
                crate::tls::nbd_options(ConnectOptions::with_contexts(ctx)),
            )
            .await
            .map_err(|e| format!("connecting to the restore export {uri}: {e}"))?;
            v.push(Arc::new(c));
        }
        Ok(Reader::Nbd(v))
    }

    pub fn size(&self) -> u64 {
        match self {
            Reader::Local(c) => c.size(),
            Reader::Nbd(c) => c[0].size(),
        }
    }

    /// Whether the export granted the metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        match self {
            Reader::Local(_) => false,
            Reader::Nbd(c) => c[0].info().has_context(name),
        }
    }

    /// The dirty ranges of the context `name` (flag 1), merged.
    pub async fn dirty_map(&self, name: &str) -> Result<Vec<(u64, u64)>, String> {
        let Reader::Nbd(c) = self else {
            return Err("a local chain has no NBD contexts".into());
        };
        let ext = c[0]
            .extents(name, 0, c[0].size())
            .await
            .map_err(|e| format!("block status of {name}: {e}"))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0;
        for e in ext {
            if e.flags & 1 != 0 {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == off => l.1 += e.length,
                    _ => out.push((off, e.length)),
                }
            }
            off += e.length;
        }
        Ok(out)
    }

    /// (offset, length, holds data) runs covering the disk.
    async fn map(&self) -> Result<Vec<(u64, u64, bool)>, String> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |off: u64, len: u64, data: bool| match out.last_mut() {
            Some(l) if l.2 == data && l.0 + l.1 == off => l.1 += len,
            _ => out.push((off, len, data)),
        };
        match self {
            Reader::Local(c) => {
                let c = Arc::clone(c);
                let ext = tokio::task::spawn_blocking(move || c.block_status(0, c.size()))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("mapping the point: {e}"))?;
                for e in ext {
                    push(e.offset, e.length, e.kind == ExtentKind::Data);
                }
            }
            Reader::Nbd(c) => {
                let c = &c[0];
                let ext = c
                    .extents(CONTEXT_BASE_ALLOCATION, 0, c.size())
                    .await
                    .map_err(|e| format!("block status of the restore export: {e}"))?;
                let mut off = 0;
                for e in ext {
                    push(off, e.length, e.flags & STATE_ZERO == 0);
                    off += e.length;
                }
            }
        }
        Ok(out)
    }

    /// Read on connection `lane` (any number: it is taken modulo the connections).
    pub async fn read(&self, lane: usize, off: u64, len: u64) -> Result<Vec<u8>, String> {
        self.read_into(lane, off, vec![0u8; len as usize]).await
    }

    /// Fill `buf` from `off` and hand it back: the copy loop keeps one buffer
    /// per request in flight instead of allocating (and clearing) one per read.
    pub async fn read_into(
        &self,
        lane: usize,
        off: u64,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        match self {
            Reader::Local(c) => {
                let c = Arc::clone(c);
                tokio::task::spawn_blocking(move || c.read_at(&mut buf, off).map(|_| buf))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("reading the point at {off}: {e}"))
            }
            Reader::Nbd(c) => c[lane % c.len()]
                .read_into(off, buf)
                .await
                .map_err(|e| format!("reading the restore export at {off}: {e}")),
        }
    }
}

/// What happened to one disk.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskResult {
    pub disk_id: u32,
    pub target: String,
    pub size: u64,
    /// Bytes of data written.
    pub written: u64,
    /// Bytes made zero on the target (holes punched, WRITE_ZEROES).
    pub zeroed: u64,
    /// Bytes not written: zero ranges and all-zero blocks on a target that
    /// already reads zeroes there.
    pub skipped: u64,
    pub verified: bool,
    /// With --since: the point the target held, and the bytes that changed
    /// since (all that was sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_bytes: Option<u64>,
    pub seconds: f64,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
}

use crate::digest::is_zero;

/// Write `buf` read at `off`: data as writes, all-zero blocks as zeroes.
/// Hands the buffer back for the next read.
async fn put(
    t: &Target,
    lane: usize,
    off: u64,
    buf: Vec<u8>,
    c: &Counters,
) -> Result<Vec<u8>, String> {
    let mut i = 0;
    while i < buf.len() {
        let end = |at: usize| {
            let abs = off as usize + at;
            ((abs / ZERO_BLOCK + 1) * ZERO_BLOCK - off as usize).min(buf.len())
        };
        let zero = is_zero(&buf[i..end(i)]);
        let mut j = end(i);
        while j < buf.len() && is_zero(&buf[j..end(j)]) == zero {
            j = end(j);
        }
        let (o, n) = (off + i as u64, (j - i) as u64);
        if !zero && i == 0 && j == buf.len() {
            // All data: hand the buffer over without a copy.
            let buf = t.write(lane, o, buf).await?;
            c.written.fetch_add(n, Ordering::Relaxed);
            return Ok(buf);
        }
        if zero {
            if t.fresh() {
                c.skipped.fetch_add(n, Ordering::Relaxed);
            } else {
                t.zero(lane, o, n).await?;
                c.zeroed.fetch_add(n, Ordering::Relaxed);
            }
        } else {
            t.write(lane, o, buf[i..j].to_vec()).await?;
            c.written.fetch_add(n, Ordering::Relaxed);
        }
        i = j;
    }
    Ok(buf)
}

/// Copy one disk from `r` to `t`, then (with `verify`) compare everything.
pub async fn restore_disk(
    disk_id: u32,
    r: Arc<Reader>,
    t: Arc<Target>,
    verify: bool,
    only: Option<Vec<(u64, u64)>>,
    bar: ProgressBar,
) -> DiskResult {
    let start = std::time::Instant::now();
    let size = r.size();
    let mut res = DiskResult {
        disk_id,
        target: t.name(),
        size,
        changed_bytes: only.as_ref().map(|o| o.iter().map(|r| r.1).sum()),
        ..Default::default()
    };
    let c = Arc::new(Counters::default());
    let out = async {
        t.prepare()?;
        // A rollback (--since) copies only the changed ranges, as data: the
        // target holds the earlier point, so every byte of them is written.
        let map = match &only {
            Some(ranges) => ranges.iter().map(|&(o, l)| (o, l, true)).collect(),
            None => r.map().await?,
        };
        let piece = match *t {
            Target::Nbd { .. } => NBD_PIECE,
            _ => PIECE,
        };
        let mut pieces = Vec::new();
        for (off, len, data) in map {
            let mut p = off;
            while p < off + len {
                let n = if data {
                    (off + len - p).min(piece - p % piece)
                } else {
                    off + len - p
                };
                pieces.push((p, n, data));
                p += n;
            }
        }
        bar.set_length(match &only {
            Some(o) => o.iter().map(|r| r.1).sum(),
            None => size,
        });
        let pieces = Arc::new(pieces);
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = tokio::task::JoinSet::new();
        for lane in 0..(IN_FLIGHT_BYTES / piece) as usize {
            let (r, t, c, pieces, next, stop, bar) = (
                Arc::clone(&r),
                Arc::clone(&t),
                Arc::clone(&c),
                Arc::clone(&pieces),
                Arc::clone(&next),
                Arc::clone(&stop),
                bar.clone(),
            );
            set.spawn(async move {
                let mut spare = Vec::new();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let Some(&(off, len, data)) = pieces.get(next.fetch_add(1, Ordering::Relaxed))
                    else {
                        return Ok(());
                    };
                    let step = async {
                        if data {
                            let mut buf = std::mem::take(&mut spare);
                            buf.resize(len as usize, 0);
                            let buf = r.read_into(lane, off, buf).await?;
                            spare = put(&t, lane, off, buf, &c).await?;
                            Ok(())
                        } else if t.fresh() {
                            c.skipped.fetch_add(len, Ordering::Relaxed);
                            Ok(())
                        } else {
                            t.zero(lane, off, len).await?;
                            c.zeroed.fetch_add(len, Ordering::Relaxed);
                            Ok(())
                        }
                    };
                    if let Err(e) = step.await {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    bar.inc(len);
                }
            });
        }
        let mut first: Option<String> = None;
        while let Some(j) = set.join_next().await {
            if let Err(e) = j.unwrap_or_else(|e| Err(e.to_string())) {
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        t.finish().await?;
        Ok::<(), String>(())
    }
    .await;
    res.written = c.written.load(Ordering::Relaxed);
    res.zeroed = c.zeroed.load(Ordering::Relaxed);
    res.skipped = c.skipped.load(Ordering::Relaxed);
    if let Err(e) = out {
        res.status = "failed".into();
        res.error = Some(e);
        bar.abandon();
        res.seconds = start.elapsed().as_secs_f64();
        return res;
    }
    if verify {
        bar.set_position(0);
        bar.set_message("verifying");
        let mut off = 0;
        while off < size {
            let n = (size - off).min(PIECE);
            let (a, b) = match (r.read(0, off, n).await, t.read(off, n).await) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    res.status = "failed".into();
                    res.error = Some(format!("verify: {e}"));
                    return res;
                }
            };
            if a != b {
                let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0) as u64 + off;
                res.status = "mismatch".into();
                res.error = Some(format!(
                    "verify: the target differs from the point at byte {at}"
                ));
                bar.abandon();
                return res;
            }
            off += n;
            bar.set_position(off);
        }
        res.verified = true;
    }
    bar.finish();
    res.status = "restored".into();
    res.seconds = start.elapsed().as_secs_f64();
    res
}

/// The summary of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub vm_name: String,
    pub backup_id: String,
    pub created_at: String,
    pub disks: Vec<DiskResult>,
}

impl RestoreReport {
    pub fn exit_code(&self) -> u8 {
        let ok = self.disks.iter().filter(|d| d.status == "restored").count();
        if self.disks.iter().any(|d| d.status == "mismatch") {
            exit::MISMATCH
        } else if ok == self.disks.len() {
            exit::OK
        } else if ok > 0 {
            exit::PARTIAL
        } else {
            exit::FAILED
        }
    }

    pub fn text(&self) -> String {
        use crate::units::human;
        let mut s = format!(
            "VM {} at backup {} ({}):\n",
            self.vm_name, self.backup_id, self.created_at
        );
        for d in &self.disks {
            let since = match (&d.since, d.changed_bytes) {
                (Some(a), Some(c)) => {
                    format!(" (rolled forward from {a}: {} changed since)", human(c))
                }
                _ => String::new(),
            };
            s.push_str(&format!(
                "disk {} -> {}: {}{since}, {} of {} written, {} zeroed, {} left as holes, {:.1} s{}{}\n",
                d.disk_id,
                d.target,
                d.status,
                human(d.written),
                human(d.size),
                human(d.zeroed),
                human(d.skipped),
                d.seconds,
                if d.verified {
                    ", verified: every byte read back equals the point"
                } else {
                    ""
                },
                d.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        s
    }
}

/// Choose the point: `at` is a backup id, `latest`, or an RFC 3339 time (the
/// newest backup at or before it). Only backups holding every wanted disk
/// completed count.
pub fn choose_point<'a>(
    vm: &str,
    backups: &'a [crate::model::BackupView],
    at: &str,
    disks: &[u32],
) -> Result<&'a crate::model::BackupView, String> {
    use crate::model::Status;
    let holds = |b: &crate::model::BackupView| {
        let done: Vec<u32> = b
            .disks
            .iter()
            .filter(|d| d.status == Status::Completed)
            .map(|d| d.disk_id)
            .collect();
        !done.is_empty() && disks.iter().all(|d| done.contains(d))
    };
    let usable: Vec<&crate::model::BackupView> = backups
        .iter()
        .filter(|b| b.backup.vm_name == vm && holds(b))
        .collect();
    if usable.is_empty() {
        return Err(format!(
            "VM {vm:?} has no completed backup{}",
            if disks.is_empty() {
                String::new()
            } else {
                format!(" of disk(s) {disks:?}")
            }
        ));
    }
    if at == "latest" {
        return Ok(usable[usable.len() - 1]);
    }
    if let Some(b) = usable.iter().find(|b| b.backup.backup_id == at) {
        return Ok(b);
    }
    if backups.iter().any(|b| b.backup.backup_id == at) {
        return Err(format!(
            "backup {at} of VM {vm:?} does not hold every disk asked for completed"
        ));
    }
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            format!("--at {at:?} is neither a backup id of VM {vm:?}, `latest`, nor an RFC 3339 time like 2026-03-01T02:00:00Z")
        })?;
    let ts = |b: &crate::model::BackupView| {
        time::OffsetDateTime::parse(
            &b.backup.created_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
    };
    usable
        .iter()
        .rev()
        .find(|b| ts(b).is_some_and(|c| c <= t))
        .copied()
        .ok_or_else(|| {
            format!(
                "VM {vm:?} has no backup at or before {at}; its first is {} ({})",
                usable[0].backup.backup_id, usable[0].backup.created_at
            )
        })
}
