//! Shared helpers of the qcow integration tests: real qemu tools (never
//! mocks), temp dirs, a deterministic PRNG, and comparisons that print a
//! readable diff.
//!
//! A missing tool fails the test (it never skips) with a message naming the
//! Debian package that provides it; `scripts/install-test-deps.sh` installs
//! them all.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chainvault_qcow::{Chain, ChainOptions, Extent, ExtentKind};
use rand::rngs::SmallRng;
use rand::SeedableRng;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Find `name` on PATH (or in the sbin directories a non-root PATH may lack);
/// panic naming the Debian `package` if it is not installed.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if let Ok(md) = std::fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return p;
            }
        }
    }
    panic!(
        "required tool `{name}` was not found: install the Debian package `{package}` \
         (apt-get install -y --no-install-recommends {package}, or run scripts/install-test-deps.sh)"
    );
}

pub fn qemu_img_bin() -> PathBuf {
    require_tool("qemu-img", "qemu-utils")
}

pub fn qemu_io_bin() -> PathBuf {
    require_tool("qemu-io", "qemu-utils")
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Run a command and return its output, whatever its exit status.
pub fn run_raw(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not start `{}`: {e}", describe(cmd)))
}

fn report(cmd: &Command, out: &Output) -> String {
    format!(
        "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command and assert that it exits 0, showing its stderr if not.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run_raw(cmd);
    assert!(out.status.success(), "{}", report(cmd, &out));
    out
}

/// `qemu-img ARGS`, asserting success; returns stdout.
pub fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let mut cmd = Command::new(qemu_img_bin());
    cmd.args(args);
    String::from_utf8_lossy(&run_ok(&mut cmd).stdout).into_owned()
}

/// `qemu-img ARGS`, any exit status; returns (exit code, stdout, the whole report).
pub fn qemu_img_status<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let mut cmd = Command::new(qemu_img_bin());
    cmd.args(args);
    let out = run_raw(&mut cmd);
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (code, stdout, report(&cmd, &out))
}

/// `qemu-io -f qcow2 -c CMD ... IMAGE`, asserting success. qemu-io exits 0
/// even when a command fails, so its output is also searched for failures.
pub fn qemu_io(image: &Path, cmds: &[String]) -> String {
    let mut out_all = String::new();
    // Keep each invocation's argument list short.
    for chunk in cmds.chunks(64) {
        let mut cmd = Command::new(qemu_io_bin());
        cmd.arg("-f").arg("qcow2");
        for c in chunk {
            cmd.arg("-c").arg(c);
        }
        cmd.arg(image);
        let out = run_ok(&mut cmd);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("failed") && !lower.contains("error") && !lower.contains("invalid"),
            "qemu-io reported a failure:\n{}",
            report(&cmd, &out)
        );
        out_all.push_str(&text);
    }
    out_all
}

/// A fresh temp dir (removed on drop; kept when CHAINVAULT_KEEP_TMP is set).
pub fn tempdir() -> tempfile::TempDir {
    let keep = std::env::var_os("CHAINVAULT_KEEP_TMP").is_some();
    let d = tempfile::Builder::new()
        .prefix("chainvault-qcow-test-")
        .disable_cleanup(keep)
        .tempdir()
        .expect("create temp dir");
    if keep {
        eprintln!("keeping temp dir {}", d.path().display());
    }
    d
}

/// Deterministic PRNG.
pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// `CHAINVAULT_SEED` (decimal or 0x-hex), when set: the one case to replay.
pub fn replay_seed() -> Option<u64> {
    let s = std::env::var("CHAINVAULT_SEED").ok()?;
    let s = s.trim();
    let v = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    Some(v.unwrap_or_else(|e| panic!("CHAINVAULT_SEED={s:?} is not a number: {e}")))
}

/// Mix a test name and an index into a case seed (splitmix64 of FNV-1a).
pub fn case_seed(name: &str, index: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let mut z = h ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Read a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Write `len` zero bytes at `off` of a raw file.
pub fn pwrite_zeroes(f: &File, off: u64, len: u64) {
    let zeros = vec![0u8; (len.min(4 * MIB)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)
            .expect("pwrite zeroes to raw mirror");
        done += n as u64;
    }
}

/// Assert two buffers are equal, naming the first differing offset and a
/// hex window around it instead of dumping megabytes.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if let Some(msg) = diff_bytes(got, want) {
        panic!("{what}: {msg}");
    }
}

