//! Fault injection (issue 14, part 6): `kill -9` of the daemon at random
//! moments, in four phases, many trials, one seed.
//!
//! * **ingest**: a backup (incremental, sometimes a new full) is written
//!   through the daemon's NBD backup export by chainvault's own NBD client,
//!   in process, with writes, FUA writes, write-zeroes and flushes several at
//!   a time; the daemon is killed after a random number of replies. Every
//!   write whose data a FLUSH or FUA reply covered must read back from the
//!   half-written overlay (read with its backing chain by `qemu-img convert`)
//!   before the daemon restarts; a write never acknowledged reads, sector by
//!   sector, as before or as after it; nothing outside the writes changes.
//! * **completion**: `POST complete` races the kill. An acknowledged
//!   completion must be `completed` after the restart; an unanswered one is
//!   either completed with its change_id and intact, or `interrupted` with no
//!   change_id, never half of each.
//! * **restore**: a read-only restore export is being read (our NBD client
//!   comparing every block, or `nbdcopy`); the reader must get correct data
//!   or errors, never hang.
//! * **mount**: `chainvault mount --server` reads a point's `disk.raw`; after
//!   the kill its reads fail (or return correct cached data), never hang, and
//!   `fusermount3 -u` still ends it cleanly.
//!
//! After every kill, before the restart: `qemu-img check` of every image
//! (leaks allowed, no corruption). After the restart: the interrupted backup
//! is `interrupted` with no change_id and its image is gone, every completed
//! point compares equal to the source at that point and carries its
//! change_id (API and sidecar), the chain head and `changeid` are the newest
//! point's, and the next backup succeeds and is intact.
//!
//! Trials come in groups of 8 (two of each phase, shuffled), one repository
//! and one VM per group. `CHAINVAULT_SEED` reproduces a run's choices (the
//! kill lands by reply counts and short delays, so timing still varies),
//! `CHAINVAULT_FAULT_TRIALS` sets the count (default 48). A trial that fails
//! is recorded with its seed, its group is abandoned, and the test goes on;
//! the last line is `N trials, K lost` and the test fails unless K is 0.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chainvault_nbd::client::ZeroRequest;
use chainvault_nbd::Client;
use tokio::runtime::Runtime;

const SIZE: u64 = 16 * MIB;
/// Writes are planned in 64 KiB blocks (half a 128 KiB cluster: overlays
/// copy-on-write and use subclusters), each written at most once per backup.
const BLOCK: u64 = 64 * KIB;
const PAGE: u64 = 4 * KIB;
const SECTOR: usize = 512;
/// Reads of restores and mounts.
const CHUNK: u64 = 256 * KIB;
const GROUP: usize = 8;
const DEFAULT_TRIALS: usize = 48;
/// No NBD request, read or reader may take longer than this after a kill.
const HANG: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Seeds

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn trial_seed(master: u64, i: usize) -> u64 {
    mix(master ^ mix(i as u64 + 1))
}

fn group_seed(master: u64, g: usize) -> u64 {
    mix(master ^ mix(0xABCD_0000 + g as u64))
}

fn shuffle<T>(r: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, r.below(i as u64 + 1) as usize);
    }
}

// ---------------------------------------------------------------------------
// Write plans: what a backup writes, and what it must read as afterwards

enum Kind {
    Data(Vec<u8>),
    Zero,
    Flush,
}

struct Op {
    off: u64,
    len: u64,
    kind: Kind,
    fua: bool,
}

struct Plan {
    ops: Vec<Op>,
    /// The disk after every op: the source at the new point.
    new: Vec<u8>,
}

impl Plan {
    fn bytes(&self) -> u64 {
        self.ops
            .iter()
            .filter(|o| !matches!(o.kind, Kind::Flush))
            .map(|o| o.len)
            .sum()
    }
}

/// About `n` writes on `base` at distinct 64 KiB blocks: some inside one
/// block (4 KiB aligned), some over up to 4 blocks; random data, one-byte
/// patterns or write-zeroes; a quarter with FUA; flushes in between.
fn plan(r: &mut Rng, base: &[u8], n: usize, final_flush: bool) -> Plan {
    let nblocks = SIZE / BLOCK;
    let mut used = BTreeSet::new();
    let mut new = base.to_vec();
    let mut ops = Vec::new();
    let mut writes = 0;
    let mut tries = 0;
    while writes < n && tries < n * 20 {
        tries += 1;
        if !ops.is_empty() && r.below(8) == 0 {
            ops.push(Op {
                off: 0,
                len: 0,
                kind: Kind::Flush,
                fua: false,
            });
            continue;
        }
        let (off, len) = if r.below(3) == 0 {
            let b = r.below(nblocks);
            if !used.insert(b) {
                continue;
            }
            let pages = BLOCK / PAGE;
            let s = r.below(pages);
            let l = 1 + r.below(pages - s);
            (b * BLOCK + s * PAGE, l * PAGE)
        } else {
            let nb = 1 + r.below(4);
            let b = r.below(nblocks - nb + 1);
            if (b..b + nb).any(|x| used.contains(&x)) {
                continue;
            }
            used.extend(b..b + nb);
            (b * BLOCK, nb * BLOCK)
        };
        let range = off as usize..(off + len) as usize;
        let kind = match r.below(6) {
            0 => {
                new[range].fill(0);
                Kind::Zero
            }
            1 | 2 => {
                let v = vec![1 + r.below(255) as u8; len as usize];
                new[range].copy_from_slice(&v);
                Kind::Data(v)
            }
            _ => {
                let mut v = vec![0u8; len as usize];
                r.fill(&mut v);
                new[range].copy_from_slice(&v);
                Kind::Data(v)
            }
        };
        ops.push(Op {
            off,
            len,
            kind,
            fua: r.below(4) == 0,
        });
        writes += 1;
    }
    if final_flush {
        ops.push(Op {
            off: 0,
            len: 0,
            kind: Kind::Flush,
            fua: false,
        });
    }
    Plan { ops, new }
}

