//! `chainvault backup`: the reference transfer client (see
//! [`crate::client`] and docs/client.md).

use std::io::IsTerminal;

use clap::Args;

use crate::client::{self, exit, Options};
use crate::units::parse_size;

/// `chainvault backup --server URL --vm NAME --disk SRC [--disk SRC ...]`
#[derive(Debug, Args)]
#[command(after_help = "\
Exit codes: 0 completed; 2 bad arguments or unusable source (fix, do not retry); \
3 daemon unreachable or gone (retry later); 4 another backup of the VM is running \
(retry later); 5 transfer failed, backup failed (retry); 6 some disks completed, \
others failed (retry); 130/143 interrupted. See docs/client.md.")]
pub struct BackupArgs {
    #[command(flatten)]
    pub daemon: super::DaemonArgs,
    /// The VM's name in the repository.
    #[arg(long, value_name = "NAME")]
    pub vm: String,
    /// A disk to back up: an NBD URI (nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH), a local qcow2 or raw file, or a block
    /// device. Repeat for each disk; the Nth --disk is disk N-1, or write
    /// N=SOURCE to give the index.
    #[arg(long = "disk", value_name = "SOURCE", required = true)]
    pub disks: Vec<String>,
    /// Read every disk in full and start new chains (no changed-block tracking).
    #[arg(long)]
    pub full: bool,
    /// Keep a full read as an overlay of the previous point holding only the
    /// clusters that differ. Default: on when a disk falls back to a full
    /// read (CBT reset), off with --full.
    #[arg(long, overrides_with = "no_compare_with_parent")]
    pub compare_with_parent: bool,
    /// Store full reads as new, independent chains.
    #[arg(long)]
    pub no_compare_with_parent: bool,
    /// The dirty bitmap that is the new checkpoint: recorded as each disk's
    /// change_id, so the next backup reads the changes since now. It must
    /// exist on the source (or be created by --rotate).
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// Local qcow2 sources: create the new checkpoint bitmap (--bitmap, or a
    /// generated PREFIX+timestamp name) before reading, and remove the previous
    /// one only after the daemon acknowledged the completion. The image must
    /// not be in use.
    #[arg(long)]
    pub rotate: bool,
    /// Prefix of generated checkpoint names; give each repository that backs
    /// up the same disks its own.
    #[arg(long, value_name = "PREFIX", default_value = "chainvault-")]
    pub bitmap_prefix: String,
    /// NBD connections per disk to the daemon.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per disk.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub requests: usize,
    /// Largest read or write request (e.g. 2M).
    #[arg(long, value_name = "SIZE", default_value = "2M", value_parser = parse_size)]
    pub request_size: u64,
    /// Limit the reading rate over all disks, in bytes per second (e.g. 50M).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub limit_rate: Option<u64>,
    /// Repository id stored with the backup.
    #[arg(long, value_name = "ID")]
    pub repository_id: Option<String>,
    /// Tag stored with the backup (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Print the summary as JSON (no progress bars).
    #[arg(long)]
    pub json: bool,
    /// No progress bars even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Run `chainvault backup`; returns the exit code.
pub fn run(a: BackupArgs) -> anyhow::Result<u8> {
    let disks = match client::parse_disks(&a.disks) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("chainvault backup: {e}");
            return Ok(exit::USAGE);
        }
    };
    let compare = if a.no_compare_with_parent {
        Some(false)
    } else if a.compare_with_parent {
        Some(true)
    } else {
        None
    };
    let opts = Options {
        server: a.daemon.server,
        token: a.daemon.token,
        vm: a.vm,
        disks,
        full: a.full,
        compare_with_parent: compare,
        bitmap: a.bitmap,
        rotate: a.rotate,
        bitmap_prefix: a.bitmap_prefix,
        connections: a.connections,
        requests: a.requests,
        request_size: a.request_size,
        limit_rate: a.limit_rate,
        repository_id: a.repository_id,
        tags: a.tags,
        progress: !a.json && !a.no_progress && std::io::stdout().is_terminal(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(client::run(opts));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if let Some(e) = &report.error {
        eprintln!("chainvault backup: error: {e}");
    }
    // Do not wait for blocking HTTP calls still running after a signal.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(report.exit_code)
}
