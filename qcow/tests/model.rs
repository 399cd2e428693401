//! Model tests: random operations on an `Image` and on an in-memory model
//! (a `Vec<u8>`), checking every read against the model.
//!
//! - `model_sequential`: a proptest over fresh images, with and without a
//!   backing file, standard and extended L2, small cluster sizes; ops are
//!   write / write_zeroes / discard / read / flush / reopen.
//! - `concurrent_disjoint`: threads writing disjoint regions (whose borders
//!   may share a cluster) of one image at once.
//! - `concurrent_overlapping`: threads writing anywhere at once, then, after
//!   a barrier, each region has one final writer; verified after the join.
//!
//! After each case the image must equal the model (also after reopening),
//! and `qemu-img check` must be clean. The concurrent tests print the seed
//! of a failing case; CHAINVAULT_SEED=<seed> replays just that one.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use chainvault_qcow::create::create;
use chainvault_qcow::{
    BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions, Image, Layer,
};
use common::*;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

#[derive(Debug, Clone, Copy)]
struct Geo {
    cluster_size: u64,
    extended_l2: bool,
}

const GEOS: [Geo; 5] = [
    Geo {
        cluster_size: 512,
        extended_l2: false,
    },
    Geo {
        cluster_size: 4096,
        extended_l2: false,
    },
    Geo {
        cluster_size: 16384,
        extended_l2: true,
    },
    Geo {
        cluster_size: 32768,
        extended_l2: true,
    },
    Geo {
        cluster_size: 65536,
        extended_l2: false,
    },
];

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Write `len` bytes from a PRNG seeded with `data` (data 0: all zeros).
    Write {
        off: u64,
        len: u64,
        data: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        may_unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    /// Flush, close and reopen the image.
    Reopen,
}

fn data_for(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    if seed != 0 {
        rng(seed).fill_bytes(&mut v);
    }
    v
}

struct Disk {
    /// Keeps the backing layers open.
    chain: Option<Chain>,
    img: Arc<Image>,
}

fn open_top(path: &Path) -> Disk {
    let chain = Chain::open(
        path,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("Chain::open({}, writable): {e}", path.display()));
    let img = match chain.top() {
        Layer::Qcow(i) => i.clone(),
        Layer::Raw(_) => panic!("{} opened as raw", path.display()),
    };
    Disk {
        chain: Some(chain),
        img,
    }
}

impl Disk {
    fn close(mut self) {
        self.img
            .flush()
            .unwrap_or_else(|e| panic!("Image::flush: {e}"));
        self.chain.take();
    }
}

