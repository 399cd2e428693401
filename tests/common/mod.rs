//! Shared harness for the daemon end-to-end tests (`daemon_*.rs`).
//!
//! * [`Daemon`]: starts the real `chainvault serve` binary on a data directory,
//!   parses its ready line, speaks HTTP to it (every call returns the status and
//!   the JSON body, 4xx/5xx included), stops it with SIGTERM or `kill -9`, and
//!   restarts it on the same data directory. Its stderr goes to a log file whose
//!   tail is printed when a test fails.
//! * Source disks: raw files of deterministic random data ([`Rng`]) with zero
//!   ranges, and scattered modifications that return the changed extents, the
//!   way changed-block tracking would report them.
//! * Writers into NBD targets: `nbdcopy` (a whole disk), `qemu-io` (pattern
//!   writes and `write -z` of the changed extents only) and libnbd's Python
//!   binding (real data of the changed extents only).
//! * Checks with the real tools: `qemu-img compare/check/info --backing-chain`.
//!
//! A missing tool is a test failure naming the Debian package, never a skip.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_chainvault");
pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

/// The system Python that has libnbd's binding (python3-libnbd). The `python3`
/// first on PATH may be another one (pyenv) without it.
pub const PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------
// Tools

/// Fail (never skip) when `tool` is missing, naming the Debian package.
pub fn need(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is missing or broken: install the Debian package {package} \
         (scripts/install-test-deps.sh does)"
    );
}

/// Every external tool the daemon tests use.
pub fn tools() {
    need("qemu-img", "qemu-utils");
    need("qemu-io", "qemu-utils");
    need("nbdcopy", "libnbd-bin");
    need("nbdinfo", "libnbd-bin");
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{PYTHON} cannot `import nbd`: install the Debian package python3-libnbd \
         (scripts/install-test-deps.sh does)"
    );
}

/// Run a command; returns its output whatever the exit status.
pub fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null());
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"))
}

