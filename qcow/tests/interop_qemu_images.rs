//! Interop, images QEMU writes: images made with qemu-img and qemu-io
//! (compressed with deflate and zstd, extended L2 with partial-cluster
//! writes, write -z with and without -u, discard, chains of 2 to 5 layers,
//! every refcount width, cluster sizes from 512 B to 2 MiB, a raw backing
//! file). For each, our `Chain` must read the whole disk byte-for-byte like
//! `qemu-img convert -O raw`, and our block status, classified into data /
//! zero / unallocated (with the supplying layer and the compressed flag),
//! must agree with `qemu-img map --output=json` byte range by byte range.
//!
//! Every qemu command runs in the scenario's directory with relative names;
//! a failure prints them as a shell script that rebuilds the image.
//! CHAINVAULT_KEEP_TMP=1 keeps the files.

mod common;

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

/// A directory of images built by qemu tools, with the commands that built them.
struct Scenario {
    name: String,
    tmp: tempfile::TempDir,
    script: Vec<String>,
}

impl Scenario {
    fn new(name: impl Into<String>) -> Scenario {
        // Fail early, naming the package, if a tool is missing.
        qemu_img_bin();
        qemu_io_bin();
        Scenario {
            name: name.into(),
            tmp: tempdir(),
            script: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    fn shell_quote(a: &str) -> String {
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,./:".contains(c))
        {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    }

    /// `qemu-img ARGS` in the scenario directory, asserting success.
    fn img(&mut self, args: &[&str]) -> String {
        self.script.push(format!(
            "qemu-img {}",
            args.iter()
                .map(|a| Self::shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let mut cmd = Command::new(qemu_img_bin());
        cmd.current_dir(self.dir()).args(args);
        let out = self.guard(|| run_ok(&mut cmd));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `qemu-io -f qcow2 -c CMD ... IMAGE` in the scenario directory.
    fn io(&mut self, image: &str, cmds: &[String]) {
        if cmds.is_empty() {
            return;
        }
        let mut line = String::from("qemu-io -f qcow2");
        for c in cmds {
            line.push_str(&format!(" -c {}", Self::shell_quote(c)));
        }
        line.push_str(&format!(" {image}"));
        self.script.push(line);
        let p = self.path(image);
        self.guard(|| qemu_io(&p, cmds));
    }

    /// A raw source file, written by us, recorded as a note in the script.
    fn write_raw(&mut self, name: &str, data: &[u8], size: u64) {
        let f = File::create(self.path(name)).expect("create raw source");
        f.write_all_at(data, 0).expect("write raw source");
        f.set_len(size).expect("size raw source");
        self.script.push(format!(
            "# {name}: {size} bytes written by the test (random / text / zero regions)"
        ));
    }

    /// Run `f`; if it panics, print the scenario's script first.
    fn guard<T>(&self, f: impl FnOnce() -> T) -> T {
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => v,
            Err(e) => {
                self.print_script();
                std::panic::resume_unwind(e)
            }
        }
    }

    fn print_script(&self) {
        eprintln!(
            "\n=== scenario {} failed; the images were built with: ===",
            self.name
        );
        eprintln!("cd {}", self.dir().display());
        for l in &self.script {
            eprintln!("{l}");
        }
        eprintln!("=== end of script ===");
    }

    /// Our Chain reads `image` exactly like `qemu-img convert -O raw`, and
    /// our block status agrees with `qemu-img map`.
    fn verify(&mut self, image: &str, r: &mut SmallRng) {
        let top = self.path(image);
        let raw_name = format!("{image}.expected.raw");
        self.img(&["convert", "-f", "qcow2", "-O", "raw", image, &raw_name]);
        let want = read_file(&self.path(&raw_name));
        let off_seed: u64 = r.random();
        self.guard(|| {
            let chain = open_chain(&top);
            assert_eq!(
                chain.size(),
                want.len() as u64,
                "{image}: Chain::size vs qemu-img convert output"
            );
            let got = read_chain(&chain, 1 << 20);
            assert_same_bytes(
                &format!("{image}: Chain::read_at vs qemu-img convert -O raw"),
                &got,
                &want,
            );
            // Unaligned reads of odd sizes.
            let mut r = rng(off_seed);
            let size = want.len() as u64;
            for _ in 0..24 {
                let off = r.random_range(0..size);
                let len = r.random_range(1..=(size - off).min(300_000));
                let mut buf = vec![0x5au8; len as usize];
                chain
                    .read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("{image}: Chain::read_at({off}, {len}): {e}"));
                assert_same_bytes(
                    &format!("{image}: Chain::read_at({off}, {len})"),
                    &buf,
                    &want[off as usize..(off + len) as usize],
                );
            }
            assert_block_status_matches_qemu(&top, &chain);
        });
        let _ = std::fs::remove_file(self.path(&raw_name));
    }
}

/// Disk content with compressible text, random bytes, zero runs and
/// repeated bytes, in regions of random lengths.
fn mixed_content(r: &mut SmallRng, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < v.len() {
        let len = (r.random_range(1..=256u64) * 1024 + r.random_range(0..1024)) as usize;
        let end = (pos + len).min(v.len());
        match r.random_range(0..4) {
            0 => r.fill_bytes(&mut v[pos..end]),
            1 => {
                let text = format!("chainvault block {pos:#x} says hello; ");
                for (i, b) in v[pos..end].iter_mut().enumerate() {
                    *b = text.as_bytes()[i % text.len()];
                }
            }
            2 => {} // zeros
            _ => v[pos..end].fill(r.random_range(1..=255)),
        }
        pos = end;
    }
    v
}

/// A random qemu-io operation inside [0, size): pattern writes (partial,
/// sub-cluster, multi-cluster, unaligned), write -z with and without -u,
/// and discard.
fn random_io_cmd(r: &mut SmallRng, size: u64, cs: u64) -> String {
    let clusters = size.div_ceil(cs);
    let off = match r.random_range(0..4) {
        0 => r.random_range(0..size),
        1 => r.random_range(0..size / 512) * 512,
        2 => r.random_range(0..clusters) * cs,
        _ => (r.random_range(0..clusters) * cs + r.random_range(0..cs.min(65536))).min(size - 1),
    };
    let len = match r.random_range(0..4) {
        0 => r.random_range(1..=4096u64),
        1 => r.random_range(1..=cs),
        2 => r.random_range(cs..=(3 * cs).min(6 << 20)),
        _ => r.random_range(1..=(cs / 512).clamp(1, 32)) * 512,
    };
    let len = len.min(size - off).max(1);
    match r.random_range(0..10) {
        0..=4 => format!("write -P {:#04x} {off} {len}", r.random_range(1..=255u8)),
        5 => format!("write -z {off} {len}"),
        6 => format!("write -z -u {off} {len}"),
        7 => format!("discard {off} {len}"),
        8 => format!("write -P 0 {off} {len}"),
        _ => format!("write -P {:#04x} {off} {len}", r.random_range(1..=255u8)),
    }
}

fn random_io_cmds(r: &mut SmallRng, n: usize, size: u64, cs: u64) -> Vec<String> {
    (0..n).map(|_| random_io_cmd(r, size, cs)).collect()
}

fn size_for(cs: u64) -> u64 {
    if cs >= 2 * MIB {
        32 * MIB
    } else {
        8 * MIB
    }
}

/// `qemu-img convert -c` from mixed content, then an overlay written by
/// qemu-io on top, and qemu-io rewrites inside the compressed image itself.
fn compressed(compression: &str, seed: u64) {
    for (i, cs) in [512, 4 * KIB, 64 * KIB, 2 * MIB].into_iter().enumerate() {
        let mut r = rng(case_seed(compression, seed + i as u64));
        let mut s = Scenario::new(format!("compressed {compression} cluster_size={cs}"));
        let size = size_for(cs) + if cs < 64 * KIB { 3 * 512 } else { 0 };
        let data = mixed_content(&mut r, size);
        s.write_raw("src.raw", &data, size);
        let opts = format!("cluster_size={cs},compression_type={compression}");
        s.img(&[
            "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", "c.qcow2",
        ]);
        // The header must say what we asked for.
        let info = s.img(&["info", "--output=json", "c.qcow2"]);
        let want_ct = if compression == "zlib" {
            "zlib"
        } else {
            "zstd"
        };
        assert!(
            info.contains(&format!("\"compression-type\": \"{want_ct}\"")),
            "{info}"
        );
        s.verify("c.qcow2", &mut r);
        // qemu-img map must show compressed clusters, or the test is not testing them.
        let map = s.img(&["map", "--output=json", "c.qcow2"]);
        assert!(
            map.contains("\"compressed\": true"),
            "no compressed clusters in c.qcow2:\n{map}"
        );

        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "c.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        let cmds = random_io_cmds(&mut r, 12, size, cs);
        s.io("top.qcow2", &cmds);
        s.verify("top.qcow2", &mut r);

        // Partial rewrites of compressed clusters in the compressed image itself.
        let cmds = random_io_cmds(&mut r, 8, size, cs);
        s.io("c.qcow2", &cmds);
        s.verify("c.qcow2", &mut r);
        s.verify("top.qcow2", &mut r);
    }
}

#[test]
fn compressed_deflate() {
    compressed("zlib", 1);
}

#[test]
fn compressed_zstd() {
    compressed("zstd", 2);
}

/// Extended L2: sub-cluster pattern writes, zeroes and discards, on a full
/// and on an extended-L2 overlay over it (unallocated subclusters of the
/// overlay read through to the base).
#[test]
fn extended_l2_partial_writes() {
    for (i, cs) in [16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 2 * MIB]
        .into_iter()
        .enumerate()
    {
        for variant in 0..2u64 {
            let mut r = rng(case_seed("extended_l2", i as u64 * 2 + variant));
            let mut s = Scenario::new(format!("extended_l2 cluster_size={cs} variant={variant}"));
            let size = size_for(cs);
            let sub = cs / 32;
            let opts = format!("extended_l2=on,cluster_size={cs}");
            s.img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "base.qcow2",
                &size.to_string(),
            ]);
            // Sub-cluster-sized and subcluster-straddling writes.
            let mut cmds = Vec::new();
            for _ in 0..20 {
                let c = r.random_range(0..size / cs) * cs;
                let off =
                    c + r.random_range(0..32) * sub + r.random_range(0..2) * r.random_range(0..sub);
                let len = r.random_range(1..=3 * sub);
                let len = len.min(size - off);
                cmds.push(format!(
                    "write -P {:#04x} {off} {len}",
                    r.random_range(1..=255u8)
                ));
            }
            cmds.extend(random_io_cmds(&mut r, 16, size, cs));
            s.io("base.qcow2", &cmds);
            s.verify("base.qcow2", &mut r);

            let top_opts = if variant == 0 {
                opts.clone()
            } else {
                // A standard-L2 overlay with a different cluster size.
                "cluster_size=65536".to_string()
            };
            s.img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &top_opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ]);
            let mut cmds = Vec::new();
            for _ in 0..20 {
                let c = r.random_range(0..size / cs) * cs;
                let off = c + r.random_range(0..32) * sub;
                let len = r.random_range(1..=2 * sub).min(size - off);
                cmds.push(match r.random_range(0..4) {
                    0 => format!("write -z {off} {len}"),
                    1 => format!("discard {off} {len}"),
                    _ => format!("write -P {:#04x} {off} {len}", r.random_range(1..=255u8)),
                });
            }
            s.io("top.qcow2", &cmds);
            s.verify("top.qcow2", &mut r);
        }
    }
}

/// write -z, write -z -u and discard over data, on fulls and on overlays
/// (where zeroes must hide the backing data), with standard L2 tables.
#[test]
fn zeroes_and_discard() {
    for (i, cs) in [4 * KIB, 64 * KIB].into_iter().enumerate() {
        let mut r = rng(case_seed("zeroes_and_discard", i as u64));
        let mut s = Scenario::new(format!("zeroes_and_discard cluster_size={cs}"));
        let size = 8 * MIB;
        let opts = format!("cluster_size={cs}");
        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "base.qcow2",
            &size.to_string(),
        ]);
        s.io("base.qcow2", &["write -P 0x61 0 8M".to_string()]);
        let mut cmds = Vec::new();
        for k in 0..24u64 {
            let off = r.random_range(0..size / cs) * cs
                + if k % 3 == 0 { r.random_range(0..cs) } else { 0 };
            let len = (r.random_range(1..=6) * cs).min(size - off);
            cmds.push(match k % 3 {
                0 => format!("write -z {off} {len}"),
                1 => format!("write -z -u {off} {len}"),
                _ => format!("discard {off} {len}"),
            });
        }
        s.io("base.qcow2", &cmds);
        s.verify("base.qcow2", &mut r);
        let kinds: Vec<Kind> = qemu_map(&s.path("base.qcow2"))
            .iter()
            .map(|x| x.kind)
            .collect();
        assert!(
            kinds.contains(&Kind::Zero) && kinds.contains(&Kind::Data),
            "base.qcow2 map lacks zero or data: {kinds:?}"
        );

        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        let mut cmds = vec!["write -P 0x62 1M 1M".to_string()];
        for k in 0..24u64 {
            let off = r.random_range(0..size / cs) * cs;
            let len = (r.random_range(1..=6) * cs).min(size - off);
            cmds.push(match k % 3 {
                0 => format!("write -z {off} {len}"),
                1 => format!("write -z -u {off} {len}"),
                _ => format!("discard {off} {len}"),
            });
        }
        s.io("top.qcow2", &cmds);
        s.verify("top.qcow2", &mut r);
    }
}

