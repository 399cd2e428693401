//! Instant recovery (engine/instant.rs): a point served read-write through a
//! scratch overlay. Writes from qemu-io and nbdcopy read back, survive a
//! kill -9 of the daemon (the export comes back under its URI), never change
//! the point, block its removal, and are discarded on close or kept with
//! `keep_as` as a standalone image of point + writes.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

const VM: &str = "ivm";
const SIZE: u64 = 16 * MIB;

fn read_all(uri: &str, to: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(to);
    run_ok(cmd("nbdcopy", &[uri, to.to_str().unwrap()]));
    std::fs::read(to).unwrap()
}

fn instant(d: &Daemon) -> Value {
    let out = cli(&[
        "restore",
        "--instant",
        "--vm",
        VM,
        "--json",
        "--server",
        &d.api,
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "{}", pretty(&v));
    assert_eq!(v[0]["writable"], true);
    v[0].clone()
}

#[test]
fn an_instant_restore_takes_writes_survives_a_crash_and_keeps_the_point() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start(&data);
    let src = tmp.path().join("src.raw");
    make_disk(&src, SIZE, 77);
    let r = d.start_backup(&start_body(VM, "full", Some(json!([disk_spec(0, SIZE)]))));
    let id = s(&r["backup_id"]);
    nbdcopy(&src, &s(&disk_of(&r, 0)["nbd_uri"]));
    d.complete(&id, 0, "c0", SIZE);
    let point = d.image_of(&id, 0);

    let v = instant(&d);
    let (rid, uri) = (s(&v["restore_id"]), s(&v["nbd_uri"]));
    // Writes: nbdcopy of 2 MiB of 0x33 over the start, qemu-io at 4 MiB.
    let patch = tmp.path().join("patch.raw");
    std::fs::write(&patch, vec![0x33u8; 2 * MIB as usize]).unwrap();
    run_ok(cmd("nbdcopy", &[patch.to_str().unwrap(), uri.as_str()]));
    run_ok(cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 4M 64k", uri.as_str()],
    ));
    let mut want = std::fs::read(&src).unwrap();
    want[..2 * MIB as usize].fill(0x33);
    want[4 * MIB as usize..(4 * MIB + 64 * KIB) as usize].fill(0x77);
    let expected = tmp.path().join("expected.raw");
    std::fs::write(&expected, &want).unwrap();
    let back = tmp.path().join("back.raw");
    assert!(read_all(&uri, &back) == want, "the writes read back");
    compare("the point is unchanged", &point, &src);

    // Listed with its overlay; the point cannot be removed meanwhile.
    let l = d.get_ok("/api/v1/restores");
    let mine = l["restores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| s(&x["restore_id"]) == rid)
        .cloned()
        .unwrap();
    assert_eq!(mine["writable"], true);
    assert!(
        mine["overlay_bytes"].as_u64().unwrap() >= 2 * MIB,
        "{}",
        pretty(&mine)
    );
    let del = d.delete(&format!("/api/v1/backups/{id}"));
    assert_error("delete under an instant restore", &del, 409);
    assert!(
        s(&del.1["error"]).contains("instant restore"),
        "{}",
        pretty(&del.1)
    );
    let t = cli(&["restores", "list", "--server", &d.api]);
    assert!(
        text(&t.stdout).contains("instant (writable)"),
        "{}",
        text(&t.stdout)
    );

    // kill -9: the export comes back under the same URI, with the writes.
    d.kill9();
    let d = Daemon::start(&data);
    let l = d.get_ok("/api/v1/restores");
    let again = l["restores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| s(&x["restore_id"]) == rid)
        .cloned();
    let again =
        again.unwrap_or_else(|| panic!("the instant restore did not come back: {}", pretty(&l)));
    assert_eq!(s(&again["nbd_uri"]), uri);
    assert!(read_all(&uri, &back) == want, "the writes survived kill -9");
    run_ok(cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 8M 4k", uri.as_str()],
    ));
    want[8 * MIB as usize..(8 * MIB + 4 * KIB) as usize].fill(0x55);
    std::fs::write(&expected, &want).unwrap();
    compare("the point is still unchanged", &point, &src);
    let del = d.delete(&format!("/api/v1/backups/{id}"));
    assert_error("delete after the restart", &del, 409);
    // A bad keep_as closes nothing.
    for (k, why) in [
        ("rel.qcow2", "absolute"),
        (expected.to_str().unwrap(), "exists"),
    ] {
        let r = d
            .try_delete(&format!("/api/v1/restores/{rid}?keep_as={k}"))
            .unwrap();
        assert_error(&format!("keep_as {k}"), &r, 400);
        assert!(s(&r.1["error"]).contains(why), "{}", pretty(&r.1));
    }
    assert!(
        read_all(&uri, &back) == want,
        "still open after refused closes"
    );

    // Close keeping the result: a standalone qcow2 of point + writes.
    let kept = tmp.path().join("kept.qcow2");
    let out = cli(&[
        "restores",
        "close",
        &rid,
        "--keep-as",
        kept.to_str().unwrap(),
        "--server",
        &d.api,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("kept as"),
        "{}",
        text(&out.stdout)
    );
    compare("kept image", &kept, &expected);
    check("kept image", &kept);
    assert_chain("kept image", &kept, &[&kept]);
    assert!(
        walk(&data.join("instant")).is_empty(),
        "the overlay and its record are gone: {:?}",
        walk(&data.join("instant"))
    );
    compare("the point after close", &point, &src);

    // Another one, closed without keeping: discarded.
    let v = instant(&d);
    run_ok(cmd(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            s(&v["nbd_uri"]).as_str(),
        ],
    ));
    let r = d.delete(&format!("/api/v1/restores/{}", s(&v["restore_id"])));
    assert_eq!(r.0, 200, "{}", pretty(&r.1));
    assert!(walk(&data.join("instant")).is_empty());
    compare("the point after a discarded restore", &point, &src);
    // keep_as on a read-only restore is refused.
    let ro = d.post_ok(
        "/api/v1/restores",
        &json!({ "backup_id": id, "disk_id": 0 }),
    );
    let r = d
        .try_delete(&format!(
            "/api/v1/restores/{}?keep_as=/tmp/x.qcow2",
            s(&ro["restore_id"])
        ))
        .unwrap();
    assert_error("keep_as of a read-only restore", &r, 400);
    d.delete(&format!("/api/v1/restores/{}", s(&ro["restore_id"])));
    // Nothing holds the point now: it can go.
    let r = d.delete(&format!("/api/v1/backups/{id}"));
    assert_eq!(r.0, 200, "{}", pretty(&r.1));
    std::thread::sleep(Duration::from_millis(50));
    verify_server_empty_ok(&d);
}

/// With every point gone, verify has nothing to check but must find no problem.
fn verify_server_empty_ok(d: &Daemon) {
    let out = cli(&["chain", "verify", "--server", &d.api, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["problems"].as_array().unwrap().is_empty(),
        "{}",
        pretty(&v)
    );
}
