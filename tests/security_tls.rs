//! TLS end to end: `chainvault serve --tls-cert --tls-key [--tls-ca]` with
//! the real peers on the other side.
//!
//! * libnbd (`nbdcopy`, `nbdinfo`) over `nbds://…?tls-certificates=DIR`
//!   writes a 1 GiB disk into a backup export and reads a restore export;
//!   `qemu-img compare` finds the point identical to the source.
//! * QEMU (`qemu-img convert` with `--object tls-creds-x509`) writes a
//!   backup export and reads a restore export.
//! * A TLS-required server answers a plaintext client with
//!   `NBD_REP_ERR_TLS_REQD`, and a plain-HTTP request gets no answer.
//! * With `--tls-ca` (mutual TLS) a client with a certificate of another
//!   CA, or with none, is refused on NBD and HTTPS; the reference client
//!   (`chainvault backup`) and the mount work with the right certificate.
//!
//! Certificates come from scripts/make-test-certs.sh (openssl).

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn make_certs(dir: &Path) -> PathBuf {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "`openssl` is missing: install the Debian package openssl (scripts/install-test-deps.sh does)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-certs.sh");
    run_ok(cmd("bash", &[script.as_os_str(), dir.as_os_str()]));
    dir.to_path_buf()
}

/// libnbd's form of an `nbds://` URI: the certificate directory as a query
/// parameter (`?tls-certificates=DIR`).
fn libnbd_uri(uri: &str, certs: &Path) -> String {
    assert!(uri.starts_with("nbds://"), "not a TLS URI: {uri}");
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}tls-certificates={}", certs.display())
}

/// `host`, `port` and `export` of an `nbds://HOST:PORT/EXPORT` URI.
fn parts(uri: &str) -> (String, String, String) {
    let rest = uri.strip_prefix("nbds://").expect("an nbds:// URI");
    let (auth, export) = rest.split_once('/').expect("URI with an export");
    let (host, port) = auth.rsplit_once(':').expect("URI with a port");
    (host.to_string(), port.to_string(), export.to_string())
}

/// qemu's options for a TLS NBD client: the object and the image options.
fn qemu_tls(uri: &str, certs: &Path) -> (String, String) {
    let (host, port, export) = parts(uri);
    (
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ),
        format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
    )
}

fn plain_uri(uri: &str) -> String {
    uri.replacen("nbds://", "nbd://", 1)
}

fn open_restore(d: &Daemon, backup_id: &str) -> Value {
    let r = d.post_ok(
        "/api/v1/restores",
        &json!({"backup_id": backup_id, "disk_id": 0}),
    );
    assert!(
        s(&r["nbd_uri"]).starts_with("nbds://"),
        "a restore export of a TLS daemon must be nbds://: {}",
        pretty(&r)
    );
    r
}