/// Run a command and require exit status 0.
pub fn run_ok(c: Command) -> Output {
    let desc = format!("{c:?}");
    let out = run(c);
    assert!(
        out.status.success(),
        "{desc} exited {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn cmd<S: AsRef<std::ffi::OsStr>>(prog: &str, args: &[S]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Percent-encode a query parameter value.
pub fn q(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

// ---------------------------------------------------------------------------
// The daemon

static DAEMON_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running `chainvault serve`. Killed (-9) on drop if still running; the tail
/// of its log is printed when the test is failing.
pub struct Daemon {
    pub data: PathBuf,
    pub sock: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub api: String,
    /// The NBD URI of the ready line (no export name).
    pub nbd: String,
    pub log: PathBuf,
    /// With `--tls-cert DIR/server-cert.pem`: DIR, a make-test-certs.sh
    /// directory (its CA is trusted, and with `--tls-ca` its client
    /// certificate presented, by this harness's HTTP agent).
    pub tls_dir: Option<PathBuf>,
    child: Option<Child>,
    agent: ureq::Agent,
}

/// Status code and JSON body of an HTTP answer. A body that is not JSON comes
/// back as `{"__non_json_body": TEXT}`, an empty one as `null`.
pub type Reply = (u16, Value);

impl Daemon {
    /// `chainvault serve --data DATA --listen 127.0.0.1:0 --nbd-socket DATA/nbd.sock`.
    pub fn start(data: &Path) -> Daemon {
        Daemon::start_with(data, &[], &[])
    }

    /// The same with extra arguments (`--disk-timeout 2s`) and environment
    /// (`CHAINVAULT_CRASH_AT`). Restarting is calling this again on the same
    /// data directory. With `--nbd-listen` among them, NBD is on TCP instead
    /// of the unix socket.
    pub fn start_with(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        std::fs::create_dir_all(data).unwrap();
        let sock = data.join("nbd.sock");
        let n = DAEMON_SEQ.fetch_add(1, Ordering::SeqCst);
        let logdir = data.parent().unwrap_or(data).join("logs");
        std::fs::create_dir_all(&logdir).unwrap();
        let log = logdir.join(format!("daemon-{n}.stderr"));
        let logf = std::fs::File::create(&log).unwrap();

        let mut c = Command::new(BIN);
        c.arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"]);
        if !extra.contains(&"--nbd-listen") {
            c.arg("--nbd-socket").arg(&sock);
        }
        c.args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CHAINVAULT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf));
        for (k, v) in env {
            c.env(k, v);
        }
        let desc = format!("{c:?}");
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));

        let line = first_stdout_line(&mut child, &desc, &log, "its ready line");
        let mut api = None;
        let mut nbd = None;
        for tok in line.split_whitespace() {
            if let Some(v) = tok.strip_prefix("api=") {
                api = Some(v.trim_end_matches('/').to_string());
            } else if let Some(v) = tok.strip_prefix("nbd=") {
                nbd = Some(v.to_string());
            }
        }
        let (api, nbd) = match (line.starts_with("ready "), api, nbd) {
            (true, Some(a), Some(n)) => (a, n),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{desc}: first stdout line is not `ready api=URL nbd=URI`: {line:?}\n--- stderr ---\n{}",
                    tail(&log, 60)
                );
            }
        };
        let arg_after = |flag: &str| {
            extra
                .iter()
                .position(|a| *a == flag)
                .and_then(|i| extra.get(i + 1))
                .map(PathBuf::from)
        };
        let tls_dir = arg_after("--tls-cert").and_then(|c| c.parent().map(Path::to_path_buf));
        let mut agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120));
        if let Some(dir) = &tls_dir {
            let client_cert = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
            let identity =
                arg_after("--tls-ca").map(|_| (client_cert.0.as_path(), client_cert.1.as_path()));
            let config =
                chainvault_nbd::tls::client_config(Some(&dir.join("ca-cert.pem")), identity)
                    .unwrap_or_else(|e| panic!("test TLS client config: {e}"));
            agent = agent.tls_config(config);
        }
        Daemon {
            data: data.to_path_buf(),
            sock,
            api,
            nbd,
            log,
            tls_dir,
            child: Some(child),
            agent: agent.build(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon already stopped").id() as i32
    }

    /// The last lines of the daemon's stderr (for failure messages).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// SIGTERM, wait (30 s at most) and return the exit status.
    pub fn sigterm(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        match wait_timeout(&mut child, Duration::from_secs(30)) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon did not exit within 30 s of SIGTERM\n--- stderr ---\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// SIGTERM and require a clean exit (status 0).
    pub fn stop(self) {
        let log = self.log.clone();
        let st = self.sigterm();
        assert_eq!(
            st.code(),
            Some(0),
            "daemon exited {st:?} after SIGTERM, want 0\n--- stderr ---\n{}",
            tail(&log, 40)
        );
    }

    /// `kill -9` and reap.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
    }

    /// Wait for the daemon to exit on its own (crash injection); returns its status.
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        match wait_timeout(&mut child, timeout) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon still running {timeout:?} after it should have aborted\n--- stderr ---\n{}", tail(&self.log, 40));
            }
        }
    }

    // --- HTTP ---------------------------------------------------------------

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.api, path)
    }

    fn finish(r: Result<ureq::Response, ureq::Error>) -> Result<Reply, String> {
        let resp = match r {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => return Err(e.to_string()),
        };
        let status = resp.status();
        let body = resp
            .into_string()
            .map_err(|e| format!("status {status}, body unreadable: {e}"))?;
        let v = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap_or_else(|_| json!({ "__non_json_body": body }))
        };
        Ok((status, v))
    }

    fn must(&self, what: String, r: Result<Reply, String>) -> Reply {
        r.unwrap_or_else(|e| {
            panic!(
                "{what}: no HTTP answer: {e}\n--- daemon stderr ---\n{}",
                self.log_tail()
            )
        })
    }

    pub fn try_get(&self, path: &str) -> Result<Reply, String> {
        Self::finish(self.agent.get(&self.url(path)).call())
    }
    pub fn try_post(&self, path: &str, body: &Value) -> Result<Reply, String> {
        Self::finish(self.agent.post(&self.url(path)).send_json(body.clone()))
    }
    pub fn try_post_raw(&self, path: &str, body: &str) -> Result<Reply, String> {
        Self::finish(
            self.agent
                .post(&self.url(path))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }
    pub fn try_patch_raw(&self, path: &str, body: &str) -> Result<Reply, String> {
        self.try_send_raw("PATCH", path, body)
    }
    /// Any method with a raw JSON body.
    pub fn try_send_raw(&self, method: &str, path: &str, body: &str) -> Result<Reply, String> {
        Self::finish(
            self.agent
                .request(method, &self.url(path))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }
    /// `PATCH` with a JSON body; panics only when the daemon cannot be reached.
    pub fn patch(&self, path: &str, body: &Value) -> Reply {
        self.try_patch_raw(path, &body.to_string())
            .unwrap_or_else(|e| panic!("PATCH {path}: {e}"))
    }
    /// `PUT` with a raw JSON body; panics only when the daemon cannot be reached.
    pub fn put_raw(&self, path: &str, body: &str) -> Reply {
        self.try_send_raw("PUT", path, body)
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
    }
    pub fn try_delete(&self, path: &str) -> Result<Reply, String> {
        Self::finish(self.agent.delete(&self.url(path)).call())
    }

    pub fn get(&self, path: &str) -> Reply {
        self.must(format!("GET {path}"), self.try_get(path))
    }
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.must(format!("POST {path} {body}"), self.try_post(path, body))
    }
    /// POST a body sent as-is with `Content-Type: application/json`.
    pub fn post_raw(&self, path: &str, body: &str) -> Reply {
        self.must(format!("POST {path} {body}"), self.try_post_raw(path, body))
    }
    pub fn delete(&self, path: &str) -> Reply {
        self.must(format!("DELETE {path}"), self.try_delete(path))
    }

    /// Require `want`; returns the body. `what` names the request.
    pub fn expect(&self, what: &str, r: Reply, want: u16) -> Value {
        if r.0 != want {
            panic!(
                "{what}: got HTTP {} want {want}\nbody: {}\n--- daemon stderr ---\n{}",
                r.0,
                pretty(&r.1),
                self.log_tail()
            );
        }
        r.1
    }

    pub fn get_ok(&self, path: &str) -> Value {
        self.expect(&format!("GET {path}"), self.get(path), 200)
    }
    pub fn post_ok(&self, path: &str, body: &Value) -> Value {
        self.expect(&format!("POST {path} {body}"), self.post(path, body), 200)
    }

    // --- API shortcuts --------------------------------------------------------

    /// `POST /api/v1/backups`, requiring 200.
    pub fn start_backup(&self, body: &Value) -> Value {
        let r = self.post_ok("/api/v1/backups", body);
        assert!(
            r["backup_id"].is_string(),
            "start response has no backup_id: {}",
            pretty(&r)
        );
        assert!(
            r["disks"].is_array(),
            "start response has no disks[]: {}",
            pretty(&r)
        );
        r
    }

    /// `POST /api/v1/backups/{id}/complete`, requiring 200.
    pub fn complete(&self, backup_id: &str, disk_id: u32, change_id: &str, bytes: u64) -> Value {
        let body = json!({"change_id": change_id, "disk_id": disk_id, "bytes_transferred": bytes});
        let r = self.post_ok(&format!("/api/v1/backups/{backup_id}/complete"), &body);
        assert_eq!(
            r["status"],
            "completed",
            "complete {backup_id}/{disk_id}: {}",
            pretty(&r)
        );
        assert_eq!(
            r["backup_id"],
            backup_id,
            "complete {backup_id}/{disk_id}: {}",
            pretty(&r)
        );
        assert_eq!(
            r["disk_id"],
            disk_id,
            "complete {backup_id}/{disk_id}: {}",
            pretty(&r)
        );
        assert_eq!(
            r["change_id"],
            change_id,
            "complete {backup_id}/{disk_id}: {}",
            pretty(&r)
        );
        r
    }

    /// `GET /api/v1/backups/changeid?vm_name=&disk_id=`, requiring 200.
    pub fn changeid(&self, vm: &str, disk_id: u32) -> Value {
        let r = self.get_ok(&format!(
            "/api/v1/backups/changeid?vm_name={}&disk_id={disk_id}",
            q(vm)
        ));
        assert_eq!(r["vm_name"], vm, "changeid answer: {}", pretty(&r));
        assert_eq!(r["disk_id"], disk_id, "changeid answer: {}", pretty(&r));
        assert!(
            r["change_id"].is_string(),
            "changeid answer without change_id string: {}",
            pretty(&r)
        );
        r
    }

    /// Just the change_id string.
    pub fn change_id(&self, vm: &str, disk_id: u32) -> String {
        self.changeid(vm, disk_id)["change_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `GET /api/v1/backups/{id}`, requiring 200.
    pub fn backup(&self, id: &str) -> Value {
        let r = self.get_ok(&format!("/api/v1/backups/{id}"));
        assert_eq!(r["backup_id"], id, "GET backup {id}: {}", pretty(&r));
        assert!(
            r["disks"].is_array(),
            "GET backup {id}: no disks[]: {}",
            pretty(&r)
        );
        r
    }

    /// `GET /api/v1/backups/chain?vm_name=&disk_id=`, requiring 200.
    pub fn chain(&self, vm: &str, disk_id: u32) -> Value {
        let r = self.get_ok(&format!(
            "/api/v1/backups/chain?vm_name={}&disk_id={disk_id}",
            q(vm)
        ));
        assert!(
            r["points"].is_array(),
            "chain view without points[]: {}",
            pretty(&r)
        );
        r
    }

    /// `GET /api/v1/backups` (optionally with a query), requiring 200; the
    /// backups as a list whether the body is an array or `{"backups": [...]}`.
    pub fn list(&self, query: &str) -> Vec<Value> {
        let path = if query.is_empty() {
            "/api/v1/backups".to_string()
        } else {
            format!("/api/v1/backups?{query}")
        };
        let r = self.get_ok(&path);
        as_list(&r).unwrap_or_else(|| panic!("GET {path}: not a list of backups: {}", pretty(&r)))
    }

    /// The image path of one disk of a backup, as an absolute path.
    pub fn image_of(&self, backup_id: &str, disk_id: u32) -> PathBuf {
        let b = self.backup(backup_id);
        let d = disk_of(&b, disk_id);
        let rel = d["image"].as_str().unwrap_or_else(|| {
            panic!(
                "disk {disk_id} of {backup_id} has no image path: {}",
                pretty(&b)
            )
        });
        abs_image(&self.data, rel)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon stderr ({}) ---\n{}",
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The first line a spawned `chainvault` prints on stdout (its ready or
/// mounted line); the rest of stdout is drained in the background so the
/// child never blocks on it. Panics with the tail of its stderr log if it
/// exits first or says nothing within 30 s.
fn first_stdout_line(child: &mut Child, desc: &str, log: &Path, what: &str) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    let t0 = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => return l,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return String::new(),
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{desc} exited {st:?} before printing {what}\n--- stderr ---\n{}",
                tail(log, 60)
            );
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{desc}: no {what} within 30 s\n--- stderr ---\n{}",
                tail(log, 60)
            );
        }
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A list of backups from `GET /api/v1/backups`: an array or `{"backups": [...]}`.
pub fn as_list(v: &Value) -> Option<Vec<Value>> {
    if let Some(a) = v.as_array() {
        return Some(a.clone());
    }
    v.get("backups").and_then(|b| b.as_array()).cloned()
}

/// The `disks[]` entry with this disk_id (start response or BackupView).
pub fn disk_of(v: &Value, disk_id: u32) -> Value {
    v["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["disk_id"] == disk_id).cloned())
        .unwrap_or_else(|| panic!("no disk {disk_id} in {}", pretty(v)))
}

pub fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_string()
}

/// `image` fields are relative to the data dir (an absolute one is used as is,
/// but must still lie inside it).
pub fn abs_image(data: &Path, rel: &str) -> PathBuf {
    let p = Path::new(rel);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        data.join(p)
    };
    assert!(
        p.starts_with(data) && !rel.split('/').any(|c| c == ".."),
        "image path {rel:?} is not inside the data dir {}",
        data.display()
    );
    p
}

/// After a restart: the backup is `interrupted`, carries no change_id, its
/// images are gone, it is not a restore point, and nothing is running.
pub fn assert_interrupted(d: &Daemon, id: &str, what: &str) {
    let v = d.backup(id);
    assert_eq!(
        v["status"],
        "interrupted",
        "{what}: backup status after restart: {}",
        pretty(&v)
    );
    for x in v["disks"].as_array().unwrap() {
        assert_eq!(
            x["status"],
            "interrupted",
            "{what}: disk status after restart: {}",
            pretty(x)
        );
        assert!(
            x["change_id"].is_null() || x["change_id"] == "",
            "{what}: an interrupted disk must not carry a change_id: {}",
            pretty(x)
        );
        // model.rs: Interrupted = "its images were removed".
        if let Some(rel) = x["image"].as_str() {
            let p = abs_image(&d.data, rel);
            assert!(
                !p.exists(),
                "{what}: half-written image {} was left behind",
                p.display()
            );
        }
    }
    // Not a restore point.
    let r = d.post("/api/v1/restores", &json!({"backup_id": id, "disk_id": 0}));
    assert!(
        r.0 >= 400 && r.0 < 500,
        "{what}: a restore of an interrupted backup must be refused, got HTTP {} {}",
        r.0,
        pretty(&r.1)
    );
    assert_error_body(&format!("{what}: restore of an interrupted backup"), &r);
    assert!(
        d.list("status=running").is_empty(),
        "{what}: running backups after restart: {:?}",
        d.list("status=running")
    );
}

/// Assert an error answer: status `want` and a JSON body with a non-empty
/// `error` string.
pub fn assert_error(what: &str, r: &Reply, want: u16) {
    assert_eq!(
        r.0,
        want,
        "{what}: got HTTP {} want {want}; body: {}",
        r.0,
        pretty(&r.1)
    );
    assert_error_body(what, r);
}

pub fn assert_error_body(what: &str, r: &Reply) {
    let e = r.1.get("error").and_then(|e| e.as_str()).unwrap_or("");
    assert!(
        !e.trim().is_empty(),
        "{what}: HTTP {} without a JSON body carrying an `error` string: {}",
        r.0,
        pretty(&r.1)
    );
}

// ---------------------------------------------------------------------------
// Request bodies and change ids

pub fn disk_spec(disk_id: u32, capacity: u64) -> Value {
    json!({"disk_id": disk_id, "disk_key": format!("disk-{}", 2000 + disk_id), "capacity_bytes": capacity})
}

pub fn start_body(vm: &str, backup_type: &str, disks: Option<Value>) -> Value {
    let mut b =
        json!({"vm_name": vm, "backup_type": backup_type, "repository_id": "r1", "tags": ["e2e"]});
    if let Some(d) = disks {
        b["disks"] = d;
    }
    b
}

/// A VMware-style change_id: `UUID/seq`, a different CBT UUID per disk and per
/// `epoch` (a CBT reset gives a disk a new UUID).
pub fn vmware_cid(disk_id: u32, epoch: u32, seq: u32) -> String {
    let mut r = Rng::new(0xC0FF_EE00 ^ ((disk_id as u64) << 32) ^ ((epoch as u64) << 16));
    let mut b: Vec<String> = (0..16).map(|_| format!("{:02x}", r.next() as u8)).collect();
    b[0] = "52".to_string();
    format!("{}-{}/{seq}", b[..8].join(" "), b[8..].join(" "))
}

// ---------------------------------------------------------------------------
// Source disks

/// xorshift64*: deterministic test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for ch in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            ch.copy_from_slice(&v[..ch.len()]);
        }
    }
}