/// Requests that failed, by when: before the kill (real failures), after it
/// (expected), or never answered.
#[derive(Default)]
struct Failures {
    /// Errors while no kill had been sent: real failures.
    early: Vec<String>,
    /// Errors once the kill was sent: expected.
    late: usize,
    /// No reply within [`HANG`].
    hung: Vec<String>,
}

impl Failures {
    /// Count a failure of `what` as early or late.
    fn failed(&mut self, kill: &KillFlags, what: String) {
        if kill.sent.load(Ordering::SeqCst) {
            self.late += 1;
        } else {
            self.early.push(what);
        }
    }

    fn none(&self) -> bool {
        self.early.is_empty() && self.late == 0 && self.hung.is_empty()
    }
}

/// What the writer knows: which requests it sent, which got a reply, which
/// are durable by that reply (FUA) or by a later flush's.
#[derive(Default)]
struct WriteLog {
    sent: Vec<bool>,
    acked: Vec<bool>,
    durable: Vec<bool>,
    errors: Failures,
}

impl WriteLog {
    fn count(v: &[bool]) -> usize {
        v.iter().filter(|x| **x).count()
    }
}

/// Set by the killer: the SIGKILL was sent / the daemon is dead (a zombie).
#[derive(Default)]
struct KillFlags {
    sent: AtomicBool,
    dead: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The log out of its shared cell (taken out if a task still holds it).
fn take_log<T: Default>(log: Arc<Mutex<T>>) -> T {
    match Arc::try_unwrap(log) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(a) => std::mem::take(&mut *lock(&a)),
    }
}

/// Write `plan` through the NBD export at `uri`, `qd` requests in flight.
/// Never panics (a killer thread may be waiting on `progress`): everything
/// goes into the log. `progress` counts replies.
async fn write_plan(
    uri: String,
    plan: Arc<Plan>,
    qd: usize,
    disconnect: bool,
    progress: Arc<AtomicUsize>,
    kill: Arc<KillFlags>,
) -> WriteLog {
    let n = plan.ops.len();
    let log = Arc::new(Mutex::new(WriteLog {
        sent: vec![false; n],
        acked: vec![false; n],
        durable: vec![false; n],
        ..WriteLog::default()
    }));
    let failed = |log: &Mutex<WriteLog>, what: String| lock(log).errors.failed(&kill, what);
    let c = match tokio::time::timeout(HANG, Client::connect(&uri)).await {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => {
            failed(&log, format!("connect {uri}: {e}"));
            return take_log(log);
        }
        Err(_) => {
            lock(&log).errors.hung.push(format!("connect {uri}"));
            return take_log(log);
        }
    };
    let info = c.info();
    if !(info.can_flush() && info.can_fua() && info.can_zero()) || info.is_read_only() {
        lock(&log).errors.early.push(format!(
            "the backup export must be writable with FLUSH, FUA and WRITE_ZEROES: {info:?}"
        ));
        return take_log(log);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(qd));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        {
            if !lock(&log).errors.none() {
                break;
            }
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        // A flush covers the writes answered before it is sent.
        let covers: Vec<usize> = {
            let mut l = lock(&log);
            l.sent[i] = true;
            if matches!(plan.ops[i].kind, Kind::Flush) {
                (0..n).filter(|&j| l.acked[j] && !l.durable[j]).collect()
            } else {
                Vec::new()
            }
        };
        let (c, plan, log, progress, kill) = (
            c.clone(),
            plan.clone(),
            log.clone(),
            progress.clone(),
            kill.clone(),
        );
        tasks.spawn(async move {
            let op = &plan.ops[i];
            let what = match &op.kind {
                Kind::Data(_) => format!("write {}+{} fua={}", op.off, op.len, op.fua),
                Kind::Zero => format!("write-zeroes {}+{} fua={}", op.off, op.len, op.fua),
                Kind::Flush => "flush".to_string(),
            };
            let req = async {
                match &op.kind {
                    Kind::Data(v) => c.write(op.off, v, op.fua).await,
                    Kind::Zero => {
                        let z = ZeroRequest {
                            fua: op.fua,
                            ..ZeroRequest::default()
                        };
                        c.write_zeroes(op.off, op.len, z).await
                    }
                    Kind::Flush => c.flush().await,
                }
            };
            match tokio::time::timeout(HANG, req).await {
                Ok(Ok(())) => {
                    let mut l = lock(&log);
                    l.acked[i] = true;
                    if op.fua || matches!(op.kind, Kind::Flush) {
                        l.durable[i] = true;
                    }
                    for j in covers {
                        l.durable[j] = true;
                    }
                    drop(l);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(e)) => lock(&log).errors.failed(&kill, format!("{what}: {e}")),
                Err(_) => lock(&log)
                    .errors
                    .hung
                    .push(format!("{what}: no reply within {HANG:?}")),
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    if let Ok(c) = Arc::try_unwrap(c) {
        let clean = lock(&log).errors.none();
        if disconnect && clean {
            match tokio::time::timeout(HANG, c.disconnect()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed(&log, format!("disconnect: {e}")),
                Err(_) => lock(&log).errors.hung.push("disconnect".into()),
            }
        }
    }
    take_log(log)
}

/// `got` (the image as read after a kill) against the plan: durable writes
/// read as written; others, sector by sector, as before or as after; all
/// the rest as `base`. Returns the number of durable writes checked.
fn check_content(got: &[u8], base: &[u8], plan: &Plan, log: &WriteLog) -> Result<usize, String> {
    if got.len() != base.len() {
        return Err(format!(
            "the image reads as {} bytes, want {}",
            got.len(),
            base.len()
        ));
    }
    let mut covered = vec![false; (SIZE / PAGE) as usize];
    let mut durable = 0;
    for (i, op) in plan.ops.iter().enumerate() {
        if matches!(op.kind, Kind::Flush) {
            continue;
        }
        let (a, b) = (op.off as usize, (op.off + op.len) as usize);
        covered[a / PAGE as usize..b / PAGE as usize].fill(true);
        let (g, old, new) = (&got[a..b], &base[a..b], &plan.new[a..b]);
        let how = if log.durable[i] {
            "acknowledged by FLUSH/FUA"
        } else if log.acked[i] {
            "answered but not flushed"
        } else if log.sent[i] {
            "sent, not answered"
        } else {
            "never sent"
        };
        if log.durable[i] {
            durable += 1;
            if let Some(x) = (0..g.len()).find(|&x| g[x] != new[x]) {
                return Err(format!(
                    "LOST: write {i} ({} bytes at {}, {how}) reads differently at byte {}: {:#04x}, written {:#04x} (before it: {:#04x})",
                    op.len, op.off, a + x, g[x], new[x], old[x]
                ));
            }
        } else if log.sent[i] {
            for s in (0..g.len()).step_by(SECTOR) {
                let r = s..s + SECTOR;
                if g[r.clone()] != old[r.clone()] && g[r.clone()] != new[r.clone()] {
                    return Err(format!(
                        "write {i} ({} bytes at {}, {how}): the sector at {} is neither what was there nor what was written",
                        op.len,
                        op.off,
                        a + s
                    ));
                }
            }
        } else if g != old {
            return Err(format!(
                "write {i} ({} bytes at {}) was never sent, yet that range changed",
                op.len, op.off
            ));
        }
    }
    for (p, c) in covered.iter().enumerate() {
        let r = p * PAGE as usize..(p + 1) * PAGE as usize;
        if !c && got[r.clone()] != base[r.clone()] {
            let x = r.start
                + (0..PAGE as usize)
                    .find(|&x| got[r.start + x] != base[r.start + x])
                    .unwrap_or(0);
            return Err(format!(
                "byte {x}, which no write touched, reads {:#04x}, want {:#04x}",
                got[x], base[x]
            ));
        }
    }
    Ok(durable)
}

// ---------------------------------------------------------------------------
// The killer

struct KillInfo {
    /// `progress` when the signal was sent.
    at: usize,
    /// The operation had ended before the kill.
    after_done: bool,
}

/// A thread that sends SIGKILL to `pid` once `progress` reaches `k` (or the
/// operation is `done`) plus `jitter`, then waits until the process is a
/// zombie. The caller reaps it (Daemon::kill9) only after joining this
/// thread, so the pid cannot have been reused.
fn spawn_killer(
    pid: i32,
    progress: Arc<AtomicUsize>,
    k: usize,
    done: Arc<AtomicBool>,
    jitter: Duration,
    flags: Arc<KillFlags>,
) -> std::thread::JoinHandle<KillInfo> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut after_done = false;
        while progress.load(Ordering::SeqCst) < k && t0.elapsed() < Duration::from_secs(60) {
            if done.load(Ordering::SeqCst) {
                after_done = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(jitter);
        after_done |= done.load(Ordering::SeqCst);
        let at = progress.load(Ordering::SeqCst);
        flags.sent.store(true, Ordering::SeqCst);
        // SAFETY: signalling the daemon we started; it is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t1 = Instant::now();
        while !is_zombie(pid) && t1.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_micros(200));
        }
        flags.dead.store(true, Ordering::SeqCst);
        KillInfo { at, after_done }
    })
}

fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------
// Checks

/// `qemu-img check` of one image: no corruption (leaks are allowed: the
/// documented cost of a crash). Returns the leaked clusters.
fn qcheck(what: &str, img: &Path) -> u64 {
    let out = run(cmd(
        "qemu-img",
        &[
            "check",
            "-U",
            "-f",
            "qcow2",
            "--output=json",
            img.to_str().unwrap(),
        ],
    ));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && corruptions == 0 && errors == 0,
        "{what}: qemu-img check {} exited {:?} (corruptions {corruptions}, check errors {errors}):\n{}{}",
        img.display(),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    v["leaks"].as_u64().unwrap_or(0)
}

fn images_under(data: &Path) -> BTreeSet<PathBuf> {
    walk(data)
        .into_iter()
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "qcow2"))
        .collect()
}

