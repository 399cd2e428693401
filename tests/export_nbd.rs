//! `chainvault export` against real NBD clients: nbdinfo, nbdcopy, qemu-io,
//! qemu-img, and qemu-nbd as the reference for block status.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn need(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is missing: install the Debian package {package} (scripts/install-test-deps.sh does)");
}

fn ok(mut c: Command) -> Output {
    let out = c.output().expect("spawn");
    assert!(
        out.status.success(),
        "{c:?} exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cmd(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

/// A running `chainvault export` (or qemu-nbd), stopped with SIGTERM on drop.
struct Served {
    child: Child,
    uri: String,
}

impl Served {
    fn chainvault(file: &Path, sock: &Path, extra: &[&str]) -> Served {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chainvault"));
        c.arg("export")
            .arg(file)
            .arg("--socket")
            .arg(sock)
            .args(extra);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn chainvault export");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("Serving"),
            "unexpected first line: {line:?}"
        );
        let uri = line.rsplit(' ').next().unwrap().trim().to_string();
        Served { child, uri }
    }

    fn qemu_nbd(file: &Path, sock: &Path, extra: &[&str]) -> Served {
        let child = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-k"])
            .arg(sock)
            .args(extra)
            .arg(file)
            .spawn()
            .expect("spawn qemu-nbd");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Served {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    fn stop(mut self) -> Option<i32> {
        let pid = self.child.id() as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st.code()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tools() {
    need("qemu-img", "qemu-utils");
    need("qemu-io", "qemu-utils");
    need("qemu-nbd", "qemu-utils");
    need("nbdinfo", "libnbd-bin");
    need("nbdcopy", "libnbd-bin");
}

fn create(path: &Path, size: &str, backing: Option<&str>) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chainvault"));
    c.args(["image", "create"]).arg(path).args(["--size", size]);
    if let Some(b) = backing {
        c.args(["--backing", b]);
    }
    ok(c);
}

fn random_file(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        for ch in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ch.copy_from_slice(&x.to_le_bytes()[..ch.len()]);
        }
        f.write_all(&buf).unwrap();
    }
}

#[test]
fn nbdinfo_sees_what_is_advertised() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    create(&img, "64M", None);
    let s = Served::chainvault(&img, &d.path().join("a.sock"), &["--name", "disk0"]);
    let list = ok(cmd("nbdinfo", &["--list", &s.uri])).stdout;
    assert!(String::from_utf8_lossy(&list).contains("disk0"));
    for (flag, want) in [
        ("flush", true),
        ("fua", true),
        ("trim", true),
        ("zero", true),
        ("fast-zero", true),
        ("df", true),
        ("multi-conn", true),
        ("cache", false),
        ("read-only", false),
    ] {
        let st = Command::new("nbdinfo")
            .args(["--can", flag, &s.uri])
            .status()
            .unwrap();
        // nbdinfo --can exits 0 for yes, 2 for no.
        assert_eq!(st.code(), Some(if want { 0 } else { 2 }), "--can {flag}");
    }
    drop(s);
    let s = Served::chainvault(&img, &d.path().join("b.sock"), &["--read-only"]);
    for (flag, want) in [
        ("read-only", true),
        ("trim", false),
        ("zero", false),
        ("flush", true),
    ] {
        let st = Command::new("nbdinfo")
            .args(["--can", flag, &s.uri])
            .status()
            .unwrap();
        assert_eq!(
            st.code(),
            Some(if want { 0 } else { 2 }),
            "read-only export --can {flag}"
        );
    }
}

#[test]
fn nbdcopy_one_gib_with_one_and_four_connections() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    random_file(&src, 1 << 30);
    for conns in ["1", "4"] {
        let img = d.path().join(format!("c{conns}.qcow2"));
        create(&img, "1G", None);
        let s = Served::chainvault(&img, &d.path().join(format!("c{conns}.sock")), &[]);
        ok(cmd(
            "nbdcopy",
            &["-C", conns, src.to_str().unwrap(), &s.uri],
        ));
        assert_eq!(s.stop(), Some(0));
        ok(cmd(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img.to_str().unwrap(),
                src.to_str().unwrap(),
            ],
        ));
        ok(cmd(
            "qemu-img",
            &["check", "-f", "qcow2", img.to_str().unwrap()],
        ));
    }
}

