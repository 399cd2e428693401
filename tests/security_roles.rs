//! Tokens with roles (docs/api.md, "Tokens and roles"): the roles table of
//! docs/api.md is read and every route is called with a token of each role
//! and with an admin token limited to another VM, checking the documented
//! status; a VM-limited backup token backs up its own VM and not another;
//! tokens are made, listed and revoked with the CLI, secrets never logged.

mod client_common;
mod common;

use std::path::Path;

use client_common::*;
use common::*;

/// `--json` output of a `chainvault` command that must succeed.
fn cv_json(args: &[&str]) -> Value {
    let out = run_ok(cmd(BIN, args));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("chainvault {args:?}: not JSON ({e}): {}", text(&out.stdout)))
}

/// One HTTP call with an optional bearer token.
fn call(d: &Daemon, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
    let agent = ureq::AgentBuilder::new().build();
    let mut req = agent.request(method, &d.url(path));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: no answer: {e}\n{}", d.log_tail()),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "__text": text }));
    (status, v)
}

/// One row of the roles table.
struct Row {
    method: String,
    path: String,
    /// admin, backup, restore, audit, limited to another VM.
    cells: [String; 5],
}

/// The roles table of docs/api.md, between its markers.
fn roles_table() -> Vec<Row> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/api.md"))
        .expect("read docs/api.md");
    let start = doc
        .find("<!-- roles-table -->")
        .expect("docs/api.md has no <!-- roles-table --> marker");
    let end = doc
        .find("<!-- /roles-table -->")
        .expect("docs/api.md has no <!-- /roles-table --> marker");
    let mut rows = Vec::new();
    for line in doc[start..end].lines().skip(3) {
        let c: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|x| x.trim().to_string())
            .collect();
        if c.len() != 7 {
            continue;
        }
        rows.push(Row {
            method: c[0].clone(),
            path: c[1].clone(),
            cells: [
                c[2].clone(),
                c[3].clone(),
                c[4].clone(),
                c[5].clone(),
                c[6].clone(),
            ],
        });
    }
    rows
}

/// The things of VM `vma` the walk points at.
struct Fixture {
    backup: String,
    restore: String,
}

