//! Deep verify (`chainvault verify --deep`, `POST /api/v1/verify/deep`):
//! in a chain of 5 points, one byte flipped in a data cluster of each layer
//! in turn (and in an L2 table) is found, named (point, offset, image file,
//! host offset, the later points that read it), kept with the point, and the
//! next backup of the disk does not build on a bad head.

mod client_common;
mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use client_common::*;
use common::*;

fn deep(d: &Daemon, extra: &[&str]) -> (i32, Value) {
    let mut c = cmd(BIN, &["verify", "--deep", "--json", "--server", &d.api]);
    c.args(extra);
    let out = run(c);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify --deep --json: {e}: {}", text(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// `qemu-img map` of one image: (guest offset, length, host offset) of the
/// data its own layer holds.
fn own_data(img: &Path) -> Vec<(u64, u64, u64)> {
    let out = run_ok(cmd(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", &p(img)],
    ));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true && e["offset"].is_u64())
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn flip(path: &Path, at: u64) {
    flip_with(path, at, 0x5a);
}

/// XOR the byte at `at` of `path` with `mask`.
fn flip_with(path: &Path, at: u64, mask: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// The first entry of `img`'s first L2 table that `want` accepts: its
/// index, its offset in the file, its value (the first 8 bytes) and the
/// image's cluster bits.
fn first_l2_entry(img: &Path, want: impl Fn(u64) -> bool) -> Option<(u64, u64, u64, u64)> {
    let f = std::fs::File::open(img).unwrap();
    let mut hd = [0u8; 104];
    f.read_exact_at(&mut hd, 0).unwrap();
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(hd[20..24].try_into().unwrap()) as u64;
    let l1 = be(&hd[40..48]);
    let extended = be(&hd[72..80]) & (1 << 4) != 0;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1).unwrap();
    let l2 = be(&e) & 0x00ff_ffff_ffff_fe00;
    let size = if extended { 16 } else { 8 };
    (0..(1u64 << cluster_bits) / size).find_map(|i| {
        f.read_exact_at(&mut e, l2 + i * size).unwrap();
        want(be(&e)).then(|| (i, l2 + i * size, be(&e), cluster_bits))
    })
}

#[test]
fn a_flipped_byte_in_any_layer_is_found_named_and_kept() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 64 * MIB, 16, 21);
    let mut ids = Vec::new();
    for i in 0..5u64 {
        if i > 0 {
            qemu_io_modify(&q, 900 + i, 12, 1);
        }
        let r = backup(&d, "vm", &[p(&q)], &["--rotate"]).ok(&format!("backup {i}"));
        ids.push(s(&r.json["backup_id"]));
    }
    let (code, clean) = deep(&d, &[]);
    assert_eq!(
        code,
        0,
        "a clean repository verifies clean: {}",
        pretty(&clean)
    );
    assert_eq!(clean["points_checked"], 5);
    assert!(clean["bad_blocks"].as_array().unwrap().is_empty());
    // Mounted before anything goes bad: the warnings appear in a live mount.
    let data = p(&d.data);
    let m = Mount::start(
        &tmp.path().join("mnt"),
        &["--data", &data, "--rescan-ms", "100"],
    );
    mount_warns(&m, &ids, None);

    for (k, id) in ids.iter().enumerate() {
        let img = d.image_of(id, 0);
        // A data cluster this layer holds, 100 bytes into it.
        let (guest, _, host) = own_data(&img)[0];
        let at_guest = guest + 100;
        flip(&img, host + 100);
        let (code, rep) = deep(&d, &["--vm", "vm"]);
        assert_ne!(code, 0, "layer {k}: the flip must fail the verify");
        let bad = rep["bad_blocks"].as_array().unwrap();
        assert_eq!(bad.len(), 1, "layer {k}: one bad block: {}", pretty(&rep));
        let b = &bad[0];
        assert_eq!(b["backup_id"], id.as_str(), "layer {k}: the point named");
        assert_eq!(
            b["offset"].as_u64().unwrap(),
            at_guest / 65536 * 65536,
            "layer {k}: the offset"
        );
        assert!(
            s(&b["image"]).ends_with(&format!("{id}.qcow2")),
            "layer {k}: the image file: {b}"
        );
        assert_eq!(
            b["host_offset"].as_u64().unwrap(),
            host + (at_guest / 65536 * 65536 - guest),
            "layer {k}"
        );
        // The later points that read it: those above with no write of that
        // block of their own (what qemu-img map says each reads from).
        let want: Vec<String> = ids
            .iter()
            .enumerate()
            .skip(k + 1)
            .filter(|(j, later)| {
                let top = d.image_of(later, 0);
                let out = run_ok(cmd(
                    "qemu-img",
                    &["map", "--output=json", "-f", "qcow2", &p(&top)],
                ));
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                v.as_array().unwrap().iter().any(|e| {
                    let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    st <= at_guest
                        && at_guest < st + len
                        && e["depth"].as_u64() == Some((j - k) as u64)
                })
            })
            .map(|(_, id)| id.clone())
            .collect();
        let got: Vec<String> = b["affected"].as_array().unwrap().iter().map(s).collect();
        assert_eq!(
            got, want,
            "layer {k}: the later points that read the bad block"
        );
        // The result is kept with the point.
        let rec = disk_of(&d.backup(id), 0);
        assert_eq!(rec["deep_verify"]["ok"], false, "{}", pretty(&rec));
        assert_eq!(
            rec["deep_verify"]["first_bad_offset"].as_u64().unwrap(),
            at_guest / 65536 * 65536
        );
        if k == 1 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            mount_warns(&m, &ids, Some(1));
        }
        flip(&img, host + 100); // mended
    }
    let (code, rep) = deep(&d, &[]);
    assert_eq!(code, 0, "mended: {}", pretty(&rep));
    assert_eq!(disk_of(&d.backup(&ids[4]), 0)["deep_verify"]["ok"], true);

    // An L2 table entry: the first one in use of the head's first L2 table
    // points 64 KiB elsewhere.
    let head = d.image_of(&ids[4], 0);
    let (_, slot, _, _) =
        first_l2_entry(&head, |x| x & 0x00ff_ffff_ffff_fe00 != 0).expect("an L2 entry in use");
    flip_with(&head, slot + 5, 0x01);
    let (code, rep) = deep(&d, &[]);
    assert_ne!(
        code,
        0,
        "a damaged L2 entry fails the verify: {}",
        pretty(&rep)
    );
    assert_eq!(rep["points_bad"].as_u64().unwrap(), 1, "{}", pretty(&rep));
    assert_eq!(disk_of(&d.backup(&ids[4]), 0)["deep_verify"]["ok"], false);
    let m = s(&d.get("/metrics").1["__non_json_body"]);
    assert!(
        m.contains("chainvault_points_deep_verify{result=\"bad\"} 1"),
        "{m}"
    );
    let show = run_ok(cmd(
        BIN,
        &[
            "chain", "show", "--server", &d.api, "--vm", "vm", "--disk", "0",
        ],
    ));
    assert!(
        text(&show.stdout).contains("deep verify") && text(&show.stdout).contains("BAD"),
        "{}",
        text(&show.stdout)
    );

    // The bad head is never a parent: the next backup is a full.
    qemu_io_modify(&q, 999, 4, 0);
    let r = backup(&d, "vm", &[p(&q)], &["--rotate"]).ok("after the bad head");
    let d0 = r.disk(0);
    assert_eq!(d0["mode"], "full", "{}", pretty(&r.json));
    assert_eq!(s(&d0["digest"]), cv_digest_of(&q));
}

