//! End-to-end: bad requests against the real daemon. Each gets the documented
//! 4xx with a JSON body carrying an `error` string, and none changes the
//! catalog: the backup list, the change_ids and the chains are compared before
//! and after every request.
//!
//! MISSION.md: "Requests that name an unknown job or disk get a clear 404 with a
//! JSON error body"; change_id is required; "Bad input gets a clear error ... a
//! 4xx with a JSON body ... never loses stored data".

mod common;

use common::*;

const VM: &str = "bad1";
const SIZE: u64 = 8 * MIB;

/// Everything the catalog answers about VM, for before/after comparisons.
fn catalog_snapshot(d: &Daemon) -> Value {
    json!({
        "list": d.get_ok("/api/v1/backups"),
        "changeid0": d.changeid(VM, 0),
        "changeid1": d.changeid(VM, 1),
        "chain0": d.chain(VM, 0),
        "chain1": d.chain(VM, 1),
    })
}

struct Ctx<'a> {
    d: &'a Daemon,
    before: Value,
}

impl Ctx<'_> {
    /// The request got `want` (one of `want`) with a JSON error, and the catalog did not change.
    fn bad(&self, what: &str, r: Reply, want: &[u16]) {
        assert!(
            want.contains(&r.0),
            "{what}: got HTTP {} want {want:?}; body: {}\n--- daemon stderr ---\n{}",
            r.0,
            pretty(&r.1),
            self.d.log_tail()
        );
        assert_error_body(what, &r);
        self.unchanged(what);
    }

    fn unchanged(&self, what: &str) {
        let after = catalog_snapshot(self.d);
        if after != self.before {
            panic!(
                "{what}: the catalog changed after a rejected request\nbefore: {}\nafter: {}",
                pretty(&self.before),
                pretty(&after)
            );
        }
    }
}

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src0 = tmp.path().join("d0.raw");
    let src1 = tmp.path().join("d1.raw");
    make_disk(&src0, SIZE, 7);
    make_disk(&src1, SIZE, 8);
    let d = Daemon::start(&data);

    // A completed full of a 2-disk VM.
    let r = d.start_backup(&start_body(
        VM,
        "full",
        Some(json!([disk_spec(0, SIZE), disk_spec(1, SIZE)])),
    ));
    let b0 = s(&r["backup_id"]);
    nbdcopy(&src0, &s(&disk_of(&r, 0)["nbd_uri"]));
    nbdcopy(&src1, &s(&disk_of(&r, 1)["nbd_uri"]));
    let cid0 = vmware_cid(0, 0, 10);
    let cid1 = vmware_cid(1, 0, 20);
    let first_completion = d.complete(&b0, 0, &cid0, SIZE);
    d.complete(&b0, 1, &cid1, SIZE);

    // A running incremental (nothing written yet).
    let r = d.start_backup(&start_body(VM, "incremental", None));
    let b1 = s(&r["backup_id"]);
    let b1_uri0 = s(&disk_of(&r, 0)["nbd_uri"]);
    assert_eq!(d.backup(&b1)["status"], "running");

    let c = Ctx {
        d: &d,
        before: catalog_snapshot(&d),
    };
    assert_eq!(c.before["changeid0"]["change_id"], cid0.as_str());
    assert_eq!(c.before["changeid1"]["change_id"], cid1.as_str());

    // ---- Missing or invalid query parameters -> 400 ---------------------------------
    for path in [
        "/api/v1/backups/changeid?disk_id=0".to_string(),
        format!("/api/v1/backups/changeid?vm_name={VM}"),
        format!("/api/v1/backups/changeid?vm_name={VM}&disk_id=abc"),
        format!("/api/v1/backups/changeid?vm_name={VM}&disk_id=-1"),
        format!("/api/v1/backups/changeid?vm_name={VM}&disk_id=1.5"),
        format!("/api/v1/backups/changeid?vm_name={VM}&disk_id=99999999999999999999"),
        "/api/v1/backups/changeid?vm_name=&disk_id=0".to_string(),
        "/api/v1/backups?status=bogus".to_string(),
        format!("/api/v1/backups/chain?vm_name={VM}&disk_id=abc"),
        format!("/api/v1/backups/chain?vm_name={VM}"),
    ] {
        c.bad(&format!("GET {path}"), d.get(&path), &[400]);
    }

    // ---- Unknown backup / disk -> 404 ---------------------------------------------
    let unknown = "00000000-0000-0000-0000-000000000000";
    let cbody = json!({"change_id": "52 00-00/1", "disk_id": 0, "bytes_transferred": 1});
    c.bad(
        "complete an unknown backup",
        d.post(&format!("/api/v1/backups/{unknown}/complete"), &cbody),
        &[404],
    );
    c.bad(
        "complete an unknown backup id with odd characters",
        d.post("/api/v1/backups/no-such%20job/complete", &cbody),
        &[404],
    );
    c.bad(
        "complete an unknown disk_id of a running backup",
        d.post(
            &format!("/api/v1/backups/{b1}/complete"),
            &json!({"change_id": "52 00-00/1", "disk_id": 7}),
        ),
        &[404],
    );
    c.bad(
        "complete an unknown disk_id of a completed backup",
        d.post(
            &format!("/api/v1/backups/{b0}/complete"),
            &json!({"change_id": cid0, "disk_id": 7}),
        ),
        &[404],
    );
    c.bad(
        "GET unknown backup",
        d.get(&format!("/api/v1/backups/{unknown}")),
        &[404],
    );
    c.bad(
        "DELETE unknown backup",
        d.delete(&format!("/api/v1/backups/{unknown}")),
        &[404],
    );
    c.bad(
        "fail unknown backup",
        d.post(
            &format!("/api/v1/backups/{unknown}/fail"),
            &json!({"reason": "x"}),
        ),
        &[404],
    );
    c.bad(
        "restore unknown backup",
        d.post(
            "/api/v1/restores",
            &json!({"backup_id": unknown, "disk_id": 0}),
        ),
        &[404],
    );
    c.bad(
        "restore unknown disk",
        d.post("/api/v1/restores", &json!({"backup_id": b0, "disk_id": 7})),
        &[404],
    );
    c.bad(
        "DELETE unknown restore",
        d.delete(&format!("/api/v1/restores/{unknown}")),
        &[404],
    );
    // Chain of an unknown VM: a 404 with a JSON error, or (documented either
    // way) a 200 empty chain; both with a JSON body.
    let r = d.get("/api/v1/backups/chain?vm_name=nosuchvm&disk_id=0");
    match r.0 {
        404 => assert_error_body("chain of an unknown VM", &r),
        200 => {
            assert!(
                r.1["head"].is_null(),
                "chain of an unknown VM has a head: {}",
                pretty(&r.1)
            );
            assert_eq!(
                r.1["points"].as_array().map(|a| a.len()),
                Some(0),
                "chain of an unknown VM: {}",
                pretty(&r.1)
            );
        }
        other => panic!("chain of an unknown VM: HTTP {other} {}", pretty(&r.1)),
    }
    c.unchanged("chain of an unknown VM");
    // A disk the VM does not have.
    let r = d.get(&format!("/api/v1/backups/chain?vm_name={VM}&disk_id=7"));
    match r.0 {
        404 => assert_error_body("chain of an unknown disk", &r),
        200 => assert_eq!(
            r.1["points"].as_array().map(|a| a.len()),
            Some(0),
            "chain of an unknown disk: {}",
            pretty(&r.1)
        ),
        other => panic!("chain of an unknown disk: HTTP {other} {}", pretty(&r.1)),
    }
    c.unchanged("chain of an unknown disk");

    // ---- Duplicate and conflicting completions -------------------------------------
    let r = d.post(
        &format!("/api/v1/backups/{b0}/complete"),
        &json!({"change_id": cid0, "disk_id": 0, "bytes_transferred": SIZE}),
    );
    assert_eq!(
        r.0,
        200,
        "repeating the same completion must answer 200 again: {}",
        pretty(&r.1)
    );
    // Same body, except `message` (it may say it was already completed) and
    // `backup_status` (the whole backup has completed since).
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("message");
            o.remove("backup_status");
        }
        v
    };
    assert_eq!(
        strip(&r.1),
        strip(&first_completion),
        "a repeated completion must answer as the first one did (timestamp of the first completion included)"
    );
    assert_eq!(
        r.1["backup_status"],
        "completed",
        "backup_status now: {}",
        pretty(&r.1)
    );
    c.unchanged("repeated completion");
    c.bad(
        "complete again with a different change_id",
        d.post(
            &format!("/api/v1/backups/{b0}/complete"),
            &json!({"change_id": vmware_cid(0, 0, 11), "disk_id": 0}),
        ),
        &[409],
    );

    // ---- Completion without a change_id -> 400 (on the running backup) ------------
    for body in [
        json!({"disk_id": 0, "bytes_transferred": 5}),
        json!({"disk_id": 0, "change_id": ""}),
        json!({"disk_id": 0, "change_id": null}),
    ] {
        c.bad(
            &format!("complete {b1} with {body}"),
            d.post(&format!("/api/v1/backups/{b1}/complete"), &body),
            &[400],
        );
    }

    // ---- A second concurrent backup of the same VM -> 409 --------------------------
    for ty in ["full", "incremental"] {
        c.bad(
            &format!("second concurrent {ty} backup of {VM}"),
            d.post("/api/v1/backups", &start_body(VM, ty, None)),
            &[409],
        );
    }
    c.bad(
        &format!("second concurrent backup of {VM} with disks"),
        d.post(
            "/api/v1/backups",
            &start_body(
                VM,
                "full",
                Some(json!([disk_spec(0, SIZE), disk_spec(1, SIZE)])),
            ),
        ),
        &[409],
    );

    // ---- Malformed JSON and wrong types -> 400 -------------------------------------
    for body in [
        "{",
        "not json",
        "",
        "[]",
        "null",
        r#"{"vm_name": "x", "backup_type": "full", "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]"#,
        r#"{"vm_name": 42, "backup_type": "full", "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "disks": "all"}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "disks": [{"disk_id": "zero", "capacity_bytes": 1048576}]}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "disks": [{"disk_id": -1, "capacity_bytes": 1048576}]}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "disks": [{"disk_id": 0, "capacity_bytes": -5}]}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "disks": [{"disk_id": 0, "capacity_bytes": "1G"}]}"#,
        r#"{"vm_name": "newvm", "backup_type": "full", "tags": "a,b", "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]}"#,
        r#"{"vm_name": "newvm", "backup_type": true, "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]}"#,
        r#"{"vm_name": "newvm", "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]}"#,
        r#"{"backup_type": "full", "disks": [{"disk_id": 0, "capacity_bytes": 1048576}]}"#,
    ] {
        c.bad(
            &format!("POST /api/v1/backups {body:?}"),
            d.post_raw("/api/v1/backups", body),
            &[400],
        );
    }
    for body in [
        "{",
        "",
        r#"{"change_id": 5490, "disk_id": 0}"#,
        r#"{"change_id": "52 00-00/1", "disk_id": "0"}"#,
        r#"{"change_id": "52 00-00/1", "disk_id": -1}"#,
        r#"{"change_id": "52 00-00/1", "disk_id": 0, "bytes_transferred": "lots"}"#,
        r#"{"change_id": ["52"], "disk_id": 0}"#,
    ] {
        c.bad(
            &format!("POST complete {body:?}"),
            d.post_raw(&format!("/api/v1/backups/{b1}/complete"), body),
            &[400],
        );
    }
    for body in [
        "{",
        r#"{"backup_id": 5, "disk_id": 0}"#,
        r#"{"disk_id": 0}"#,
    ] {
        c.bad(
            &format!("POST /api/v1/restores {body:?}"),
            d.post_raw("/api/v1/restores", body),
            &[400],
        );
    }

    // ---- Semantically bad start requests -> 400 ------------------------------------
    c.bad(
        "unknown VM without disks",
        d.post("/api/v1/backups", &start_body("newvm", "full", None)),
        &[400],
    );
    c.bad(
        "unknown VM with an empty disk list",
        d.post(
            "/api/v1/backups",
            &start_body("newvm", "full", Some(json!([]))),
        ),
        &[400],
    );
    c.bad(
        "backup_type weird",
        d.post(
            "/api/v1/backups",
            &start_body("newvm", "weird", Some(json!([disk_spec(0, MIB)]))),
        ),
        &[400],
    );
    c.bad(
        "per-disk mode weird",
        d.post(
            "/api/v1/backups",
            &start_body(
                "newvm",
                "full",
                Some(json!([{"disk_id": 0, "capacity_bytes": MIB, "mode": "weird"}])),
            ),
        ),
        &[400],
    );
    c.bad(
        "unknown VM, disk without capacity_bytes",
        d.post(
            "/api/v1/backups",
            &start_body(
                "newvm",
                "full",
                Some(json!([{"disk_id": 0, "disk_key": "disk-2000"}])),
            ),
        ),
        &[400],
    );
    c.bad(
        "capacity_bytes 0",
        d.post(
            "/api/v1/backups",
            &start_body("newvm", "full", Some(json!([disk_spec(0, 0)]))),
        ),
        &[400],
    );
    c.bad(
        "the same disk_id twice",
        d.post(
            "/api/v1/backups",
            &start_body(
                "newvm",
                "full",
                Some(json!([disk_spec(0, MIB), disk_spec(0, MIB)])),
            ),
        ),
        &[400],
    );
    c.bad(
        "empty vm_name",
        d.post(
            "/api/v1/backups",
            &start_body("", "full", Some(json!([disk_spec(0, MIB)]))),
        ),
        &[400],
    );

    // A VM name that looks like a path: refused, or accepted with every image
    // inside the data directory.
    let r = d.post(
        "/api/v1/backups",
        &start_body("../../escape", "full", Some(json!([disk_spec(0, MIB)]))),
    );
    match r.0 {
        400 => {
            assert_error_body("vm_name ../../escape", &r);
            c.unchanged("vm_name ../../escape");
        }
        200 => {
            let id = s(&r.1["backup_id"]);
            let v = d.backup(&id);
            for x in v["disks"].as_array().unwrap() {
                let rel = s(&x["image"]);
                let p = abs_image(&d.data, &rel);
                let canon_parent = std::fs::canonicalize(p.parent().unwrap()).unwrap();
                assert!(
                    canon_parent.starts_with(std::fs::canonicalize(&d.data).unwrap()),
                    "vm_name ../../escape put an image outside the data dir: {rel}"
                );
            }
            d.post_ok(
                &format!("/api/v1/backups/{id}/fail"),
                &json!({"reason": "test"}),
            );
        }
        other => panic!("vm_name ../../escape: HTTP {other} {}", pretty(&r.1)),
    }
    assert!(
        !tmp.path().join("escape").exists()
            && !tmp.path().parent().unwrap().join("escape").exists(),
        "vm_name ../../escape created something outside the data dir"
    );

    // ---- After all that, the running backup still works ---------------------------
    assert_eq!(
        nbd_size(&b1_uri0),
        Ok(SIZE),
        "the running backup's export must survive the rejected requests"
    );
    let v = d.backup(&b1);
    assert_eq!(v["status"], "running", "{}", pretty(&v));
    let r = d.post_ok(
        &format!("/api/v1/backups/{b1}/fail"),
        &json!({"reason": "test over"}),
    );
    assert_eq!(r["status"], "failed", "{}", pretty(&r));
    assert_eq!(d.change_id(VM, 0), cid0);
    assert_eq!(d.change_id(VM, 1), cid1);
    // Completing a failed backup is refused, and failing it again is harmless.
    let r = d.post(
        &format!("/api/v1/backups/{b1}/complete"),
        &json!({"change_id": "52 00-00/9", "disk_id": 0}),
    );
    assert_error("complete a failed backup", &r, 409);
    assert_eq!(
        d.change_id(VM, 0),
        cid0,
        "completing a failed backup must not record its change_id"
    );
    // With b1 failed, a new backup of the VM is accepted again.
    let r = d.start_backup(&start_body(VM, "incremental", None));
    let b2 = s(&r["backup_id"]);
    assert_eq!(disk_of(&r, 0)["previous_change_id"], cid0.as_str());
    d.post_ok(
        &format!("/api/v1/backups/{b2}/fail"),
        &json!({"reason": "test over"}),
    );
    d.stop();
}
