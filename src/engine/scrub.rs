//! Deep verify (scrub): read every block each point's own layer holds,
//! through its chain, hash it and compare with its recorded block digest.
//! A bad block is named (point, disk offset, the image file and host offset
//! that hold it, the later points that read it), the result is kept with
//! each point, and a bad point is never offered as a parent again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chainvault_qcow::{Chain, ExtentKind};
use tracing::{info, warn};

use super::{cat, repo, Engine, EngineResult};
use crate::catalog::Change;
use crate::digest::compute::{self, Runs};
use crate::digest::file::{self, Kind, Reader, Resolved};
use crate::digest::{block_len, zero_digest, BLOCK};
use crate::model::*;

/// Bad blocks named per point (the rest are counted).
const MAX_NAMED: usize = 64;

/// Blocks a digest file lists (its indexes), or its error.
fn listed(image: &Path) -> Result<Option<Vec<u64>>, String> {
    let p = file::path_of(image);
    if !p.exists() {
        return Ok(None);
    }
    let mut r = Reader::open(&p)?;
    let mut v = Vec::new();
    while let Some((i, _)) = r.next_entry()? {
        v.push(i);
    }
    Ok(Some(v))
}

fn merge_runs(a: &Runs, b: &Runs) -> Runs {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b.iter()).copied().collect();
    all.sort();
    let mut out = Runs::new();
    for (s, e) in all {
        compute::push_run(&mut out, s, e);
    }
    out
}

/// One point's findings.
struct PointScrub {
    blocks: u64,
    bytes: u64,
    bad: Vec<(u64, String)>,
    bad_count: u64,
    error: Option<String>,
}

/// Check one point's own blocks. `pace` is called with the bytes read so far.
/// The digest file is read twice, once for the blocks it lists and once,
/// in step with the hashing, for their digests, so that memory stays small
/// however large the layer.
fn scrub_point(chain: &Chain, pace: &dyn Fn(u64)) -> Result<PointScrub, String> {
    let top = chain.top().path().to_path_buf();
    let size = chain.size();
    let path = file::path_of(&top);
    let mut reader = Reader::open(&path)?;
    let kind = reader.kind;
    let mut own = Runs::new();
    while let Some((i, _)) = reader.next_entry()? {
        compute::push_run(&mut own, i, i + 1);
    }
    // A whole file also claims that every block it does not list is zero.
    let runs = match kind {
        Kind::Layer => own,
        Kind::Whole => merge_runs(&own, &compute::data_blocks(chain)?),
    };
    let mut expected = Reader::open(&path)?;
    let mut next = expected.next_entry()?;
    let mut out = PointScrub {
        blocks: 0,
        bytes: 0,
        bad: Vec::new(),
        bad_count: 0,
        error: None,
    };
    let res = compute::hash_runs(
        chain,
        &runs,
        &mut |i, got| {
            while next.is_some_and(|(j, _)| j < i) {
                next = expected.next_entry()?;
            }
            let want = match next {
                Some((j, d)) if j == i => d,
                _ => zero_digest(block_len(size, i)),
            };
            out.blocks += 1;
            let why = match got {
                Ok(d) if *d == want => return Ok(()),
                Ok(_) => "its bytes do not match the recorded block digest".to_string(),
                Err(e) => format!("it cannot be read: {e}"),
            };
            out.bad_count += 1;
            if out.bad.len() < MAX_NAMED {
                out.bad.push((i, why));
            }
            Ok(())
        },
        &|done| {
            pace(done);
        },
    );
    out.bytes = compute::count(&runs) * BLOCK;
    if let Err(e) = res {
        out.error = Some(e);
    }
    Ok(out)
}

/// Points a scheduled deep verify checks in one turn (their results are
/// kept after each turn, so a long scrub makes progress that survives a
/// restart).
const SCHEDULED_BATCH: usize = 8;