/// A raw source disk of `size` bytes: random data with a few zero ranges (64
/// KiB aligned, 256 KiB to 2 MiB long). Returns the zero ranges.
pub fn make_disk(path: &Path, size: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut r = Rng::new(seed);
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        r.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    let mut zeros = Vec::new();
    let nz = 3 + r.below(3);
    for _ in 0..nz {
        let len = (4 + r.below(29)) * 64 * KIB;
        let off = r.below((size - len) / (64 * KIB)) * 64 * KIB;
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
        zeros.push((off, len));
    }
    // The last 512 KiB is zero too (a typical unused tail).
    f.write_all_at(&vec![0u8; 512 * KIB as usize], size - 512 * KIB)
        .unwrap();
    zeros.push((size - 512 * KIB, 512 * KIB));
    f.sync_all().unwrap();
    zeros
}

/// One changed extent. `pattern` is the byte the whole extent was filled with
/// (qemu-io can write it), `None` for random data (read it from the source).
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    pub off: u64,
    pub len: u64,
    pub pattern: Option<u8>,
}

/// What changed on a source disk since the previous point, as CBT reports it.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub writes: Vec<Extent>,
    pub zeros: Vec<(u64, u64)>,
}

impl Changes {
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|e| e.len).sum::<u64>() + self.zeros.iter().map(|z| z.1).sum::<u64>()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Each changed block filled with one byte (written with `qemu-io write -P`).
    Pattern,
    /// Random data (written with libnbd from the source file).
    Random,
}

