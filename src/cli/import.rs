//! `chainvault import`: adopt existing qcow2 files as the next points of a
//! disk, against a daemon (`--server`, the default) or a repository no
//! daemon serves (`--data DIR`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::inspect::{print_json, Source, SourceArgs};
use super::lifecycle::runtime;
use crate::model::*;
use crate::units::human;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The VM the points belong to (created if new).
    #[arg(long, value_name = "VM")]
    pub vm: String,
    /// The disk index.
    #[arg(long, value_name = "N")]
    pub disk: u32,
    /// When each IMAGE was taken (RFC 3339), one per IMAGE, in order.
    /// Default: each file's mtime.
    #[arg(long = "created-at", value_name = "RFC3339")]
    pub created_at: Vec<String>,
    /// The change_id of the last IMAGE (the next incremental starts from it).
    #[arg(long, value_name = "ID")]
    pub change_id: Option<String>,
    /// Remove each IMAGE once it is adopted.
    #[arg(long = "move")]
    pub move_files: bool,
    /// The qcow2 files, oldest first: a full (or an overlay of the disk's
    /// newest point), then overlays each backed by the one before.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

pub fn run(a: ImportArgs) -> anyhow::Result<u8> {
    if !a.created_at.is_empty() && a.created_at.len() != a.images.len() {
        bail!(
            "{} --created-at for {} images: give one per IMAGE, in order, or none (each file's mtime is used)",
            a.created_at.len(),
            a.images.len()
        );
    }
    let mut images = Vec::new();
    for (i, p) in a.images.iter().enumerate() {
        let abs = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
        images.push(ImportImage {
            path: abs.to_string_lossy().into_owned(),
            created_at: a.created_at.get(i).cloned(),
        });
    }
    let req = ImportRequest {
        vm_name: a.vm.clone(),
        disk_id: a.disk,
        images,
        change_id: a.change_id.clone(),
        move_files: a.move_files,
    };
    let r: ImportReport = match Source::open_writable(&a.source)? {
        Source::Offline(e) => runtime()?.block_on(e.import(req))?,
        Source::Http(h) => h.call(
            "POST",
            "/api/v1/imports",
            &[],
            Some(&serde_json::to_value(&req)?),
        )?,
    };
    if a.json {
        print_json(&r)?;
    } else {
        for p in &r.points {
            println!(
                "{}  {}  {:<11}  parent {}",
                p.backup_id,
                p.started_at,
                if p.mode == BackupType::Full {
                    "full"
                } else {
                    "incremental"
                },
                p.parent_backup_id.as_deref().unwrap_or("-")
            );
        }
        println!(
            "imported {} point(s) into disk {} of VM {} ({} copied{})",
            r.points.len(),
            r.disk_id,
            r.vm_name,
            human(r.bytes_copied),
            if r.moved { ", sources removed" } else { "" }
        );
    }
    Ok(0)
}