/// Chains of 2 to 5 layers, each layer with its own cluster size and L2
/// kind, sometimes a larger virtual size than the layer below, random
/// writes at each layer. Every intermediate point is verified too.
#[test]
fn chains_2_to_5_layers() {
    for layers in 2..=5usize {
        for variant in 0..2u64 {
            let mut r = rng(case_seed("chains", layers as u64 * 10 + variant));
            let mut s = Scenario::new(format!("chain of {layers} layers, variant {variant}"));
            let mut size = 8 * MIB;
            for k in 0..layers {
                let (cs, ext) = [
                    (4 * KIB, false),
                    (64 * KIB, false),
                    (64 * KIB, true),
                    (512, false),
                    (32 * KIB, true),
                ][r.random_range(0..5)];
                let opts = format!(
                    "cluster_size={cs},extended_l2={}",
                    if ext { "on" } else { "off" }
                );
                let name = format!("layer{k}.qcow2");
                if k == 0 {
                    let data = mixed_content(&mut r, size);
                    s.write_raw("src.raw", &data, size);
                    s.img(&[
                        "convert", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", &name,
                    ]);
                } else {
                    let below = format!("layer{}.qcow2", k - 1);
                    if r.random_bool(0.25) {
                        size += r.random_range(1..=8) * 64 * KIB;
                        let sz = size.to_string();
                        s.img(&[
                            "create", "-f", "qcow2", "-o", &opts, "-b", &below, "-F", "qcow2",
                            &name, &sz,
                        ]);
                    } else {
                        s.img(&[
                            "create", "-f", "qcow2", "-o", &opts, "-b", &below, "-F", "qcow2",
                            &name,
                        ]);
                    }
                }
                let n = r.random_range(8..=24);
                let cmds = random_io_cmds(&mut r, n, size, cs);
                s.io(&name, &cmds);
            }
            for k in 0..layers {
                s.verify(&format!("layer{k}.qcow2"), &mut r);
            }
            let top = s.path(&format!("layer{}.qcow2", layers - 1));
            let map = qemu_map(&top);
            assert!(
                map.iter().any(|x| x.depth.unwrap_or(0) >= 1)
                    && map.iter().any(|x| x.depth == Some(0)),
                "the chain's map does not mix the top and lower layers: {map:?}"
            );
        }
    }
}