/// Change about `permille`/1000 of the 64 KiB blocks of the source, scattered
/// at random, and zero two ranges of 256 KiB. Returns the changed extents.
pub fn modify_disk(path: &Path, seed: u64, permille: u64, fill: Fill) -> Changes {
    const BLOCK: u64 = 64 * KIB;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    let nblocks = size / BLOCK;
    let mut r = Rng::new(seed);
    let mut used = BTreeSet::new();
    let mut ch = Changes::default();
    for _ in 0..2 {
        loop {
            let b = r.below(nblocks - 4);
            if (b..b + 4).all(|x| !used.contains(&x)) {
                used.extend(b..b + 4);
                ch.zeros.push((b * BLOCK, 4 * BLOCK));
                break;
            }
        }
    }
    let n = (nblocks * permille / 1000).max(1);
    let mut chosen = BTreeSet::new();
    while chosen.len() < n as usize {
        let b = r.below(nblocks);
        if !used.contains(&b) {
            used.insert(b);
            chosen.insert(b);
        }
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for b in chosen {
        let pattern = match fill {
            Fill::Pattern => {
                let p = 1 + r.below(255) as u8;
                buf.iter_mut().for_each(|x| *x = p);
                Some(p)
            }
            Fill::Random => {
                r.fill(&mut buf);
                None
            }
        };
        f.write_all_at(&buf, b * BLOCK).unwrap();
        ch.writes.push(Extent {
            off: b * BLOCK,
            len: BLOCK,
            pattern,
        });
    }
    for &(off, len) in &ch.zeros {
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    }
    f.sync_all().unwrap();
    ch
}

/// Keep a copy of the source as it is at this point.
pub fn snapshot_source(src: &Path, dst: &Path) {
    std::fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
}

// ---------------------------------------------------------------------------
// Writers into NBD targets

/// `nbdcopy SRC URI`: write a whole disk (no --flush: the daemon must make it
/// durable at completion whether or not the client flushed).
pub fn nbdcopy(src: &Path, uri: &str) {
    run_ok(cmd("nbdcopy", &[src.to_str().unwrap(), uri]));
}

/// Write only the changed extents with qemu-io: `write -P` for pattern
/// extents, `write -z` for zeroed ranges, then `flush`.
pub fn qemu_io_changes(uri: &str, ch: &Changes) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for e in &ch.writes {
        let p = e
            .pattern
            .expect("qemu_io_changes needs Fill::Pattern changes");
        c.arg("-c")
            .arg(format!("write -P 0x{p:02x} {} {}", e.off, e.len));
    }
    for (off, len) in &ch.zeros {
        c.arg("-c").arg(format!("write -z {off} {len}"));
    }
    c.arg("-c").arg("flush");
    c.arg(uri);
    let out = run_ok(c);
    let t = text(&out.stdout) + &text(&out.stderr);
    assert!(
        !t.contains("failed") && !t.to_lowercase().contains("error"),
        "qemu-io against {uri} reported a failure:\n{t}"
    );
}