/// In the mount, the point `ids[bad]` and every later one (each reads
/// through it) hold WARNING.txt naming it; the earlier ones (all, when
/// `bad` is None) do not.
fn mount_warns(m: &Mount, ids: &[String], bad: Option<usize>) {
    for (j, id) in ids.iter().enumerate() {
        let dir = m.dir.join("by-id").join(id).join("disk0");
        assert!(dir.join("info.json").exists(), "{}", dir.display());
        let w = dir.join("WARNING.txt");
        let Some(bad) = bad.filter(|b| j >= *b) else {
            assert!(!w.exists(), "point {j} reads no bad point: {}", w.display());
            continue;
        };
        if j < bad {
            assert!(!w.exists(), "point {j} reads no bad point: {}", w.display());
            continue;
        }
        let t = std::fs::read_to_string(&w)
            .unwrap_or_else(|e| panic!("point {j} must warn ({}): {e}", w.display()));
        assert!(t.contains(&ids[bad]) && t.contains("deep verify"), "{t}");
        if j > bad {
            assert!(t.contains("reads through point"), "{t}");
        }
        let info: Value =
            serde_json::from_slice(&std::fs::read(dir.join("info.json")).unwrap()).unwrap();
        assert!(s(&info["digest"]).starts_with("cvblk2-blake3:"), "{info}");
        if j == bad {
            assert_eq!(info["deep_verify"]["ok"], false, "{info}");
        }
    }
}

