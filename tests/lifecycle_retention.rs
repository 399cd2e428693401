//! Retention (engine/retention.rs, engine/prune.rs) and import
//! (engine/import.rs), end to end against the daemon and the CLI.
//!
//! * A year of backups: 100 qcow2 points made with qemu-img/qemu-io, with
//!   timestamps over a simulated year, imported; some protected; pruned by
//!   `--keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 6
//!   --keep-yearly 1`. The kept set must be what an independent reference
//!   of Proxmox Backup Server's algorithm (Python, its own calendar code,
//!   in this file) says; the dry run must list the same verdicts as the
//!   real run; every kept point must compare identical to its original.
//! * Policies: set/show/clear through the CLI and the API; the daemon
//!   applies a VM's policy after each of its backups.
//! * Bad input: bad policies and prune requests, and imports that must be
//!   refused with nothing changed.

mod client_common;
mod common;

use client_common::compare_qcow2;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SIZE: u64 = 4 * MIB;

fn qemu_img(args: &[&str]) {
    run_ok(cmd("qemu-img", args));
}

/// A qemu-img chain of `n` images: a full of pattern data, then overlays
/// (each backed by the one before, by relative name) that each write one
/// 64 KiB block with their own pattern.
fn make_chain(dir: &Path, n: usize, seed: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut out: Vec<PathBuf> = Vec::new();
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let p = dir.join(format!("p{i:03}.qcow2"));
        let ps = p.to_str().unwrap();
        if i == 0 {
            qemu_img(&["create", "-q", "-f", "qcow2", ps, &SIZE.to_string()]);
            run_ok(cmd(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x11 0 1M",
                    "-c",
                    "write -P 0x22 2M 1M",
                    ps,
                ],
            ));
        } else {
            let back = out[i - 1]
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &back, "-F", "qcow2", ps,
            ]);
            let off = rng.below(SIZE / 65536) * 65536;
            let pat = 1 + (i % 250);
            run_ok(cmd(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P {pat} {off} 64k"),
                    ps,
                ],
            ));
        }
        out.push(p);
    }
    out
}

/// 100 times over 2025: runs of days with one to four backups, gaps of up
/// to five weeks, in seconds.
fn year_of_times(seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    let start = 1_735_689_600i64; // 2025-01-01T00:00:00Z
    let mut t = start + 3600;
    let mut out = Vec::new();
    while out.len() < 100 {
        let per_day = 1 + rng.below(4) as i64;
        for _ in 0..per_day {
            if out.len() == 100 {
                break;
            }
            t += 60 + rng.below(5 * 3600) as i64;
            out.push(t);
        }
        // The next day, or a gap of up to five weeks.
        let gap_days = if rng.below(6) == 0 {
            7 + rng.below(29) as i64
        } else {
            1 + rng.below(3) as i64
        };
        t = (t / 86400 + gap_days) * 86400 + rng.below(6 * 3600) as i64;
    }
    out
}

fn rfc3339(t: i64) -> String {
    let out = run_ok(cmd(
        "date",
        &["-u", "-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%SZ"],
    ));
    text(&out.stdout).trim().to_string()
}

/// The reference: Proxmox Backup Server's prune selection written again in
/// Python with its own calendar (datetime, isocalendar). Input: lines of
/// "id epoch protected(0/1)"; output: lines of "id keep|remove|protected".
const REFERENCE: &str = r#"
import sys, datetime
opts = dict(a.split('=') for a in sys.argv[1:])
rows = [l.split() for l in sys.stdin if l.strip()]
rows = [(i, int(t), p == '1') for i, t, p in rows]
rows.sort(key=lambda r: -r[1])
def utc(t): return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
sel = {
  'last': lambda t: ('l', t),
  'hourly': lambda t: utc(t).strftime('%Y/%m/%d/%H'),
  'daily': lambda t: utc(t).strftime('%Y/%m/%d'),
  'weekly': lambda t: '%d/%02d' % utc(t).isocalendar()[:2],
  'monthly': lambda t: utc(t).strftime('%Y/%m'),
  'yearly': lambda t: utc(t).strftime('%Y'),
}
mark = {}
for name in ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly']:
    n = int(opts.get(name, '0'))
    if n == 0: continue
    f = sel[name]
    already = {f(t) for i, t, p in rows if mark.get(i) == 'keep'}
    got = set()
    for i, t, p in rows:
        if i in mark: continue
        if p:
            mark[i] = 'protected'; continue
        k = f(t)
        if k in already: continue
        if k in got:
            mark[i] = 'remove'
        else:
            if len(got) >= n: break
            got.add(k); mark[i] = 'keep'