/// Write only the changed extents with libnbd (Python binding): the data read
/// from the source file, `zero` for zeroed ranges, then flush.
pub fn nbd_write_changes(uri: &str, src: &Path, ch: &Changes) {
    let spec = json!({
        "uri": uri,
        "src": src,
        "writes": ch.writes.iter().map(|e| [e.off, e.len]).collect::<Vec<_>>(),
        "zeros": ch.zeros.iter().map(|z| [z.0, z.1]).collect::<Vec<_>>(),
    });
    let script = r#"
import json, sys, nbd
spec = json.loads(sys.stdin.read())
h = nbd.NBD()
h.connect_uri(spec["uri"])
with open(spec["src"], "rb") as f:
    for off, ln in spec["writes"]:
        f.seek(off)
        h.pwrite(f.read(ln), off)
for off, ln in spec["zeros"]:
    h.zero(ln, off)
h.flush()
h.shutdown()
"#;
    let mut c = Command::new(PYTHON);
    c.args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "libnbd write of changed extents to {uri} failed ({:?}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `nbdinfo --size URI`, or the error text.
pub fn nbd_size(uri: &str) -> Result<u64, String> {
    let out = run(cmd("nbdinfo", &["--size", uri]));
    if out.status.success() {
        text(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("nbdinfo --size printed {:?}: {e}", text(&out.stdout)))
    } else {
        Err(text(&out.stderr))
    }
}

/// Is the export at `uri` gone (nbdinfo cannot open it)?
pub fn assert_export_gone(what: &str, uri: &str) {
    if let Ok(sz) = nbd_size(uri) {
        panic!("{what}: export {uri} is still served (size {sz}) but should be gone");
    }
}

// ---------------------------------------------------------------------------
// Checks with qemu-img

/// `qemu-img compare -f qcow2 -F raw IMAGE SRC` must say identical.
pub fn compare(what: &str, image: &Path, src: &Path) {
    let out = run(cmd(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    ));
    assert!(
        out.status.success(),
        "{what}: qemu-img compare {} {} exited {:?}:\n{}{}",
        image.display(),
        src.display(),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `qemu-img check -f qcow2 IMAGE` must be clean (exit 0).
pub fn check(what: &str, image: &Path) {
    let out = run(cmd(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    ));
    assert!(
        out.status.success(),
        "{what}: qemu-img check {} exited {:?}:\n{}{}",
        image.display(),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `qemu-img info --backing-chain --output=json IMAGE`: the files of the chain,
/// top first, canonicalised; every layer must be qcow2.
pub fn backing_chain(image: &Path) -> Vec<PathBuf> {
    let out = run_ok(cmd(
        "qemu-img",
        &[
            "info",
            "--backing-chain",
            "--output=json",
            image.to_str().unwrap(),
        ],
    ));
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info json");
    let mut files = Vec::new();
    for layer in v
        .as_array()
        .expect("qemu-img info --backing-chain gives an array")
    {
        assert_eq!(
            layer["format"],
            "qcow2",
            "layer of {} is not qcow2: {}",
            image.display(),
            pretty(layer)
        );
        let f = PathBuf::from(s(&layer["filename"]));
        files.push(std::fs::canonicalize(&f).unwrap_or(f));
    }
    files
}

/// Assert the backing chain of `top` is exactly `want` (top first).
pub fn assert_chain(what: &str, top: &Path, want: &[&Path]) {
    let got = backing_chain(top);
    let want: Vec<PathBuf> = want
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or(p.to_path_buf()))
        .collect();
    assert_eq!(
        got,
        want,
        "{what}: qemu-img info --backing-chain of {} (top first)",
        top.display()
    );
}

/// Bytes the file occupies on disk (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .blocks()
        * 512
}

/// The JSON sidecar of an image: `<image>.json`, `<stem>.json`, or another
/// `.json` in the same directory whose name starts with the image's stem.
pub fn find_sidecar(image: &Path) -> Option<PathBuf> {
    let a = PathBuf::from(format!("{}.json", image.display()));
    if a.is_file() {
        return Some(a);
    }
    let b = image.with_extension("json");
    if b.is_file() {
        return Some(b);
    }
    let stem = image.file_stem()?.to_string_lossy().into_owned();
    let dir = image.parent()?;
    let mut c: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().map(|x| x == "json").unwrap_or(false)
                && p.file_name().unwrap().to_string_lossy().starts_with(&stem)
        })
        .collect();
    c.sort();
    c.into_iter().next()
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                let ft = match e.file_type() {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                if ft.is_dir() {
                    todo.push(p.clone());
                }
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The sled catalog directory under the data dir: a directory holding sled's
/// `conf` and `db` files.
pub fn find_catalog_dir(data: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = walk(data)
        .into_iter()
        .filter(|p| p.is_dir() && p.join("conf").is_file() && p.join("db").is_file())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs.len(),
        1,
        "expected exactly one sled database directory (with `conf` and `db`) under {}, found {dirs:?}; files: {:#?}",
        data.display(),
        walk(data)
    );
    dirs.pop().unwrap()
}

// ---------------------------------------------------------------------------
// The CLI

pub fn cli(args: &[&str]) -> Output {
    run(cmd(BIN, args))
}

/// `chainvault chain verify --data DIR --json`: exit 0 and no problems.
pub fn verify_offline(data: &Path) {
    let out = cli(&[
        "chain",
        "verify",
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "chainvault chain verify --data {} exited {:?}\nstdout: {so}\nstderr: {}",
        data.display(),
        out.status,
        text(&out.stderr)
    );
    let v: Value = serde_json::from_str(so.trim())
        .unwrap_or_else(|e| panic!("chain verify --json printed non-JSON ({e}): {so}"));
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(
        problems.is_empty(),
        "chain verify reported problems: {}",
        pretty(&v)
    );
    assert!(
        v["points_checked"].as_u64().unwrap_or(0) > 0,
        "chain verify checked no points: {}",
        pretty(&v)
    );
}

/// `chainvault chain verify --server URL --json` against a running daemon:
/// exit 0 and no problems.
pub fn verify_server(d: &Daemon) {
    let out = cli(&["chain", "verify", "--server", &d.api, "--json"]);
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "chainvault chain verify --server {} exited {:?}\nstdout: {so}\nstderr: {}",
        d.api,
        out.status,
        text(&out.stderr)
    );
    let v: Value = serde_json::from_str(so.trim())
        .unwrap_or_else(|e| panic!("chain verify --server --json printed non-JSON ({e}): {so}"));
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(
        problems.is_empty(),
        "chain verify --server reported problems: {}",
        pretty(&v)
    );
}

/// The sidecar of a completed image names its backup, change_id and chain and
/// says completed.
pub fn assert_sidecar(what: &str, image: &Path, facts: &[&str]) {
    let sc = find_sidecar(image)
        .unwrap_or_else(|| panic!("{what}: no JSON sidecar next to {}", image.display()));
    let body = std::fs::read_to_string(&sc).unwrap();
    let v: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: sidecar {} is not JSON: {e}", sc.display()));
    let flat = v.to_string();
    for f in facts.iter().chain(&["completed"]) {
        assert!(
            flat.contains(*f),
            "{what}: sidecar {} does not record {f:?}: {}",
            sc.display(),
            pretty(&v)
        );
    }
}

/// The status as a string for messages: exit code or the signal.
pub fn describe_exit(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st:?}"),
    }
}