/// refcount_bits = 1, 2, 4, ..., 64: plain writes, zeroes and discards, and
/// compressed clusters (which share host clusters, so refcounts above 1).
#[test]
fn refcount_widths() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let mut r = rng(case_seed("refcount_bits", bits as u64));
        let mut s = Scenario::new(format!("refcount_bits={bits}"));
        let size = 8 * MIB;
        let opts = format!("refcount_bits={bits},cluster_size=4096");
        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "plain.qcow2",
            &size.to_string(),
        ]);
        let cmds = random_io_cmds(&mut r, 30, size, 4096);
        s.io("plain.qcow2", &cmds);
        s.verify("plain.qcow2", &mut r);
        let info = s.img(&["info", "--output=json", "plain.qcow2"]);
        assert!(
            info.contains(&format!("\"refcount-bits\": {bits}")),
            "{info}"
        );

        let data = mixed_content(&mut r, size);
        s.write_raw("src.raw", &data, size);
        let opts = format!("refcount_bits={bits}");
        s.img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            "src.raw",
            "comp.qcow2",
        ]);
        s.verify("comp.qcow2", &mut r);
        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "comp.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        let cmds = random_io_cmds(&mut r, 12, size, 65536);
        s.io("top.qcow2", &cmds);
        s.verify("top.qcow2", &mut r);
    }
}

