//! Helpers of the transfer client tests (`client_*.rs`): VM disks as qcow2
//! files with data, changes made with qemu-io, dirty bytes measured
//! independently with `qemu-nbd -B` + `nbdinfo --map`, and runs of
//! `chainvault backup --json`.

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Every tool these tests use, failing with the Debian package to install.
pub fn client_tools() {
    tools();
    need("qemu-nbd", "qemu-utils");
}

/// A finished `chainvault backup` run.
pub struct Run {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

impl Run {
    pub fn disk(&self, id: u32) -> Value {
        disk_of(&self.json, id)
    }
    pub fn ok(self, what: &str) -> Run {
        assert_eq!(
            self.code,
            0,
            "{what}: chainvault backup exited {}\n{}\nstderr: {}",
            self.code,
            pretty(&self.json),
            self.stderr
        );
        self
    }
}

pub fn backup_cmd(d: &Daemon, vm: &str, disks: &[String], extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["backup", "--json", "--server", &d.api, "--vm", vm]);
    for s in disks {
        c.arg("--disk").arg(s);
    }
    c.args(extra);
    c
}

fn finish(what: &str, out: Output) -> Run {
    let stdout = text(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: --json output is not JSON ({e}):\n{stdout}\nstderr: {}",
            text(&out.stderr)
        )
    });
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr: text(&out.stderr),
    }
}

/// Run `chainvault backup --json` to the end.
pub fn backup(d: &Daemon, vm: &str, disks: &[String], extra: &[&str]) -> Run {
    let what = format!("backup {vm} {disks:?} {extra:?}");
    finish(&what, run(backup_cmd(d, vm, disks, extra)))
}

/// Start it in the background.
pub fn backup_spawn(d: &Daemon, vm: &str, disks: &[String], extra: &[&str]) -> Child {
    let mut c = backup_cmd(d, vm, disks, extra);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("spawn chainvault backup")
}

pub fn wait_run(child: Child, what: &str, timeout: Duration) -> Run {
    let t0 = Instant::now();
    let mut child = child;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            panic!("{what}: chainvault backup still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(what, child.wait_with_output().unwrap())
}

pub fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// A qcow2 VM disk of `size` bytes holding `data_mib` MiB of random data in
/// scattered 1 MiB runs (the rest never written), built as a raw file and
/// converted, so that qcow2 allocates only the data.
pub fn make_vm_disk(path: &Path, size: u64, data_mib: u64, seed: u64) {
    let raw = path.with_extension("build.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    let mut r = Rng::new(seed);
    let slots = size / MIB;
    let mut used = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; MIB as usize];
    while (used.len() as u64) < data_mib {
        let s = r.below(slots);
        if used.insert(s) {
            r.fill(&mut buf);
            f.write_all_at(&buf, s * MIB).unwrap();
        }
    }
    drop(f);
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p(&raw),
            &p(path),
        ],
    ));
    std::fs::remove_file(&raw).unwrap();
}

/// Scattered changes with qemu-io: `writes` 64 KiB pattern writes and
/// `zeroes` 256 KiB `write -z` ranges at distinct 64 KiB-aligned offsets.
/// Returns the bytes changed by the pattern writes.
pub fn qemu_io_modify(path: &Path, seed: u64, writes: u64, zeroes: u64) -> u64 {
    let size = virtual_size(path);
    let mut r = Rng::new(seed);
    let mut used = std::collections::BTreeSet::new();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    let block = 64 * KIB;
    let mut pick = |n: u64| loop {
        let b = r.below(size / block - n);
        if (b..b + n).all(|x| !used.contains(&x)) {
            used.extend(b..b + n);
            return b * block;
        }
    };
    for i in 0..writes {
        let off = pick(1);
        c.arg("-c")
            .arg(format!("write -P {} {off} {block}", 1 + (seed + i) % 254));
    }
    for _ in 0..zeroes {
        let off = pick(4);
        c.arg("-c").arg(format!("write -z {off} {}", 4 * block));
    }
    c.arg(path);
    let out = run_ok(c);
    let t = text(&out.stdout) + &text(&out.stderr);
    assert!(!t.contains("failed"), "qemu-io: {t}");
    writes * block
}

pub fn virtual_size(path: &Path) -> u64 {
    let out = run_ok(cmd("qemu-img", &["info", "--output=json", &p(path)]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Names of the persistent bitmaps of a qcow2 file.
pub fn bitmaps(path: &Path) -> Vec<String> {
    let out = run_ok(cmd("qemu-img", &["info", "--output=json", &p(path)]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().map(|b| s(&b["name"])).collect())
        .unwrap_or_default()
}

/// `qemu-nbd -r -t -e 4 -B ...` on a unix socket; killed on drop.
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(image: &Path, socket: &Path, bitmaps: &[&str]) -> QemuNbd {
        let _ = std::fs::remove_file(socket);
        let mut c = Command::new("qemu-nbd");
        c.args(["-r", "-t", "-e", "4", "-f", "qcow2", "-x", "", "-k"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for b in bitmaps {
            c.args(["-B", b]);
        }
        c.arg(image);
        let mut child = c.spawn().expect("spawn qemu-nbd");
        let t0 = Instant::now();
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("qemu-nbd for {} exited {st}", image.display());
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "qemu-nbd not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd {
            child,
            socket: socket.to_path_buf(),
        }
    }
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes bitmap `name` of `image` marks dirty, read by `nbdinfo --map`
/// through `qemu-nbd -B` (independent of chainvault).
pub fn dirty_bytes(image: &Path, name: &str) -> u64 {
    let sock = image.with_extension("dirty.sock");
    let nbd = QemuNbd::start(image, &sock, &[name]);
    let out = run_ok(cmd(
        "nbdinfo",
        &[
            &format!("--map=qemu:dirty-bitmap:{name}"),
            "--json",
            &nbd.uri(),
        ],
    ));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 == 1)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// A copy of a qcow2 source at this point in time.
pub fn keep_point(src: &Path, dst: &Path) {
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            &p(src),
            &p(dst),
        ],
    ));
}

/// `qemu-img compare` of a backup image (with its chain) and a qcow2 copy.
pub fn compare_qcow2(what: &str, image: &Path, point: &Path) {
    let out = run(cmd(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            &p(image),
            &p(point),
        ],
    ));
    assert!(
        out.status.success(),
        "{what}: qemu-img compare {} {}: {}{}",
        image.display(),
        point.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Bytes of guest data stored in the top image itself (qemu-img map of the
/// chain, entries at depth 0 that hold data).
pub fn top_layer_data(image: &Path) -> u64 {
    let out = run_ok(cmd("qemu-img", &["map", "--output=json", &p(image)]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Poll until `f` is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