// ---------------------------------------------------------------------------
// `chainvault mount` (mount_*.rs)

/// A running `chainvault mount`. On drop (a failing test) the mount is
/// detached and the process killed, so nothing is left behind.
pub struct Mount {
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Whether `dir` is a mount point now (by /proc/mounts).
pub fn is_mounted(dir: &Path) -> bool {
    let want = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|m| Path::new(&m.replace("\\040", " ")) == want)
    })
}

impl Mount {
    /// `chainvault mount DIR ARGS...`; waits for its `mounted` line.
    pub fn start(dir: &Path, args: &[&str]) -> Mount {
        need("fusermount3", "fuse3");
        std::fs::create_dir_all(dir).unwrap();
        let n = DAEMON_SEQ.fetch_add(1, Ordering::SeqCst);
        let logdir = dir.parent().unwrap_or(dir).join("logs");
        std::fs::create_dir_all(&logdir).unwrap();
        let log = logdir.join(format!("mount-{n}.stderr"));
        let mut c = Command::new(BIN);
        c.arg("mount")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        let desc = format!("{c:?}");
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
        let line = first_stdout_line(&mut child, &desc, &log, "its `mounted` line");
        if !line.starts_with("mounted ") {
            let st = wait_timeout(&mut child, Duration::from_secs(5));
            panic!(
                "{desc}: first stdout line is {line:?}, not `mounted ...` (exit {st:?})\n--- stderr ---\n{}",
                tail(&log, 40)
            );
        }
        assert!(
            is_mounted(dir),
            "{desc} said mounted but /proc/mounts has no {}",
            dir.display()
        );
        Mount {
            dir: dir.to_path_buf(),
            log,
            child: Some(child),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("mount already stopped").id() as i32
    }

    fn finish(&mut self, how: &str) {
        let mut child = self.child.take().expect("mount already stopped");
        let st = wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chainvault mount still running 20 s after {how}\n{}",
                tail(&self.log, 40)
            )
        });
        assert_eq!(
            st.code(),
            Some(0),
            "chainvault mount exited {} after {how}\n{}",
            describe_exit(&st),
            tail(&self.log, 40)
        );
        assert!(
            !is_mounted(&self.dir),
            "{} is still in /proc/mounts after {how}",
            self.dir.display()
        );
    }

    /// Ctrl-C: the process must unmount and exit 0.
    pub fn sigint(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        self.finish("SIGINT");
    }

    /// `fusermount3 -u DIR` from outside: the process must exit 0.
    pub fn fusermount_u(mut self) {
        let mut c = Command::new("fusermount3");
        c.arg("-u").arg(&self.dir);
        run_ok(c);
        self.finish("fusermount3 -u");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- chainvault mount stderr ({}) ---\n{}",
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
        }
    }
}