/// Apply one op to the image and the model; check reads.
fn apply(img: &Image, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write { off, len, data } => {
            let d = data_for(data, len);
            img.write_at(&d, off)
                .unwrap_or_else(|e| panic!("{op:?}: {e}"));
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        Op::WriteZeroes {
            off,
            len,
            may_unmap,
        } => {
            img.write_zeroes(off, len, may_unmap)
                .unwrap_or_else(|e| panic!("{op:?}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard { off, len } => {
            img.discard(off, len)
                .unwrap_or_else(|e| panic!("{op:?}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Read { off, len } => {
            let mut buf = vec![0xa5u8; len as usize];
            img.read_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("{op:?}: {e}"));
            assert_same_bytes(
                &format!("{op:?}"),
                &buf,
                &model[off as usize..(off + len) as usize],
            );
        }
        Op::Flush | Op::Reopen => img.flush().unwrap_or_else(|e| panic!("{op:?}: {e}")),
    }
}

fn read_image(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    for (i, chunk) in v.chunks_mut(256 * 1024).enumerate() {
        let off = i as u64 * 256 * 1024;
        img.read_at(chunk, off)
            .unwrap_or_else(|e| panic!("Image::read_at({off}): {e}"));
    }
    v
}

fn create_image(path: &Path, geo: Geo, size: u64, backing: Option<&str>) {
    create(
        path,
        &CreateOptions {
            size,
            cluster_size: geo.cluster_size,
            extended_l2: geo.extended_l2,
            refcount_bits: 16,
            backing: backing.map(|b| BackingSpec {
                name: b.to_string(),
                format: BackingFormat::Qcow2,
            }),
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Final checks of a case: the image equals the model through a fresh open,
/// `qemu-img check` is clean, and `qemu-img compare` agrees with the model.
fn final_checks(dir: &Path, top: &Path, model: &[u8]) {
    let chain = open_chain(top);
    let got = read_chain(&chain, 1 << 20);
    assert_same_bytes("whole image after reopening, vs model", &got, model);
    drop(chain);
    assert_qemu_check_clean(top);
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).expect("write model.raw");
    let (code, _, report) = qemu_img_status(&[
        "compare".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        top.as_os_str(),
        raw.as_os_str(),
    ]);
    assert_eq!(
        code, 0,
        "qemu-img compare: image differs from the model:\n{report}"
    );
}

// ---------------------------------------------------------------- proptest

#[derive(Debug, Clone)]
struct Case {
    geo: Geo,
    size: u64,
    /// Ops applied to a backing file first (None: no backing file).
    base_ops: Option<Vec<Op>>,
    ops: Vec<Op>,
}

fn range_strategy(size: u64, cs: u64) -> impl Strategy<Value = (u64, u64)> {
    let clusters = size.div_ceil(cs);
    let off = prop_oneof![
        0..size,
        (0..size / 512).prop_map(|s| s * 512),
        (0..clusters).prop_map(move |c| c * cs),
        ((0..clusters), (1..=600u64)).prop_map(move |(c, d)| (c * cs).saturating_sub(d)),
    ];
    let len = prop_oneof![
        1..=600u64,
        1..=cs,
        cs..=4 * cs,
        (1..=8u64).prop_map(move |n| n * 512),
        (1..=3u64).prop_map(move |n| n * cs),
    ];
    (off, len).prop_map(move |(o, l)| {
        let o = o.min(size - 1);
        (o, l.min(size - o).max(1))
    })
}

fn op_strategy(size: u64, cs: u64) -> impl Strategy<Value = Op> {
    let r = move || range_strategy(size, cs);
    prop_oneof![
        6 => (r(), prop_oneof![1 => Just(0u64), 6 => 1..u64::MAX]).prop_map(|((off, len), data)| Op::Write { off, len, data }),
        2 => (r(), any::<bool>()).prop_map(|((off, len), may_unmap)| Op::WriteZeroes { off, len, may_unmap }),
        2 => r().prop_map(|(off, len)| Op::Discard { off, len }),
        4 => r().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        0..GEOS.len(),
        1..=16u64,
        prop_oneof![Just(0u64), 1..64u64],
        any::<bool>(),
    )
        .prop_flat_map(|(g, clusters_k, tail_sectors, backing)| {
            let geo = GEOS[g];
            // 16..256 clusters (at most 2 MiB), sometimes with a partial last cluster.
            let size = (clusters_k * 16 * geo.cluster_size).min(2 << 20)
                + (tail_sectors * 512) % geo.cluster_size;
            let cs = geo.cluster_size;
            let base = if backing {
                prop::collection::vec(op_strategy(size, cs), 1..12)
                    .prop_map(Some)
                    .boxed()
            } else {
                Just(None).boxed()
            };
            (
                Just(geo),
                Just(size),
                base,
                prop::collection::vec(op_strategy(size, cs), 1..60),
            )
        })
        .prop_map(|(geo, size, base_ops, ops)| Case {
            geo,
            size,
            base_ops,
            ops,
        })
}

fn run_model_case(c: &Case) {
    let tmp = tempdir();
    let dir = tmp.path();
    let mut model = vec![0u8; c.size as usize];
    let top = dir.join("top.qcow2");
    if let Some(base_ops) = &c.base_ops {
        let base = dir.join("base.qcow2");
        create_image(&base, c.geo, c.size, None);
        let d = open_top(&base);
        for op in base_ops {
            apply(&d.img, &mut model, op);
        }
        d.close();
        create_image(&top, c.geo, c.size, Some("base.qcow2"));
    } else {
        create_image(&top, c.geo, c.size, None);
    }
    let mut d = open_top(&top);
    assert_eq!(d.img.size(), c.size);
    for op in &c.ops {
        apply(&d.img, &mut model, op);
        if let Op::Reopen = op {
            d.close();
            d = open_top(&top);
        }
    }
    let got = read_image(&d.img);
    assert_same_bytes("whole image vs model", &got, &model);
    d.close();
    final_checks(dir, &top, &model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        max_shrink_iters: 256,
        max_shrink_time: 30_000,
        .. ProptestConfig::default()
    })]

    #[test]
    fn model_sequential(c in case_strategy()) {
        // Report the panic through proptest (which prints the minimal case)
        // rather than once per shrinking step.
        if let Err(msg) = quietly(|| run_model_case(&c)) {
            return Err(TestCaseError::fail(msg));
        }
    }
}

// ---------------------------------------------------------------- concurrent

/// A random op confined to [lo, hi).
fn region_op(r: &mut SmallRng, lo: u64, hi: u64, cs: u64, with_reads: bool) -> Op {
    let span = hi - lo;
    let off = lo
        + match r.random_range(0..3) {
            0 => r.random_range(0..span),
            1 => r.random_range(0..span) / 512 * 512,
            _ => (r.random_range(lo..hi) / cs * cs)
                .saturating_sub(lo)
                .min(span - 1),
        };
    let len = match r.random_range(0..3) {
        0 => r.random_range(1..=700),
        1 => r.random_range(1..=cs),
        _ => r.random_range(cs..=3 * cs),
    }
    .min(hi - off)
    .max(1);
    match r.random_range(0..10) {
        0..=4 => Op::Write {
            off,
            len,
            data: r.random_range(1..u64::MAX),
        },
        5 => Op::WriteZeroes {
            off,
            len,
            may_unmap: r.random_bool(0.5),
        },
        6 => Op::Discard { off, len },
        7 if !with_reads => Op::Flush,
        7..=8 => Op::Read { off, len },
        _ => Op::Flush,
    }
}

/// Cut [0, size) into `n` regions; borders are unaligned half of the time,
/// so neighbouring threads share clusters.
fn cut_regions(r: &mut SmallRng, size: u64, n: usize, cs: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = (1..n as u64)
        .map(|i| {
            let c = size * i / n as u64;
            if r.random_bool(0.5) {
                c / cs * cs
            } else {
                c + r.random_range(0..cs.min(4096))
            }
        })
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut regions = Vec::new();
    let mut lo = 0;
    for c in cuts.into_iter().chain([size]) {
        if c > lo {
            regions.push((lo, c));
            lo = c;
        }
    }
    regions
}

struct ConcSetup {
    tmp: tempfile::TempDir,
    top: std::path::PathBuf,
    model: Vec<u8>,
    geo: Geo,
    size: u64,
}

/// A fresh image (half the time an overlay over a written base).
fn conc_setup(seed: u64, r: &mut SmallRng) -> ConcSetup {
    let geo = GEOS[(seed % GEOS.len() as u64) as usize];
    let size = (r.random_range(64..=256u64) * geo.cluster_size).clamp(1 << 20, 4 << 20)
        + 512 * r.random_range(0..2);
    let tmp = tempdir();
    let top = tmp.path().join("top.qcow2");
    let mut model = vec![0u8; size as usize];
    if r.random_bool(0.5) {
        let base = tmp.path().join("base.qcow2");
        create_image(&base, geo, size, None);
        let d = open_top(&base);
        for _ in 0..16 {
            let op = region_op(r, 0, size, geo.cluster_size, true);
            apply(&d.img, &mut model, &op);
        }
        d.close();
        create_image(&top, geo, size, Some("base.qcow2"));
    } else {
        create_image(&top, geo, size, None);
    }
    ConcSetup {
        tmp,
        top,
        model,
        geo,
        size,
    }
}

fn conc_disjoint_case(seed: u64) {
    let mut r = rng(seed);
    let ConcSetup {
        tmp,
        top,
        mut model,
        geo,
        size,
    } = conc_setup(seed, &mut r);
    let cs = geo.cluster_size;
    let nthreads = r.random_range(2..=4usize);
    let regions = cut_regions(&mut r, size, nthreads, cs);
    eprintln!("seed {seed}: {geo:?} size {size} regions {regions:?}");
    let d = open_top(&top);
    let img = &d.img;
    // Each thread gets its region's slice of the model.
    let mut slices: Vec<(u64, u64, Vec<u8>, u64)> = regions
        .iter()
        .map(|&(lo, hi)| (lo, hi, model[lo as usize..hi as usize].to_vec(), r.random()))
        .collect();
    std::thread::scope(|s| {
        for (lo, hi, slice, tseed) in slices.iter_mut() {
            let (lo, hi, tseed) = (*lo, *hi, *tseed);
            s.spawn(move || {
                let mut tr = rng(tseed);
                // Ops address the whole disk; the slice is the model of [lo, hi).
                let mut local = vec![0u8; hi as usize];
                local[lo as usize..].copy_from_slice(slice);
                for i in 0..60 {
                    let op = region_op(&mut tr, lo, hi, cs, true);
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        apply(img, &mut local, &op)
                    }));
                    if let Err(e) = res {
                        eprintln!(
                            "seed {seed}: thread for region [{lo}, {hi}) failed at op {i}: {op:?}"
                        );
                        std::panic::resume_unwind(e);
                    }
                }
                slice.copy_from_slice(&local[lo as usize..]);
            });
        }
    });
    for (lo, hi, slice, _) in &slices {
        model[*lo as usize..*hi as usize].copy_from_slice(slice);
    }
    let got = read_image(img);
    assert_same_bytes(
        &format!("seed {seed}: whole image after the threads joined, vs model"),
        &got,
        &model,
    );
    d.close();
    final_checks(tmp.path(), &top, &model);
}