/// Every image in the repository passes `qemu-img check`. Returns leaks.
fn check_all_images(what: &str, data: &Path) -> u64 {
    images_under(data).iter().map(|p| qcheck(what, p)).sum()
}

/// The image read through its backing chain, as raw bytes.
fn read_image(img: &Path, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    ));
    let v = std::fs::read(scratch).unwrap();
    let _ = std::fs::remove_file(scratch);
    v
}

struct Point {
    id: String,
    cid: String,
    /// The source disk at this point.
    snap: PathBuf,
    image: PathBuf,
    /// Its backing chain, top first.
    chain: Vec<PathBuf>,
}

struct Group {
    n: usize,
    dir: PathBuf,
    data: PathBuf,
    vm: String,
    d: Option<Daemon>,
    points: Vec<Point>,
    /// The content of the newest point.
    head: Vec<u8>,
    seq: u32,
    /// How long a completion takes here (the completion phase aims its
    /// kills at that window).
    complete_time: Duration,
    leaks: u64,
}

impl Group {
    fn d(&self) -> &Daemon {
        self.d.as_ref().expect("the daemon is running")
    }

    fn next_cid(&mut self) -> String {
        self.seq += 1;
        vmware_cid(0, self.n as u32, self.seq)
    }

    fn snap_path(&self) -> PathBuf {
        self.dir.join(format!("point-{}.raw", self.seq))
    }

