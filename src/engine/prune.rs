//! Retention policies and prune: which backups of each VM a policy keeps
//! (the rules are in `retention.rs`), what removing the rest frees, and the
//! removals themselves (each one a `delete_backup`, so every removal is the
//! journalled consolidation of `lifecycle.rs`).
//!
//! A VM's own policy, when it has one, replaces the server-wide default as a
//! whole. Keep counts given to one prune run replace the policy's keep
//! counts for that run (its time zone still applies).

use std::collections::HashMap;

use tracing::{info, warn};

use super::retention::{self, Candidate, KeepOptions, Rule, Verdict};
use super::space::{allocated, own_ranges, uncovered, union};
use super::{cat, lock, validate_vm_name, Engine, EngineError, EngineResult};
use crate::model::*;

/// The most periods one keep option may ask for.
pub const MAX_KEEP: i64 = 100_000;
/// The longest chain a depth limit may allow.
pub const MAX_CHAIN_LENGTH: i64 = 100_000;

/// Check a request's keep counts: whole numbers from 0 to [`MAX_KEEP`].
fn keep_options(counts: [Option<i64>; 6]) -> EngineResult<(KeepOptions, bool)> {
    let mut k = KeepOptions::default();
    let mut any = false;
    for (rule, n) in Rule::ALL.iter().zip(counts) {
        if let Some(n) = n {
            if !(0..=MAX_KEEP).contains(&n) {
                return Err(EngineError::BadRequest(format!(
                    "{} {n}: a keep count is a whole number from 0 to {MAX_KEEP}",
                    rule.as_str()
                )));
            }
            k.set(*rule, Some(n as u32));
            any = true;
        }
    }
    Ok((k, any))
}

/// A schedule: "HH:MM" (daily) or "every N{s,m,h,d}". Returns the period
/// in seconds, or the minute of the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Every(i64),
    DailyAt(i64),
}

pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let bad = || {
        format!("schedule {s:?}: write \"HH:MM\" (daily, in the policy's time zone) or \"every 6h\" (s, m, h or d)")
    };
    let t = s.trim();
    if let Some(rest) = t.strip_prefix("every") {
        let rest = rest.trim();
        let (num, unit) = rest.split_at(
            rest.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len()),
        );
        let n: i64 = num.parse().map_err(|_| bad())?;
        let mult = match unit.trim() {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        if n <= 0 || n * mult < 10 || n * mult > 366 * 86400 {
            return Err(format!(
                "schedule {s:?}: the period must be from 10 s to a year"
            ));
        }
        return Ok(Schedule::Every(n * mult));
    }
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    match (h.parse::<i64>(), m.parse::<i64>()) {
        (Ok(h), Ok(m))
            if (0..24).contains(&h) && (0..60).contains(&m) && m.to_string().len() <= 2 =>
        {
            Ok(Schedule::DailyAt(h * 60 + m))
        }
        _ => Err(bad()),
    }
}