/// Cluster sizes 512 B, 4 KiB, 64 KiB, 2 MiB with standard L2 tables:
/// random operations on a full (with a virtual size that does not end on a
/// cluster boundary where possible), and on an overlay of a different
/// cluster size.
#[test]
fn cluster_sizes() {
    for (i, cs) in [512u64, 4 * KIB, 64 * KIB, 2 * MIB].into_iter().enumerate() {
        let mut r = rng(case_seed("cluster_sizes", i as u64));
        let mut s = Scenario::new(format!("cluster_size={cs}"));
        let size = size_for(cs) + 512 * 7;
        let opts = format!("cluster_size={cs}");
        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "full.qcow2",
            &size.to_string(),
        ]);
        let cmds = random_io_cmds(&mut r, 40, size, cs);
        s.io("full.qcow2", &cmds);
        s.verify("full.qcow2", &mut r);

        let top_cs = [512u64, 4 * KIB, 64 * KIB, 2 * MIB][(i + 1) % 4];
        let top_opts = format!("cluster_size={top_cs}");
        s.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &top_opts,
            "-b",
            "full.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        let cmds = random_io_cmds(&mut r, 24, size, top_cs);
        s.io("top.qcow2", &cmds);
        s.verify("top.qcow2", &mut r);
    }
}

