//! Interop, images we write: random sequences of write / write_zeroes /
//! discard through our `Image`, over fulls and overlay chains of 1 to 5
//! layers, mirrored into raw files. Every layer (a point in time) must pass
//! `qemu-img check`, be identical to its raw mirror by `qemu-img compare`,
//! show the expected chain in `qemu-img info --backing-chain`, read back
//! identically through our `Chain`, and have a block status that agrees with
//! `qemu-img map`.
//!
//! Each case is fully determined by its seed (cluster size, extended L2,
//! layer count, virtual size, operations). A failing case prints its seed
//! and operations; replay it alone with
//!   CHAINVAULT_SEED=<seed> cargo nextest run -p chainvault-qcow --test interop_written part_00
//! (with CHAINVAULT_SEED set, part_00 runs only that case and the other
//! parts do nothing). CHAINVAULT_KEEP_TMP=1 keeps the files.

mod common;

use std::fs::{File, OpenOptions as FsOpen};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chainvault_qcow::create::create;
use chainvault_qcow::{
    BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions, Image, Layer,
};
use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

/// Cases per #[test]; PARTS × CASES_PER_PART ≥ 200.
const PARTS: u64 = 8;
const CASES_PER_PART: u64 = 26;

#[derive(Debug, Clone, Copy)]
struct Config {
    cluster_size: u64,
    extended_l2: bool,
    layers: usize,
    size: u64,
}

/// (cluster size, extended L2): 4 KiB clusters cannot have extended L2.
const GEOMETRIES: [(u64, bool); 5] = [
    (4 * KIB, false),
    (64 * KIB, false),
    (64 * KIB, true),
    (2 * MIB, false),
    (2 * MIB, true),
];

fn config_for(seed: u64) -> Config {
    let mut r = rng(seed ^ 0x5eed_c0f1_9000_0001);
    let (cluster_size, extended_l2) = GEOMETRIES[(seed % GEOMETRIES.len() as u64) as usize];
    let layers = r.random_range(1..=5usize);
    let base = match cluster_size {
        c if c <= 4 * KIB => r.random_range(8..=16u64) * MIB,
        c if c <= 64 * KIB => r.random_range(8..=32u64) * MIB,
        _ => 64 * MIB,
    };
    // Sometimes a virtual size that does not end on a cluster boundary.
    let tail = if r.random_bool(0.3) {
        r.random_range(1..cluster_size / 512) * 512
    } else {
        0
    };
    Config {
        cluster_size,
        extended_l2,
        layers,
        size: base + tail,
    }
}