/// A qemu-made image with compressed clusters, imported: its point's digest
/// is the source's, and a byte flipped inside one compressed cluster is
/// found, named as compressed, and the disk's next backup is a full.
#[test]
fn a_flipped_byte_in_a_compressed_cluster_of_an_imported_image_is_found() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let raw = tmp.path().join("src.raw");
    let size = 8 * MIB;
    let mut bytes = Vec::with_capacity(size as usize);
    let mut line = 0u64;
    while (bytes.len() as u64) < size {
        bytes
            .extend_from_slice(format!("line {line:08} of a compressible guest disk\n").as_bytes());
        line += 1;
    }
    bytes.truncate(size as usize);
    // A hole of zero blocks in the middle.
    bytes[3 * MIB as usize..4 * MIB as usize].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    let qc = tmp.path().join("src.qcow2");
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            &p(&raw),
            &p(&qc),
        ],
    ));
    let rep = run_ok(cmd(
        BIN,
        &[
            "import",
            "--vm",
            "cz",
            "--disk",
            "0",
            "--server",
            &d.api,
            "--json",
            "--change-id",
            "cz-cbt-1",
            &p(&qc),
        ],
    ));
    let rep: Value = serde_json::from_slice(&rep.stdout).unwrap();
    let id = s(&rep["points"][0]["backup_id"]);
    let want = cv_digest_of(&raw);
    assert_eq!(cv_digest_of(&qc), want, "qcow2 and raw read the same");
    assert_eq!(
        s(&rep["points"][0]["digest"]),
        want,
        "the import records the digest"
    );
    assert_eq!(s(&disk_of(&d.backup(&id), 0)["digest"]), want);
    let (code, clean) = deep(&d, &["--vm", "cz"]);
    assert_eq!(code, 0, "{}", pretty(&clean));

    // The first compressed L2 entry of the repository's copy.
    let img = d.image_of(&id, 0);
    let (slot, _, entry, cluster_bits) = first_l2_entry(&img, |x| x & (1 << 62) != 0)
        .expect("qemu-img convert -c wrote compressed clusters");
    let host = entry & ((1u64 << (62 - (cluster_bits - 8))) - 1);
    let guest = slot << cluster_bits;
    flip(&img, host + 40);
    let (code, rep) = deep(&d, &["--vm", "cz"]);
    assert_ne!(code, 0, "{}", pretty(&rep));
    let bad = rep["bad_blocks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{}", pretty(&rep));
    let b = &bad[0];
    assert_eq!(b["backup_id"], id.as_str());
    assert_eq!(b["offset"].as_u64().unwrap(), guest, "{b}");
    assert_eq!(b["compressed"], true, "{b}");
    assert!(s(&b["image"]).ends_with(&format!("{id}.qcow2")), "{b}");
    assert_eq!(b["host_offset"].as_u64().unwrap(), host, "{b}");
    assert!(b["affected"].as_array().unwrap().is_empty(), "{b}");
    assert_eq!(disk_of(&d.backup(&id), 0)["deep_verify"]["ok"], false);

    // Not an incremental on the bad point: no change_id is offered, and an
    // incremental asked for is made a full that says why.
    assert_eq!(d.change_id("cz", 0), "");
    let r = d.start_backup(&start_body(
        "cz",
        "incremental",
        Some(json!([disk_spec(0, size)])),
    ));
    let d0 = &r["disks"][0];
    assert_eq!(d0["mode"], "full", "{}", pretty(&r));
    assert!(
        s(&d0["reason"]).contains("failed deep verify"),
        "{}",
        pretty(&r)
    );
}

/// `serve --verify-every`: the daemon deep-verifies every point on its own,
/// again once a result is older than the period, and finds what went bad.
#[test]
fn the_daemon_verifies_on_a_schedule() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        &tmp.path().join("data"),
        &["--verify-every", "3s", "--verify-rate", "512"],
        &[],
    );
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 32 * MIB, 8, 5);
    let id = s(&backup(&d, "vm", &[p(&q)], &["--rotate"]).ok("full").json["backup_id"]);
    let wait_for = |what: &str, ok: bool| -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let v = disk_of(&d.backup(&id), 0)["deep_verify"].clone();
            if v["ok"] == ok {
                return v;
            }
            assert!(
                t0.elapsed().as_secs() < 60,
                "{what}: no scheduled deep verify said ok={ok} in 60 s: {v}\n{}",
                d.log_tail()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    };
    let first = wait_for("the first scheduled verify", true);
    let img = d.image_of(&id, 0);
    let (_, _, host) = own_data(&img)[0];
    flip(&img, host + 7);
    let later = wait_for("the verify after the flip", false);
    assert_ne!(first["at"], later["at"]);
    assert!(s(&later["message"]).contains("offset"), "{later}");
}

fn cv_digest_of(path: &Path) -> String {
    let out = run_ok(cmd(BIN, &["digest", "--json", &p(path)]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    s(&v["digest"])
}

#[test]
fn the_rate_limit_holds_and_the_api_takes_bad_input_as_4xx() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let q = tmp.path().join("q.qcow2");
    make_vm_disk(&q, 64 * MIB, 24, 4);
    backup(&d, "vm", &[p(&q)], &["--rotate"]).ok("full");
    let t0 = std::time::Instant::now();
    let (code, rep) = deep(&d, &["--rate", "16"]);
    assert_eq!(code, 0, "{}", pretty(&rep));
    let read = rep["bytes_read"].as_u64().unwrap();
    assert!(read >= 24 * MIB, "read {read}");
    // 24 MiB at 16 MiB/s: at least a second.
    assert!(
        t0.elapsed().as_secs_f64() >= 1.0,
        "{:?} for {read} bytes",
        t0.elapsed()
    );
    let r = d.post("/api/v1/verify/deep", &json!({"vm_name": "vm", "bogus": 1}));
    assert_error("unknown field", &r, 400);
    assert_error_body("unknown field", &r);
    let r = d.post("/api/v1/verify/deep", &json!({"rate_mib_s": "fast"}));
    assert_error("bad rate", &r, 400);
}
