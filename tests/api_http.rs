//! The HTTP API of the real `chainvault serve` binary, over loopback: health,
//! the OpenAPI document, JSON errors for every kind of bad request, bearer
//! auth, metrics, and the inspection CLI against the running daemon.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// A running `chainvault serve`, killed on drop.
struct Daemon {
    child: Child,
    api: String,
    nbd: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let data = dir.path().join("data");
        let sock = dir.path().join("nbd.sock");
        let mut c = Command::new(env!("CARGO_BIN_EXE_chainvault"));
        c.arg("serve")
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--nbd-socket")
            .arg(&sock)
            .args(extra)
            .env_remove("CHAINVAULT_TOKEN")
            .env_remove("CHAINVAULT_LISTEN")
            .env_remove("CHAINVAULT_NBD_LISTEN")
            .env_remove("CHAINVAULT_DATA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn chainvault serve");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let n = reader.read_line(&mut line).expect("read the ready line");
        if n == 0 {
            let st = child.wait().ok();
            panic!("chainvault serve exited before it was ready: {st:?}");
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let (api, nbd) = parse_ready(&line);
        Daemon {
            child,
            api,
            nbd,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    fn signal(&mut self, sig: i32) -> Option<i32> {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, sig) };
        for _ in 0..300 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("chainvault serve did not exit within 15 s of signal {sig}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ready api=http://HOST:PORT nbd=URI` → (api, nbd).
fn parse_ready(line: &str) -> (String, String) {
    let line = line.trim_end();
    let rest = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("first stdout line is not the ready line: {line:?}"));
    let mut api = None;
    let mut nbd = None;
    for field in rest.split(' ') {
        if let Some(v) = field.strip_prefix("api=") {
            api = Some(v.to_string());
        } else if let Some(v) = field.strip_prefix("nbd=") {
            nbd = Some(v.to_string());
        }
    }
    let api = api.unwrap_or_else(|| panic!("no api= in {line:?}"));
    let nbd = nbd.unwrap_or_else(|| panic!("no nbd= in {line:?}"));
    assert!(api.starts_with("http://127.0.0.1:"), "{line:?}");
    (api, nbd)
}

/// A response reduced to what the tests look at.
struct Resp {
    status: u16,
    content_type: String,
    text: String,
    headers: Vec<(String, String)>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} {:?}",
                self.status, self.text
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Assert an error response: this status, a JSON body with a non-empty
    /// `error` and a `details` key; returns the body.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert!(
            self.content_type.starts_with("application/json"),
            "error with content type {:?}: {}",
            self.content_type,
            self.text
        );
        let v = self.json();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(msg.len() > 10, "error message too terse: {msg:?}");
        assert!(
            v.as_object().is_some_and(|o| o.contains_key("details")),
            "no details key: {v}"
        );
        v
    }
}