/// A qcow2 overlay over a raw backing file with data and holes (shorter than
/// the overlay): the raw layer's holes read as zeros, and what is past its
/// end is unallocated.
#[test]
fn raw_backing_file() {
    let mut r = rng(case_seed("raw_backing", 0));
    let mut s = Scenario::new("raw backing file");
    let raw_size = 4 * MIB;
    {
        let p = s.path("base.raw");
        let mut f = File::create(&p).expect("create base.raw");
        f.set_len(raw_size).unwrap();
        for k in 0..8u64 {
            let mut buf = vec![0u8; 100_000 + k as usize * 1000];
            r.fill_bytes(&mut buf);
            f.write_all_at(&buf, k * 512 * KIB + 4096).unwrap();
        }
        f.flush().unwrap();
        s.script.push(
            "# base.raw: 4 MiB sparse raw file with 8 random runs, written by the test".into(),
        );
    }
    s.img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
        "6M",
    ]);
    let cmds = random_io_cmds(&mut r, 16, 6 * MIB, 65536);
    s.io("top.qcow2", &cmds);
    s.verify("top.qcow2", &mut r);
}

/// The comparison itself finds differences of kind, depth and compression,
/// and accepts the same map split differently.
#[test]
fn map_comparison_detects_differences() {
    let r = |start, length, kind, depth, compressed| Range {
        start,
        length,
        kind,
        depth,
        compressed,
    };
    let a = vec![
        r(0, 4096, Kind::Data, Some(0), false),
        r(4096, 4096, Kind::Zero, Some(1), false),
        r(8192, 8192, Kind::Unallocated, None, false),
    ];
    // Same map, split differently.
    let b = vec![
        r(0, 1024, Kind::Data, Some(0), false),
        r(1024, 3072, Kind::Data, Some(0), false),
        r(4096, 4096, Kind::Zero, Some(1), false),
        r(8192, 100, Kind::Unallocated, None, false),
        r(8292, 8092, Kind::Unallocated, None, false),
    ];
    compare_maps(&a, &b, 16384).unwrap();
    let mut c = b.clone();
    c[1].kind = Kind::Zero;
    let e = compare_maps(&a, &c, 16384).unwrap_err();
    assert!(
        e.contains("[0x400, 0x1000)") && e.contains("ours Data@depth0"),
        "{e}"
    );
    let mut d = a.clone();
    d[1].depth = Some(0);
    assert!(compare_maps(&a, &d, 16384).is_err());
    let mut f = a.clone();
    f[0].compressed = true;
    assert!(compare_maps(&a, &f, 16384).is_err());
    // Gaps and short maps are errors.
    assert!(compare_maps(&a[..2], &b, 16384).is_err());
    assert!(compare_maps(&a, &b[1..], 16384).is_err());
    // Byte comparison names the first difference.
    let x = vec![0u8; 100];
    let mut y = x.clone();
    y[42] = 1;
    assert!(diff_bytes(&x, &y).unwrap().contains("first at offset 42"));
    assert!(diff_bytes(&x, &x).is_none());
}