for i, t, p in rows:
    print(i, 'protected' if p else mark.get(i, 'remove'))
"#;

fn reference(rows: &[(String, i64, bool)], opts: &[(&str, u32)]) -> Vec<(String, String)> {
    let script = std::env::temp_dir().join(format!("cv-prune-ref-{}.py", std::process::id()));
    std::fs::write(&script, REFERENCE).unwrap();
    let mut c = cmd(PYTHON, &[script.to_str().unwrap()]);
    for (k, v) in opts {
        c.arg(format!("{k}={v}"));
    }
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("python3");
    {
        use std::io::Write;
        let mut si = child.stdin.take().unwrap();
        for (id, t, p) in rows {
            writeln!(si, "{id} {t} {}", if *p { 1 } else { 0 }).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "reference: {}", text(&out.stderr));
    let _ = std::fs::remove_file(&script);
    text(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect()
}

fn cli_json(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "chainvault {}: exit {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "chainvault {}: not JSON ({e}): {}",
            args.join(" "),
            text(&out.stdout)
        )
    })
}

/// The verdicts of a prune report, by backup id.
fn verdicts(r: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = r["vms"][0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (s(&b["backup_id"]), s(&b["verdict"])))
        .collect();
    v.sort();
    v
}

#[test]
fn a_year_of_backups_is_pruned_exactly_as_proxmox_does() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("old");
    let images = make_chain(&src, 100, 7);
    let times = year_of_times(11);
    let d = Daemon::start(&tmp.path().join("data"));

    // Import all 100 points in one call, each with its time.
    let mut args: Vec<String> = [
        "import", "--vm", "year", "--disk", "0", "--server", &d.api, "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for t in &times {
        args.push("--created-at".into());
        args.push(rfc3339(*t));
    }
    args.push("--change-id".into());
    args.push("cid-100".into());
    for p in &images {
        args.push(p.to_str().unwrap().to_string());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let rep = cli_json(&a);
    let points = rep["points"].as_array().unwrap().clone();
    assert_eq!(points.len(), 100, "{}", pretty(&rep));
    let ids: Vec<String> = points.iter().map(|p| s(&p["backup_id"])).collect();
    assert_eq!(d.change_id("year", 0), "cid-100");
    // Imported as a chain: qemu-img sees every point reading its original.
    for (i, id) in ids.iter().enumerate().step_by(33) {
        compare_qcow2(
            &format!("imported point {i}"),
            &d.image_of(id, 0),
            &images[i],
        );
    }
    let chain = d.chain("year", 0);
    assert_eq!(chain["points"].as_array().unwrap().len(), 100);

    // Protect three: one that the policy would keep anyway and two it would not.
    let protected = [ids[5].clone(), ids[40].clone(), ids[98].clone()];
    for p in &protected {
        let out = cli(&["backups", "protect", p, "--server", &d.api]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    let keep = [
        ("--keep-last", "3"),
        ("--keep-daily", "7"),
        ("--keep-weekly", "4"),
        ("--keep-monthly", "6"),
        ("--keep-yearly", "1"),
    ];
    let mut pargs: Vec<&str> = vec!["prune", "--vm", "year", "--server", &d.api, "--json"];
    for (k, v) in &keep {
        pargs.push(k);
        pargs.push(v);
    }
    let mut dry_args = pargs.clone();
    dry_args.push("--dry-run");
    let dry = cli_json(&dry_args);
    assert_eq!(dry["dry_run"], true);
    // Nothing removed by the dry run.
    assert_eq!(d.chain("year", 0)["points"].as_array().unwrap().len(), 100);

    let rows: Vec<(String, i64, bool)> = ids
        .iter()
        .zip(&times)
        .map(|(id, t)| (id.clone(), *t, protected.contains(id)))
        .collect();
    let mut want = reference(
        &rows,
        &[
            ("last", 3),
            ("daily", 7),
            ("weekly", 4),
            ("monthly", 6),
            ("yearly", 1),
        ],
    );
    want.sort();
    assert_eq!(verdicts(&dry), want, "dry run against the reference");
    let kept_n = want.iter().filter(|(_, v)| v != "remove").count();
    assert!(
        (15..=30).contains(&kept_n),
        "the simulated year should keep a couple of dozen points, kept {kept_n}"
    );
    for b in dry["vms"][0]["backups"].as_array().unwrap() {
        if b["verdict"] == "keep" {
            assert!(
                s(&b["reason"]).starts_with("keep-"),
                "a kept backup names its option: {}",
                pretty(b)
            );
        }
    }
    assert!(
        dry["bytes_freed"].as_u64().unwrap() > 0,
        "{}",
        pretty(&dry["bytes_freed"])
    );

    // The real run gives the same verdicts, and removes exactly the rest.
    let before = walk(&d.data.join("vms"));
    let real = cli_json(&pargs);
    assert_eq!(verdicts(&real), want, "real run against the reference");
    assert_eq!(
        real["errors"].as_array().unwrap().len(),
        0,
        "{}",
        pretty(&real["errors"])
    );
    assert_eq!(real["removed"].as_u64().unwrap() as usize, 100 - kept_n);
    assert!(real["bytes_freed"].as_u64().unwrap() > 0);
    assert!(walk(&d.data.join("vms")).len() < before.len());

    // What is left is the kept set, each point reading its original.
    let left: Vec<String> = d.chain("year", 0)["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| s(&p["backup_id"]))
        .collect();
    let kept: Vec<String> = ids
        .iter()
        .filter(|id| want.iter().any(|(w, v)| w == *id && v != "remove"))
        .cloned()
        .collect();
    assert_eq!(left, kept);
    for id in &kept {
        let i = ids.iter().position(|x| x == id).unwrap();
        let img = d.image_of(id, 0);
        compare_qcow2(&format!("kept point {i} ({id})"), &img, &images[i]);
        check(&format!("kept point {i}"), &img);
    }
    assert_eq!(d.change_id("year", 0), "cid-100");
    verify_server(&d);

    // A second prune with the same options removes nothing more.
    let again = cli_json(&pargs);
    assert_eq!(again["removed"], 0, "{}", pretty(&again));
    d.stop();
}

#[test]
fn policies_are_stored_shown_and_applied_after_each_backup() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let api = d.api.clone();

    // No policy: show says so, prune keeps everything.
    let v = cli_json(&["policy", "show", "--vm", "pol", "--server", &api, "--json"]);
    assert_eq!(v["source"], "none", "{}", pretty(&v));

    // The default, then a VM's own.
    let v = cli_json(&[
        "policy",
        "set",
        "--keep-daily",
        "9",
        "--time-zone",
        "Europe/Berlin",
        "--server",
        &api,
        "--json",
    ]);
    assert_eq!(v["policy"]["keep_daily"], 9);
    let v = cli_json(&["policy", "show", "--vm", "pol", "--server", &api, "--json"]);
    assert_eq!(v["source"], "default", "{}", pretty(&v));
    let v = cli_json(&[
        "policy",
        "set",
        "--vm",
        "pol",
        "--keep-last",
        "2",
        "--server",
        &api,
        "--json",
    ]);
    assert_eq!(v["source"], "vm");
    assert_eq!(v["policy"]["keep_last"], 2);
    assert!(
        v["policy"]["keep_daily"].is_null(),
        "a VM's policy replaces the default: {}",
        pretty(&v)
    );
    let all = d.get_ok("/api/v1/policies");
    assert_eq!(
        all["policies"].as_array().unwrap().len(),
        2,
        "{}",
        pretty(&all)
    );
    let text_out = cli(&["policy", "show", "--vm", "pol", "--server", &api]);
    assert!(
        text(&text_out.stdout).contains("keep-last 2"),
        "{}",
        text(&text_out.stdout)
    );

    // Three backups of a small disk: after each, the daemon applies keep-last 2.
    let size = MIB;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = if i == 0 {
            d.start_backup(&start_body(
                "pol",
                "full",
                Some(json!([disk_spec(0, size)])),
            ))
        } else {
            d.start_backup(&start_body("pol", "incremental", None))
        };
        let id = s(&r["backup_id"]);
        d.complete(&id, 0, &format!("c{i}"), 0);
        ids.push(id);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = d.list("vm_name=pol").len();
        if n == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy was not applied after the backups: {n} backups\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<String> = d
        .list("vm_name=pol")
        .iter()
        .map(|b| s(&b["backup_id"]))
        .collect();
    assert_eq!(left, ids[1..].to_vec());
    assert_eq!(d.change_id("pol", 0), "c2");
    // The point leaves the listings first; its child's image is merged
    // after, and its journal goes when that is done.
    let journals = d.data.join("journal");
    while std::fs::read_dir(&journals).is_ok_and(|mut r| r.next().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the removal's journal is still there: {}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The survivors still read: the old head is now the base.
    let chain = d.chain("pol", 0);
    assert!(
        chain["points"][0]["parent_backup_id"].is_null(),
        "{}",
        pretty(&chain)
    );
    check("new base", &d.image_of(&ids[1], 0));

    // prune: never. Clearing the VM's policy falls back to the default.
    let v = cli_json(&["policy", "clear", "--vm", "pol", "--server", &api, "--json"]);
    assert_eq!(v["source"], "default");
    let r = d.delete("/api/v1/policies/vms/pol");
    assert_error("clearing again", &r, 404);
    // A policy survives a restart.
    d.stop();
    let d = Daemon::start(&tmp.path().join("data"));
    let v = d.get_ok("/api/v1/policies/default");
    assert_eq!(v["policy"]["keep_daily"], 9);
    assert_eq!(v["policy"]["time_zone"], "Europe/Berlin");
    d.stop();
}

#[test]
fn bad_policies_prunes_and_imports_are_refused_and_change_nothing() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let api = d.api.clone();

    for (body, want) in [
        (json!({ "keep_last": -1 }), "keep-last -1"),
        (
            json!({ "keep_daily": 1_000_000_000u64 }),
            "keep-daily 1000000000",
        ),
        (json!({ "keep_weekly": "four" }), "keep_weekly"),
        (json!({ "keep_lost": 3 }), "keep_lost"),
        (
            json!({ "keep_daily": 3, "time_zone": "Mars/Olympus" }),
            "Mars/Olympus",
        ),
        (json!({ "keep_daily": 3, "prune": "schedule" }), "schedule"),
        (
            json!({ "keep_daily": 3, "schedule": "whenever" }),
            "whenever",
        ),
        (
            json!({ "keep_daily": 3, "max_chain_length": 1 }),
            "max_chain_length 1",
        ),
    ] {
        let raw = serde_json::to_string(&body).unwrap();
        let r = d.put_raw("/api/v1/policies/default", &raw);
        assert_error(&format!("policy {raw}"), &r, 400);
        assert!(
            s(&r.1["error"]).contains(want),
            "policy {raw}: {}",
            pretty(&r.1)
        );
    }
    assert_eq!(d.get_ok("/api/v1/policies/default")["source"], "none");
    let out = cli(&["policy", "set", "--keep-last", "-3", "--server", &api]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("keep-last -3"),
        "{}",
        text(&out.stderr)
    );

    let r = d.post("/api/v1/prune", &json!({ "vm_name": "nosuchvm" }));
    assert_error("prune of an unknown VM", &r, 404);
    let r = d.post("/api/v1/prune", &json!({ "keep_last": -2 }));
    assert_error("prune with a negative count", &r, 400);

    // A disk with two points, for the imports to build on.
    let src = tmp.path().join("src");
    let good = make_chain(&src, 2, 3);
    let rep = cli_json(&[
        "import",
        "--vm",
        "imp",
        "--disk",
        "0",
        "--server",
        &api,
        "--json",
        "--created-at",
        "2025-03-01T01:00:00Z",
        "--created-at",
        "2025-03-02T01:00:00Z",
        good[0].to_str().unwrap(),
        good[1].to_str().unwrap(),
    ]);
    let head = s(&rep["points"][1]["backup_id"]);
    let rep0_base = rep["points"][0]["backup_id"].clone();
    let snapshot = |d: &Daemon| {
        let mut files: Vec<String> = walk(&d.data.join("vms"))
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        files.sort();
        (
            files,
            d.list("vm_name=imp").len(),
            s(&d.chain("imp", 0)["head"]["head_backup_id"]),
        )
    };
    let before = snapshot(&d);

    // Protected backups are not pruned and not deleted.
    let r = d.patch(
        &format!("/api/v1/backups/{head}"),
        &json!({ "protected": true }),
    );
    assert_eq!(r.0, 200);
    let pr = d.post_ok(
        "/api/v1/prune",
        &json!({ "vm_name": "imp", "keep_last": 1 }),
    );
    let bs = pr["vms"][0]["backups"].as_array().unwrap().clone();
    assert_eq!(bs[0]["verdict"], "protected", "{}", pretty(&pr));
    // A protected backup does not use up keep-last's one slot.
    assert_eq!(bs[1]["verdict"], "keep", "{}", pretty(&pr));
    assert_eq!(pr["removed"], 0);
    let r = d.delete(&format!("/api/v1/backups/{head}"));
    assert_error("delete of a protected backup", &r, 409);
    assert!(s(&r.1["error"]).contains("unprotect"), "{}", pretty(&r.1));
    let out = cli(&["backups", "delete", &head, "--server", &api]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("protected"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(snapshot(&d).1, before.1, "nothing was removed");
    d.patch(
        &format!("/api/v1/backups/{head}"),
        &json!({ "protected": false }),
    );
    let before = snapshot(&d);

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let try_import = |what: &str, args: &[&str], want: &str| {
        let mut a = vec!["import", "--vm", "imp", "--disk", "0", "--server", &api];
        a.extend_from_slice(args);
        let out = cli(&a);
        assert!(
            !out.status.success(),
            "{what}: import succeeded: {}",
            text(&out.stdout)
        );
        let e = text(&out.stderr);
        assert!(e.contains(want), "{what}: expected {want:?} in: {e}");
        assert!(e.contains("HTTP 4"), "{what}: a 4xx: {e}");
        assert_eq!(
            snapshot(&d),
            before,
            "{what}: the catalog and files changed"
        );
    };

    // An overlay whose backing file is not the disk's newest point.
    let other = make_chain(&bad.join("other"), 2, 99);
    let ov = bad.join("on-other.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        other[1].to_str().unwrap(),
        "-F",
        "qcow2",
        ov.to_str().unwrap(),
    ]);
    try_import(
        "backing not the newest point",
        &[ov.to_str().unwrap()],
        "does not hold the same bytes",
    );
    // A size that differs.
    let big = bad.join("big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", big.to_str().unwrap(), "8M"]);
    try_import("size differs", &[big.to_str().unwrap()], "virtual size");
    // A corrupt image: an L1 entry pointing past the end of the file.
    let corrupt = bad.join("corrupt.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        corrupt.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    run_ok(cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 64k",
            corrupt.to_str().unwrap(),
        ],
    ));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&corrupt)
            .unwrap();
        let mut h = [0u8; 48];
        f.read_exact_at(&mut h, 0).unwrap();
        let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
        f.write_all_at(&(0x8000_0000_0000_0000u64 | (1u64 << 40)).to_be_bytes(), l1)
            .unwrap();
    }
    try_import("corrupt", &[corrupt.to_str().unwrap()], "corrupt");
    // A backing file that escapes: a relative name climbing out of the directory.
    let nested = bad.join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    let esc = nested.join("escape.qcow2");
    let rel = format!(
        "../../other/{}",
        other[0].file_name().unwrap().to_str().unwrap()
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &rel,
        "-F",
        "qcow2",
        esc.to_str().unwrap(),
    ]);
    try_import(
        "backing escapes",
        &[esc.to_str().unwrap()],
        "outside the image's directory",
    );
    // Not a qcow2 at all, a missing file, a time before the newest point, a broken link.
    let raw = bad.join("plain.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    try_import("raw file", &[raw.to_str().unwrap()], "not a qcow2");
    try_import(
        "missing",
        &[bad.join("nope.qcow2").to_str().unwrap()],
        "cannot be read",
    );
    let next = make_chain(&bad.join("next"), 1, 5);
    try_import(
        "time before the newest point",
        &[
            "--created-at",
            "2025-01-01T00:00:00Z",
            next[0].to_str().unwrap(),
        ],
        "not later than",
    );
    try_import(
        "two images not linked",
        &[next[0].to_str().unwrap(), good[0].to_str().unwrap()],
        "has no backing file",
    );
    let out = cli(&[
        "import",
        "--vm",
        "imp",
        "--disk",
        "0",
        "--server",
        &api,
        "--created-at",
        "2026-01-01T00:00:00Z",
        next[0].to_str().unwrap(),
        good[0].to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("one per IMAGE"),
        "{}",
        text(&out.stderr)
    );

    // And a good one still works afterwards, as an overlay on the head.
    let head_img = d.image_of(&before.2, 0);
    let ok = bad.join("ok.qcow2");
    let copy = bad.join("head-copy.qcow2");
    // The old system's copy of the newest point (same bytes, another file).
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        head_img.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "head-copy.qcow2",
        "-F",
        "qcow2",
        ok.to_str().unwrap(),
    ]);
    run_ok(cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 9 1M 64k",
            ok.to_str().unwrap(),
        ],
    ));
    // What it reads, kept aside (the import moves the file).
    let ok_copy = bad.join("ok-flat.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        ok.to_str().unwrap(),
        ok_copy.to_str().unwrap(),
    ]);
    let rep = cli_json(&[
        "import",
        "--vm",
        "imp",
        "--disk",
        "0",
        "--server",
        &api,
        "--json",
        "--move",
        ok.to_str().unwrap(),
    ]);
    let id = s(&rep["points"][0]["backup_id"]);
    assert_eq!(s(&rep["points"][0]["parent_backup_id"]), before.2);
    assert!(!ok.exists(), "--move removes the source");
    check("imported overlay", &d.image_of(&id, 0));
    let base_img = d.image_of(&s(&rep0_base), 0);
    assert_chain(
        "imported overlay",
        &d.image_of(&id, 0),
        &[&d.image_of(&id, 0), &head_img, &base_img],
    );
    compare_qcow2("imported overlay", &d.image_of(&id, 0), &ok_copy);
    d.stop();
}