fn unix(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

impl Engine {
    /// The policy that applies to `vm` (or the default with `None`), and where it comes from.
    pub fn policy(&self, vm: Option<&str>) -> EngineResult<PolicyView> {
        if let Some(v) = vm {
            if let Some(p) = self.catalog.policy(Some(v)).map_err(cat)? {
                return Ok(PolicyView {
                    vm_name: Some(v.to_string()),
                    source: "vm".into(),
                    policy: Some(p),
                });
            }
        }
        let d = self.catalog.policy(None).map_err(cat)?;
        Ok(PolicyView {
            vm_name: vm.map(str::to_string),
            source: if d.is_some() { "default" } else { "none" }.into(),
            policy: d,
        })
    }

    /// Every stored policy: the default first, then each VM's own.
    pub fn policies(&self) -> EngineResult<Vec<PolicyView>> {
        let mut out = vec![PolicyView {
            vm_name: None,
            source: "default".into(),
            policy: self.catalog.policy(None).map_err(cat)?,
        }];
        for (vm, p) in self.catalog.vm_policies().map_err(cat)? {
            out.push(PolicyView {
                vm_name: Some(vm),
                source: "vm".into(),
                policy: Some(p),
            });
        }
        Ok(out)
    }

    /// Replace the policy of `vm` (or the default). Every field left out is off.
    pub fn set_policy(&self, vm: Option<&str>, req: &PolicyRequest) -> EngineResult<PolicyView> {
        if let Some(v) = vm {
            validate_vm_name(v)?;
        }
        let (keep, _) = keep_options(req.counts())?;
        let time_zone = req.time_zone.clone().filter(|t| !t.trim().is_empty());
        retention::time_zone(time_zone.as_deref()).map_err(EngineError::BadRequest)?;
        let prune = match (req.prune, &req.schedule) {
            (Some(PruneWhen::Schedule) | None, Some(s)) => {
                parse_schedule(s).map_err(EngineError::BadRequest)?;
                PruneWhen::Schedule
            }
            (Some(PruneWhen::Schedule), None) => {
                return Err(EngineError::BadRequest(
                    "prune \"schedule\" needs a schedule: \"HH:MM\" or \"every 6h\"".into(),
                ))
            }
            (Some(p), Some(_)) => {
                return Err(EngineError::BadRequest(format!(
                    "a schedule is only used with prune \"schedule\", not {:?}",
                    serde_json::to_value(p).unwrap_or_default()
                )))
            }
            (Some(p), None) => p,
            (None, None) => PruneWhen::AfterBackup,
        };
        let max_chain_length = match req.max_chain_length {
            None => None,
            Some(n) if (2..=MAX_CHAIN_LENGTH).contains(&n) => Some(n as u32),
            Some(n) => {
                return Err(EngineError::BadRequest(format!(
                    "max_chain_length {n}: a chain holds from 2 to {MAX_CHAIN_LENGTH} points"
                )))
            }
        };
        let p = RetentionPolicy {
            keep,
            time_zone,
            prune,
            schedule: req.schedule.clone().map(|s| s.trim().to_string()),
            max_chain_length,
            updated_at: now(),
        };
        self.catalog.set_policy(vm, Some(&p)).map_err(cat)?;
        info!(vm = ?vm, policy = %p.keep.describe(), "retention policy set");
        Ok(PolicyView {
            vm_name: vm.map(str::to_string),
            source: if vm.is_some() { "vm" } else { "default" }.into(),
            policy: Some(p),
        })
    }

    /// Remove the policy of `vm` (it falls back to the default) or the default.
    pub fn clear_policy(&self, vm: Option<&str>) -> EngineResult<()> {
        if !self.catalog.set_policy(vm, None).map_err(cat)? {
            return Err(match vm {
                Some(v) => EngineError::not_found("policy of VM", v),
                None => EngineError::not_found("policy", "default"),
            });
        }
        Ok(())
    }

    /// Decide (and unless `dry_run`, carry out) the prune of one VM or of all.
    pub async fn prune(&self, req: &PruneRequest) -> EngineResult<PruneReport> {
        self.check_not_stopping()?;
        let (over, overridden) = keep_options(req.counts())?;
        let vms: Vec<String> = match &req.vm_name {
            Some(v) => {
                if self.catalog.vm(v).map_err(cat)?.is_none() {
                    return Err(EngineError::not_found("VM", v.clone()));
                }
                vec![v.clone()]
            }
            None => self
                .catalog
                .vms()
                .map_err(cat)?
                .into_iter()
                .map(|v| v.name)
                .collect(),
        };
        let _one = self.prune_lock.lock().await;
        let mut report = PruneReport {
            dry_run: req.dry_run,
            vms: Vec::new(),
            kept: 0,
            removed: 0,
            bytes_freed: 0,
            errors: Vec::new(),
        };
        // Backups by VM, read once.
        let mut by_vm: HashMap<String, Vec<BackupRecord>> = HashMap::new();
        for b in self.catalog.backups().map_err(cat)? {
            by_vm.entry(b.vm_name.clone()).or_default().push(b);
        }
        for vm in vms {
            let pv = self.policy(Some(&vm))?;
            let (keep, source) = if overridden {
                (over, "request".to_string())
            } else {
                (
                    pv.policy.as_ref().map(|p| p.keep).unwrap_or_default(),
                    pv.source.clone(),
                )
            };
            let tz_name = pv.policy.as_ref().and_then(|p| p.time_zone.clone());
            let tz = retention::time_zone(tz_name.as_deref()).map_err(EngineError::BadRequest)?;
            let backups = by_vm.remove(&vm).unwrap_or_default();
            let mut vp = self.plan_vm(&vm, backups, &keep, &tz)?;
            vp.policy_source = source;
            vp.time_zone = tz_name.unwrap_or_else(|| "UTC".into());
            if !req.dry_run && vp.removed > 0 {
                let before = self.vm_allocated(&vm)?;
                // Newest first: the removal of a newest point is a plain
                // unlink, and a run of removed points is folded into the
                // kept point above it one by one.
                for e in vp.backups.iter_mut() {
                    if e.verdict != Verdict::Remove {
                        continue;
                    }
                    if let Err(err) = self.delete_backup(&e.backup_id).await {
                        warn!(backup = %e.backup_id, error = %err, "prune could not remove a backup");
                        report.errors.push(format!("backup {}: {err}", e.backup_id));
                        e.error = Some(err.to_string());
                    }
                }
                vp.bytes_freed = before.saturating_sub(self.vm_allocated(&vm)?);
                vp.removed = vp
                    .backups
                    .iter()
                    .filter(|e| e.verdict == Verdict::Remove && e.error.is_none())
                    .count() as u64;
                info!(vm = %vm, removed = vp.removed, bytes_freed = vp.bytes_freed, "pruned");
            }
            report.kept += vp.kept;
            report.removed += vp.removed;
            report.bytes_freed += vp.bytes_freed;
            report.vms.push(vp);
        }
        Ok(report)
    }

    /// Bytes all images of a VM occupy.
    fn vm_allocated(&self, vm: &str) -> EngineResult<u64> {
        let dir = self.data.join("vms").join(super::repo::encode_vm(vm));
        let mut total = 0;
        if let Ok(disks) = std::fs::read_dir(&dir) {
            for d in disks.flatten() {
                if let Ok(files) = std::fs::read_dir(d.path()) {
                    for f in files.flatten() {
                        total += allocated(&f.path());
                    }
                }
            }
        }
        Ok(total)
    }

    /// The verdicts for one VM and the bytes each removal frees.
    fn plan_vm(
        &self,
        vm: &str,
        backups: Vec<BackupRecord>,
        keep: &KeepOptions,
        tz: &jiff::tz::TimeZone,
    ) -> EngineResult<VmPrune> {
        let mut disks_of: HashMap<String, Vec<DiskBackupRecord>> = HashMap::new();
        let vm_rec = self.catalog.vm(vm).map_err(cat)?;
        for d in vm_rec.map(|v| v.disks).unwrap_or_default() {
            for p in self.catalog.points_of(vm, d.disk_id).map_err(cat)? {
                disks_of.entry(p.backup_id.clone()).or_default().push(p);
            }
        }
        let cands: Vec<Candidate> = backups
            .iter()
            .map(|b| Candidate {
                time: unix(&b.created_at),
                finished: disks_of
                    .get(&b.backup_id)
                    .is_some_and(|ds| ds.iter().any(|d| d.status == Status::Completed)),
                protected: b.protected,
                running: b.status == Status::Running,
            })
            .collect();
        let marks = retention::decide(&cands, keep, tz);
        let removed: std::collections::HashSet<&str> = backups
            .iter()
            .zip(&marks)
            .filter(|(_, m)| m.verdict == Verdict::Remove)
            .map(|(b, _)| b.backup_id.as_str())
            .collect();

        // Bytes freed, disk by disk, newest point first: a removed point
        // keeps (moves into the kept point above it) what neither that
        // point nor the removed points between them cover.
        let mut freed: HashMap<String, u64> = HashMap::new();
        if !removed.is_empty() {
            let mut per_disk: HashMap<u32, Vec<&DiskBackupRecord>> = HashMap::new();
            for ds in disks_of.values() {
                for d in ds.iter().filter(|d| d.status == Status::Completed) {
                    per_disk.entry(d.disk_id).or_default().push(d);
                }
            }
            for (_, mut pts) in per_disk {
                pts.sort_by(|a, b| b.backup_id.cmp(&a.backup_id));
                let mut shadow: Option<Vec<(u64, u64)>> = None;
                // The parent of the point visited last: a shadow only
                // covers the chain it belongs to (a full starts another).
                let mut expect: Option<String> = None;
                for (i, p) in pts.iter().enumerate() {
                    if expect.as_deref() != Some(p.backup_id.as_str()) {
                        shadow = None;
                    }
                    expect = p.parent_backup_id.clone();
                    let is_removed = removed.contains(p.backup_id.as_str());
                    if !is_removed {
                        // Only needed when its parent is removed.
                        let below_removed = pts.get(i + 1).is_some_and(|n| {
                            removed.contains(n.backup_id.as_str())
                                && p.parent_backup_id.as_deref() == Some(n.backup_id.as_str())
                        });
                        shadow = below_removed.then(|| own_ranges(&self.abs(&p.image)));
                        continue;
                    }
                    let a = allocated(&self.abs(&p.image));
                    let f = match &mut shadow {
                        None => a,
                        Some(sh) => {
                            let own = own_ranges(&self.abs(&p.image));
                            let moved = uncovered(&own, sh);
                            *sh = union(sh, &own);
                            a.saturating_sub(moved)
                        }
                    };
                    *freed.entry(p.backup_id.clone()).or_default() += f;
                }
            }
        }

        let mut entries: Vec<PruneEntry> = backups
            .iter()
            .zip(&marks)
            .map(|(b, m)| PruneEntry {
                backup_id: b.backup_id.clone(),
                created_at: b.created_at.clone(),
                status: b.status,
                verdict: m.verdict,
                reason: match (m.verdict, m.rule) {
                    (_, Some(r)) => r.as_str().to_string(),
                    (Verdict::Keep, None) => "no keep option set: everything is kept".into(),
                    (Verdict::KeepPartial, _) => {
                        "newest unfinished backup: kept while no finished backup is newer".into()
                    }
                    (Verdict::Protected, _) => "protected".into(),
                    (Verdict::Running, _) => "running".into(),
                    (Verdict::Remove, _) => {
                        if cands_finished(&disks_of, &b.backup_id) {
                            "no keep option selects it".into()
                        } else {
                            "unfinished, and a newer backup exists".into()
                        }
                    }
                },
                bytes_freed: freed.get(&b.backup_id).copied().unwrap_or(0),
                error: None,
            })
            .collect();
        entries.sort_by(|a, b| b.backup_id.cmp(&a.backup_id));
        let removed_n = entries
            .iter()
            .filter(|e| e.verdict == Verdict::Remove)
            .count() as u64;
        Ok(VmPrune {
            vm_name: vm.to_string(),
            policy_source: String::new(),
            keep: *keep,
            time_zone: String::new(),
            kept: entries.len() as u64 - removed_n,
            removed: removed_n,
            bytes_freed: entries.iter().map(|e| e.bytes_freed).sum(),
            backups: entries,
        })
    }

    /// Ask for the policy of `vm` to be applied soon (after a backup completes).
    pub(super) fn prune_soon(&self, vm: &str) {
        lock(&self.prune_due).insert(vm.to_string());
    }

    /// One turn of the automatic prune: VMs whose backup just completed
    /// (policy `prune: after-backup`) and policies whose schedule is due.
    pub(super) async fn auto_prune(&self) {
        let due: Vec<String> = lock(&self.prune_due).drain().collect();
        let mut run: Vec<String> = Vec::new();
        let mut depth: Vec<(String, u32)> = Vec::new();
        for vm in due {
            if let Ok(PolicyView {
                policy: Some(p), ..
            }) = self.policy(Some(&vm))
            {
                if p.prune == PruneWhen::AfterBackup && p.keep.keeps_something() {
                    run.push(vm.clone());
                }
                if let Some(m) = p.max_chain_length {
                    depth.push((vm, m));
                }
            }
        }
        // Schedules: a VM's own policy, or the default for VMs without one.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Ok(vms) = self.catalog.vms() {
            for v in vms {
                let Ok(PolicyView {
                    policy: Some(p), ..
                }) = self.policy(Some(&v.name))
                else {
                    continue;
                };
                if p.prune != PruneWhen::Schedule || !p.keep.keeps_something() {
                    continue;
                }
                let Some(Ok(s)) = p.schedule.as_deref().map(parse_schedule) else {
                    continue;
                };
                let tz =
                    retention::time_zone(p.time_zone.as_deref()).unwrap_or(jiff::tz::TimeZone::UTC);
                let mut last = lock(&self.schedule_runs);
                let prev = *last.entry(v.name.clone()).or_insert(now);
                if schedule_due(s, prev, now, &tz) {
                    last.insert(v.name.clone(), now);
                    if !run.contains(&v.name) {
                        run.push(v.name.clone());
                    }
                }
            }
        }
        for vm in run {
            let req = PruneRequest {
                vm_name: Some(vm.clone()),
                ..Default::default()
            };
            match self.prune(&req).await {
                Ok(r) if r.removed > 0 || !r.errors.is_empty() => {
                    info!(vm = %vm, removed = r.removed, bytes_freed = r.bytes_freed, errors = r.errors.len(), "policy applied")
                }
                Ok(_) => {}
                Err(e) => warn!(vm = %vm, error = %e, "the retention policy could not be applied"),
            }
        }
        // The depth limit after retention: what retention removed no longer counts.
        for (vm, max) in depth {
            if let Err(e) = self.enforce_depth(&vm, max).await {
                warn!(vm = %vm, error = %e, "the chain depth limit could not be applied");
            }
        }
    }
}