/// When a point was last deep-verified, in seconds since the epoch.
fn verified_at(d: &DiskBackupRecord) -> Option<i64> {
    let v = d.deep_verify.as_ref()?;
    time::OffsetDateTime::parse(&v.at, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

impl Engine {
    /// `chainvault verify --deep`, `POST /api/v1/verify/deep`.
    pub async fn deep_verify(&self, req: DeepVerifyRequest) -> EngineResult<DeepVerifyReport> {
        self.check_not_stopping()?;
        let completed = self.completed_points()?;
        let disks: Vec<DiskBackupRecord> = completed
            .iter()
            .filter(|d| req.vm_name.as_ref().is_none_or(|v| *v == d.vm_name))
            .cloned()
            .collect();
        let rate = req.rate_mib_s.filter(|r| *r > 0).map(|r| r << 20);
        let _one = self.scrub_lock.lock().await;
        self.scrub(disks, completed, rate).await
    }

    /// One turn of the daemon's deep-verify schedule: the points whose last
    /// deep verify is older than `every` (never verified first, then the
    /// oldest), a few at a time, at the configured rate. A turn that finds
    /// a deep verify already running leaves it alone.
    pub(super) async fn scheduled_verify(&self, every: Duration) {
        let Ok(_one) = self.scrub_lock.try_lock() else {
            return;
        };
        let Ok(completed) = self.completed_points() else {
            return;
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut due: Vec<(Option<i64>, &DiskBackupRecord)> = completed
            .iter()
            .filter(|d| d.digest.is_some())
            .map(|d| (verified_at(d), d))
            .filter(|(at, _)| at.is_none_or(|t| now - t >= every.as_secs() as i64))
            .collect();
        if due.is_empty() {
            return;
        }
        due.sort_by(|a, b| (a.0, &a.1.backup_id).cmp(&(b.0, &b.1.backup_id)));
        let batch: Vec<DiskBackupRecord> = due
            .into_iter()
            .take(SCHEDULED_BATCH)
            .map(|(_, d)| d.clone())
            .collect();
        let rate = Some(self.cfg.verify_rate_mib_s.max(1) << 20);
        match self.scrub(batch, completed, rate).await {
            Ok(r) if r.points_bad > 0 => warn!(
                points = r.points_checked,
                bad = r.points_bad,
                first = r.problems.first().map(String::as_str).unwrap_or_default(),
                "scheduled deep verify found bad points"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "scheduled deep verify failed"),
        }
    }

    /// Every completed point in the catalog.
    fn completed_points(&self) -> EngineResult<Vec<DiskBackupRecord>> {
        Ok(self
            .catalog
            .all_disks()
            .map_err(cat)?
            .into_iter()
            .filter(|d| d.status == Status::Completed)
            .collect())
    }

    /// Check `disks` and keep each one's result with its record. `completed`
    /// is every completed point, from which those of the same disks name the
    /// later points a bad block affects.
    async fn scrub(
        &self,
        mut disks: Vec<DiskBackupRecord>,
        completed: Vec<DiskBackupRecord>,
        rate: Option<u64>,
    ) -> EngineResult<DeepVerifyReport> {
        disks.sort_by(|a, b| {
            (&a.vm_name, a.disk_id, &a.backup_id).cmp(&(&b.vm_name, b.disk_id, &b.backup_id))
        });
        let checked: std::collections::HashSet<(&str, u32)> = disks
            .iter()
            .map(|d| (d.vm_name.as_str(), d.disk_id))
            .collect();
        let family: Vec<DiskBackupRecord> = completed
            .into_iter()
            .filter(|d| checked.contains(&(d.vm_name.as_str(), d.disk_id)))
            .collect();
        let data = self.data.clone();
        let opts = self.chain_options(false);
        let stop = self.scrub_stop.clone();
        let (report, results) = tokio::task::spawn_blocking(move || {
            scrub_all(&data, &opts, disks, family, rate, &stop)
        })
        .await
        .map_err(super::EngineError::internal)??;
        // Keep each point's result (the point may have gone meanwhile).
        let _op = self.op.lock().await;
        let mut changes = Vec::new();
        let mut sidecars = Vec::new();
        for (backup_id, disk_id, r) in results {
            if let Some(mut d) = self.catalog.disk(&backup_id, disk_id).map_err(cat)? {
                d.deep_verify = Some(r);
                if let Some(b) = self.catalog.backup(&backup_id).map_err(cat)? {
                    sidecars.push((self.abs(&d.image), repo::Sidecar::new(&b, &d)));
                }
                changes.push(Change::PutDisk(d));
            }
        }
        self.catalog.apply(&changes).map_err(cat)?;
        for (img, sc) in sidecars {
            if let Err(e) = repo::write_sidecar(&img, &sc) {
                warn!(error = %e, "sidecar update after deep verify failed");
            }
        }
        info!(
            points = report.points_checked,
            bad = report.points_bad,
            bytes = report.bytes_read,
            "deep verify done"
        );
        Ok(report)
    }
}

type Results = Vec<(String, u32, DeepVerifyResult)>;

/// Check `disks`; `family` holds every completed point of their disks
/// (for the later points a bad block affects). Stops between points when
/// `stop` is set (the daemon is shutting down); the points not reached get
/// no result.
fn scrub_all(
    data: &Path,
    opts: &chainvault_qcow::ChainOptions,
    disks: Vec<DiskBackupRecord>,
    family: Vec<DiskBackupRecord>,
    rate: Option<u64>,
    stop: &AtomicBool,
) -> EngineResult<(DeepVerifyReport, Results)> {
    let t0 = Instant::now();
    let mut rep = DeepVerifyReport::default();
    let mut results = Results::new();
    let by_id: HashMap<(String, u32), DiskBackupRecord> = family
        .into_iter()
        .map(|d| ((d.backup_id.clone(), d.disk_id), d))
        .collect();
    let mut listed_cache: HashMap<PathBuf, Option<Vec<u64>>> = HashMap::new();
    let mut read_before = 0u64;
    for d in &disks {
        if stop.load(Ordering::Acquire) {
            rep.problems
                .push("stopped before every point was checked: the daemon is shutting down".into());
            break;
        }
        let image = data.join(&d.image);
        let chain = match Chain::open(&image, opts) {
            Ok(c) => c,
            Err(e) => {
                rep.problems.push(format!(
                    "{} disk {} point {}: cannot open {}: {e}",
                    d.vm_name,
                    d.disk_id,
                    d.backup_id,
                    image.display()
                ));
                continue;
            }
        };
        if !file::has_current(&image) {
            rep.points_without_digests += 1;
            continue;
        }
        rep.points_checked += 1;
        let base = read_before;
        let pace = |done: u64| {
            if let Some(r) = rate {
                let due = Duration::from_secs_f64((base + done) as f64 / r as f64);
                let el = t0.elapsed();
                if due > el {
                    std::thread::sleep(due - el);
                }
            }
        };
        let now = now();
        let mut first_bad: Option<u64> = None;
        let mut message: Option<String> = None;
        match scrub_point(&chain, &pace) {
            Err(e) => {
                message = Some(e);
            }
            Ok(s) => {
                rep.blocks_checked += s.blocks;
                rep.bytes_read += s.bytes;
                read_before += s.bytes;
                if let Some(e) = s.error {
                    message = Some(format!("reading the point failed: {e}"));
                }
                if s.bad_count > 0 {
                    first_bad = s.bad.first().map(|b| b.0 * BLOCK);
                    let m = format!(
                        "{} block(s) fail their recorded digests (other bytes, or unreadable); the first at offset {}",
                        s.bad_count,
                        first_bad.unwrap_or(0)
                    );
                    message = Some(match message {
                        Some(x) => format!("{m}; {x}"),
                        None => m,
                    });
                }
                for (i, why) in s.bad {
                    rep.bad_blocks.push(name_block(
                        data,
                        &chain,
                        d,
                        &by_id,
                        &mut listed_cache,
                        i,
                        why,
                    ));
                }
            }
        }
        // The recorded digest must be what the files resolve to.
        if message.is_none() {
            let layers = compute::layer_paths(&chain);
            match Resolved::open(&layers, chain.size())
                .and_then(|r| r.map(|r| r.root()).transpose())
            {
                Ok(Some(root)) => {
                    if let Some(want) = &d.digest {
                        if root.to_string() != *want {
                            message = Some(format!(
                                "its digest files resolve to {root}, but the point recorded {want}"
                            ));
                        }
                    }
                }
                Ok(None) => rep.problems.push(format!(
                    "{} disk {} point {}: a layer below has no block digests",
                    d.vm_name, d.disk_id, d.backup_id
                )),
                Err(e) => message = Some(e),
            }
        }
        let ok = message.is_none();
        if !ok {
            rep.points_bad += 1;
            rep.problems.push(format!(
                "{} disk {} point {}: {}",
                d.vm_name,
                d.disk_id,
                d.backup_id,
                message.clone().unwrap_or_default()
            ));
        }
        results.push((
            d.backup_id.clone(),
            d.disk_id,
            DeepVerifyResult {
                at: now,
                ok,
                first_bad_offset: first_bad,
                message,
            },
        ));
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok((rep, results))
}

/// Where a bad block lives and who reads it.
#[allow(clippy::too_many_arguments)]
fn name_block(
    data: &Path,
    chain: &Chain,
    d: &DiskBackupRecord,
    by_id: &HashMap<(String, u32), DiskBackupRecord>,
    cache: &mut HashMap<PathBuf, Option<Vec<u64>>>,
    i: u64,
    why: String,
) -> BadBlock {
    let off = i * BLOCK;
    let len = block_len(chain.size(), i) as u64;
    let (mut image, mut host, mut compressed) = (None, None, false);
    if let Ok(ext) = chain.block_status(off, len) {
        if let Some(e) = ext.iter().find(|e| e.kind == ExtentKind::Data) {
            let layer = chain.layers()[e.depth as usize].path();
            image = Some(
                layer
                    .strip_prefix(data)
                    .unwrap_or(layer)
                    .display()
                    .to_string(),
            );
            host = e.host_offset.map(|h| h + (off.max(e.offset) - e.offset));
            compressed = e.compressed;
            if compressed {
                // Where the damaged cluster's compressed bytes start.
                let at = off.max(e.offset);
                host = match &chain.layers()[e.depth as usize] {
                    chainvault_qcow::Layer::Qcow(img) => {
                        img.compressed_host_offset(at).ok().flatten()
                    }
                    chainvault_qcow::Layer::Raw(_) => None,
                };
            }
        }
    }
    // Later points of the same disk that reach this point through their
    // parents without a layer of their own listing the block.
    let mut affected = Vec::new();
    for ((id, disk), p) in by_id {
        if *disk != d.disk_id || p.vm_name != d.vm_name || *id == d.backup_id {
            continue;
        }
        let mut between: Vec<&DiskBackupRecord> = Vec::new();
        let mut cur = Some(p);
        let mut reaches = false;
        while let Some(c) = cur {
            if c.backup_id == d.backup_id {
                reaches = true;
                break;
            }
            between.push(c);
            cur = c
                .parent_backup_id
                .as_ref()
                .and_then(|pid| by_id.get(&(pid.clone(), *disk)));
        }
        if !reaches {
            continue;
        }
        let hidden = between.iter().any(|b| {
            let img = data.join(&b.image);
            cache
                .entry(img.clone())
                .or_insert_with(|| listed(&img).ok().flatten())
                .as_ref()
                .is_some_and(|v| v.binary_search(&i).is_ok())
        });
        if !hidden {
            affected.push(id.clone());
        }
    }
    affected.sort();
    BadBlock {
        vm_name: d.vm_name.clone(),
        disk_id: d.disk_id,
        backup_id: d.backup_id.clone(),
        offset: off,
        length: len,
        image,
        host_offset: host,
        compressed,
        affected,
        message: why,
    }
}
