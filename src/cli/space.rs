//! `chainvault gc` and `chainvault usage`: the files no record accounts for,
//! and what every VM, disk and point occupies.

use clap::Args;

use super::inspect::{print_json, Source, SourceArgs};
use super::lifecycle::runtime;
use crate::engine::space::{GcReport, UsageReport};
use crate::units::human;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// List the orphans, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this VM.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

pub fn run_gc(a: GcArgs) -> anyhow::Result<u8> {
    let source = if a.dry_run {
        Source::open(&a.source)?
    } else {
        Source::open_writable(&a.source)?
    };
    let r: GcReport = match source {
        Source::Offline(e) => runtime()?.block_on(e.gc(a.dry_run))?,
        Source::Http(h) => h.call(
            "POST",
            "/api/v1/gc",
            &[],
            Some(&serde_json::json!({ "dry_run": a.dry_run })),
        )?,
    };
    if a.json {
        print_json(&r)?;
        return Ok(0);
    }
    if r.orphans.is_empty() {
        println!("no orphans: every file is accounted for");
        return Ok(0);
    }
    for o in &r.orphans {
        println!("{:>10}  {}  ({})", human(o.bytes), o.path, o.reason);
    }
    println!(
        "{} orphan(s), {}: {}",
        r.orphans.len(),
        human(r.bytes),
        if r.dry_run {
            "dry run, nothing removed (run without --dry-run to remove them)".to_string()
        } else {
            format!(
                "removed {} file(s) and {} empty director{}",
                r.removed,
                r.directories_removed,
                if r.directories_removed == 1 {
                    "y"
                } else {
                    "ies"
                }
            )
        }
    );
    Ok(0)
}

pub fn run_usage(a: UsageArgs) -> anyhow::Result<u8> {
    let r: UsageReport = match Source::open(&a.source)? {
        Source::Offline(e) => e.usage(a.vm.as_deref(), true)?,
        Source::Http(h) => {
            let q: Vec<(&str, String)> = a.vm.iter().map(|v| ("vm_name", v.clone())).collect();
            h.call("GET", "/api/v1/usage", &q, None)?
        }
    };
    if a.json {
        print_json(&r)?;
        return Ok(0);
    }
    for vm in &r.vms {
        println!(
            "VM {}: {} in {} point(s)",
            vm.vm_name,
            human(vm.bytes),
            vm.points
        );
        for d in &vm.disks {
            println!("  disk {}: {}", d.disk_id, human(d.bytes));
            println!(
                "    {:<34} {:<20} {:>10} {:>12}",
                "BACKUP", "CREATED", "ON DISK", "REMOVAL FREES"
            );
            for p in &d.points {
                let created = p
                    .created_at
                    .get(..19)
                    .unwrap_or(&p.created_at)
                    .replace('T', " ");
                println!(
                    "    {:<34} {:<20} {:>10} {:>12}{}",
                    p.backup_id,
                    created,
                    human(p.bytes),
                    human(p.frees),
                    if p.protected { "  protected" } else { "" }
                );
            }
        }
    }
    println!(
        "images: {}; repository: {}; free: {} of {}",
        human(r.bytes),
        human(r.repository_bytes),
        human(r.free_bytes),
        human(r.filesystem_bytes)
    );
    Ok(0)
}