/// The request for one route: (path, body) for a caller the table allows
/// (side-effect free: a bad body or an id that does not exist), and for the
/// token limited to another VM (naming vma's real things, so that only the
/// VM limit can make it 404).
fn requests(
    method: &str,
    path: &str,
    f: &Fixture,
) -> ((String, Option<Value>), (String, Option<Value>)) {
    let b = &f.backup;
    let none = "20000101T000000.000Z-00000000";
    let same = |p: String, body: Option<Value>| ((p.clone(), body.clone()), (p, body));
    match (method, path) {
        ("POST", "/api/v1/backups") => (
            ("/api/v1/backups".into(), Some(json!({ "vm_name": "vma" }))),
            (
                "/api/v1/backups".into(),
                Some(json!({ "vm_name": "vma", "backup_type": "full" })),
            ),
        ),
        ("GET", "/api/v1/backups") => same("/api/v1/backups".into(), None),
        ("GET", "/api/v1/backups/changeid") => same(
            "/api/v1/backups/changeid?vm_name=vma&disk_id=0".into(),
            None,
        ),
        ("GET", "/api/v1/backups/chain") => {
            same("/api/v1/backups/chain?vm_name=vma&disk_id=0".into(), None)
        }
        ("GET", "/api/v1/backups/{backup_id}") => same(format!("/api/v1/backups/{b}"), None),
        ("PATCH", "/api/v1/backups/{backup_id}") => (
            (
                format!("/api/v1/backups/{b}"),
                Some(json!({ "protected": "not a boolean" })),
            ),
            (
                format!("/api/v1/backups/{b}"),
                Some(json!({ "note": "changed by a token that must not see vma" })),
            ),
        ),
        ("DELETE", "/api/v1/backups/{backup_id}") => (
            (format!("/api/v1/backups/{none}"), None),
            (format!("/api/v1/backups/{b}"), None),
        ),
        ("POST", "/api/v1/backups/{backup_id}/complete") => (
            (format!("/api/v1/backups/{b}/complete"), Some(json!({}))),
            (
                format!("/api/v1/backups/{b}/complete"),
                Some(json!({ "change_id": "c", "disk_id": 0 })),
            ),
        ),
        ("POST", "/api/v1/backups/{backup_id}/fail") => (
            (format!("/api/v1/backups/{none}/fail"), Some(json!({}))),
            (format!("/api/v1/backups/{b}/fail"), Some(json!({}))),
        ),
        ("GET", "/api/v1/backups/{backup_id}/disks/{disk_id}/digests") => {
            same(format!("/api/v1/backups/{b}/disks/0/digests"), None)
        }
        ("PUT", "/api/v1/backups/{backup_id}/disks/{disk_id}/source-digests") => same(
            format!("/api/v1/backups/{b}/disks/0/source-digests"),
            Some(json!("not a digest file")),
        ),
        ("POST", "/api/v1/restores") => (
            (
                "/api/v1/restores".into(),
                Some(json!({ "backup_id": none, "disk_id": 0 })),
            ),
            (
                "/api/v1/restores".into(),
                Some(json!({ "backup_id": b, "disk_id": 0 })),
            ),
        ),
        ("GET", "/api/v1/restores") => same("/api/v1/restores".into(), None),
        ("DELETE", "/api/v1/restores/{restore_id}") => (
            ("/api/v1/restores/r-0000000000000000".into(), None),
            (format!("/api/v1/restores/{}", f.restore), None),
        ),
        ("GET", "/api/v1/policies") => same("/api/v1/policies".into(), None),
        ("GET", "/api/v1/policies/default") => same("/api/v1/policies/default".into(), None),
        ("PUT", "/api/v1/policies/default") => same(
            "/api/v1/policies/default".into(),
            Some(json!({ "keep_last": "many" })),
        ),
        ("DELETE", "/api/v1/policies/default") => same("/api/v1/policies/default".into(), None),
        ("GET", "/api/v1/policies/vms/{vm_name}") => same("/api/v1/policies/vms/vma".into(), None),
        ("PUT", "/api/v1/policies/vms/{vm_name}") => (
            (
                "/api/v1/policies/vms/vma".into(),
                Some(json!({ "keep_last": "many" })),
            ),
            (
                "/api/v1/policies/vms/vma".into(),
                Some(json!({ "keep_last": 1 })),
            ),
        ),
        ("DELETE", "/api/v1/policies/vms/{vm_name}") => (
            ("/api/v1/policies/vms/nosuchvm".into(), None),
            ("/api/v1/policies/vms/vma".into(), None),
        ),
        ("POST", "/api/v1/prune") => (
            (
                "/api/v1/prune".into(),
                Some(json!({ "vm_name": "nosuchvm", "dry_run": true })),
            ),
            (
                "/api/v1/prune".into(),
                Some(json!({ "vm_name": "vma", "dry_run": true })),
            ),
        ),
        ("POST", "/api/v1/imports") => (
            ("/api/v1/imports".into(), Some(json!({}))),
            (
                "/api/v1/imports".into(),
                Some(json!({ "vm_name": "vma", "disk_id": 0, "images": [] })),
            ),
        ),
        ("POST", "/api/v1/gc") => same("/api/v1/gc".into(), Some(json!({ "dry_run": true }))),
        ("GET", "/api/v1/usage") => same("/api/v1/usage?vm_name=vma".into(), None),
        ("GET", "/api/v1/verify") => same("/api/v1/verify?vm_name=vma".into(), None),
        ("POST", "/api/v1/verify/deep") => (
            (
                "/api/v1/verify/deep".into(),
                Some(json!({ "vm_name": "nosuchvm" })),
            ),
            (
                "/api/v1/verify/deep".into(),
                Some(json!({ "vm_name": "vma" })),
            ),
        ),
        ("GET", "/api/v1/tokens") => same("/api/v1/tokens".into(), None),
        ("POST", "/api/v1/tokens") => same(
            "/api/v1/tokens".into(),
            Some(json!({ "name": "", "role": "admin" })),
        ),
        ("DELETE", "/api/v1/tokens/{name}") => same("/api/v1/tokens/nosuchtoken".into(), None),
        ("GET", "/api/v1/openapi.json") => same("/api/v1/openapi.json".into(), None),
        ("GET", "/healthz") => same("/healthz".into(), None),
        ("GET", "/metrics") => same("/metrics".into(), None),
        _ => panic!("the test has no request for {method} {path}: add one"),
    }
}

/// Whether list `v` (a backups, restores or policies answer) names vma.
fn mentions_vma(v: &Value) -> bool {
    v.to_string().contains("\"vma\"")
}