#[test]
fn nbd_tls_and_https_with_libnbd_and_qemu() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let certs = make_certs(&t.join("pki"));
    let cert = certs.join("server-cert.pem");
    let key = certs.join("server-key.pem");
    let d = Daemon::start_with(
        &t.join("data"),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(d.api.starts_with("https://"), "ready line api: {}", d.api);
    assert!(d.nbd.starts_with("nbds://"), "ready line nbd: {}", d.nbd);

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = d.api.replacen("https://", "http://", 1) + "/healthz";
    let r = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .get(&plain)
        .call();
    assert!(r.is_err(), "plain HTTP to the HTTPS listener was answered");
    assert_eq!(d.get_ok("/healthz")["status"], "ok");

    // 1 GiB through libnbd over TLS.
    let src = t.join("big.raw");
    make_disk(&src, 1 << 30, 41);
    let r = d.start_backup(&start_body(
        "tls-big",
        "full",
        Some(json!([disk_spec(0, 1 << 30)])),
    ));
    let id = s(&r["backup_id"]);
    let target = s(&disk_of(&r, 0)["nbd_uri"]);
    assert!(
        target.starts_with("nbds://"),
        "start response: {}",
        pretty(&r)
    );

    // A plaintext client is refused with the protocol's error.
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let uri: chainvault_nbd::NbdUri = plain_uri(&target).parse().unwrap();
        chainvault_nbd::Client::connect_uri(&uri, chainvault_nbd::ConnectOptions::default()).await
    });
    match refused {
        Err(chainvault_nbd::ClientError::OptionRefused { reply, .. }) => assert_eq!(
            reply,
            chainvault_nbd::proto::rep::ERR_TLS_REQD,
            "plaintext option refused with the wrong reply"
        ),
        other => panic!("a plaintext client was not refused with NBD_REP_ERR_TLS_REQD: {other:?}"),
    }
    let out = run(cmd("nbdinfo", &[plain_uri(&target)]));
    assert!(
        !out.status.success(),
        "nbdinfo in plain text was let in: {}",
        text(&out.stdout)
    );

    // NBD_OPT_LIST shows no backup export, even over TLS.
    let base = format!("{}/", d.nbd);
    let list = run_ok(cmd(
        "nbdinfo",
        &["--list", "--json", &libnbd_uri(&base, &certs)],
    ));
    let list: Value = serde_json::from_slice(&list.stdout).expect("nbdinfo --list --json");
    assert_eq!(
        list["exports"],
        json!([]),
        "NBD_OPT_LIST shows exports: {}",
        pretty(&list)
    );

    nbdcopy(&src, &libnbd_uri(&target, &certs));
    d.complete(&id, 0, "cid-tls-1", 1 << 30);
    compare("1 GiB over TLS", &d.image_of(&id, 0), &src);

    // Read it back: nbdinfo and nbdcopy on a restore export over TLS.
    let rv = open_restore(&d, &id);
    let ruri = s(&rv["nbd_uri"]);
    let info = run_ok(cmd("nbdinfo", &["--json", &libnbd_uri(&ruri, &certs)]));
    let info: Value = serde_json::from_slice(&info.stdout).expect("nbdinfo --json");
    assert_eq!(
        info["exports"][0]["export-size"],
        1u64 << 30,
        "{}",
        pretty(&info)
    );
    assert_eq!(
        info["TLS"],
        true,
        "nbdinfo says TLS is off: {}",
        pretty(&info)
    );
    let back = t.join("back.raw");
    run_ok(cmd(
        "nbdcopy",
        &[
            libnbd_uri(&ruri, &certs),
            back.to_str().unwrap().to_string(),
        ],
    ));
    assert_cmp("restore read with nbdcopy over TLS", &back, &src);
    std::fs::remove_file(&back).unwrap();

    // qemu-img reads the restore export with tls-creds-x509.
    let (object, opts) = qemu_tls(&ruri, &certs);
    let out_qcow = t.join("qemu-read.qcow2");
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "qcow2",
            out_qcow.to_str().unwrap(),
        ],
    ));
    compare(
        "qemu-img convert from a TLS restore export",
        &out_qcow,
        &src,
    );
    std::fs::remove_file(&out_qcow).unwrap();
    d.delete(&format!("/api/v1/restores/{}", s(&rv["restore_id"])));
    std::fs::remove_file(&src).unwrap();

    // qemu-img writes a backup export with tls-creds-x509.
    let small = t.join("small.raw");
    make_disk(&small, 64 * MIB, 42);
    let r = d.start_backup(&start_body(
        "tls-qemu",
        "full",
        Some(json!([disk_spec(0, 64 * MIB)])),
    ));
    let qid = s(&r["backup_id"]);
    let (object, opts) = qemu_tls(&s(&disk_of(&r, 0)["nbd_uri"]), &certs);
    run_ok(cmd(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            small.to_str().unwrap(),
            "--target-image-opts",
            &opts,
        ],
    ));
    d.complete(&qid, 0, "cid-tls-q", 64 * MIB);
    compare(
        "qemu-img convert into a TLS backup export",
        &d.image_of(&qid, 0),
        &small,
    );

    // A client that trusts another CA does not accept the server.
    let out = run(cmd(
        "nbdinfo",
        &[libnbd_uri(&format!("{}/x", d.nbd), &certs.join("other"))],
    ));
    assert!(!out.status.success(), "a client of another CA connected");
    d.stop();
}