/// Back up whole source disks through the daemon: start (`disks` carries
/// the disk specs on a VM's first backup), `nbdcopy` each source into its
/// target, complete each with change_id `cid-<backup n>-<disk>`. Returns the
/// backup id.
pub fn backup_sources(
    d: &Daemon,
    vm: &str,
    kind: &str,
    srcs: &[(u32, &Path)],
    first: bool,
) -> String {
    let disks = first.then(|| {
        Value::Array(
            srcs.iter()
                .map(|(id, p)| disk_spec(*id, std::fs::metadata(p).unwrap().len()))
                .collect(),
        )
    });
    let r = d.start_backup(&start_body(vm, kind, disks));
    let id = s(&r["backup_id"]);
    for (disk, src) in srcs {
        let t = disk_of(&r, *disk);
        nbdcopy(src, &s(&t["nbd_uri"]));
        d.complete(&id, *disk, &format!("cid-{id}-{disk}"), 0);
    }
    id
}

/// `cmp A B` must say identical.
pub fn assert_cmp(what: &str, a: &Path, b: &Path) {
    let out = run(cmd("cmp", &[a.as_os_str(), b.as_os_str()]));
    assert!(
        out.status.success(),
        "{what}: cmp {} {} differ: {}{}",
        a.display(),
        b.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Poll `f` every 100 ms for up to `secs`.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