#[test]
fn qemu_io_patterns_zeroes_and_discard_over_unix_socket() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    create(&base, "64M", None);
    ok(cmd(
        "qemu-io",
        &["-c", "write -P 0x61 0 8M", base.to_str().unwrap()],
    ));
    let top = d.path().join("top.qcow2");
    create(&top, "64M", Some(base.to_str().unwrap()));
    let s = Served::chainvault(&top, &d.path().join("t.sock"), &[]);
    let io = |c: &[&str]| {
        let mut x = Command::new("qemu-io");
        x.args(["-f", "raw"]);
        for a in c {
            x.arg("-c").arg(a);
        }
        x.arg(&s.uri);
        let out = ok(x);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!text.contains("Pattern verification failed"), "{text}");
        text
    };
    io(&[
        "write -P 0x62 1M 100k",
        "read -P 0x62 1M 100k",
        "read -P 0x61 0 1M",
        "read -P 0x61 1124k 100k",
    ]);
    io(&["write -z 2M 1M", "read -P 0 2M 1M"]);
    io(&[
        "write -z 5000k 3k",
        "read -P 0 5000k 3k",
        "read -P 0x61 4996k 4k",
    ]);
    // Discard in an overlay must not expose the backing data.
    io(&["discard 3M 2M", "read -P 0 3M 2M", "read -P 0x61 5M 1M"]);
    io(&["flush"]);
    assert_eq!(s.stop(), Some(0));
    ok(cmd(
        "qemu-img",
        &["check", "-f", "qcow2", top.to_str().unwrap()],
    ));
    // What qemu-img reads from the files agrees.
    ok(cmd(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0 3M 2M",
            "-c",
            "read -P 0x62 1M 100k",
            top.to_str().unwrap(),
        ],
    ));
}

fn three_layer_chain(d: &Path) -> PathBuf {
    let l0 = d.join("l0.qcow2");
    create(&l0, "32M", None);
    ok(cmd(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 4M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 2 12M 64k",
            l0.to_str().unwrap(),
        ],
    ));
    let l1 = d.join("l1.qcow2");
    create(&l1, "32M", Some(l0.to_str().unwrap()));
    ok(cmd(
        "qemu-io",
        &[
            "-c",
            "write -P 3 1M 512k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "discard 12M 64k",
            "-c",
            "write -P 4 20M 1M",
            l1.to_str().unwrap(),
        ],
    ));
    let l2 = d.join("l2.qcow2");
    create(&l2, "32M", Some(l1.to_str().unwrap()));
    ok(cmd(
        "qemu-io",
        &[
            "-c",
            "write -P 5 1536k 64k",
            "-c",
            "write -z 20M 256k",
            "-c",
            "write -P 6 30M 2M",
            "-c",
            "discard 0 64k",
            l2.to_str().unwrap(),
        ],
    ));
    l2
}

/// `nbdinfo --map` lines as merged (start, length, type) runs.
fn map(uri: &str, ctx: Option<&str>) -> Vec<(u64, u64, String)> {
    let mut args = vec![];
    let m;
    match ctx {
        Some(c) => {
            m = format!("--map={c}");
            args.push(m.as_str());
        }
        None => args.push("--map"),
    }
    args.push(uri);
    let out = ok(cmd("nbdinfo", &args)).stdout;
    let mut runs: Vec<(u64, u64, String)> = Vec::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let mut f = line.split_whitespace();
        let (Some(off), Some(len), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (off, len): (u64, u64) = (off.parse().unwrap(), len.parse().unwrap());
        match runs.last_mut() {
            Some(l) if l.2 == ty && l.0 + l.1 == off => l.1 += len,
            _ => runs.push((off, len, ty.to_string())),
        }
    }
    runs
}

#[test]
fn block_status_matches_qemu_nbd() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let top = three_layer_chain(d.path());
    let ours = Served::chainvault(&top, &d.path().join("ours.sock"), &["--read-only"]);
    let theirs = Served::qemu_nbd(
        &top,
        &d.path().join("theirs.sock"),
        &["-r", "-A", "-t", "--shared=8"],
    );
    assert_eq!(
        map(&ours.uri, None),
        map(&theirs.uri, None),
        "base:allocation"
    );
    assert_eq!(
        map(&ours.uri, Some("qemu:allocation-depth")),
        map(&theirs.uri, Some("qemu:allocation-depth")),
        "qemu:allocation-depth"
    );
}

#[test]
fn qemu_img_convert_of_the_read_only_chain_export() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let top = three_layer_chain(d.path());
    let s = Served::chainvault(&top, &d.path().join("ro.sock"), &["--read-only"]);
    let via_nbd = d.path().join("via-nbd.raw");
    let via_file = d.path().join("via-file.raw");
    ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri,
            via_nbd.to_str().unwrap(),
        ],
    ));
    ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            top.to_str().unwrap(),
            via_file.to_str().unwrap(),
        ],
    ));
    assert!(
        std::fs::read(&via_nbd).unwrap() == std::fs::read(&via_file).unwrap(),
        "contents differ"
    );
    // A read-only export refuses writes with an error, and stays up.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &s.uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"),
        "{text}"
    );
    ok(cmd("nbdinfo", &["--size", &s.uri]));
}

#[test]
fn sigterm_flushes_before_exit() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("f.qcow2");
    create(&img, "16M", None);
    let s = Served::chainvault(&img, &d.path().join("f.sock"), &[]);
    // qemu-io without an explicit flush command.
    ok(cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x7e 0 3M", &s.uri],
    ));
    assert_eq!(s.stop(), Some(0));
    ok(cmd(
        "qemu-img",
        &["check", "-f", "qcow2", img.to_str().unwrap()],
    ));
    ok(cmd(
        "qemu-io",
        &["-r", "-c", "read -P 0x7e 0 3M", img.to_str().unwrap()],
    ));
}
