//! The README's five-minute tour, run verbatim: every ```sh block of the
//! "A five-minute tour" section, in order, as one bash script with `-e`,
//! against `chainvault serve` started with no flags in a scratch directory,
//! exactly as a newcomer would. If the README and the program drift apart,
//! this fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The ```sh blocks of the tour section.
fn tour_script(readme: &str) -> String {
    let start = readme
        .find("## A five-minute tour")
        .expect("README.md has no '## A five-minute tour' section");
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map(|i| i + 3).unwrap_or(rest.len());
    let section = &rest[..end];
    let mut script = String::new();
    let mut in_sh = false;
    for line in section.lines() {
        if in_sh {
            if line.trim_start().starts_with("```") {
                in_sh = false;
                script.push('\n');
            } else {
                script.push_str(line);
                script.push('\n');
            }
        } else if line.trim() == "```sh" {
            in_sh = true;
        }
    }
    assert!(
        script.lines().count() > 10,
        "the tour has almost no ```sh blocks:\n{script}"
    );
    script
}

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
    assert!(
        found,
        "{tool} is missing: apt-get install {package} (scripts/install-test-deps.sh does it)"
    );
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_tour_runs_verbatim() {
    for (tool, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-nbd", "qemu-utils"),
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("mountpoint", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ] {
        need(tool, pkg);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = tour_script(&std::fs::read_to_string(root.join("README.md")).unwrap());
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_chainvault"));
    let path = format!(
        "{}:{}:/usr/sbin:/sbin",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();

    // Terminal 1: `chainvault serve`, no flags: the default ports must be
    // free (nothing else in the suite uses them).
    let mut child = Command::new(&bin)
        .arg("serve")
        .current_dir(dir.path())
        .env("PATH", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let serve = Serve(child);
    let mut first = String::new();
    BufReader::new(out).read_line(&mut first).unwrap();
    assert!(
        first.starts_with("ready api=http://127.0.0.1:8420 "),
        "`chainvault serve` on its defaults did not come up (is port 8420 or 10809 taken?): {first:?}"
    );

    // Terminal 2: the tour.
    let mut tour = Command::new("timeout")
        .args(["-k", "5", "300", "bash", "-euo", "pipefail", "-c"])
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    tour.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    tour.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = tour.wait().unwrap();
    // Whatever happened, leave no mount behind.
    for m in ["restore", "running"] {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(dir.path().join(m))
            .stderr(Stdio::null())
            .status();
    }
    drop(serve);
    let show =
        format!("--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(
        status.success(),
        "the README tour failed ({status}):\n{show}"
    );

    // What the tour promises the reader.
    let backups: Vec<&str> = stdout.lines().filter(|l| l.starts_with("0 ")).collect();
    assert_eq!(backups.len(), 3, "three backup summaries expected:\n{show}");
    assert!(backups[0].contains(" full "), "{show}");
    assert!(backups[1].contains(" incremental "), "{show}");
    assert!(backups[2].contains(" incremental "), "{show}");
    assert!(
        stdout.contains("kept 1, would remove 1") && stdout.contains("kept 1, removed 1"),
        "prune's dry run and real run:\n{show}"
    );
    assert!(
        stdout.contains("keep-last"),
        "the verdict names its option:\n{show}"
    );
    assert!(stdout.contains("no orphans"), "gc --dry-run:\n{show}");
    assert!(
        stdout.contains("verified: every byte read back equals the point")
            && stdout.contains("Images are identical."),
        "the restore and its comparison:\n{show}"
    );
    // The newest point's recorded digest, the restored file's and the
    // source's are one digest.
    let digests: Vec<&str> = stdout
        .split_whitespace()
        .filter(|w| w.starts_with("cvblk2-blake3:") && w.len() == 14 + 64)
        .collect();
    assert!(digests.len() >= 3, "three digests expected:\n{show}");
    let last3 = &digests[digests.len() - 3..];
    assert!(
        last3.iter().all(|d| *d == last3[0]),
        "the point, the restored disk and the source digest differently: {last3:?}\n{show}"
    );
    assert!(
        stdout.contains("point(s) checked, 0 bad"),
        "verify --deep:\n{show}"
    );
    assert!(
        stdout.contains("Q3 figures: 42"),
        "the deleted report was not copied out of the first point:\n{show}"
    );
    assert!(
        stdout.contains("notes.txt"),
        "latest shows the new file:\n{show}"
    );
    assert!(
        stdout.contains("the first point is the original disk"),
        "{show}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("report.txt")).unwrap(),
        "Q3 figures: 42\n"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "a mount was left behind:\n{mounts}"
    );
}