fn conc_overlapping_case(seed: u64) {
    let mut r = rng(seed);
    let ConcSetup {
        tmp,
        top,
        mut model,
        geo,
        size,
    } = conc_setup(seed, &mut r);
    let cs = geo.cluster_size;
    let nthreads = r.random_range(2..=4usize);
    let regions = cut_regions(&mut r, size, nthreads * 2, cs);
    eprintln!("seed {seed}: {geo:?} size {size} threads {nthreads} regions {regions:?}");
    let d = open_top(&top);
    let img = &d.img;
    let barrier = Barrier::new(nthreads);
    // Region j's final writer is thread j % nthreads; it first covers the
    // whole region (write / zeroes / discard), then works inside it.
    let mut finals: Vec<(usize, u64, u64, Vec<u8>, u64)> = regions
        .iter()
        .enumerate()
        .map(|(j, &(lo, hi))| (j % nthreads, lo, hi, Vec::new(), r.random()))
        .collect();
    let tseeds: Vec<u64> = (0..nthreads).map(|_| r.random()).collect();
    std::thread::scope(|s| {
        let mut per_thread: Vec<Vec<&mut FinalWrite>> = (0..nthreads).map(|_| Vec::new()).collect();
        for f in finals.iter_mut() {
            per_thread[f.0].push(f);
        }
        for (t, mine) in per_thread.into_iter().enumerate() {
            let barrier = &barrier;
            let tseed = tseeds[t];
            s.spawn(move || {
                let mut tr = rng(tseed);
                // Phase 1: anywhere, racing with the other threads; reads only must not fail.
                let mut scratch = vec![0u8; size as usize];
                for _ in 0..40 {
                    let mut op = region_op(&mut tr, 0, size, cs, true);
                    if let Op::Read { off, len } = op {
                        let mut buf = vec![0u8; len as usize];
                        img.read_at(&mut buf, off).unwrap_or_else(|e| panic!("seed {seed}: phase 1 {op:?}: {e}"));
                        op = Op::Flush;
                    }
                    apply(img, &mut scratch, &op);
                }
                barrier.wait();
                // Phase 2: this thread is the only writer of its regions.
                for (_, lo, hi, out, rseed) in mine {
                    let (lo, hi) = (*lo, *hi);
                    let mut rr = rng(*rseed);
                    let mut local = vec![0u8; hi as usize];
                    let cover = match rr.random_range(0..3) {
                        0 => Op::Write {
                            off: lo,
                            len: hi - lo,
                            data: rr.random_range(1..u64::MAX),
                        },
                        1 => Op::WriteZeroes {
                            off: lo,
                            len: hi - lo,
                            may_unmap: rr.random_bool(0.5),
                        },
                        _ => Op::Discard { off: lo, len: hi - lo },
                    };
                    apply(img, &mut local, &cover);
                    for i in 0..20 {
                        let op = region_op(&mut rr, lo, hi, cs, true);
                        let res =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(img, &mut local, &op)));
                        if let Err(e) = res {
                            eprintln!("seed {seed}: final writer of [{lo}, {hi}) failed at op {i}: {op:?} (cover {cover:?})");
                            std::panic::resume_unwind(e);
                        }
                    }
                    *out = local[lo as usize..].to_vec();
                }
            });
        }
    });
    for (_, lo, hi, slice, _) in &finals {
        model[*lo as usize..*hi as usize].copy_from_slice(slice);
    }
    let got = read_image(img);
    assert_same_bytes(
        &format!("seed {seed}: whole image after the barrier and join, vs model"),
        &got,
        &model,
    );
    d.close();
    final_checks(tmp.path(), &top, &model);
}