#[test]
fn every_route_answers_each_role_as_documented() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("repo"));
    let disk = tmp.path().join("a.qcow2");
    make_vm_disk(&disk, 16 * MIB, 4, 1);
    let r = backup(&d, "vma", &[p(&disk)], &[]).ok("backup of vma");
    let backup_id = s(&r.json["backup_id"]);
    // A VM policy, so that the policy list has a vma entry to filter.
    let (st, _) = call(
        &d,
        "PUT",
        "/api/v1/policies/vms/vma",
        None,
        Some(&json!({ "keep_last": 7 })),
    );
    assert_eq!(st, 200);

    // The first token is made while the API is open; with it, the rest.
    let api = d.api.clone();
    let admin = cv_json(&[
        "token", "create", "--name", "root", "--role", "admin", "--json", "--server", &api,
    ]);
    assert_eq!(s(&admin["role"]), "admin");
    let admin_secret = s(&admin["token"]);
    assert!(admin_secret.starts_with("cvt_"), "{admin}");
    let make = |name: &str, role: &str, vms: &[&str]| -> String {
        let mut args = vec![
            "token",
            "create",
            "--name",
            name,
            "--role",
            role,
            "--json",
            "--server",
            &api,
            "--token",
            &admin_secret,
        ];
        for v in vms {
            args.push("--vm");
            args.push(v);
        }
        s(&cv_json(&args)["token"])
    };
    let secrets = [
        admin_secret.clone(),
        make("bk", "backup", &[]),
        make("rs", "restore", &[]),
        make("au", "audit", &[]),
        make("elsewhere", "admin", &["other-*", "vmz"]),
    ];
    let names = [
        "admin",
        "backup",
        "restore",
        "audit",
        "limited to another VM",
    ];

    // Without a token, with a bad one: 401 (healthz stays open).
    let (st, body) = call(&d, "GET", "/api/v1/backups", None, None);
    assert_eq!(st, 401, "{body}");
    assert!(s(&body["error"]).contains("Authorization"), "{body}");
    let (st, _) = call(&d, "GET", "/api/v1/backups", Some("cvt_nope"), None);
    assert_eq!(st, 401);
    assert_eq!(call(&d, "GET", "/healthz", None, None).0, 200);

    // A restore of vma, for the routes that name one.
    let (st, rv) = call(
        &d,
        "POST",
        "/api/v1/restores",
        Some(&admin_secret),
        Some(&json!({ "backup_id": backup_id, "disk_id": 0 })),
    );
    assert_eq!(st, 200, "{rv}");
    let f = Fixture {
        backup: backup_id.clone(),
        restore: s(&rv["restore_id"]),
    };

    let rows = roles_table();
    for (m, path) in chainvault::api::ROUTES {
        assert!(
            rows.iter()
                .any(|r| r.method.eq_ignore_ascii_case(m) && r.path == *path),
            "the roles table of docs/api.md has no row for {m} {path}"
        );
    }
    assert_eq!(
        rows.len(),
        chainvault::api::ROUTES.len(),
        "the roles table of docs/api.md has rows for routes that do not exist"
    );

    // Non-admin roles and the limited token first, admin last (its "yes"
    // requests are also side-effect free, but order makes a leak obvious).
    let mut checked = 0;
    for k in [1usize, 2, 3, 4, 0] {
        for row in &rows {
            let (allowed, scoped) = requests(&row.method, &row.path, &f);
            let want = row.cells[k].as_str();
            let (path, body) = if k == 4 && want == "404" {
                scoped
            } else {
                allowed
            };
            let (st, v) = call(&d, &row.method, &path, Some(&secrets[k]), body.as_ref());
            let what = format!("{} {} as {} (table: {want})", row.method, path, names[k]);
            match want {
                "yes" => assert!(st != 401 && st != 403, "{what}: refused with {st}: {v}"),
                "filtered" => {
                    assert_eq!(st, 200, "{what}: {v}");
                    assert!(!mentions_vma(&v), "{what}: the answer shows vma: {v}");
                }
                "403" | "404" => {
                    assert_eq!(st.to_string(), want, "{what}: {v}");
                    assert!(
                        v["error"].is_string(),
                        "{what}: the error body is not JSON: {v}"
                    );
                }
                other => panic!(
                    "the roles table has a cell {other:?} for {} {}",
                    row.method, row.path
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, rows.len() * 5);
    eprintln!("{checked} route × token calls answered as docs/api.md says");

    // The limited token's 404s changed nothing of vma's.
    let (st, b) = call(
        &d,
        "GET",
        &format!("/api/v1/backups/{backup_id}"),
        Some(&admin_secret),
        None,
    );
    assert_eq!(st, 200, "vma's backup must still be there: {b}");
    assert_eq!(s(&b["status"]), "completed", "{b}");
    assert!(b["note"].is_null() || s(&b["note"]).is_empty(), "{b}");
    let (_, pol) = call(
        &d,
        "GET",
        "/api/v1/policies/vms/vma",
        Some(&admin_secret),
        None,
    );
    assert_eq!(pol["policy"]["keep_last"], json!(7), "{pol}");
    let (_, rl) = call(&d, "GET", "/api/v1/restores", Some(&admin_secret), None);
    assert!(
        rl.to_string().contains(&f.restore),
        "the restore must still be open: {rl}"
    );
    // Lists the admin sees do show vma (so "filtered" above meant something).
    assert!(mentions_vma(
        &call(&d, "GET", "/api/v1/backups", Some(&admin_secret), None).1
    ));

    // A restore token may not open a writable restore, nor keep_as.
    let (st, v) = call(
        &d,
        "POST",
        "/api/v1/restores",
        Some(&secrets[2]),
        Some(&json!({ "backup_id": backup_id, "disk_id": 0, "writable": true })),
    );
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(
        &d,
        "DELETE",
        &format!("/api/v1/restores/{}?keep_as=/tmp/x.qcow2", f.restore),
        Some(&secrets[2]),
        None,
    );
    assert_eq!(st, 403, "{v}");

    // Secrets never reach the log; refusals name the token.
    let log = std::fs::read_to_string(&d.log).unwrap();
    for sct in &secrets {
        assert!(
            !log.contains(sct.as_str()),
            "a token's secret is in the daemon's log"
        );
    }
    assert!(
        log.contains("token=elsewhere"),
        "refusals must name the token"
    );
    assert!(log.contains("token=au"), "refusals must name the token");
}

#[test]
fn a_vm_limited_backup_token_backs_up_its_vm_only_and_revoked_tokens_stop() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("repo");
    // Tokens made on a stopped daemon's repository (--data).
    Daemon::start(&data).stop();
    let data_s = p(&data);
    let t = cv_json(&[
        "token", "create", "--name", "web", "--role", "backup", "--vm", "web-*", "--json",
        "--data", &data_s,
    ]);
    let web = s(&t["token"]);
    let admin = s(&cv_json(&[
        "token", "create", "--name", "ops", "--role", "admin", "--json", "--data", &data_s,
    ])["token"]);
    let listed = cv_json(&["token", "list", "--json", "--data", &data_s]);
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 2, "{listed}");
    assert!(
        !listed.to_string().contains(&web),
        "token list shows a secret: {listed}"
    );

    let d = Daemon::start(&data);
    let disk = tmp.path().join("w.qcow2");
    make_vm_disk(&disk, 16 * MIB, 4, 2);
    // Its own VM: two backups, the second incremental on the first.
    let r = backup(&d, "web-01", &[p(&disk)], &["--token", &web]).ok("web-01 full");
    assert_eq!(s(&r.disk(0)["mode"]), "full");
    let r = backup(&d, "web-01", &[p(&disk)], &["--token", &web]).ok("web-01 again");
    assert_eq!(r.code, 0);
    // Another VM: refused, and nothing of it is made.
    let r = backup(&d, "db-01", &[p(&disk)], &["--token", &web]);
    assert_ne!(
        r.code, 0,
        "a token limited to web-* backed up db-01: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("404") || r.stderr.contains("not found"),
        "{}",
        r.stderr
    );
    let (_, all) = call(&d, "GET", "/api/v1/backups", Some(&admin), None);
    assert!(!all.to_string().contains("db-01"), "{all}");
    assert_eq!(all["count"], json!(2), "{all}");

    // Revoked over the API: the next request is 401.
    run_ok(cmd(
        BIN,
        &[
            "token", "revoke", "web", "--server", &d.api, "--token", &admin,
        ],
    ));
    let (st, v) = call(&d, "GET", "/api/v1/backups", Some(&web), None);
    assert_eq!(st, 401, "{v}");
    assert!(s(&v["error"]).contains("revoked"), "{v}");
    // Only admins manage tokens; a bad role is a clear CLI error.
    let out = run(cmd(
        BIN,
        &[
            "token", "create", "--name", "x", "--role", "root", "--server", &d.api, "--token",
            &admin,
        ],
    ));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("admin, backup, restore, audit")
            || text(&out.stderr).contains("possible values"),
        "{}",
        text(&out.stderr)
    );
}
