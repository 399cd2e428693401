//! `chainvault image ...` against qemu-img, on images QEMU writes.
//!
//! For each kind of image: `chainvault image convert -O raw` is byte-identical
//! to `qemu-img convert -O raw`, and `chainvault image map --json` agrees with
//! `qemu-img map --output=json` on what is data, zero and unallocated.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chainvault"))
}

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

fn qemu_img(args: &[&str]) -> Output {
    let mut c = Command::new("qemu-img");
    c.args(args);
    ok(c)
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(img);
    ok(c);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Data,
    Zero,
    Unalloc,
}

/// Per-512-byte-sector classification of a `map --json` output.
fn classes(json: &[u8], size: u64) -> Vec<Class> {
    let v: serde_json::Value = serde_json::from_slice(json).expect("map output is JSON");
    let mut out = vec![Class::Unalloc; (size / 512) as usize];
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let c = if !e["present"].as_bool().unwrap() {
            Class::Unalloc
        } else if e["zero"].as_bool().unwrap() {
            Class::Zero
        } else {
            Class::Data
        };
        for s in start / 512..(start + len) / 512 {
            out[s as usize] = c;
        }
    }
    out
}

fn compare(img: &Path, dir: &Path) {
    let ours = dir.join("ours.raw");
    let theirs = dir.join("theirs.raw");
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let mut c = cv();
    c.args(["image", "convert", "-O", "raw"])
        .arg(img)
        .arg(&ours);
    ok(c);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "{}: raw sizes differ", img.display());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{}: first differing byte at {i:#x}", img.display());
    }
    let size = a.len() as u64;
    let mut c = cv();
    c.args(["image", "map", "--json"]).arg(img);
    let ours = classes(&ok(c).stdout, size);
    let theirs = classes(
        &qemu_img(&["map", "--output=json", img.to_str().unwrap()]).stdout,
        size,
    );
    if let Some(i) = ours.iter().zip(&theirs).position(|(x, y)| x != y) {
        panic!(
            "{}: map differs at sector {i} (offset {:#x}): chainvault {:?}, qemu-img {:?}",
            img.display(),
            i * 512,
            ours[i],
            theirs[i]
        );
    }
}

fn tmp() -> tempfile::TempDir {
    need("qemu-img", "qemu-utils");
    need("qemu-io", "qemu-utils");
    tempfile::tempdir().unwrap()
}

fn p(d: &Path, n: &str) -> PathBuf {
    d.join(n)
}

fn filled(d: &Path, name: &str, opts: &str) -> PathBuf {
    let f = p(d, name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([f.to_str().unwrap(), "8M"]);
    qemu_img(&args);
    qemu_io(
        &f,
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 1000k 5k",
            "write -z 2M 192k",
            "write -P 0x33 3M 1M",
            "write -z -u 3200k 128k",
            "discard 3600k 64k",
            "write -P 0x44 7M 1k",
        ],
    );
    f
}

#[test]
fn compressed_deflate_and_zstd() {
    let d = tmp();
    let src = filled(d.path(), "src.qcow2", "");
    let z = p(d.path(), "zlib.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        z.to_str().unwrap(),
    ]);
    compare(&z, d.path());
    let zs = p(d.path(), "zstd.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        src.to_str().unwrap(),
        zs.to_str().unwrap(),
    ]);
    compare(&zs, d.path());
}

#[test]
fn extended_l2_and_zero_and_discard() {
    let d = tmp();
    for opts in [
        "extended_l2=on",
        "extended_l2=on,cluster_size=128k",
        "cluster_size=4k",
        "cluster_size=2M",
        "",
    ] {
        let f = filled(
            d.path(),
            &format!("x{}.qcow2", opts.replace([',', '='], "_")),
            opts,
        );
        compare(&f, d.path());
    }
}

#[test]
fn refcount_widths() {
    let d = tmp();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let f = filled(
            d.path(),
            &format!("r{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
        );
        compare(&f, d.path());
    }
}