    /// A fresh repository with one full backup (nbdcopy, the way a client
    /// writes one).
    fn start(dir: PathBuf, n: usize, seed: u64) -> Group {
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let d = Daemon::start(&data);
        let mut g = Group {
            n,
            dir,
            data,
            vm: format!("fk{n}"),
            d: Some(d),
            points: Vec::new(),
            head: Vec::new(),
            seq: 0,
            complete_time: Duration::from_millis(40),
            leaks: 0,
        };
        let cid = g.next_cid();
        let snap = g.snap_path();
        make_disk(&snap, SIZE, seed);
        let d = g.d();
        let r = d.start_backup(&start_body(
            &g.vm,
            "full",
            Some(json!([disk_spec(0, SIZE)])),
        ));
        let id = s(&r["backup_id"]);
        nbdcopy(&snap, &s(&disk_of(&r, 0)["nbd_uri"]));
        d.complete(&id, 0, &cid, SIZE);
        let image = d.image_of(&id, 0);
        compare("the group's first full", &image, &snap);
        g.head = std::fs::read(&snap).unwrap();
        g.points.push(Point {
            id,
            cid,
            snap,
            chain: vec![image.clone()],
            image,
        });
        g
    }

    fn restart(&mut self) {
        assert!(self.d.is_none(), "restart with a daemon still running");
        self.d = Some(Daemon::start(&self.data));
    }

    /// Every completed point intact with its change_id; head and changeid
    /// are the newest point's; nothing running; no image but the points'.
    fn verify(&mut self, what: &str) {
        let d = self.d();
        let running = d.list("status=running");
        assert!(running.is_empty(), "{what}: running backups: {running:?}");
        let head = self.points.last().unwrap();
        let a = d.changeid(&self.vm, 0);
        assert_eq!(
            a["change_id"],
            head.cid.as_str(),
            "{what}: changeid: {}",
            pretty(&a)
        );
        assert_eq!(
            a["backup_id"],
            head.id.as_str(),
            "{what}: changeid: {}",
            pretty(&a)
        );
        let ch = d.chain(&self.vm, 0);
        assert_eq!(
            ch["head"]["head_backup_id"],
            head.id.as_str(),
            "{what}: chain head: {}",
            pretty(&ch["head"])
        );
        let mut leaks = 0;
        for p in &self.points {
            let v = d.backup(&p.id);
            let x = disk_of(&v, 0);
            assert!(
                v["status"] == "completed" && x["status"] == "completed",
                "{what}: point {} is no longer completed: {}",
                p.id,
                pretty(&v)
            );
            assert_eq!(
                x["change_id"],
                p.cid.as_str(),
                "{what}: change_id of point {}: {}",
                p.id,
                pretty(&v)
            );
            let img = abs_image(&d.data, x["image"].as_str().unwrap_or(""));
            assert_eq!(img, p.image, "{what}: image of point {}", p.id);
            compare(&format!("{what}: point {}", p.id), &p.image, &p.snap);
            leaks += qcheck(&format!("{what}: point {}", p.id), &p.image);
            assert_sidecar(
                &format!("{what}: point {}", p.id),
                &p.image,
                &[&p.id, &p.cid],
            );
        }
        let chain: Vec<&Path> = head.chain.iter().map(PathBuf::as_path).collect();
        assert_chain(&format!("{what}: head"), &head.image, &chain);
        let want: BTreeSet<PathBuf> = self.points.iter().map(|p| p.image.clone()).collect();
        let got = images_under(&self.data);
        assert_eq!(
            got, want,
            "{what}: the repository's images (left) are not exactly the completed points' (right)"
        );
        self.leaks += leaks;
        // The daemon's own verify: no problems, no orphaned files.
        verify_server(self.d());
    }

    /// The next backup: an incremental from the head, written by our
    /// client, completed, intact. Measures the completion.
    fn next_backup(&mut self, r: &mut Rng, rt: &Runtime, what: &str) {
        let cid = self.next_cid();
        let snap = self.snap_path();
        let head = self.points.last().unwrap();
        let d = self.d();
        let resp = d.start_backup(&start_body(&self.vm, "incremental", None));
        let id = s(&resp["backup_id"]);
        let x = disk_of(&resp, 0);
        assert_eq!(x["mode"], "incremental", "{what}: {}", pretty(&resp));
        assert_eq!(
            x["parent_backup_id"],
            head.id.as_str(),
            "{what}: {}",
            pretty(&resp)
        );
        assert_eq!(
            x["previous_change_id"],
            head.cid.as_str(),
            "{what}: {}",
            pretty(&resp)
        );
        let n = 8 + r.below(24) as usize;
        let p = Arc::new(plan(r, &self.head, n, true));
        let log = rt.block_on(write_plan(
            s(&x["nbd_uri"]),
            p.clone(),
            1 + r.below(6) as usize,
            true,
            Arc::new(AtomicUsize::new(0)),
            Arc::new(KillFlags::default()),
        ));
        assert!(
            log.errors.none(),
            "{what}: writing the next backup: errors {:?}, hung {:?}",
            log.errors.early,
            log.errors.hung
        );
        std::fs::write(&snap, &p.new).unwrap();
        let t0 = Instant::now();
        d.complete(&id, 0, &cid, p.bytes());
        let dt = t0.elapsed();
        let image = d.image_of(&id, 0);
        compare(&format!("{what}: next backup {id}"), &image, &snap);
        let mut chain = vec![image.clone()];
        chain.extend(head.chain.iter().cloned());
        self.complete_time = (self.complete_time + dt) / 2;
        self.head = p.new.clone();
        self.points.push(Point {
            id,
            cid,
            snap,
            image,
            chain,
        });
    }