#[test]
fn prune_leaves_running_backups_alone_and_works_offline() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start(&data);
    let size = MIB;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = if i == 0 {
            d.start_backup(&start_body(
                "run",
                "full",
                Some(json!([disk_spec(0, size)])),
            ))
        } else {
            d.start_backup(&start_body("run", "incremental", None))
        };
        let id = s(&r["backup_id"]);
        d.complete(&id, 0, &format!("c{i}"), 0);
        ids.push(id);
    }
    // A running backup on top: prune neither removes it nor its parent's
    // chain under it, and does not count it.
    let running = s(&d.start_backup(&start_body("run", "incremental", None))["backup_id"]);
    let r = d.post_ok(
        "/api/v1/prune",
        &json!({ "vm_name": "run", "keep_last": 1 }),
    );
    let v: Vec<(String, String)> = r["vms"][0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (s(&b["backup_id"]), s(&b["verdict"])))
        .collect();
    assert_eq!(
        v,
        vec![
            (running.clone(), "running".to_string()),
            (ids[2].clone(), "keep".to_string()),
            (ids[1].clone(), "remove".to_string()),
            (ids[0].clone(), "remove".to_string()),
        ],
        "{}",
        pretty(&r)
    );
    assert_eq!(r["removed"], 2, "{}", pretty(&r));
    d.complete(&running, 0, "c3", 0);
    let left: Vec<String> = d
        .list("vm_name=run")
        .iter()
        .map(|b| s(&b["backup_id"]))
        .collect();
    assert_eq!(left, vec![ids[2].clone(), running.clone()]);
    check("kept", &d.image_of(&ids[2], 0));
    check("completed on top", &d.image_of(&running, 0));
    d.stop();

    // With the daemon stopped, on the repository directly.
    let ds = data.to_str().unwrap();
    let src = make_chain(&tmp.path().join("src"), 2, 21);
    let rep = cli_json(&[
        "import",
        "--vm",
        "off",
        "--disk",
        "0",
        "--data",
        ds,
        "--json",
        "--created-at",
        "2026-01-01T00:00:00Z",
        "--created-at",
        "2026-01-02T00:00:00Z",
        src[0].to_str().unwrap(),
        src[1].to_str().unwrap(),
    ]);
    let off: Vec<String> = rep["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| s(&p["backup_id"]))
        .collect();
    let dry = cli_json(&[
        "prune",
        "--vm",
        "off",
        "--keep-last",
        "1",
        "--dry-run",
        "--data",
        ds,
        "--json",
    ]);
    assert_eq!(dry["removed"], 1);
    let real = cli_json(&[
        "prune",
        "--vm",
        "off",
        "--keep-last",
        "1",
        "--data",
        ds,
        "--json",
    ]);
    assert_eq!(verdicts(&dry), verdicts(&real));
    let out = cli(&["backups", "delete", &off[1], "--data", ds]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["backups", "list", "--vm", "off", "--data", ds, "--json"]);
    let l: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l.as_array().map(|a| a.len()), Some(0), "{}", pretty(&l));
    verify_offline(&data);
}

