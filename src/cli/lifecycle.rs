//! Lifecycle commands: `backups protect|unprotect|note|delete`.
//!
//! Against a daemon (`--server`, the default) or a repository opened
//! directly (`--data DIR`, the daemon must not be running on it).

use anyhow::Context;
use clap::Args;

use super::inspect::{print_json, Source, SourceArgs};
use crate::api::handlers::DeletedResponse;
use crate::model::*;

#[derive(Debug, Args)]
pub struct BackupIdArgs {
    /// The backup id (as `chainvault backups list` shows it).
    #[arg(value_name = "BACKUP_ID")]
    pub backup_id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct NoteArgs {
    /// The backup id.
    #[arg(value_name = "BACKUP_ID")]
    pub backup_id: String,
    /// The note (free text, at most 4096 bytes).
    #[arg(
        value_name = "TEXT",
        required_unless_present = "clear",
        conflicts_with = "clear"
    )]
    pub text: Option<String>,
    /// Remove the note.
    #[arg(long)]
    pub clear: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn annotate(
    source: &SourceArgs,
    backup_id: &str,
    req: AnnotateRequest,
) -> anyhow::Result<BackupView> {
    match Source::open(source)? {
        Source::Offline(e) => {
            Ok(runtime()?.block_on(e.annotate_backup(backup_id, req.protected, req.note))?)
        }
        Source::Http(h) => h.call(
            "PATCH",
            &format!("/api/v1/backups/{backup_id}"),
            &[],
            Some(&serde_json::to_value(&req)?),
        ),
    }
}

fn show(v: &BackupView, json: bool, what: &str) -> anyhow::Result<u8> {
    if json {
        print_json(v)?;
    } else {
        println!(
            "backup {} of VM {}: {what}{}",
            v.backup.backup_id,
            v.backup.vm_name,
            v.backup
                .note
                .as_deref()
                .map(|n| format!(" (note: {n})"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

/// `backups protect` / `backups unprotect`.
pub fn protect(a: BackupIdArgs, on: bool) -> anyhow::Result<u8> {
    let req = AnnotateRequest {
        protected: Some(on),
        note: None,
    };
    let v = annotate(&a.source, &a.backup_id, req)?;
    show(
        &v,
        a.json,
        if on {
            "protected: prune and delete refuse it"
        } else {
            "not protected"
        },
    )
}

/// `backups note`.
pub fn note(a: NoteArgs) -> anyhow::Result<u8> {
    let req = AnnotateRequest {
        protected: None,
        note: Some(if a.clear { None } else { a.text.clone() }),
    };
    let v = annotate(&a.source, &a.backup_id, req)?;
    show(
        &v,
        a.json,
        if a.clear { "note removed" } else { "note set" },
    )
}

/// `backups delete`.
pub fn delete(a: BackupIdArgs) -> anyhow::Result<u8> {
    let r: DeletedResponse = match Source::open_writable(&a.source)? {
        Source::Offline(e) => {
            runtime()?.block_on(e.delete_backup(&a.backup_id))?;
            DeletedResponse {
                status: "deleted".into(),
                message: format!("backup {} and its images were deleted", a.backup_id),
                backup_id: Some(a.backup_id.clone()),
                restore_id: None,
                timestamp: now(),
            }
        }
        Source::Http(h) => h.call(
            "DELETE",
            &format!("/api/v1/backups/{}", a.backup_id),
            &[],
            None,
        )?,
    };
    if a.json {
        print_json(&r)?;
    } else {
        println!("{}", r.message);
    }
    Ok(0)
}

/// `backups show`.
pub fn show_backup(a: BackupIdArgs) -> anyhow::Result<u8> {
    let v: BackupView = match Source::open(&a.source)? {
        Source::Offline(e) => e.get_backup(&a.backup_id)?,
        Source::Http(h) => h.call(
            "GET",
            &format!("/api/v1/backups/{}", a.backup_id),
            &[],
            None,
        )?,
    };
    if a.json {
        print_json(&v)?;
        return Ok(0);
    }
    let b = &v.backup;
    println!("backup {} of VM {}", b.backup_id, b.vm_name);
    println!(
        "  {} {}, created {}{}",
        b.status.as_str(),
        if b.backup_type == BackupType::Full {
            "full"
        } else {
            "incremental"
        },
        b.created_at,
        b.finished_at
            .as_deref()
            .map(|f| format!(", finished {f}"))
            .unwrap_or_default()
    );
    if b.protected {
        println!("  protected: prune and delete refuse it");
    }
    if let Some(n) = &b.note {
        println!("  note: {n}");
    }
    if !b.tags.is_empty() {
        println!("  tags: {}", b.tags.join(", "));
    }
    if let Some(e) = &b.error {
        println!("  error: {e}");
    }
    for d in &v.disks {
        println!(
            "  disk {}: {} {}, size {}, {} on disk, parent {}, change_id {}{}",
            d.disk_id,
            d.status.as_str(),
            if d.mode == BackupType::Full {
                "full"
            } else {
                "incremental"
            },
            crate::units::human(d.capacity_bytes),
            d.size_on_disk
                .map(crate::units::human)
                .unwrap_or_else(|| "-".into()),
            d.parent_backup_id.as_deref().unwrap_or("none"),
            d.change_id
                .as_deref()
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| "-".into()),
            d.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        if let Some(dg) = &d.digest {
            println!("    digest {dg}");
        }
    }
    Ok(0)
}