    /// The end of a group: verify through the daemon and offline.
    fn finish(mut self) {
        let d = self.d.take().unwrap();
        verify_server(&d);
        d.stop();
        verify_offline(&self.data);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// The phases

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Ingest,
    Completion,
    Restore,
    Mount,
}

#[derive(Default)]
struct Stats {
    per_phase: [usize; 4],
    durable_checked: usize,
    completion_acked: usize,
    completion_survived: usize,
    completion_interrupted: usize,
    read_errors_after_kill: usize,
}

/// Kill during ingest: the write log against the half-written image.
fn ingest(g: &mut Group, r: &mut Rng, rt: &Runtime, st: &mut Stats) -> String {
    let full = r.below(4) == 0;
    let d = g.d();
    let resp = d.start_backup(&start_body(
        &g.vm,
        if full { "full" } else { "incremental" },
        None,
    ));
    let id = s(&resp["backup_id"]);
    let x = disk_of(&resp, 0);
    assert_eq!(
        x["mode"],
        if full { "full" } else { "incremental" },
        "{}",
        pretty(&resp)
    );
    let uri = s(&x["nbd_uri"]);
    let img = d.image_of(&id, 0);
    let base = if full {
        vec![0u8; SIZE as usize]
    } else {
        g.head.clone()
    };
    let n = 16 + r.below(100) as usize;
    let final_flush = r.below(4) != 0;
    let p = Arc::new(plan(r, &base, n, final_flush));
    let total = p.ops.len();
    let k = r.below(total as u64 + 1) as usize;
    let jitter = Duration::from_micros(r.below(2500));
    let qd = 1 + r.below(8) as usize;
    let disconnect = r.below(2) == 0;

    let progress = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let flags = Arc::new(KillFlags::default());
    let killer = spawn_killer(
        d.pid(),
        progress.clone(),
        k,
        done.clone(),
        jitter,
        flags.clone(),
    );
    let log = rt.block_on(write_plan(uri, p.clone(), qd, disconnect, progress, flags));
    done.store(true, Ordering::SeqCst);
    let ki = killer.join().expect("killer thread");
    g.d.take().unwrap().kill9();

    assert!(
        log.errors.hung.is_empty(),
        "NBD requests hung after the kill: {:?}",
        log.errors.hung
    );
    assert!(
        log.errors.early.is_empty(),
        "NBD requests failed before any kill: {:?}",
        log.errors.early
    );
    g.leaks += check_all_images("after the kill (ingest)", &g.data);
    let durable = WriteLog::count(&log.durable);
    if img.exists() {
        let got = read_image(&img, &g.dir.join("scratch.raw"));
        let checked = check_content(&got, &base, &p, &log)
            .unwrap_or_else(|e| panic!("the half-written image {}: {e}", img.display()));
        st.durable_checked += checked;
    } else {
        assert_eq!(
            durable,
            0,
            "the half-written image {} is gone before the restart, with {durable} writes acknowledged by FLUSH/FUA",
            img.display()
        );
    }
    g.restart();
    assert_interrupted(g.d(), &id, "kill -9 during ingest");
    g.verify("after the restart (ingest)");
    format!(
        "{} qd {qd}: {total} requests, killed at {}{} replies: {} sent, {} answered, {durable} durable, {} errors after the kill",
        if full { "full" } else { "incremental" },
        ki.at,
        if ki.after_done { " (after the writer ended)" } else { "" },
        WriteLog::count(&log.sent),
        WriteLog::count(&log.acked),
        log.errors.late,
    )
}

/// Kill racing `POST complete`.
fn completion(g: &mut Group, r: &mut Rng, rt: &Runtime, st: &mut Stats) -> String {
    let full = r.below(5) == 0;
    let cid = g.next_cid();
    let snap = g.snap_path();
    let d = g.d();
    let resp = d.start_backup(&start_body(
        &g.vm,
        if full { "full" } else { "incremental" },
        None,
    ));
    let id = s(&resp["backup_id"]);
    let x = disk_of(&resp, 0);
    let img = d.image_of(&id, 0);
    let base = if full {
        vec![0u8; SIZE as usize]
    } else {
        g.head.clone()
    };
    let flushed = r.below(2) == 0;
    let n = 8 + r.below(40) as usize;
    let p = Arc::new(plan(r, &base, n, flushed));
    let log = rt.block_on(write_plan(
        s(&x["nbd_uri"]),
        p.clone(),
        1 + r.below(6) as usize,
        true,
        Arc::new(AtomicUsize::new(0)),
        Arc::new(KillFlags::default()),
    ));
    assert!(
        log.errors.none(),
        "writing before the completion: errors {:?}, hung {:?}",
        log.errors.early,
        log.errors.hung
    );
    std::fs::write(&snap, &p.new).unwrap();

    // Aim at the completion's own window, and a little past it.
    let window = g.complete_time.as_micros() as u64 * 13 / 10 + 1000;
    let delay = Duration::from_micros(r.below(window));
    let flags = Arc::new(KillFlags::default());
    let killer = spawn_killer(
        d.pid(),
        Arc::new(AtomicUsize::new(0)),
        0,
        Arc::new(AtomicBool::new(false)),
        delay,
        flags,
    );
    let body = json!({"change_id": cid, "disk_id": 0, "bytes_transferred": p.bytes()});
    let t0 = Instant::now();
    let res = d.try_post(&format!("/api/v1/backups/{id}/complete"), &body);
    let took = t0.elapsed();
    killer.join().expect("killer thread");
    g.d.take().unwrap().kill9();
    let acked = match &res {
        Ok((200, v)) => {
            assert_eq!(
                v["change_id"],
                cid.as_str(),
                "completion answer: {}",
                pretty(v)
            );
            true
        }
        Ok((code, v)) => panic!("the completion was answered HTTP {code}: {}", pretty(v)),
        Err(_) => false,
    };

    g.leaks += check_all_images("after the kill (completion)", &g.data);
    assert!(
        img.exists(),
        "the image {} of a backup being completed is gone before the restart",
        img.display()
    );
    let got = read_image(&img, &g.dir.join("scratch.raw"));
    let mut all = WriteLog {
        durable: log.durable.clone(),
        acked: log.acked.clone(),
        sent: log.sent.clone(),
        ..WriteLog::default()
    };
    if acked {
        all.durable.iter_mut().for_each(|x| *x = true);
    }
    let checked = check_content(&got, &base, &p, &all)
        .unwrap_or_else(|e| panic!("the image {} after a kill during completion (flushed {flushed}, completion answered {acked}): {e}", img.display()));
    st.durable_checked += checked;

    g.restart();
    let d = g.d();
    let v = d.backup(&id);
    let outcome = match v["status"].as_str() {
        Some("completed") => {
            let x = disk_of(&v, 0);
            assert_eq!(x["status"], "completed", "{}", pretty(&v));
            assert_eq!(
                x["change_id"],
                cid.as_str(),
                "a completed disk carries its change_id: {}",
                pretty(&v)
            );
            let mut chain = vec![img.clone()];
            if !full {
                chain.extend(g.points.last().unwrap().chain.iter().cloned());
            }
            g.head = std::fs::read(&snap).unwrap();
            g.points.push(Point {
                id: id.clone(),
                cid: cid.clone(),
                snap,
                image: img,
                chain,
            });
            st.completion_survived += 1;
            "completed"
        }
        Some("interrupted") => {
            assert!(
                !acked,
                "LOST: the completion of {id} was answered 200 with change_id {cid}, but after the restart the backup is interrupted"
            );
            assert_interrupted(d, &id, "kill -9 during completion");
            st.completion_interrupted += 1;
            "interrupted"
        }
        _ => panic!(
            "after a kill during completion the backup must be completed or interrupted: {}",
            pretty(&v)
        ),
    };
    st.completion_acked += acked as usize;
    g.verify("after the restart (completion)");
    format!(
        "{}{} write(s), kill {delay:?} into a completion of ~{:?} (request took {took:?}, answered: {acked}) -> {outcome}",
        if full { "full, " } else { "" },
        p.ops.len(),
        g.complete_time,
    )
}

/// What the readers of a restore export or of a mount saw.
#[derive(Default)]
struct ReadLog {
    ok: usize,
    wrong: Vec<String>,
    errors: Failures,
    /// Reads started once the daemon was dead (through the mount: of
    /// chunks never read before).
    after_death: usize,
}

impl ReadLog {
    /// A read of the chunk at `off` that returned `data`.
    fn read(&mut self, data: &[u8], want: &[u8], off: u64) {
        if data[..] != want[off as usize..(off + CHUNK) as usize] {
            self.wrong.push(format!("{CHUNK} bytes at {off}"));
        }
        self.ok += 1;
    }