#[test]
fn a_scheduled_policy_prunes_on_its_schedule_and_not_after_backups() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let v = cli_json(&[
        "policy",
        "set",
        "--vm",
        "sched",
        "--keep-last",
        "1",
        "--schedule",
        "every 10s",
        "--server",
        &d.api,
        "--json",
    ]);
    assert_eq!(v["policy"]["prune"], "schedule", "{}", pretty(&v));
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = if i == 0 {
            d.start_backup(&start_body(
                "sched",
                "full",
                Some(json!([disk_spec(0, MIB)])),
            ))
        } else {
            d.start_backup(&start_body("sched", "incremental", None))
        };
        let id = s(&r["backup_id"]);
        d.complete(&id, 0, &format!("c{i}"), 0);
        ids.push(id);
    }
    // Not after the backups: all three are there a moment later.
    std::thread::sleep(Duration::from_millis(1500));
    let n = d.list("vm_name=sched").len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    if n == 3 {
        // Then, within one period (10 s, aligned to the clock), the schedule fires.
        loop {
            if d.list("vm_name=sched").len() == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the schedule never pruned\n{}",
                d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    } else {
        // The schedule may have fired in the 1.5 s already; it must have kept only the newest.
        assert_eq!(
            n, 1,
            "a schedule prunes to keep-last 1, not after each backup"
        );
    }
    let left: Vec<String> = d
        .list("vm_name=sched")
        .iter()
        .map(|b| s(&b["backup_id"]))
        .collect();
    assert_eq!(left, vec![ids[2].clone()]);
    d.stop();
}
