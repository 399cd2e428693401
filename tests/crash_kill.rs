//! Crash safety of the image writer: `chainvault export` is killed with
//! SIGKILL at random moments while clients write, zero, discard and flush
//! through it. After every kill `qemu-img check` must find no corruption
//! (leaked clusters are allowed: they are the documented cost of a crash), and
//! everything acknowledged by a completed flush must still read back.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn need(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is missing: install the Debian package {package}"
    );
}

fn create(path: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_chainvault"))
        .args(["image", "create"])
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// xorshift, so every run is reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run_round(dir: &Path, seed: u64, overlay: bool) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let img = dir.join(format!("k{seed}.qcow2"));

    if overlay {
        let base = dir.join(format!("k{seed}-base.qcow2"));
        create(&base, &["--size", "32M", "--cluster-size", "64K"]);
        let st = Command::new("qemu-io")
            .args(["-c", "write -P 0x11 0 32M"])
            .arg(&base)
            .output()
            .unwrap();
        assert!(st.status.success());
        create(
            &img,
            &[
                "--backing",
                base.to_str().unwrap(),
                "--extended-l2",
                "--cluster-size",
                "64K",
            ],
        );
    } else {
        let cs = ["4K", "64K", "2M"][rng.below(3) as usize];
        create(&img, &["--size", "32M", "--cluster-size", cs]);
    }
    let sock = dir.join(format!("k{seed}.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_chainvault"))
        .arg("export")
        .arg(&img)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    // Phase 1: a pattern that is written and flushed before the storm; it must survive.
    let st = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 28M 1M",
            "-c",
            "flush",
            &uri,
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    // Phase 2: a storm of writes, zeroes, discards and flushes in the first 24 MiB,
    // with the server killed at a random moment.
    let mut cmds = Vec::new();
    for _ in 0..400 {
        let off = rng.below(24 << 20) & !511;
        let len = ((rng.below(512 << 10) + 512) & !511).min((24 << 20) - off);
        cmds.push(match rng.below(10) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            2 => "flush".to_string(),
            _ => format!("write -P 0x{:02x} {off} {len}", rng.below(255) + 1),
        });
    }
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c);
    }
    args.push(uri.clone());
    let mut writer = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let delay = Duration::from_millis(20 + rng.below(600));
    let t = Instant::now();
    while t.elapsed() < delay {
        if let Ok(Some(_)) = writer.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = writer.kill();
    let _ = writer.wait();

    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "seed {seed} (overlay: {overlay}, killed after {delay:?}): qemu-img check exited {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report["corruptions"].as_u64().unwrap_or(0),
        0,
        "seed {seed}: {report}"
    );
    // The flushed pattern is intact.
    let out = Command::new("qemu-io")
        .args(["-r", "-c", "read -P 0x5a 28M 1M"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "seed {seed}: {text}"
    );
    // Our own checker agrees, and repairs the leaks.
    let r = chainvault_qcow::check(&img, &chainvault_qcow::CheckOptions { repair_leaks: true })
        .unwrap();
    assert_eq!(r.corruptions, 0, "seed {seed}: {r:?}");
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "seed {seed}: after repair: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn killed_at_random_moments_never_corrupts() {
    need("qemu-img", "qemu-utils");
    need("qemu-io", "qemu-utils");
    let d = tempfile::tempdir().unwrap();
    let base_seed: u64 = std::env::var("CHAINVAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for i in 0..12 {
        run_round(d.path(), base_seed + i, i % 3 == 2);
    }
}