pub fn diff_bytes(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!(
            "length differs: got {} bytes, want {}",
            got.len(),
            want.len()
        ));
    }
    // Fast path (memcmp): byte-wise iteration is slow in debug builds.
    if got == want {
        return None;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b)?;
    let last = got.len()
        - 1
        - got
            .iter()
            .rev()
            .zip(want.iter().rev())
            .position(|(a, b)| a != b)
            .unwrap();
    let ndiff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let lo = first.saturating_sub(16) & !15;
    let hi = (first + 48).min(got.len());
    let mut s = format!(
        "{ndiff} bytes differ, first at offset {first} (0x{first:x}), last at {last} (0x{last:x})\n"
    );
    let _ = writeln!(
        s,
        "offset      got                                              want"
    );
    let mut o = lo;
    while o < hi {
        let e = (o + 16).min(hi);
        let g: String = got[o..e].iter().map(|b| format!("{b:02x} ")).collect();
        let w: String = want[o..e].iter().map(|b| format!("{b:02x} ")).collect();
        let mark = if got[o..e] != want[o..e] { "*" } else { " " };
        let _ = writeln!(s, "{mark}{o:010x} {g:<48} {w}");
        o = e;
    }
    Some(s)
}

/// Read a whole chain with our reader, in chunks of `chunk` bytes.
pub fn read_chain(chain: &Chain, chunk: usize) -> Vec<u8> {
    let size = chain.size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(chunk);
        chain
            .read_at(&mut out[off as usize..off as usize + n], off)
            .unwrap_or_else(|e| panic!("Chain::read_at({off}, {n}): {e}"));
        off += n as u64;
    }
    out
}

/// Open a chain read-only with default options (root = the top's directory).
pub fn open_chain(top: &Path) -> Chain {
    Chain::open(top, &ChainOptions::default())
        .unwrap_or_else(|e| panic!("Chain::open({}): {e}", top.display()))
}

/// The three kinds a block-status range can have, as both tools see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data,
    Zero,
    Unallocated,
}

/// A classified range: [start, start+length) is `kind`, supplied by layer
/// `depth` (None for unallocated: the tools need not agree on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub length: u64,
    pub kind: Kind,
    pub depth: Option<u32>,
    /// Stored compressed (data ranges only).
    pub compressed: bool,
}

impl Range {
    fn key(&self) -> (Kind, Option<u32>, bool) {
        (self.kind, self.depth, self.compressed)
    }
}

fn fmt_key(k: (Kind, Option<u32>, bool)) -> String {
    let mut s = format!("{:?}", k.0);
    if let Some(d) = k.1 {
        s.push_str(&format!("@depth{d}"));
    }
    if k.2 {
        s.push_str(",compressed");
    }
    s
}

/// Our block status, classified.
pub fn ours_classified(extents: &[Extent]) -> Vec<Range> {
    extents
        .iter()
        .map(|e| {
            let kind = match e.kind {
                ExtentKind::Data => Kind::Data,
                ExtentKind::Zero => Kind::Zero,
                ExtentKind::Unallocated => Kind::Unallocated,
            };
            Range {
                start: e.offset,
                length: e.length,
                kind,
                depth: if kind == Kind::Unallocated {
                    None
                } else {
                    Some(e.depth)
                },
                compressed: kind == Kind::Data && e.compressed,
            }
        })
        .collect()
}

