//! Retention from the command line: `chainvault policy set|show|clear` and
//! `chainvault prune`. Against a daemon (`--server`, the default) or a
//! repository no daemon serves (`--data DIR`).

use anyhow::Context;
use clap::{Args, Subcommand};

use super::inspect::{print_json, Source, SourceArgs};
use super::lifecycle::runtime;
use crate::model::*;
use crate::units::human;

/// The keep options, as flags.
#[derive(Debug, Args, Clone, Default)]
pub struct KeepFlags {
    /// Keep the N newest backups.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_last: Option<i64>,
    /// Keep the newest backup of each of the N newest hours that have one.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_hourly: Option<i64>,
    /// ... of each of the N newest days.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_daily: Option<i64>,
    /// ... of each of the N newest ISO weeks.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_weekly: Option<i64>,
    /// ... of each of the N newest months.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_monthly: Option<i64>,
    /// ... of each of the N newest years.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_yearly: Option<i64>,
}

/// `chainvault policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Set the retention policy of one VM (--vm) or the server-wide default.
    /// The options given replace the whole policy: an option left out is off.
    Set(SetArgs),
    /// Show the policy that applies to a VM (its own, else the default), or
    /// with no --vm every stored policy.
    Show(ShowArgs),
    /// Remove a VM's own policy (the default applies again), or the default.
    Clear(ShowArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The VM (default: the server-wide default policy).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    #[command(flatten)]
    pub keep: KeepFlags,
    /// Calendar periods in this time zone (IANA name, UTC, or +02:00). Default UTC.
    #[arg(long, value_name = "TZ")]
    pub time_zone: Option<String>,
    /// When the daemon applies the policy by itself.
    #[arg(long, value_name = "WHEN", value_parser = ["after-backup", "schedule", "never"])]
    pub prune: Option<String>,
    /// With --prune schedule: "HH:MM" (daily) or "every 6h".
    #[arg(long, value_name = "WHEN")]
    pub schedule: Option<String>,
    /// Longest chain per disk; longer chains consolidate their oldest points.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_chain_length: Option<i64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The VM (default: the server-wide default policy).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `chainvault prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only this VM (default: every VM).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Keep options for this run; when any is given they replace the stored
    /// policy's keep options.
    #[command(flatten)]
    pub keep: KeepFlags,
    /// Decide and list, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

fn vm_path(vm: &Option<String>) -> String {
    match vm {
        Some(v) => format!("/api/v1/policies/vms/{}", percent(v)),
        None => "/api/v1/policies/default".into(),
    }
}

/// Percent-encode a path segment.
pub(super) fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn describe(p: &Option<RetentionPolicy>) -> String {
    let Some(p) = p else {
        return "no policy: every backup is kept".into();
    };
    let mut s = p.keep.describe();
    s.push_str(&format!(
        "; time zone {}",
        p.time_zone.as_deref().unwrap_or("UTC")
    ));
    s.push_str(&match p.prune {
        PruneWhen::AfterBackup => "; applied after each backup".to_string(),
        PruneWhen::Never => "; applied only by `chainvault prune`".to_string(),
        PruneWhen::Schedule => format!(
            "; applied on the schedule {}",
            p.schedule.as_deref().unwrap_or("?")
        ),
    });
    if let Some(n) = p.max_chain_length {
        s.push_str(&format!("; chains at most {n} points long"));
    }
    s
}

fn print_view(v: &PolicyView) {
    let whose = match (&v.vm_name, v.source.as_str()) {
        (None, _) => "default policy".to_string(),
        (Some(vm), "vm") => format!("VM {vm}: its own policy"),
        (Some(vm), "default") => format!("VM {vm}: the default policy"),
        (Some(vm), _) => format!("VM {vm}"),
    };
    println!("{whose}: {}", describe(&v.policy));
}

pub fn run_policy(cmd: PolicyCmd) -> anyhow::Result<u8> {
    match cmd {
        PolicyCmd::Set(a) => {
            let prune = match a.prune.as_deref() {
                Some("after-backup") => Some(PruneWhen::AfterBackup),
                Some("schedule") => Some(PruneWhen::Schedule),
                Some("never") => Some(PruneWhen::Never),
                _ => None,
            };
            let k = &a.keep;
            let req = PolicyRequest {
                keep_last: k.keep_last,
                keep_hourly: k.keep_hourly,
                keep_daily: k.keep_daily,
                keep_weekly: k.keep_weekly,
                keep_monthly: k.keep_monthly,
                keep_yearly: k.keep_yearly,
                time_zone: a.time_zone.clone(),
                prune,
                schedule: a.schedule.clone(),
                max_chain_length: a.max_chain_length,
            };
            let v: PolicyView = match Source::open_writable(&a.source)? {
                Source::Offline(e) => e.set_policy(a.vm.as_deref(), &req)?,
                Source::Http(h) => h.call(
                    "PUT",
                    &vm_path(&a.vm),
                    &[],
                    Some(&serde_json::to_value(&req)?),
                )?,
            };
            if a.json {
                print_json(&v)?;
            } else {
                print_view(&v);
            }
            Ok(0)
        }
        PolicyCmd::Show(a) => {
            let views: Vec<PolicyView> = match (Source::open(&a.source)?, &a.vm) {
                (Source::Offline(e), Some(vm)) => vec![e.policy(Some(vm))?],
                (Source::Offline(e), None) => e.policies()?,
                (Source::Http(h), Some(_)) => vec![h.call("GET", &vm_path(&a.vm), &[], None)?],
                (Source::Http(h), None) => {
                    let l: serde_json::Value = h.call("GET", "/api/v1/policies", &[], None)?;
                    serde_json::from_value(l["policies"].clone())
                        .context("the daemon sent a policy list this CLI cannot read")?
                }
            };
            if a.json {
                if a.vm.is_some() {
                    print_json(&views[0])?;
                } else {
                    print_json(&serde_json::json!({ "policies": views }))?;
                }
            } else {
                for v in &views {
                    print_view(v);
                }
            }
            Ok(0)
        }
        PolicyCmd::Clear(a) => {
            let v: PolicyView = match Source::open_writable(&a.source)? {
                Source::Offline(e) => {
                    e.clear_policy(a.vm.as_deref())?;
                    e.policy(a.vm.as_deref())?
                }
                Source::Http(h) => h.call("DELETE", &vm_path(&a.vm), &[], None)?,
            };
            if a.json {
                print_json(&v)?;
            } else {
                print!("removed; now ");
                print_view(&v);
            }
            Ok(0)
        }
    }
}

pub fn run_prune(a: PruneArgs) -> anyhow::Result<u8> {
    let k = &a.keep;
    let req = PruneRequest {
        vm_name: a.vm.clone(),
        keep_last: k.keep_last,
        keep_hourly: k.keep_hourly,
        keep_daily: k.keep_daily,
        keep_weekly: k.keep_weekly,
        keep_monthly: k.keep_monthly,
        keep_yearly: k.keep_yearly,
        dry_run: a.dry_run,
    };
    let source = if a.dry_run {
        Source::open(&a.source)?
    } else {
        Source::open_writable(&a.source)?
    };
    let r: PruneReport = match source {
        Source::Offline(e) => runtime()?.block_on(e.prune(&req))?,
        Source::Http(h) => h.call(
            "POST",
            "/api/v1/prune",
            &[],
            Some(&serde_json::to_value(&req)?),
        )?,
    };
    if a.json {
        print_json(&r)?;
    } else {
        print_report(&r);
    }
    Ok(if r.errors.is_empty() { 0 } else { 1 })
}

fn print_report(r: &PruneReport) {
    if r.dry_run {
        println!("dry run: nothing is removed");
    }
    for vm in &r.vms {
        println!(
            "VM {} (policy: {}; {}; time zone {})",
            vm.vm_name,
            vm.policy_source,
            vm.keep.describe(),
            vm.time_zone
        );
        println!(
            "  {:<34} {:<20} {:<11} {:<16} {:>10}",
            "BACKUP", "CREATED", "VERDICT", "REASON", "FREES"
        );
        for e in &vm.backups {
            let verdict = serde_json::to_value(e.verdict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let created = e
                .created_at
                .get(..19)
                .unwrap_or(&e.created_at)
                .replace('T', " ");
            let frees = if e.verdict == Verdict::Remove {
                human(e.bytes_freed)
            } else {
                String::new()
            };
            println!(
                "  {:<34} {:<20} {:<11} {:<16} {:>10}{}",
                e.backup_id,
                created,
                verdict,
                e.reason,
                frees,
                e.error
                    .as_deref()
                    .map(|x| format!("  FAILED: {x}"))
                    .unwrap_or_default()
            );
        }
        println!(
            "  kept {}, {} {}, {} {}",
            vm.kept,
            if r.dry_run { "would remove" } else { "removed" },
            vm.removed,
            if r.dry_run { "freeing about" } else { "freed" },
            human(vm.bytes_freed)
        );
    }
    println!(
        "total: kept {}, {} {}, {} {}",
        r.kept,
        if r.dry_run { "would remove" } else { "removed" },
        r.removed,
        if r.dry_run { "freeing about" } else { "freed" },
        human(r.bytes_freed)
    );
    for e in &r.errors {
        eprintln!("error: {e}");
    }
}
