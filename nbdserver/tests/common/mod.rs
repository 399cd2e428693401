//! Shared helpers for the integration tests: an in-process server on a unix
//! socket in a temp dir, and lookups of the real client tools. A missing
//! tool fails the test with the Debian package to install.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use chainvault_nbd::{BlockExport, ListenAddr, Server, ServerConfig};

/// A server listening on a unix socket inside a temp dir.
pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> TestServer {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("nbd.sock");
        let server = Server::new(config);
        let addr = server
            .listen_unix(&socket)
            .await
            .expect("listen on unix socket");
        assert_eq!(addr, ListenAddr::Unix(socket.clone()));
        TestServer {
            server,
            dir,
            socket,
        }
    }

    pub fn add(&self, name: &str, export: Arc<dyn BlockExport>) {
        self.server.add_export(name, export).expect("add export");
    }

    /// `nbd+unix:///name?socket=...`
    pub fn uri(&self, name: &str) -> String {
        ListenAddr::Unix(self.socket.clone()).uri(name)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Path of `tool`, or panic naming the Debian package that provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    which(tool).unwrap_or_else(|| {
        panic!("required tool `{tool}` not found: install it with `apt-get install -y {package}`")
    })
}

/// A python3 interpreter that can `import nbd` (python3-libnbd). Debian's
/// module lives in the system interpreter, which may not be first in PATH.
pub fn require_python_nbd() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/bin/python3")];
    if let Some(p) = which("python3") {
        candidates.push(p);
    }
    for py in candidates {
        let ok = std::process::Command::new(&py)
            .args(["-c", "import nbd"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return py;
        }
    }
    panic!("no python3 can `import nbd`: install it with `apt-get install -y python3-libnbd`");
}

/// Run a command with a timeout; returns its output.
pub async fn run(program: &Path, args: &[&str]) -> Output {
    run_env(program, args, &[]).await
}

pub async fn run_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("cannot run {}: {e}", program.display()),
        Err(_) => panic!("{} {:?} timed out", program.display(), args),
    }
}

/// Run and require success; returns stdout.
pub async fn run_ok(program: &Path, args: &[&str]) -> String {
    let o = run(program, args).await;
    if !o.status.success() {
        panic!(
            "{} {:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            program.display(),
            args,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a python script (with `import nbd` available); `args` become sys.argv[1..].
pub async fn run_python(script: &str, args: &[&str]) -> String {
    let py = require_python_nbd();
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run_ok(&py, &all).await
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Create a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create file");
    f.set_len(size).expect("set_len");
}