/// `qemu-img map --output=json` of a qcow2 image, classified:
/// present:false → unallocated; present, zero:true → zero; present, data → data.
pub fn qemu_map(image: &Path) -> Vec<Range> {
    let out = qemu_img(&[
        "map".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "--output=json".as_ref(),
        image.as_os_str(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img map output is not JSON ({e}):\n{out}"));
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("qemu-img map output is not an array:\n{out}"));
    arr.iter()
        .map(|m| {
            let g = |k: &str| {
                m.get(k)
                    .unwrap_or_else(|| panic!("qemu-img map entry lacks {k}: {m}"))
            };
            let start = g("start").as_u64().unwrap();
            let length = g("length").as_u64().unwrap();
            let present = g("present").as_bool().unwrap();
            let zero = g("zero").as_bool().unwrap();
            let data = g("data").as_bool().unwrap();
            let depth = g("depth").as_u64().unwrap() as u32;
            let compressed = m
                .get("compressed")
                .and_then(|c| c.as_bool())
                .unwrap_or(false);
            let kind = if !present {
                Kind::Unallocated
            } else if zero {
                Kind::Zero
            } else if data {
                Kind::Data
            } else {
                panic!("qemu-img map entry is present but neither data nor zero: {m}")
            };
            Range {
                start,
                length,
                kind,
                depth: if kind == Kind::Unallocated {
                    None
                } else {
                    Some(depth)
                },
                compressed: kind == Kind::Data && compressed,
            }
        })
        .collect()
}

/// Check that a list of ranges tiles [0, size) without gaps or overlaps.
fn check_tiling(who: &str, r: &[Range], size: u64) -> Result<(), String> {
    let mut pos = 0;
    for x in r {
        if x.start != pos {
            return Err(format!(
                "{who}: range {x:?} starts at {}, expected {pos} (gap or overlap)",
                x.start
            ));
        }
        if x.length == 0 {
            return Err(format!("{who}: empty range {x:?}"));
        }
        pos += x.length;
    }
    if pos != size {
        return Err(format!("{who}: ranges end at {pos}, the disk at {size}"));
    }
    Ok(())
}

/// Merge adjacent ranges with the same kind and depth.
pub fn coalesce(r: &[Range]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for x in r {
        if let Some(l) = out.last_mut() {
            if l.key() == x.key() && l.start + l.length == x.start {
                l.length += x.length;
                continue;
            }
        }
        out.push(*x);
    }
    out
}

/// Compare two classifications byte range by byte range. On mismatch return
/// a readable diff: every differing range with both sides' view.
pub fn compare_maps(ours: &[Range], qemu: &[Range], size: u64) -> Result<(), String> {
    check_tiling("ours", ours, size)?;
    check_tiling("qemu", qemu, size)?;
    let a = coalesce(ours);
    let b = coalesce(qemu);
    let mut diffs = Vec::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while pos < size {
        let x = &a[i];
        let y = &b[j];
        let end = (x.start + x.length).min(y.start + y.length);
        if x.key() != y.key() {
            // extend the previous diff if contiguous and the same pair
            match diffs.last_mut() {
                Some((_, e, px, py)) if *e == pos && (*px, *py) == (x.key(), y.key()) => *e = end,
                _ => diffs.push((pos, end, x.key(), y.key())),
            }
        }
        pos = end;
        if pos == x.start + x.length {
            i += 1;
        }
        if pos == y.start + y.length {
            j += 1;
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let mut s = format!(
        "block status differs from qemu-img map in {} ranges:\n",
        diffs.len()
    );
    for (st, e, x, y) in diffs.iter().take(40) {
        let _ = writeln!(
            s,
            "  [{st:#x}, {e:#x}) len {:>9}: ours {:<28} qemu {}",
            e - st,
            fmt_key(*x),
            fmt_key(*y)
        );
    }
    if diffs.len() > 40 {
        let _ = writeln!(s, "  ... {} more", diffs.len() - 40);
    }
    for (who, list) in [("ours", &a), ("qemu", &b)] {
        let _ = writeln!(s, "{who} (coalesced, {} ranges):", list.len());
        for x in list.iter().take(60) {
            let _ = writeln!(
                s,
                "  [{:#x}, {:#x}) {}",
                x.start,
                x.start + x.length,
                fmt_key(x.key())
            );
        }
        if list.len() > 60 {
            let _ = writeln!(s, "  ...");
        }
    }
    Err(s)
}

/// Our chain's block status over the whole disk, checked against qemu-img map.
pub fn assert_block_status_matches_qemu(top: &Path, chain: &Chain) {
    let size = chain.size();
    // A block-status call may answer for a prefix only: ask again from where it stopped.
    let mut ext = Vec::new();
    let mut pos = 0;
    while pos < size {
        let part = chain.block_status(pos, size - pos).unwrap_or_else(|e| {
            panic!(
                "Chain::block_status({pos}, {}) on {}: {e}",
                size - pos,
                top.display()
            )
        });
        let end = part.last().map(|e| e.offset + e.length).unwrap_or(pos);
        assert!(
            end > pos,
            "Chain::block_status({pos}, {}) on {} made no progress: {part:?}",
            size - pos,
            top.display()
        );
        ext.extend(part);
        pos = end;
    }
    let ours = ours_classified(&ext);
    let qemu = qemu_map(top);
    if let Err(msg) = compare_maps(&ours, &qemu, size) {
        panic!("{}: {msg}", top.display());
    }
}

/// `qemu-img convert -O raw` of an image (following its chain) into `out`.
pub fn qemu_to_raw(image: &Path, out: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    read_file(out)
}

/// `qemu-img check -f qcow2` exits 0, and its JSON report shows no errors,
/// corruptions or leaks.
pub fn assert_qemu_check_clean(image: &Path) {
    qemu_img(&[
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        image.as_os_str(),
    ]);
    let (code, out, report) = qemu_img_status(&[
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "--output=json".as_ref(),
        image.as_os_str(),
    ]);
    assert_eq!(
        code, 0,
        "qemu-img check --output=json is not clean:\n{report}"
    );
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img check output is not JSON ({e}):\n{out}"));
    for k in [
        "check-errors",
        "corruptions",
        "leaks",
        "corruptions-fixed",
        "leaks-fixed",
    ] {
        let n = v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "qemu-img check of {} reports {k} = {n}:\n{out}",
            image.display()
        );
    }
}

/// Hex pattern byte of a number, never 0 (so pattern writes are visible).
pub fn pattern_byte(x: u64) -> u8 {
    ((x % 255) + 1) as u8
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic into `Err(message)` without the panic hook
/// printing it (the caller reports it, once, with its context). Other
/// threads' panics are printed as usual.
pub fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}
