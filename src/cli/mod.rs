//! Command-line interface (clap).

pub mod backup;
pub mod digest;
pub mod export;
pub mod image;
pub mod import;
pub mod inspect;
pub mod lifecycle;
pub mod limits;
pub mod mount;
pub mod policy;
pub mod restore;
pub mod serve;
pub mod space;
pub mod token;
pub mod verify;

use clap::{Parser, Subcommand};

/// chainvault: a backup repository for virtual machine disks.
#[derive(Debug, Parser)]
#[command(name = "chainvault", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(flatten)]
    pub tls: crate::tls::TlsFiles,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect, check and convert QCOW2 images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Serve one image (or chain) over NBD, like qemu-nbd.
    Export(export::ExportArgs),
    /// Run the daemon: HTTP control API and NBD exports over a repository.
    Serve(serve::ServeArgs),
    /// List backups (from a running daemon, or a repository with --data).
    #[command(subcommand)]
    Backups(inspect::BackupsCmd),
    /// Show and verify the chains of points in time of each disk.
    #[command(subcommand)]
    Chain(inspect::ChainCmd),
    /// Repository catalog maintenance.
    #[command(subcommand)]
    Catalog(inspect::CatalogCmd),
    /// Back up a VM's disks into a daemon: full, or incremental from QEMU
    /// dirty bitmaps (the reference transfer client).
    Backup(backup::BackupArgs),
    /// Mount every completed point in time as a read-only file tree (FUSE).
    Mount(mount::MountArgs),
    /// Retention policies: how long each VM's backups are kept.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Apply retention: list every backup with its verdict, then remove the
    /// ones no keep option selects (not with --dry-run).
    Prune(policy::PruneArgs),
    /// Adopt existing qcow2 files (a qemu-img chain, an old repository) as
    /// the next points of a disk, oldest first.
    Import(import::ImportArgs),
    /// Find (and remove) files no catalog record or journal accounts for:
    /// the leftovers of crashes.
    Gc(space::GcArgs),
    /// What each VM, disk and point occupies, what removing a point would
    /// free, and the repository's total and free space.
    Usage(space::UsageArgs),
    /// Write a point in time of a VM's disks to files, block devices, new
    /// qcow2 images or NBD exports.
    Restore(restore::RestoreArgs),
    /// Open restore exports: list them, close them (and keep an instant
    /// restore's writes as an image).
    #[command(subcommand)]
    Restores(restore::RestoresCmd),
    /// Print the content digest (cvblk2-blake3:HEX) of a raw file, block
    /// device, qcow2 image or chain, or NBD export, to compare with a point's.
    Digest(digest::DigestArgs),
    /// Check the repository (as `chain verify`); with --deep, read every
    /// stored block of every point and compare it with its block digest.
    Verify(verify::VerifyArgs),
    /// API tokens with roles: create (the secret is shown once), list, revoke.
    #[command(subcommand)]
    Token(token::TokenCmd),
}

/// Where the daemon is, for commands that talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// URL of the chainvault daemon.
    #[arg(
        long,
        value_name = "URL",
        env = "CHAINVAULT_SERVER",
        default_value = "http://127.0.0.1:8420"
    )]
    pub server: String,
    /// API token: the daemon's serve --token secret, or one made with
    /// `chainvault token create`.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CHAINVAULT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// Set up logging to stderr.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Allow as many open files as the hard limit; returns the new soft limit.
pub(crate) fn raise_fd_limit() -> Option<u64> {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let mut up = r;
            up.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
                r = up;
            }
        }
        Some(r.rlim_cur as u64)
    }
}

/// Run a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    if !matches!(cli.command, Command::Serve(_)) {
        crate::tls::configure_client(&cli.tls)?;
    }
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Export(a) => export::run(a),
        Command::Serve(a) => serve::run(a, &cli.tls),
        Command::Backups(c) => inspect::run_backups(c),
        Command::Chain(c) => inspect::run_chain(c),
        Command::Catalog(c) => inspect::run_catalog(c),
        Command::Backup(a) => backup::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Policy(c) => policy::run_policy(c),
        Command::Prune(a) => policy::run_prune(a),
        Command::Import(a) => import::run(a),
        Command::Gc(a) => space::run_gc(a),
        Command::Usage(a) => space::run_usage(a),
        Command::Restore(a) => restore::run(a),
        Command::Restores(c) => restore::run_restores(c),
        Command::Digest(a) => digest::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Token(c) => token::run(c),
    }
}