#[test]
fn mutual_tls_refuses_other_clients_and_serves_the_reference_client() {
    tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let certs = make_certs(&t.join("pki"));
    let p = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let d = Daemon::start_with(
        &t.join("data"),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &p("server-cert.pem"),
            "--tls-key",
            &p("server-key.pem"),
            "--tls-ca",
            &p("ca-cert.pem"),
        ],
        &[],
    );
    // The harness presents the right client certificate.
    assert_eq!(d.get_ok("/healthz")["status"], "ok");

    // HTTPS without a client certificate, and with one of another CA.
    let agent = |identity: Option<(&str, &str)>| {
        let cfg = chainvault_nbd::tls::client_config(
            Some(&certs.join("ca-cert.pem")),
            identity
                .map(|(c, k)| (certs.join(c), certs.join(k)))
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap();
        ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(10))
            .tls_config(cfg)
            .build()
    };
    let url = d.url("/healthz");
    assert!(
        agent(None).get(&url).call().is_err(),
        "HTTPS without a client certificate was answered"
    );
    assert!(
        agent(Some(("other/client-cert.pem", "other/client-key.pem")))
            .get(&url)
            .call()
            .is_err(),
        "HTTPS with a client certificate of another CA was answered"
    );
    assert!(agent(Some(("client-cert.pem", "client-key.pem")))
        .get(&url)
        .call()
        .is_ok());

    // NBD: the same three clients on a backup export.
    let src = t.join("src.raw");
    make_disk(&src, 32 * MIB, 43);
    let r = d.start_backup(&start_body(
        "mtls",
        "full",
        Some(json!([disk_spec(0, 32 * MIB)])),
    ));
    let id = s(&r["backup_id"]);
    let target = s(&disk_of(&r, 0)["nbd_uri"]);
    let bad = t.join("bad-client");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), bad.join("ca-cert.pem")).unwrap();
    std::fs::copy(
        certs.join("other/client-cert.pem"),
        bad.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        certs.join("other/client-key.pem"),
        bad.join("client-key.pem"),
    )
    .unwrap();
    let anon = t.join("no-client-cert");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    for (what, dir) in [
        ("another CA's client certificate", &bad),
        ("no client certificate", &anon),
    ] {
        let out = run(cmd("nbdinfo", &[libnbd_uri(&target, dir)]));
        assert!(
            !out.status.success(),
            "NBD with {what} was let in: {}",
            text(&out.stdout)
        );
    }
    nbdcopy(&src, &libnbd_uri(&target, &certs));
    d.complete(&id, 0, "cid-mtls-1", 0);
    compare("mutual TLS ingest", &d.image_of(&id, 0), &src);

    // The reference client: refused without its certificate (with a hint),
    // then a backup with it.
    let out = run(cmd(
        BIN,
        &[
            "backup",
            "--server",
            &d.api,
            "--tls-ca",
            &p("ca-cert.pem"),
            "--vm",
            "ref",
            "--disk",
            src.to_str().unwrap(),
            "--no-progress",
        ],
    ));
    assert!(
        !out.status.success(),
        "chainvault backup without a client certificate succeeded"
    );
    assert!(
        text(&out.stderr).contains("--tls-cert"),
        "the refusal does not say to pass --tls-cert: {}",
        text(&out.stderr)
    );
    let out = run_ok(cmd(
        BIN,
        &[
            "backup",
            "--server",
            &d.api,
            "--tls-ca",
            &p("ca-cert.pem"),
            "--tls-cert",
            &p("client-cert.pem"),
            "--tls-key",
            &p("client-key.pem"),
            "--vm",
            "ref",
            "--disk",
            src.to_str().unwrap(),
            "--json",
        ],
    ));
    let v: Value = serde_json::from_slice(&out.stdout).expect("backup --json");
    let rid = s(&v["backup_id"]);
    compare("chainvault backup over TLS", &d.image_of(&rid, 0), &src);

    // The mount reads its restore exports over TLS.
    let m = Mount::start(
        &t.join("mnt"),
        &[
            "--server",
            &d.api,
            "--vm",
            "ref",
            "--tls-ca",
            &p("ca-cert.pem"),
            "--tls-cert",
            &p("client-cert.pem"),
            "--tls-key",
            &p("client-key.pem"),
        ],
    );
    assert_cmp("mount over TLS", &m.path("ref/disk0/latest/disk.raw"), &src);
    m.sigint();
    d.stop();
}