/// POST with a `Content-Length` of `len` but no body; returns (status, body).
fn declared_length_only(url: &str, len: usize) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(hostport).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until the headers and the announced body have arrived (or EOF).
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the 413 answer: {e}"),
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(h) = text.find("\r\n\r\n") {
            let cl = text[..h].lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if let Some(cl) = cl {
                if buf.len() >= h + 4 + cl {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

fn into_resp(r: Result<ureq::Response, ureq::Error>) -> Resp {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let headers = r
        .headers_names()
        .into_iter()
        .filter_map(|n| r.header(&n).map(|v| (n.clone(), v.to_string())))
        .collect();
    Resp {
        status: r.status(),
        content_type: r.content_type().to_string(),
        headers,
        text: r.into_string().unwrap_or_default(),
    }
}

fn get(url: &str) -> Resp {
    into_resp(agent().get(url).call())
}

fn send_json(method: &str, url: &str, body: &Value) -> Resp {
    into_resp(agent().request(method, url).send_json(body.clone()))
}

fn send_raw(method: &str, url: &str, content_type: &str, body: &str) -> Resp {
    into_resp(
        agent()
            .request(method, url)
            .set("Content-Type", content_type)
            .send_string(body),
    )
}

fn start_body(vm: &str) -> Value {
    json!({
        "vm_name": vm,
        "backup_type": "full",
        "repository_id": "repo-1",
        "tags": ["test"],
        "disks": [{"disk_id": 0, "disk_key": "disk-2000", "capacity_bytes": 1048576}]
    })
}

#[test]
fn ready_line_health_and_openapi() {
    let d = Daemon::start(&[]);
    assert!(
        d.nbd.starts_with("nbd+unix:///?socket="),
        "nbd base {:?}",
        d.nbd
    );

    let r = get(&d.url("/healthz"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));

    let r = get(&d.url("/api/v1/openapi.json"));
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/json"));
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in [
        ("post", "/api/v1/backups"),
        ("get", "/api/v1/backups"),
        ("get", "/api/v1/backups/changeid"),
        ("get", "/api/v1/backups/chain"),
        ("get", "/api/v1/backups/{backup_id}"),
        ("delete", "/api/v1/backups/{backup_id}"),
        ("post", "/api/v1/backups/{backup_id}/complete"),
        ("post", "/api/v1/backups/{backup_id}/fail"),
        ("post", "/api/v1/restores"),
        ("delete", "/api/v1/restores/{restore_id}"),
        ("get", "/api/v1/verify"),
        ("get", "/api/v1/openapi.json"),
        ("get", "/healthz"),
        ("get", "/metrics"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "openapi.json lacks {method} {path}"
        );
    }
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    } else {
                        refs(x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("odd $ref {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {r}"
        );
    }
}

#[test]
fn errors_are_json() {
    let d = Daemon::start(&[]);

    // Unknown route.
    let v = get(&d.url("/api/v1/nope")).error(404);
    assert!(v["error"].as_str().unwrap().contains("/api/v1/nope"), "{v}");

    // Wrong method.
    let r = into_resp(agent().put(&d.url("/api/v1/backups")).call());
    let v = r.error(405);
    assert!(
        v["details"]["allowed"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    assert!(r.header("allow").is_some(), "405 without Allow header");
    into_resp(agent().delete(&d.url("/healthz")).call()).error(405);

    // Malformed JSON, wrong content type, missing field, wrong type.
    send_raw(
        "POST",
        &d.url("/api/v1/backups"),
        "application/json",
        "{\"vm_name\": ",
    )
    .error(400);
    send_raw("POST", &d.url("/api/v1/backups"), "text/plain", "{}").error(415);
    let v = send_json(
        "POST",
        &d.url("/api/v1/backups"),
        &json!({"backup_type": "full"}),
    )
    .error(400);
    assert!(v["error"].as_str().unwrap().contains("vm_name"), "{v}");
    let v = send_json(
        "POST",
        &d.url("/api/v1/backups"),
        &json!({"vm_name": "x", "backup_type": "weekly"}),
    )
    .error(400);
    assert!(
        v["error"].as_str().unwrap().contains("backup_type")
            || v["error"].as_str().unwrap().contains("weekly"),
        "{v}"
    );

    // Body too large: refused on the declared length, before any of it is read.
    // (Only the headers are sent, so the answer cannot race a client still writing.)
    let (status, body) = declared_length_only(&d.url("/api/v1/backups"), 2 << 20);
    assert_eq!(status, 413, "{body}");
    let v: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("413 body is not JSON ({e}): {body}"));
    assert!(v["error"].is_string(), "{v}");

    // Bad query parameters.
    let v = get(&d.url("/api/v1/backups/changeid?disk_id=0")).error(400);
    assert!(v["error"].as_str().unwrap().contains("vm_name"), "{v}");
    let v = get(&d.url("/api/v1/backups/changeid?vm_name=pgtest1")).error(400);
    assert!(v["error"].as_str().unwrap().contains("disk_id"), "{v}");
    let v = get(&d.url("/api/v1/backups/changeid?vm_name=pgtest1&disk_id=abc")).error(400);
    assert!(v["error"].as_str().unwrap().contains("disk_id"), "{v}");
    get(&d.url("/api/v1/backups/chain?vm_name=pgtest1&disk_id=-1")).error(400);
    let v = get(&d.url("/api/v1/backups?status=bogus")).error(400);
    assert!(v["error"].as_str().unwrap().contains("running"), "{v}");

    // Complete: change_id and disk_id are required.
    let url = d.url("/api/v1/backups/some-backup/complete");
    let v = send_json("POST", &url, &json!({"disk_id": 0})).error(400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("change_id is required"),
        "{v}"
    );
    let v = send_json("POST", &url, &json!({"disk_id": 0, "change_id": "  "})).error(400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("change_id is required"),
        "{v}"
    );
    let v = send_json(
        "POST",
        &url,
        &json!({"change_id": "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490"}),
    )
    .error(400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("disk_id is required: every disk completes on its own"),
        "{v}"
    );

    // Unknown backup: 404 from the engine, JSON.
    get(&d.url("/api/v1/backups/no-such-backup")).error(404);
    let r = send_json(
        "POST",
        &url,
        &json!({"disk_id": 0, "change_id": "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490"}),
    );
    r.error(404);
    into_resp(
        agent()
            .delete(&d.url("/api/v1/restores/no-such-restore"))
            .call(),
    )
    .error(404);
}

#[test]
fn backup_round_trip() {
    let d = Daemon::start(&[]);
    // Nothing yet: 200 with an empty change_id.
    let r = get(&d.url("/api/v1/backups/changeid?vm_name=pgtest1&disk_id=0"));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["change_id"], "");

    let r = send_json("POST", &d.url("/api/v1/backups"), &start_body("pgtest1"));
    assert_eq!(r.status, 200, "{}", r.text);
    let start = r.json();
    let id = start["backup_id"].as_str().expect("backup_id").to_string();
    let disk = &start["disks"][0];
    assert_eq!(disk["disk_id"], 0);
    assert!(
        disk["nbd_uri"]
            .as_str()
            .unwrap_or("")
            .starts_with("nbd+unix:///"),
        "{disk}"
    );

    let r = get(&d.url(&format!("/api/v1/backups/{id}")));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "running");

    let r = get(&d.url("/api/v1/backups?vm_name=pgtest1&status=running"));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["count"], 1);

    // The fail body may be left out entirely.
    let r = into_resp(
        agent()
            .post(&d.url(&format!("/api/v1/backups/{id}/fail")))
            .call(),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "failed");

    let r = get(&d.url("/api/v1/backups?status=failed"));
    assert_eq!(r.json()["count"], 1, "{}", r.text);
}

#[test]
fn bearer_token() {
    let d = Daemon::start(&["--token", "s3cret-token"]);
    // /healthz needs no token.
    assert_eq!(get(&d.url("/healthz")).status, 200);

    // Everything else does.
    for path in [
        "/api/v1/backups",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/nope",
    ] {
        let r = get(&d.url(path));
        r.error(401);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{path}"
        );
    }
    let wrong = into_resp(
        agent()
            .get(&d.url("/api/v1/backups"))
            .set("Authorization", "Bearer nope")
            .call(),
    );
    wrong.error(401);
    let basic = into_resp(
        agent()
            .get(&d.url("/api/v1/backups"))
            .set("Authorization", "Basic czNjcmV0")
            .call(),
    );
    basic.error(401);
    let r = into_resp(
        agent()
            .post(&d.url("/api/v1/backups"))
            .send_json(start_body("authvm")),
    );
    r.error(401);

    let ok = into_resp(
        agent()
            .get(&d.url("/api/v1/backups"))
            .set("Authorization", "Bearer s3cret-token")
            .call(),
    );
    assert_eq!(ok.status, 200, "{}", ok.text);
    let ok = into_resp(
        agent()
            .post(&d.url("/api/v1/backups"))
            .set("Authorization", "Bearer s3cret-token")
            .send_json(start_body("authvm")),
    );
    assert_eq!(ok.status, 200, "{}", ok.text);

    // The CLI passes the token along.
    let out = cli(&[
        "backups",
        "list",
        "--json",
        "--server",
        &d.api,
        "--token",
        "s3cret-token",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["backups", "list", "--server", &d.api]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_text_format() {
    let d = Daemon::start(&[]);
    let r = get(&d.url("/metrics"));
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    let t = r.text;
    for name in [
        "chainvault_backups",
        "chainvault_bytes_received_total",
        "chainvault_active_exports",
        "chainvault_active_restores",
    ] {
        assert!(
            t.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{t}"
        );
        assert!(
            t.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}:\n{t}"
        );
    }
    for status in ["running", "completed", "failed", "interrupted"] {
        assert!(
            t.contains(&format!("chainvault_backups{{status=\"{status}\"}} ")),
            "{status}:\n{t}"
        );
    }
    // Every sample line is `name{labels} value` with a numeric value.
    for line in t.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (_, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chainvault"))
        .args(args)
        .env_remove("CHAINVAULT_SERVER")
        .env_remove("CHAINVAULT_TOKEN")
        .env_remove("CHAINVAULT_DATA")
        .output()
        .expect("run chainvault")
}

#[test]
fn cli_against_daemon_and_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8 path").to_string();
    let mut d = Daemon::start_in(dir, &[]);
    let r = send_json("POST", &d.url("/api/v1/backups"), &start_body("clivm"));
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json()["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_string();

    let out = cli(&["backups", "list", "--server", &d.api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id) && text.contains("clivm"), "{text}");

    let out = cli(&[
        "backups", "list", "--json", "--vm", "clivm", "--server", &d.api,
    ]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");

    let out = cli(&[
        "chain", "show", "--vm", "clivm", "--disk", "0", "--json", "--server", &d.api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["vm_name"], "clivm");

    let out = cli(&["chain", "verify", "--server", &d.api]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(2)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stop the daemon; SIGTERM exits 0 and marks the running backup interrupted.
    assert_eq!(d.signal(libc::SIGTERM), Some(0));
    let api = d.api.clone();

    let out = cli(&["backups", "list", "--server", &api]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no daemon at") && err.contains("--data DIR"),
        "{err}"
    );

    let out = cli(&["backups", "list", "--json", "--data", &data_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v[0]["status"], "interrupted", "{v}");

    let out = cli(&["catalog", "rebuild", "--data", &data_s, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
}

#[test]
fn sigint_exits_zero() {
    let mut d = Daemon::start(&[]);
    assert_eq!(get(&d.url("/healthz")).status, 200);
    assert_eq!(d.signal(libc::SIGINT), Some(0));
}
