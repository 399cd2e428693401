//! Inspection commands: `backups list`, `chain show`, `chain verify`,
//! `catalog rebuild`.
//!
//! Each asks a running daemon over HTTP (`--server`, default
//! `http://127.0.0.1:8420`), or, given `--data DIR`, opens the repository
//! directly with [`Engine::open_offline`] (the daemon must not be running on
//! it then). `catalog rebuild` is always offline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use crate::api::handlers::BackupList;
use crate::api::ErrorBody;
use crate::engine::Engine;
use crate::model::*;
use crate::units::human;

/// Where the catalog is read from: a daemon, or a repository directory.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub daemon: super::DaemonArgs,
    /// Read this repository directly instead of asking a daemon (the daemon
    /// must not be running on it).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// `chainvault backups ...`
#[derive(Debug, Subcommand)]
pub enum BackupsCmd {
    /// List backups (oldest first).
    List(ListArgs),
    /// One backup: its status and times, and each disk's size, bytes on
    /// disk, change_id and parent.
    Show(super::lifecycle::BackupIdArgs),
    /// Protect a backup: prune and delete refuse it until it is unprotected.
    Protect(super::lifecycle::BackupIdArgs),
    /// Remove a backup's protection.
    Unprotect(super::lifecycle::BackupIdArgs),
    /// Set (or with --clear, remove) a backup's note.
    Note(super::lifecycle::NoteArgs),
    /// Delete a backup anywhere in its chains (later points are consolidated).
    Delete(super::lifecycle::BackupIdArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this VM's backups.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Only backups in this status: running, completed, failed, interrupted.
    #[arg(long, value_name = "STATUS", value_parser = parse_status)]
    pub status: Option<Status>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `chainvault chain ...`
#[derive(Debug, Subcommand)]
pub enum ChainCmd {
    /// Show every point in time of one disk as a tree, oldest first.
    Show(ShowArgs),
    /// Check the catalog against the images; exit 0 when clean, 2 on problems.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The VM.
    #[arg(long, value_name = "VM")]
    pub vm: String,
    /// The disk index (0, 1, 2, ...).
    #[arg(long, value_name = "N")]
    pub disk: u32,
    /// Print JSON instead of a tree.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this VM.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `chainvault catalog ...`
#[derive(Debug, Subcommand)]
pub enum CatalogCmd {
    /// Rebuild the catalog from the image sidecars in the repository alone
    /// (stop the daemon first).
    Rebuild(RebuildArgs),
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR", env = "CHAINVAULT_DATA")]
    pub data: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| {
        format!("{s:?} is not a status: use running, completed, failed or interrupted")
    })
}

// ---------------------------------------------------------------------------
// Where the answers come from
// ---------------------------------------------------------------------------

/// A daemon over HTTP, or the repository opened offline.
pub enum Source {
    Http(HttpSource),
    Offline(Arc<Engine>),
}

impl Source {
    /// For commands that change the repository: with --data the repository
    /// is opened for writing (recovery runs first, as at a daemon's start).
    pub(super) fn open_writable(a: &SourceArgs) -> anyhow::Result<Source> {
        match &a.data {
            Some(dir) => {
                let engine = Engine::open_local(dir)
                    .with_context(|| format!("cannot open the repository {}", dir.display()))?;
                Ok(Source::Offline(engine))
            }
            None => Source::open(a),
        }
    }

    pub fn open(a: &SourceArgs) -> anyhow::Result<Source> {
        match &a.data {
            Some(dir) => {
                let engine = Engine::open_offline(dir).with_context(|| {
                    format!("cannot open the repository {} offline", dir.display())
                })?;
                Ok(Source::Offline(engine))
            }
            None => Ok(Source::Http(HttpSource::new(
                &a.daemon.server,
                a.daemon.token.clone(),
            ))),
        }
    }

    pub(super) fn list_backups(
        &self,
        vm: Option<&str>,
        status: Option<Status>,
    ) -> anyhow::Result<Vec<BackupView>> {
        match self {
            Source::Offline(e) => Ok(e.list_backups(vm, status)?),
            Source::Http(h) => Ok(h
                .get::<BackupList>("/api/v1/backups", &list_query(vm, status))?
                .backups),
        }
    }

    /// The listing as the daemon encoded it (for `--json`: printed as it
    /// comes, without decoding and encoding thousands of records again).
    fn list_backups_raw(
        &self,
        vm: Option<&str>,
        status: Option<Status>,
    ) -> anyhow::Result<Option<String>> {
        #[derive(serde::Deserialize)]
        struct Raw {
            backups: Box<serde_json::value::RawValue>,
        }
        match self {
            Source::Offline(_) => Ok(None),
            Source::Http(h) => Ok(Some(
                h.get::<Raw>("/api/v1/backups", &list_query(vm, status))?
                    .backups
                    .get()
                    .to_string(),
            )),
        }
    }

    fn chain(&self, vm: &str, disk: u32) -> anyhow::Result<ChainView> {
        match self {
            Source::Offline(e) => Ok(e.chain(vm, disk)?),
            Source::Http(h) => h.get(
                "/api/v1/backups/chain",
                &[("vm_name", vm.to_string()), ("disk_id", disk.to_string())],
            ),
        }
    }

    fn verify(&self, vm: Option<&str>) -> anyhow::Result<VerifyReport> {
        match self {
            Source::Offline(e) => Ok(e.verify(vm)?),
            Source::Http(h) => {
                let q: Vec<(&str, String)> =
                    vm.map(|v| ("vm_name", v.to_string())).into_iter().collect();
                h.get("/api/v1/verify", &q)
            }
        }
    }
}

/// A blocking HTTP client for the daemon's API.
pub struct HttpSource {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl HttpSource {
    pub(super) fn new(server: &str, token: Option<String>) -> HttpSource {
        HttpSource {
            base: server.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            agent: crate::tls::http_agent()
                .timeout_connect(Duration::from_secs(5))
                // verify reads every image; give it time.
                .timeout_read(Duration::from_secs(3600))
                .build(),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<T> {
        self.call("GET", path, query, None)
    }

    /// One request; `body` is sent as JSON. Errors say what the daemon said.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.request(method, &url);
        for (k, v) in query {
            req = req.query(k, v);
        }
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let sent = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match sent {
            Ok(resp) => {
                // Whole body first, then parse from memory: several times
                // faster than parsing from the socket for large listings.
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).with_context(
                    || {
                        format!(
                            "reading the answer of the daemon at {} ({method} {path})",
                            self.base
                        )
                    },
                )?;
                serde_json::from_slice::<T>(&body).with_context(|| {
                    format!(
                        "the daemon at {} sent a response this CLI cannot read ({method} {path})",
                        self.base
                    )
                })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp
                    .into_json::<ErrorBody>()
                    .map(|b| b.error)
                    .unwrap_or_else(|_| "no error message".into());
                if code == 401 {
                    bail!(
                        "the daemon at {} refused the request: {msg}\n\
                         pass --token TOKEN or set CHAINVAULT_TOKEN to the token the daemon was started with",
                        self.base
                    );
                }
                bail!("{msg} (HTTP {code} from {})", self.base)
            }
            Err(ureq::Error::Transport(t))
                if crate::tls::with_hint(t.to_string()) != t.to_string() =>
            {
                bail!(
                    "cannot talk to the daemon at {}: {}",
                    self.base,
                    crate::tls::with_hint(t.to_string())
                )
            }
            Err(ureq::Error::Transport(t)) => match t.kind() {
                ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => bail!(
                    "no daemon at {}; start `chainvault serve` or pass --data DIR",
                    self.base
                ),
                ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                    bail!(
                        "--server {:?} is not a valid URL: use e.g. http://127.0.0.1:8420",
                        self.base
                    )
                }
                _ => bail!("cannot talk to the daemon at {}: {t}", self.base),
            },
        }
    }
}

/// Query parameters of `GET /api/v1/backups`.
fn list_query(vm: Option<&str>, status: Option<Status>) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(vm) = vm {
        q.push(("vm_name", vm.to_string()));
    }
    if let Some(s) = status {
        q.push(("status", s.as_str().to_string()));
    }
    q
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// `chainvault backups ...`
pub fn run_backups(cmd: BackupsCmd) -> anyhow::Result<u8> {
    match cmd {
        BackupsCmd::List(a) => {
            let src = Source::open(&a.source)?;
            if a.json {
                if let Some(raw) = src.list_backups_raw(a.vm.as_deref(), a.status)? {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(raw.as_bytes())?;
                    out.write_all(b"\n")?;
                    return Ok(0);
                }
            }
            let backups = src.list_backups(a.vm.as_deref(), a.status)?;
            if a.json {
                print_json(&backups)?;
            } else if backups.is_empty() {
                println!("no backups{}", filter_desc(a.vm.as_deref(), a.status));
            } else {
                print!("{}", render_backup_table(&backups));
            }
            Ok(0)
        }
        BackupsCmd::Show(a) => super::lifecycle::show_backup(a),
        BackupsCmd::Protect(a) => super::lifecycle::protect(a, true),
        BackupsCmd::Unprotect(a) => super::lifecycle::protect(a, false),
        BackupsCmd::Note(a) => super::lifecycle::note(a),
        BackupsCmd::Delete(a) => super::lifecycle::delete(a),
    }
}

/// `chainvault chain ...`
pub fn run_chain(cmd: ChainCmd) -> anyhow::Result<u8> {
    match cmd {
        ChainCmd::Show(a) => {
            let src = Source::open(&a.source)?;
            let chain = src.chain(&a.vm, a.disk)?;
            if a.json {
                print_json(&chain)?;
            } else {
                print!("{}", render_chain(&chain));
            }
            Ok(0)
        }
        ChainCmd::Verify(a) => {
            let src = Source::open(&a.source)?;
            let report = src.verify(a.vm.as_deref())?;
            if a.json {
                print_json(&report)?;
            } else {
                let scope =
                    a.vm.as_deref()
                        .map(|v| format!(" of VM {v}"))
                        .unwrap_or_default();
                if report.is_clean() {
                    println!(
                        "{} points{scope} checked: no problems",
                        report.points_checked
                    );
                } else {
                    println!(
                        "{} points{scope} checked: {} problem{}",
                        report.points_checked,
                        report.problems.len(),
                        if report.problems.len() == 1 { "" } else { "s" }
                    );
                    for p in &report.problems {
                        println!("  - {p}");
                    }
                }
            }
            Ok(if report.is_clean() { 0 } else { 2 })
        }
    }
}

/// `chainvault catalog ...`
pub fn run_catalog(cmd: CatalogCmd) -> anyhow::Result<u8> {
    match cmd {
        CatalogCmd::Rebuild(a) => {
            let report = Engine::rebuild_catalog(&a.data)
                .with_context(|| format!("cannot rebuild the catalog of {}", a.data.display()))?;
            if a.json {
                print_json(&report)?;
            } else {
                println!(
                    "catalog of {} rebuilt: {} VMs, {} backups, {} disk backups, {} chains",
                    a.data.display(),
                    report.vms,
                    report.backups,
                    report.disk_backups,
                    report.chains
                );
                if !report.skipped.is_empty() {
                    println!("skipped {}:", report.skipped.len());
                    for s in &report.skipped {
                        println!("  - {s}");
                    }
                }
            }
            Ok(0)
        }
    }
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("cannot encode JSON")?
    );
    Ok(())
}

fn filter_desc(vm: Option<&str>, status: Option<Status>) -> String {
    let mut parts = Vec::new();
    if let Some(vm) = vm {
        parts.push(format!("of VM {vm}"));
    }
    if let Some(s) = status {
        parts.push(format!("with status {}", s.as_str()));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" {}", parts.join(" "))
    }
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// `2025-01-02T03:04:05.123456Z` → `2025-01-02 03:04:05Z`; other text as is.
fn short_time(t: &str) -> String {
    if t.len() >= 19 && t.is_char_boundary(19) && t.as_bytes().get(10) == Some(&b'T') {
        let zone = if t.ends_with('Z') { "Z" } else { "" };
        format!("{} {}{zone}", &t[..10], &t[11..19])
    } else {
        t.to_string()
    }
}

fn type_str(t: BackupType) -> &'static str {
    match t {
        BackupType::Full => "full",
        BackupType::Incremental => "incremental",
    }
}