#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Bytes of a SmallRng seeded with this.
    Random(u64),
    /// One byte repeated.
    Byte(u8),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, fill: Fill },
    WriteZeroes { off: u64, len: u64, may_unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Fill {
    fn bytes(&self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        match *self {
            Fill::Random(s) => rng(s).fill_bytes(&mut v),
            Fill::Byte(b) => v.fill(b),
        }
        v
    }
}

/// A random length: tiny and unaligned, sub-cluster, multi-cluster, or
/// whole clusters / sectors.
fn gen_len(r: &mut SmallRng, cs: u64, max_multi: u64) -> u64 {
    match r.random_range(0..6) {
        0 => r.random_range(1..=600),
        1 => r.random_range(1..=cs),
        2 => r.random_range(cs..=max_multi.max(cs + 1)),
        3 => r.random_range(1..=4) * cs,
        4 => r.random_range(1..=(cs / 512).clamp(1, 64)) * 512,
        _ => r.random_range(cs / 2..=cs + cs / 2),
    }
}

/// A random offset: any byte, sector- or cluster-aligned, or just around a
/// cluster boundary (so requests straddle it).
fn gen_off(r: &mut SmallRng, size: u64, cs: u64) -> u64 {
    let clusters = size.div_ceil(cs);
    let c = r.random_range(0..clusters) * cs;
    let off = match r.random_range(0..5) {
        0 => r.random_range(0..size),
        1 => r.random_range(0..size / 512) * 512,
        2 => c,
        3 => c.saturating_sub(r.random_range(1..=1024)),
        _ => c + r.random_range(0..=cs.min(8192)),
    };
    off.min(size - 1)
}

fn gen_range(r: &mut SmallRng, size: u64, cs: u64, max_multi: u64) -> (u64, u64) {
    let off = gen_off(r, size, cs);
    let len = gen_len(r, cs, max_multi).min(size - off).max(1);
    (off, len)
}

fn gen_ops(r: &mut SmallRng, cfg: &Config) -> Vec<Op> {
    let cs = cfg.cluster_size;
    // Random data per write is bounded so big-cluster runs stay quick.
    let max_write = (3 * cs).min(5 * MIB);
    let n = r.random_range(5..=40);
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let op = match r.random_range(0..100) {
            0..=54 => {
                let (off, len) = gen_range(r, cfg.size, cs, max_write);
                let fill = match r.random_range(0..10) {
                    0 => Fill::Byte(0), // data that happens to be zeros
                    1..=2 => Fill::Byte(r.random_range(1..=255)),
                    _ => Fill::Random(r.random()),
                };
                Op::Write { off, len, fill }
            }
            55..=74 => {
                let (off, len) = gen_range(r, cfg.size, cs, 8 * cs);
                Op::WriteZeroes {
                    off,
                    len,
                    may_unmap: r.random_bool(0.5),
                }
            }
            75..=94 => {
                let (off, len) = gen_range(r, cfg.size, cs, 8 * cs);
                Op::Discard { off, len }
            }
            95 => Op::WriteZeroes {
                off: 0,
                len: cfg.size,
                may_unmap: r.random_bool(0.5),
            },
            96 => Op::Discard {
                off: 0,
                len: cfg.size,
            },
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

fn apply(img: &Image, raw: &File, op: &Op) {
    match *op {
        Op::Write { off, len, fill } => {
            let data = fill.bytes(len);
            img.write_at(&data, off)
                .unwrap_or_else(|e| panic!("Image::write_at({off}, {len}): {e}"));
            raw.write_all_at(&data, off).expect("pwrite raw mirror");
        }
        Op::WriteZeroes {
            off,
            len,
            may_unmap,
        } => {
            img.write_zeroes(off, len, may_unmap)
                .unwrap_or_else(|e| panic!("Image::write_zeroes({off}, {len}, {may_unmap}): {e}"));
            pwrite_zeroes(raw, off, len);
        }
        Op::Discard { off, len } => {
            img.discard(off, len)
                .unwrap_or_else(|e| panic!("Image::discard({off}, {len}): {e}"));
            pwrite_zeroes(raw, off, len);
        }
        Op::Flush => img
            .flush()
            .unwrap_or_else(|e| panic!("Image::flush(): {e}")),
    }
}

fn layer_name(k: usize) -> String {
    format!("layer{k}.qcow2")
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

/// `qemu-img info --backing-chain --output=json top` lists exactly
/// layer{k}, layer{k-1}, ..., layer0 with the expected backing names.
fn assert_info_chain(dir: &Path, k: usize, cfg: &Config) {
    let top = dir.join(layer_name(k));
    let out = qemu_img(&[
        "info".as_ref(),
        "--backing-chain".as_ref(),
        "--output=json".as_ref(),
        top.as_os_str(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info output is JSON");
    let arr = v
        .as_array()
        .expect("qemu-img info --backing-chain gives an array");
    assert_eq!(
        arr.len(),
        k + 1,
        "qemu-img info lists {} images, expected {}:\n{out}",
        arr.len(),
        k + 1
    );
    for (i, e) in arr.iter().enumerate() {
        let layer = k - i;
        let want = dir.join(layer_name(layer));
        let ctx = || format!("qemu-img info entry {i} (layer{layer}):\n{e:#}");
        let filename = e["filename"]
            .as_str()
            .unwrap_or_else(|| panic!("no filename; {}", ctx()));
        assert_eq!(canon(Path::new(filename)), canon(&want), "{}", ctx());
        assert_eq!(e["format"], "qcow2", "{}", ctx());
        assert_eq!(e["virtual-size"].as_u64(), Some(cfg.size), "{}", ctx());
        assert_eq!(
            e["cluster-size"].as_u64(),
            Some(cfg.cluster_size),
            "{}",
            ctx()
        );
        assert_eq!(e["dirty-flag"].as_bool(), Some(false), "{}", ctx());
        let data = &e["format-specific"]["data"];
        assert_eq!(data["compat"], "1.1", "{}", ctx());
        assert_eq!(data["corrupt"].as_bool(), Some(false), "{}", ctx());
        assert_eq!(
            data["extended-l2"].as_bool(),
            Some(cfg.extended_l2),
            "{}",
            ctx()
        );
        assert_eq!(data["refcount-bits"].as_u64(), Some(16), "{}", ctx());
        if layer > 0 {
            let below = layer_name(layer - 1);
            assert_eq!(
                e["backing-filename"].as_str(),
                Some(below.as_str()),
                "{}",
                ctx()
            );
            assert_eq!(e["backing-filename-format"], "qcow2", "{}", ctx());
            let full = e["full-backing-filename"]
                .as_str()
                .unwrap_or_else(|| panic!("no full-backing-filename; {}", ctx()));
            assert_eq!(
                canon(Path::new(full)),
                canon(&dir.join(&below)),
                "{}",
                ctx()
            );
        } else {
            assert!(
                e.get("backing-filename").is_none(),
                "bottom layer has a backing file; {}",
                ctx()
            );
        }
    }
}

/// Everything we check of one point in time.
fn verify_layer(dir: &Path, k: usize, cfg: &Config, raw: &Path, r: &mut SmallRng) {
    let img = dir.join(layer_name(k));
    assert_qemu_check_clean(&img);

    let (code, _, report) = qemu_img_status(&[
        "compare".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        raw.as_os_str(),
    ]);
    assert_eq!(
        code, 0,
        "qemu-img compare: layer{k} differs from its raw mirror:\n{report}"
    );

    assert_info_chain(dir, k, cfg);

    let want = read_file(raw);
    let chain = open_chain(&img);
    assert_eq!(chain.size(), cfg.size, "Chain::size of layer{k}");
    assert_eq!(chain.layers().len(), k + 1, "Chain::layers of layer{k}");
    let got = read_chain(&chain, MIB as usize);
    assert_same_bytes(
        &format!("Chain::read_at of layer{k} vs its raw mirror"),
        &got,
        &want,
    );
    // Some unaligned reads of odd sizes too.
    for _ in 0..16 {
        let off = r.random_range(0..cfg.size);
        let len = r.random_range(1..=(cfg.size - off).min(3 * cfg.cluster_size));
        let mut buf = vec![0xa5u8; len as usize];
        chain
            .read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("Chain::read_at({off}, {len}) of layer{k}: {e}"));
        assert_same_bytes(
            &format!("Chain::read_at({off}, {len}) of layer{k}"),
            &buf,
            &want[off as usize..(off + len) as usize],
        );
    }
    assert_block_status_matches_qemu(&img, &chain);
}

fn run_case(seed: u64, log: &mut Vec<String>) {
    let cfg = config_for(seed);
    log.push(format!("{cfg:?}"));
    let tmp = tempdir();
    let dir = tmp.path();
    let mut r = rng(seed);
    // One raw mirror: after layer k's operations it holds layer k's point in
    // time. Lower layers must not change afterwards: their bytes are kept.
    let raw_path = dir.join("mirror.raw");
    File::create(&raw_path)
        .and_then(|f| f.set_len(cfg.size))
        .expect("create raw mirror");
    let raw = FsOpen::new()
        .write(true)
        .open(&raw_path)
        .expect("open raw mirror");
    let mut frozen: Vec<Vec<u8>> = Vec::new();
    for k in 0..cfg.layers {
        let t_layer = std::time::Instant::now();
        let path = dir.join(layer_name(k));
        let backing = (k > 0).then(|| BackingSpec {
            name: layer_name(k - 1),
            format: BackingFormat::Qcow2,
        });
        create(
            &path,
            &CreateOptions {
                size: cfg.size,
                cluster_size: cfg.cluster_size,
                extended_l2: cfg.extended_l2,
                refcount_bits: 16,
                backing,
            },
        )
        .unwrap_or_else(|e| panic!("create layer{k}: {e}"));

        let ops = gen_ops(&mut r, &cfg);
        {
            let chain = Chain::open(
                &path,
                &ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("Chain::open(layer{k}, writable): {e}"));
            let img = match chain.top() {
                Layer::Qcow(img) => img.clone(),
                Layer::Raw(_) => panic!("top of layer{k} opened as raw"),
            };
            assert_eq!(img.size(), cfg.size);
            for (i, op) in ops.iter().enumerate() {
                log.push(format!("layer{k} op{i}: {op:?}"));
                apply(&img, &raw, op);
            }
            img.flush()
                .unwrap_or_else(|e| panic!("Image::flush of layer{k}: {e}"));
        }
        log.push(format!("layer{k}: verify"));
        let t_ops = t_layer.elapsed();
        verify_layer(dir, k, &cfg, &raw_path, &mut r);
        if std::env::var_os("CHAINVAULT_TIMING").is_some() {
            eprintln!(
                "  layer{k}: {} ops in {t_ops:.2?}, verified in {:.2?}",
                ops.len(),
                t_layer.elapsed() - t_ops
            );
        }
        frozen.push(read_file(&path));
    }
    // The layers below must not have changed while the ones above were written.
    for (k, bytes) in frozen.iter().enumerate() {
        if read_file(&dir.join(layer_name(k))) != *bytes {
            panic!("layer{k} changed after it was verified (while the layers above it were written or read)");
        }
    }
}

/// Run cases; collect failures; panic with every failing seed at the end.
fn run_cases(seeds: impl IntoIterator<Item = u64>) {
    let mut failures = Vec::new();
    let mut ran = 0;
    for seed in seeds {
        ran += 1;
        let mut log = Vec::new();
        let t0 = std::time::Instant::now();
        let res = quietly(|| run_case(seed, &mut log));
        eprintln!(
            "case seed={seed}: {:?} in {:.2?}",
            config_for(seed),
            t0.elapsed()
        );
        if let Err(msg) = res {
            eprintln!("\n=== FAILED case seed={seed} (replay: CHAINVAULT_SEED={seed}) ===");
            let shown = if log.len() > 250 {
                &log[log.len() - 250..]
            } else {
                &log[..]
            };
            if log.len() > 250 {
                eprintln!(
                    "({} earlier log lines not shown; replay to see all)",
                    log.len() - 250
                );
            }
            for l in shown {
                eprintln!("  {l}");
            }
            eprintln!("  panic: {msg}");
            failures.push((seed, msg.lines().next().unwrap_or("").to_string()));
            if failures.len() >= 4 {
                eprintln!("stopping this part after {} failures", failures.len());
                break;
            }
        }
    }
    if !failures.is_empty() {
        let mut s = format!("{} of {ran} cases failed:\n", failures.len());
        for (seed, m) in &failures {
            s.push_str(&format!("  CHAINVAULT_SEED={seed}: {m}\n"));
        }
        panic!("{s}");
    }
}

fn part(n: u64) {
    if let Some(seed) = replay_seed() {
        if n == 0 {
            eprintln!("replaying CHAINVAULT_SEED={seed}: {:?}", config_for(seed));
            run_cases([seed]);
        } else {
            eprintln!("CHAINVAULT_SEED is set: part_00 replays it, part_{n:02} does nothing");
        }
        return;
    }
    assert!(n < PARTS);
    run_cases((0..CASES_PER_PART).map(|i| case_seed("interop_written", n * CASES_PER_PART + i)));
}

#[test]
fn part_00() {
    part(0)
}
#[test]
fn part_01() {
    part(1)
}
#[test]
fn part_02() {
    part(2)
}
#[test]
fn part_03() {
    part(3)
}
#[test]
fn part_04() {
    part(4)
}
#[test]
fn part_05() {
    part(5)
}
#[test]
fn part_06() {
    part(6)
}
#[test]
fn part_07() {
    part(7)
}

/// The generator covers what the suite promises: every geometry, every
/// layer count, and all operation kinds (incl. unaligned and multi-cluster).
#[test]
fn generator_covers_the_space() {
    let mut geos = std::collections::HashSet::new();
    let mut layers = std::collections::HashSet::new();
    let (mut unaligned, mut multi, mut sub, mut zu, mut zk, mut disc) = (0, 0, 0, 0, 0, 0);
    for i in 0..PARTS * CASES_PER_PART {
        let seed = case_seed("interop_written", i);
        let cfg = config_for(seed);
        geos.insert((cfg.cluster_size, cfg.extended_l2));
        layers.insert(cfg.layers);
        let mut r = rng(seed);
        for op in gen_ops(&mut r, &cfg) {
            match op {
                Op::Write { off, len, .. } => {
                    assert!(off + len <= cfg.size && len > 0);
                    if off % 512 != 0 || len % 512 != 0 {
                        unaligned += 1;
                    }
                    if len > cfg.cluster_size {
                        multi += 1;
                    }
                    if len < cfg.cluster_size {
                        sub += 1;
                    }
                }
                Op::WriteZeroes {
                    off,
                    len,
                    may_unmap,
                } => {
                    assert!(off + len <= cfg.size && len > 0);
                    if may_unmap {
                        zu += 1
                    } else {
                        zk += 1
                    }
                }
                Op::Discard { off, len } => {
                    assert!(off + len <= cfg.size && len > 0);
                    disc += 1;
                }
                Op::Flush => {}
            }
        }
    }
    assert_eq!(geos.len(), GEOMETRIES.len(), "geometries covered: {geos:?}");
    assert_eq!(layers.len(), 5, "layer counts covered: {layers:?}");
    for (what, n) in [
        ("unaligned writes", unaligned),
        ("multi-cluster writes", multi),
        ("sub-cluster writes", sub),
        ("write_zeroes may_unmap", zu),
        ("write_zeroes keep", zk),
        ("discards", disc),
    ] {
        assert!(n > 100, "too few {what}: {n}");
    }
}