    /// Enough reads failed after the kill: stop reading.
    fn enough(&self) -> bool {
        self.errors.late > 4 || !self.errors.early.is_empty() || !self.errors.hung.is_empty()
    }
}

/// Read the chunks in `order` of the restore export at `uri`, `qd` at a
/// time, comparing each with `want`. Never panics.
async fn read_export(
    uri: String,
    want: Arc<Vec<u8>>,
    order: Vec<u64>,
    qd: usize,
    progress: Arc<AtomicUsize>,
    kill: Arc<KillFlags>,
) -> ReadLog {
    let log = Arc::new(Mutex::new(ReadLog::default()));
    let c = match tokio::time::timeout(HANG, Client::connect(&uri)).await {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => {
            lock(&log)
                .errors
                .failed(&kill, format!("connect {uri}: {e}"));
            return take_log(log);
        }
        Err(_) => {
            lock(&log).errors.hung.push(format!("connect {uri}"));
            return take_log(log);
        }
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(qd));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in order {
        // A few more reads after the first failure, then stop.
        if lock(&log).enough() {
            break;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (c, want, log, progress, kill) = (
            c.clone(),
            want.clone(),
            log.clone(),
            progress.clone(),
            kill.clone(),
        );
        tasks.spawn(async move {
            let off = chunk * CHUNK;
            if kill.dead.load(Ordering::SeqCst) {
                lock(&log).after_death += 1;
            }
            match tokio::time::timeout(HANG, c.read(off, CHUNK)).await {
                Ok(Ok(data)) => {
                    lock(&log).read(&data, &want, off);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(e)) => lock(&log)
                    .errors
                    .failed(&kill, format!("read at {off}: {e}")),
                Err(_) => lock(&log)
                    .errors
                    .hung
                    .push(format!("read at {off}: no reply within {HANG:?}")),
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    drop(c);
    take_log(log)
}

fn random_order(r: &mut Rng) -> Vec<u64> {
    let mut v: Vec<u64> = (0..SIZE / CHUNK).collect();
    if r.below(2) == 0 {
        shuffle(r, &mut v);
    }
    v
}

/// After the restart, a fresh restore of a random point reads back whole.
fn restore_reads_back(g: &Group, r: &mut Rng, what: &str) {
    let p = &g.points[r.below(g.points.len() as u64) as usize];
    let d = g.d();
    let v = d.post_ok(
        "/api/v1/restores",
        &json!({"backup_id": p.id, "disk_id": 0}),
    );
    let out = g.dir.join("restored.raw");
    let _ = std::fs::remove_file(&out);
    nbdcopy_to(&s(&v["nbd_uri"]), &out);
    assert_cmp(&format!("{what}: restore of {}", p.id), &out, &p.snap);
    let _ = std::fs::remove_file(&out);
    d.expect(
        "close the restore",
        d.delete(&format!("/api/v1/restores/{}", s(&v["restore_id"]))),
        200,
    );
}

fn nbdcopy_to(uri: &str, out: &Path) {
    run_ok(cmd("nbdcopy", &[uri, out.to_str().unwrap()]));
}

/// Kill while a restore export is being read.
fn restore(g: &mut Group, r: &mut Rng, rt: &Runtime, st: &mut Stats) -> String {
    let pi = r.below(g.points.len() as u64) as usize;
    let (pid, want, uri) = {
        let p = &g.points[pi];
        let d = g.d();
        let v = d.post_ok(
            "/api/v1/restores",
            &json!({"backup_id": p.id, "disk_id": 0}),
        );
        assert_eq!(v["size"], SIZE, "{}", pretty(&v));
        (
            d.pid(),
            Arc::new(std::fs::read(&p.snap).unwrap()),
            s(&v["nbd_uri"]),
        )
    };
    let flags = Arc::new(KillFlags::default());
    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let note = if r.below(3) == 0 {
        // nbdcopy, killed after a random delay.
        let out = g.dir.join("partial.raw");
        let _ = std::fs::remove_file(&out);
        let delay = Duration::from_micros(r.below(150_000));
        let mut child = Command::new("nbdcopy")
            .args([uri.as_str(), out.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdcopy");
        let t0 = Instant::now();
        let killer = spawn_killer(pid, progress, 0, done, delay, flags);
        killer.join().expect("killer thread");
        g.d.take().unwrap().kill9();
        let status = wait_timeout(&mut child, HANG);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let status = status.unwrap_or_else(|| {
            panic!(
                "nbdcopy reading a restore export still runs {HANG:?} after the daemon was killed"
            )
        });
        if status.success() {
            assert_cmp(
                "nbdcopy that finished before the kill",
                &out,
                &g.points[pi].snap,
            );
        }
        let _ = std::fs::remove_file(&out);
        format!(
            "nbdcopy of point {pi}, kill at {delay:?}: nbdcopy {} after {:?}",
            describe_exit(&status),
            t0.elapsed()
        )
    } else {
        let order = random_order(r);
        let k = r.below(order.len() as u64) as usize;
        let qd = 1 + r.below(4) as usize;
        let jitter = Duration::from_micros(r.below(2000));
        let killer = spawn_killer(
            pid,
            progress.clone(),
            k,
            done.clone(),
            jitter,
            flags.clone(),
        );
        let log = rt.block_on(read_export(uri, want, order, qd, progress, flags));
        done.store(true, Ordering::SeqCst);
        let ki = killer.join().expect("killer thread");
        g.d.take().unwrap().kill9();
        assert!(
            log.errors.hung.is_empty(),
            "restore reads hung after the kill: {:?}",
            log.errors.hung
        );
        assert!(
            log.errors.early.is_empty(),
            "restore reads failed before the kill: {:?}",
            log.errors.early
        );
        assert!(
            log.wrong.is_empty(),
            "restore reads returned wrong data: {:?}",
            log.wrong
        );
        assert!(
            log.after_death == 0 || log.errors.late > 0,
            "{} reads were sent after the daemon died, and none failed",
            log.after_death
        );
        st.read_errors_after_kill += log.errors.late;
        format!(
            "NBD reads of point {pi}, qd {qd}, killed at {} chunks{}: {} read and compared, {} failed after the kill",
            ki.at,
            if ki.after_done { " (after the reader ended)" } else { "" },
            log.ok,
            log.errors.late
        )
    };
    g.leaks += check_all_images("after the kill (restore)", &g.data);
    g.restart();
    g.verify("after the restart (restore)");
    restore_reads_back(g, r, "after the restart (restore)");
    note
}

/// Read `file` in chunks in `order`, comparing with `want`; the reader of
/// the mount phase (a thread: a read may block in the kernel).
fn read_file(
    file: PathBuf,
    want: Arc<Vec<u8>>,
    order: Vec<u64>,
    progress: Arc<AtomicUsize>,
    kill: Arc<KillFlags>,
) -> ReadLog {
    let mut m = ReadLog::default();
    let f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) => {
            m.errors.early.push(format!("open {}: {e}", file.display()));
            return m;
        }
    };
    let mut buf = vec![0u8; CHUNK as usize];
    for chunk in order {
        if m.enough() {
            break;
        }
        let off = chunk * CHUNK;
        if kill.dead.load(Ordering::SeqCst) {
            m.after_death += 1;
        }
        match f.read_exact_at(&mut buf, off) {
            Ok(()) => {
                m.read(&buf, &want, off);
                progress.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => m.errors.failed(&kill, format!("read at {off}: {e}")),
        }
    }
    m
}

/// Kill while `chainvault mount --server` reads a point's disk.raw.
fn mount(g: &mut Group, r: &mut Rng, _rt: &Runtime, st: &mut Stats) -> String {
    let mnt = g.dir.join("mnt");
    let pi = r.below(g.points.len() as u64) as usize;
    let (pid, m) = {
        let d = g.d();
        let m = Mount::start(
            &mnt,
            &["--server", &d.api, "--vm", &g.vm, "--idle-close", "600"],
        );
        (d.pid(), m)
    };
    let listed: Vec<String> = names(&m.path(&format!("{}/disk0", g.vm)))
        .into_iter()
        .filter(|n| n != "latest")
        .collect();
    assert_eq!(
        listed.len(),
        g.points.len(),
        "the mount lists {listed:?} for {} completed points",
        g.points.len()
    );
    let p = &g.points[pi];
    let pdir = m.path(&format!("by-id/{}/disk0", p.id));
    let info: Value =
        serde_json::from_slice(&std::fs::read(pdir.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["backup_id"], p.id.as_str(), "{}", pretty(&info));
    assert_eq!(info["change_id"], p.cid.as_str(), "{}", pretty(&info));

    let want = Arc::new(std::fs::read(&p.snap).unwrap());
    let order = random_order(r);
    let k = r.below(order.len() as u64) as usize;
    let jitter = Duration::from_micros(r.below(2000));
    let flags = Arc::new(KillFlags::default());
    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let (file, want, progress, flags, done) = (
            pdir.join("disk.raw"),
            want.clone(),
            progress.clone(),
            flags.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let res = read_file(file, want, order, progress, flags);
            done.store(true, Ordering::SeqCst);
            let _ = tx.send(res);
        })
    };
    let killer = spawn_killer(pid, progress, k, done, jitter, flags);
    let ki = killer.join().expect("killer thread");
    g.d.take().unwrap().kill9();
    let res = match rx.recv_timeout(HANG) {
        Ok(res) => res,
        Err(_) => {
            // Killing the mount aborts the FUSE connection: the reader wakes.
            drop(m);
            let _ = reader.join();
            panic!("a reader of the mount still hangs {HANG:?} after the daemon was killed");
        }
    };
    let _ = reader.join();
    assert!(
        res.errors.early.is_empty(),
        "mount reads failed before the kill: {:?}",
        res.errors.early
    );
    assert!(
        res.wrong.is_empty(),
        "mount reads returned wrong data: {:?}",
        res.wrong
    );
    assert!(
        res.after_death < 8 || res.errors.late > 0,
        "{} reads of uncached chunks were started through the mount after the daemon died, and none failed",
        res.after_death
    );
    st.read_errors_after_kill += res.errors.late;
    // With the daemon gone, unmounting from outside still ends it cleanly.
    m.fusermount_u();

    g.leaks += check_all_images("after the kill (mount)", &g.data);
    g.restart();
    g.verify("after the restart (mount)");
    // A new mount reads the newest point whole.
    let d = g.d();
    let m = Mount::start(&mnt, &["--server", &d.api, "--vm", &g.vm]);
    let head = g.points.last().unwrap();
    let latest = m.path(&format!("{}/disk0/latest", g.vm));
    let info: Value =
        serde_json::from_slice(&std::fs::read(latest.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["change_id"], head.cid.as_str(), "{}", pretty(&info));
    assert_cmp(
        "latest through a new mount",
        &latest.join("disk.raw"),
        &head.snap,
    );
    m.fusermount_u();
    format!(
        "disk.raw of point {pi}, killed at {} chunks{}: {} read and compared, {} failed after the kill ({} started after it)",
        ki.at,
        if ki.after_done { " (after the reader ended)" } else { "" },
        res.ok,
        res.errors.late,
        res.after_death
    )
}

// ---------------------------------------------------------------------------

fn end_group(g: Group, master: u64, lost: &mut Vec<String>, leaks: &mut u64) {
    let n = g.n;
    *leaks += g.leaks;
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| g.finish())) {
        lost.push(format!(
            "group {n} (seed {:#018x}), at its end: {}",
            group_seed(master, n),
            panic_text(&*p)
        ));
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(a panic without a message)".into()
    }
}

#[test]
fn kill9_at_random_moments_loses_nothing() {
    tools();
    need("fusermount3", "fuse3");
    let master = env_u64("CHAINVAULT_SEED").unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        mix(t.as_nanos() as u64 ^ std::process::id() as u64)
    });
    let trials = env_u64("CHAINVAULT_FAULT_TRIALS").unwrap_or(DEFAULT_TRIALS as u64) as usize;
    assert!(trials > 0, "CHAINVAULT_FAULT_TRIALS must be at least 1");
    println!(
        "fault_kill: seed {master:#018x}, {trials} trials (reproduce with CHAINVAULT_SEED={master:#018x} CHAINVAULT_FAULT_TRIALS={trials})"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t_start = Instant::now();
    let mut st = Stats::default();
    let mut lost: Vec<String> = Vec::new();
    let mut group: Option<Group> = None;
    let mut schedule: Vec<Phase> = Vec::new();
    let mut leaks = 0u64;

    for i in 0..trials {
        let gi = i / GROUP;
        if i % GROUP == 0 {
            if let Some(g) = group.take() {
                end_group(g, master, &mut lost, &mut leaks);
            }
            let mut gr = Rng::new(group_seed(master, gi));
            schedule = [
                Phase::Ingest,
                Phase::Completion,
                Phase::Restore,
                Phase::Mount,
            ]
            .iter()
            .flat_map(|p| [*p, *p])
            .collect();
            shuffle(&mut gr, &mut schedule);
        }
        let phase = schedule[i % GROUP];
        let seed = trial_seed(master, i);
        let t0 = Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| {
            let g = match &mut group {
                Some(g) => g,
                None => group.insert(Group::start(
                    tmp.path().join(format!("g{gi}-t{i}")),
                    gi,
                    group_seed(master, gi),
                )),
            };
            let mut r = Rng::new(seed);
            let note = match phase {
                Phase::Ingest => ingest(g, &mut r, &rt, &mut st),
                Phase::Completion => completion(g, &mut r, &rt, &mut st),
                Phase::Restore => restore(g, &mut r, &rt, &mut st),
                Phase::Mount => mount(g, &mut r, &rt, &mut st),
            };
            g.next_backup(&mut r, &rt, "the next backup");
            g.verify("after the next backup");
            note
        }));
        match res {
            Ok(note) => {
                st.per_phase[phase as usize] += 1;
                println!(
                    "trial {i} ({phase:?}, seed {seed:#018x}, group {gi}): {note}; ok in {:.1?}",
                    t0.elapsed()
                );
            }
            Err(p) => {
                let msg = panic_text(&*p);
                println!("trial {i} ({phase:?}, seed {seed:#018x}, group {gi}): FAILED: {msg}");
                lost.push(format!(
                    "trial {i} ({phase:?}, seed {seed:#018x}, group {gi}): {msg}"
                ));
                // Its repository is in an unknown state: the group goes on
                // (same schedule) in a fresh one.
                if let Some(g) = group.take() {
                    leaks += g.leaks;
                    drop(g);
                }
            }
        }
    }
    if let Some(g) = group.take() {
        end_group(g, master, &mut lost, &mut leaks);
    }
    println!(
        "fault_kill: {:?} per phase (ingest, completion, restore, mount); {} FLUSH/FUA-acknowledged writes read back; completions: {} answered, {} completed, {} interrupted; {} reads failed after kills; {leaks} leaked clusters in all; {:.1?}",
        st.per_phase,
        st.durable_checked,
        st.completion_acked,
        st.completion_survived,
        st.completion_interrupted,
        st.read_errors_after_kill,
        t_start.elapsed()
    );
    for l in &lost {
        println!("LOST: {l}");
    }
    println!("{trials} trials, {} lost", lost.len());
    assert!(
        lost.is_empty(),
        "{} of {trials} trials lost something (seed {master:#018x}; rerun with CHAINVAULT_SEED={master:#018x} CHAINVAULT_FAULT_TRIALS={trials}):\n{}",
        lost.len(),
        lost.join("\n")
    );
}