/// The table of `backups list`.
pub fn render_backup_table(backups: &[BackupView]) -> String {
    let header = ["BACKUP", "VM", "TYPE", "STATUS", "CREATED", "DISKS", "SIZE"];
    let rows: Vec<[String; 7]> = backups
        .iter()
        .map(|b| {
            let done = b
                .disks
                .iter()
                .filter(|d| d.status == Status::Completed)
                .count();
            let total = b.disks.len().max(b.backup.disk_ids.len());
            let size: u64 = b.disks.iter().filter_map(|d| d.size_on_disk).sum();
            let has_size = b.disks.iter().any(|d| d.size_on_disk.is_some());
            [
                b.backup.backup_id.clone(),
                b.backup.vm_name.clone(),
                type_str(b.backup.backup_type).to_string(),
                b.backup.status.as_str().to_string(),
                short_time(&b.backup.created_at),
                format!("{done}/{total} done"),
                if has_size { human(size) } else { "-".into() },
            ]
        })
        .collect();
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.map(String::from));
    for (r, b) in rows.iter().zip(backups) {
        out.push_str(&line(r));
        if let Some(e) = &b.backup.error {
            out.push_str(&format!("    error: {e}\n"));
        }
    }
    out
}

/// The tree of `chain show`: points grouped by chain (a full, e.g. after a
/// CBT reset, starts a new one), oldest first, with parent links.
pub fn render_chain(c: &ChainView) -> String {
    let mut out = String::new();
    let first = c.points.first();
    let key = first
        .and_then(|p| p.disk_key.as_deref())
        .map(|k| format!("{k}, "))
        .unwrap_or_default();
    let cap = first.map(|p| human(p.capacity_bytes)).unwrap_or_default();
    // Chains in order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&DiskBackupRecord>> = HashMap::new();
    for p in &c.points {
        let g = groups.entry(p.chain_id.as_str()).or_default();
        if g.is_empty() {
            order.push(p.chain_id.as_str());
        }
        g.push(p);
    }
    if c.points.is_empty() {
        out.push_str(&format!("{} disk {}: no backups\n", c.vm_name, c.disk_id));
        return out;
    }
    let live_chains = order
        .iter()
        .filter(|id| groups[*id].iter().any(|p| p.status == Status::Completed))
        .count();
    let unfinished = c
        .points
        .iter()
        .filter(|p| p.status != Status::Completed)
        .count();
    out.push_str(&format!(
        "{} disk {} ({key}{cap}): {} point{} in {} chain{}{}\n",
        c.vm_name,
        c.disk_id,
        c.points.len(),
        if c.points.len() == 1 { "" } else { "s" },
        live_chains,
        if live_chains == 1 { "" } else { "s" },
        if unfinished > 0 {
            format!(", {unfinished} not completed")
        } else {
            String::new()
        }
    ));
    match &c.head {
        Some(h) => out.push_str(&format!(
            "head: {} (chain {}), next incremental starts from change_id {:?}\n",
            h.head_backup_id, h.chain_id, h.head_change_id
        )),
        None => out.push_str("head: none (the next backup of this disk will be full)\n"),
    }
    let head_id = c.head.as_ref().map(|h| h.head_backup_id.as_str());
    let head_chain = c.head.as_ref().map(|h| h.chain_id.as_str());

    for (gi, chain_id) in order.iter().enumerate() {
        let points = &groups[chain_id];
        out.push('\n');
        let mut title = format!("chain {chain_id}");
        if gi > 0 {
            let why = points
                .first()
                .and_then(|p| p.reason.as_deref())
                .unwrap_or("full backup");
            title.push_str(&format!("  ── new chain: {why}"));
        }
        if !points.iter().any(|p| p.status == Status::Completed) {
            title.push_str("  (no completed point)");
        }
        if head_chain == Some(*chain_id) {
            title.push_str("  [current]");
        }
        out.push_str(&title);
        out.push('\n');

        for (i, p) in points.iter().enumerate() {
            let last = i + 1 == points.len();
            let (branch, cont) = if last {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let size = p.size_on_disk.map(human).unwrap_or_else(|| "-".into());
            let mut line = format!(
                "{branch} {}  {:<11}  {:>10}  {:<11}  {}",
                short_time(&p.started_at),
                type_str(p.mode),
                size,
                p.status.as_str(),
                p.backup_id
            );
            if let Some(parent) = &p.parent_backup_id {
                line.push_str(&format!("  ← {parent}"));
            }
            if head_id == Some(p.backup_id.as_str()) {
                line.push_str("  ◀ head");
            }
            out.push_str(&line);
            out.push('\n');
            if let Some(cid) = &p.change_id {
                out.push_str(&format!("{cont}   change_id {cid}\n"));
            }
            if let Some(d) = &p.digest {
                out.push_str(&format!("{cont}   digest {d}\n"));
            }
            if let Some(v) = &p.deep_verify {
                out.push_str(&format!(
                    "{cont}   deep verify {}: {}\n",
                    v.at,
                    if v.ok {
                        "ok".to_string()
                    } else {
                        format!("BAD ({})", v.message.as_deref().unwrap_or("bad blocks"))
                    }
                ));
            }
            if let Some(r) = &p.reason {
                if !(gi > 0 && i == 0) {
                    out.push_str(&format!("{cont}   reason: {r}\n"));
                }
            }
            if let Some(e) = &p.error {
                out.push_str(&format!("{cont}   error: {e}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        id: &str,
        parent: Option<&str>,
        chain: &str,
        mode: BackupType,
        status: Status,
    ) -> DiskBackupRecord {
        DiskBackupRecord {
            backup_id: id.into(),
            disk_id: 0,
            vm_name: "pgtest1".into(),
            disk_key: Some("disk-2000".into()),
            capacity_bytes: 100 << 30,
            mode,
            reason: None,
            parent_backup_id: parent.map(Into::into),
            chain_id: chain.into(),
            image: format!("pgtest1/0/{id}.qcow2"),
            status,
            change_id: (status == Status::Completed).then(|| {
                format!(
                    "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/{}",
                    id.len() * 100
                )
            }),
            digest: None,
            deep_verify: None,
            bytes_transferred: None,
            size_on_disk: (status == Status::Completed).then_some(43 << 20),
            started_at: "2025-03-01T02:00:00.123456Z".into(),
            completed_at: None,
            error: (status == Status::Failed).then(|| "timed out".into()),
        }
    }

    #[test]
    fn chain_tree() {
        let mut reset = point("b4", None, "c2", BackupType::Full, Status::Completed);
        reset.reason = Some("CBT reset of this disk".into());
        let c = ChainView {
            vm_name: "pgtest1".into(),
            disk_id: 0,
            head: Some(ChainHead {
                vm_name: "pgtest1".into(),
                disk_id: 0,
                chain_id: "c2".into(),
                head_backup_id: "b4".into(),
                head_change_id: "x/1".into(),
            }),
            points: vec![
                point("b1", None, "c1", BackupType::Full, Status::Completed),
                point(
                    "b2",
                    Some("b1"),
                    "c1",
                    BackupType::Incremental,
                    Status::Completed,
                ),
                point(
                    "b3",
                    Some("b2"),
                    "c1",
                    BackupType::Incremental,
                    Status::Failed,
                ),
                reset,
            ],
        };
        let t = render_chain(&c);
        assert!(t.contains("├─ 2025-03-01 02:00:00Z  full"), "{t}");
        assert!(t.contains("← b1"), "{t}");
        assert!(t.contains("└─ 2025-03-01 02:00:00Z  incremental"), "{t}");
        assert!(
            t.contains("── new chain: CBT reset of this disk  [current]"),
            "{t}"
        );
        assert!(t.contains("4 points in 2 chains, 1 not completed"), "{t}");
        assert!(t.contains("◀ head"), "{t}");
        assert!(t.contains("error: timed out"), "{t}");
    }

    #[test]
    fn times() {
        assert_eq!(
            short_time("2025-03-01T02:00:00.123Z"),
            "2025-03-01 02:00:00Z"
        );
        assert_eq!(short_time("yesterday"), "yesterday");
    }

    #[test]
    fn no_daemon_message() {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let h = HttpSource::new(&format!("http://127.0.0.1:{port}"), None);
        let e = h
            .get::<serde_json::Value>("/api/v1/backups", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no daemon at http://127.0.0.1:"), "{e}");
        assert!(e.contains("pass --data DIR"), "{e}");
    }
}