#[test]
fn chains_of_two_to_five_layers() {
    let d = tmp();
    let base = filled(d.path(), "l0.qcow2", "");
    let mut below = base;
    for i in 1..5 {
        let f = p(d.path(), &format!("l{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            below.file_name().unwrap().to_str().unwrap(),
            "-F",
            "qcow2",
            f.to_str().unwrap(),
        ]);
        let off = i * 1024 * 1024 + 4096 * i;
        qemu_io(
            &f,
            &[
                &format!("write -P 0x{:x}0 {off} 70k", i + 5),
                &format!("write -z {} 64k", (i + 2) * 1024 * 1024),
                &format!("discard {} 128k", (7 - i) * 1024 * 1024),
            ],
        );
        compare(&f, d.path());
        below = f;
    }
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let d = tmp();
    let f = filled(d.path(), "c.qcow2", "");
    let code = |c: &mut Command| c.output().unwrap().status.code().unwrap();
    assert_eq!(code(cv().args(["image", "check"]).arg(&f)), 0);
    // Leak a cluster: raise the refcount of the cluster just past the end of the file.
    let h = chainvault_qcow::chain::read_header(&f).unwrap();
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    let mut e = [0u8; 8];
    file.read_exact_at(&mut e, h.refcount_table_offset).unwrap();
    let rb = u64::from_be_bytes(e);
    let len = file.metadata().unwrap().len();
    file.set_len(len + 65536).unwrap();
    let idx = len / 65536;
    file.write_all_at(&1u16.to_be_bytes(), rb + idx * 2)
        .unwrap();
    drop(file);
    let q = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(q.status.code(), Some(3));
    assert_eq!(code(cv().args(["image", "check"]).arg(&f)), 3);
    assert_eq!(code(cv().args(["image", "check", "--repair"]).arg(&f)), 0);
    let q = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(
        q.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&q.stdout)
    );
}

#[test]
fn create_info_and_bad_input() {
    let d = tmp();
    let base = p(d.path(), "base.qcow2");
    let mut c = cv();
    c.args(["image", "create"]).arg(&base).args([
        "--size",
        "64M",
        "--cluster-size",
        "128K",
        "--extended-l2",
    ]);
    ok(c);
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let top = p(d.path(), "sub/top.qcow2");
    let mut c = cv();
    c.args(["image", "create"])
        .arg(&top)
        .arg("--backing")
        .arg(&base);
    ok(c);
    let info = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        top.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v[0]["backing-filename"], "../base.qcow2");
    assert_eq!(v[0]["backing-filename-format"], "qcow2");
    assert_eq!(v[0]["virtual-size"], 64 << 20);
    assert_eq!(v[1]["format-specific"]["data"]["extended-l2"], true);
    assert_eq!(v[1]["cluster-size"], 131072);
    // Our own info follows the chain when allowed to leave sub/.
    let mut c = cv();
    c.args(["image", "info", "--json", "--backing-root"])
        .arg(d.path())
        .arg(&top);
    let ours: serde_json::Value = serde_json::from_slice(&ok(c).stdout).unwrap();
    assert_eq!(ours.as_array().unwrap().len(), 2);
    // ...and refuses by default, naming the file and why.
    let out = cv().args(["image", "info"]).arg(&top).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("top.qcow2") && err.contains("outside the allowed directory"),
        "{err}"
    );
    // Bad sizes and cluster sizes are clear errors, not panics.
    for args in [
        vec!["--size", "12Q"],
        vec!["--size", "1G", "--cluster-size", "3000"],
        vec!["--size", "1G", "--cluster-size", "4K", "--extended-l2"],
    ] {
        let out = cv()
            .args(["image", "create"])
            .arg(p(d.path(), "bad.qcow2"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(if args[1] == "12Q" { 2 } else { 1 }),
            "{args:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("size") || err.contains("extended"),
            "{args:?}: {err}"
        );
    }
    // A file that is not an image at all.
    let junk = p(d.path(), "junk.qcow2");
    std::fs::write(&junk, b"QFI\xfbjunk").unwrap();
    let out = cv().args(["image", "check"]).arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.qcow2"));
}