fn run_seeds(name: &str, n: u64, f: fn(u64)) {
    let seeds: Vec<u64> = match replay_seed() {
        Some(s) => vec![s],
        None => (0..n).map(|i| case_seed(name, i)).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        if let Err(msg) = quietly(|| f(seed)) {
            eprintln!("=== {name}: FAILED seed {seed} (replay: CHAINVAULT_SEED={seed}) ===\n{msg}");
            failed.push(seed);
            if failed.len() >= 3 {
                break;
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: failing seeds {failed:?}; replay one with CHAINVAULT_SEED=<seed> cargo nextest run -p chainvault-qcow --test model {name}"
    );
}

#[test]
fn concurrent_disjoint() {
    run_seeds("concurrent_disjoint", 20, conc_disjoint_case);
}

#[test]
fn concurrent_overlapping() {
    run_seeds("concurrent_overlapping", 20, conc_overlapping_case);
}

/// Requests past the end of the disk are refused with an error and change nothing.
#[test]
fn out_of_range_requests_are_refused() {
    let tmp = tempdir();
    let top = tmp.path().join("top.qcow2");
    let size = 1 << 20;
    create_image(&top, GEOS[1], size, None);
    let d = open_top(&top);
    let mut model = vec![0u8; size as usize];
    apply(
        &d.img,
        &mut model,
        &Op::Write {
            off: size - 4096,
            len: 4096,
            data: 7,
        },
    );
    let mut buf = vec![0u8; 8192];
    assert!(
        d.img.write_at(&buf, size - 4096).is_err(),
        "write past the end was accepted"
    );
    assert!(
        d.img.write_at(&buf[..1], size).is_err(),
        "write at the end was accepted"
    );
    assert!(
        d.img.write_zeroes(size - 512, 1024, false).is_err(),
        "write_zeroes past the end was accepted"
    );
    assert!(
        d.img.discard(size, 512).is_err(),
        "discard past the end was accepted"
    );
    assert!(
        d.img.read_at(&mut buf, size - 4096).is_err(),
        "read past the end was accepted"
    );
    assert!(
        d.img.read_at(&mut buf[..1], u64::MAX).is_err(),
        "read at u64::MAX was accepted"
    );
    assert!(
        d.img.write_at(&buf[..1], u64::MAX).is_err(),
        "write at u64::MAX was accepted"
    );
    let got = read_image(&d.img);
    assert_same_bytes("image after refused requests", &got, &model);
    d.close();
    final_checks(tmp.path(), &top, &model);
}

/// A region's final write: (thread, start, end, data, seed).
type FinalWrite = (usize, u64, u64, Vec<u8>, u64);