fn cands_finished(disks_of: &HashMap<String, Vec<DiskBackupRecord>>, id: &str) -> bool {
    disks_of
        .get(id)
        .is_some_and(|ds| ds.iter().any(|d| d.status == Status::Completed))
}

/// Whether a schedule fires in (prev, now].
fn schedule_due(s: Schedule, prev: i64, now: i64, tz: &jiff::tz::TimeZone) -> bool {
    match s {
        Schedule::Every(p) => now / p > prev / p,
        Schedule::DailyAt(min) => {
            let local_minute = |t: i64| {
                let z = jiff::Timestamp::from_second(t)
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                    .to_zoned(tz.clone());
                let day_start = z
                    .start_of_day()
                    .map(|d| d.timestamp().as_second())
                    .unwrap_or(t);
                day_start + min * 60
            };
            // The firing time on now's local day, and on prev's.
            let today = local_minute(now);
            let prev_day = local_minute(prev);
            (prev < today && today <= now) || (prev < prev_day && prev_day <= now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(parse_schedule("every 6h"), Ok(Schedule::Every(21600)));
        assert_eq!(parse_schedule("03:30"), Ok(Schedule::DailyAt(210)));
        assert!(parse_schedule("25:00").is_err());
        assert!(parse_schedule("every 1s").is_err());
        assert!(parse_schedule("sometimes").is_err());
        let utc = jiff::tz::TimeZone::UTC;
        let day = 86400;
        let at3 = 3 * 3600;
        assert!(schedule_due(
            Schedule::DailyAt(180),
            10 * day + at3 - 5,
            10 * day + at3,
            &utc
        ));
        assert!(!schedule_due(
            Schedule::DailyAt(180),
            10 * day + at3,
            10 * day + at3 + 5,
            &utc
        ));
        assert!(schedule_due(Schedule::Every(60), 119, 120, &utc));
        assert!(!schedule_due(Schedule::Every(60), 120, 150, &utc));
    }
}
