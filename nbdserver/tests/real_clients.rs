//! The server driven by real NBD clients: nbdinfo, nbdcopy (libnbd-bin),
//! qemu-io and qemu-img (qemu-utils).

mod common;

use std::sync::Arc;

use chainvault_nbd::{BlockExport, FileExport, MemExport, MetaContext};
use common::*;

const MIB: u64 = 1024 * 1024;

/// Random bytes from the kernel (fast even in debug builds).
fn urandom(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = Vec::with_capacity(len);
    std::fs::File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .take(len as u64)
        .read_to_end(&mut v)
        .expect("read /dev/urandom");
    assert_eq!(v.len(), len);
    v
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_describes_every_export() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let ts = TestServer::start().await;
    ts.add(
        "disk0",
        Arc::new(MemExport::new(64 * MIB).with_description("first disk")),
    );
    ts.add(
        "disk1",
        Arc::new(
            MemExport::new(3 * MIB)
                .read_only()
                .with_description("second disk"),
        ),
    );

    let out = run_ok(&nbdinfo, &["--list", "--json", &ts.uri("")]).await;
    let v = json(&out);
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 2, "{out}");
    let find = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {out}"))
            .clone()
    };
    let d0 = find("disk0");
    assert_eq!(d0["export-size"], 64 * MIB);
    assert_eq!(d0["description"], "first disk");
    assert_eq!(d0["is_read_only"], false);
    let d1 = find("disk1");
    assert_eq!(d1["export-size"], 3 * MIB);
    assert_eq!(d1["description"], "second disk");
    assert_eq!(d1["is_read_only"], true);
    // Block size info is reported.
    assert_eq!(d0["block_size_preferred"], 4096, "{out}");
    assert_eq!(d0["block_size_maximum"], 32 * MIB, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_can_flags_match_the_export() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let ts = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    sparse_file(&raw, 16 * MIB);
    ts.add("rw", Arc::new(FileExport::open(&raw, false).unwrap()));
    ts.add("ro", Arc::new(FileExport::open(&raw, true).unwrap()));

    let can = |feature: &'static str, export: &'static str| {
        let nbdinfo = nbdinfo.clone();
        let uri = ts.uri(export);
        async move {
            let o = run(&nbdinfo, &["--can", feature, &uri]).await;
            match o.status.code() {
                Some(0) => true,
                Some(2) => false,
                _ => panic!(
                    "nbdinfo --can {feature} {uri}: {:?} {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ),
            }
        }
    };
    for f in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "cache",
        "write",
    ] {
        assert!(can(f, "rw").await, "rw export should support {f}");
    }
    for f in ["fua", "trim", "zero", "fast-zero", "write"] {
        assert!(
            !can(f, "ro").await,
            "read-only export must not advertise {f}"
        );
    }
    for f in ["df", "multi-conn", "cache"] {
        assert!(
            can(f, "ro").await,
            "read-only export should still support {f}"
        );
    }
    let o = run(&nbdinfo, &["--is", "read-only", &ts.uri("ro")]).await;
    assert_eq!(o.status.code(), Some(0));
    let o = run(&nbdinfo, &["--is", "read-only", &ts.uri("rw")]).await;
    assert_eq!(o.status.code(), Some(2));
    // An unknown export is an error, not a crash.
    let o = run(&nbdinfo, &[&ts.uri("nope")]).await;
    assert!(!o.status.success());
}

fn map_entries(out: &str) -> Vec<(u64, u64, u64)> {
    json(out)
        .as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_allocation_and_depth() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let ts = TestServer::start().await;
    let m = MemExport::new(64 * MIB);
    m.write(MIB, &vec![1u8; 128 * 1024], false).unwrap();
    m.write(10 * MIB, &vec![2u8; (2 * MIB) as usize], false)
        .unwrap();
    ts.add("disk", Arc::new(m));

    let out = run_ok(&nbdinfo, &["--map", "--json", &ts.uri("disk")]).await;
    let hole = 3; // HOLE|ZERO
    assert_eq!(
        map_entries(&out),
        vec![
            (0, MIB, hole),
            (MIB, 128 * 1024, 0),
            (MIB + 128 * 1024, 10 * MIB - MIB - 128 * 1024, hole),
            (10 * MIB, 2 * MIB, 0),
            (12 * MIB, 52 * MIB, hole),
        ],
        "{out}"
    );
    let out = run_ok(
        &nbdinfo,
        &["--map=qemu:allocation-depth", "--json", &ts.uri("disk")],
    )
    .await;
    assert_eq!(
        map_entries(&out),
        vec![
            (0, MIB, 0),
            (MIB, 128 * 1024, 1),
            (MIB + 128 * 1024, 10 * MIB - MIB - 128 * 1024, 0),
            (10 * MIB, 2 * MIB, 1),
            (12 * MIB, 52 * MIB, 0),
        ],
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_of_a_file_matches_qemu_nbd() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let qemu_nbd = require_tool("qemu-nbd", "qemu-utils");
    let ts = TestServer::start().await;
    let raw = ts.path("file.raw");
    sparse_file(&raw, 32 * MIB);
    let e = FileExport::open(&raw, false).unwrap();
    e.write(4 * MIB, &vec![7u8; MIB as usize], false).unwrap();
    e.write(20 * MIB, &vec![7u8; 64 * 1024], false).unwrap();
    e.flush().unwrap();
    ts.add("file", Arc::new(e));
    let ours = map_entries(&run_ok(&nbdinfo, &["--map", "--json", &ts.uri("file")]).await);

    // The same file through qemu-nbd, read-only.
    let qsock = ts.path("qemu.sock");
    let mut child = tokio::process::Command::new(&qemu_nbd)
        .args(["-r", "-f", "raw", "-k"])
        .arg(&qsock)
        .arg(&raw)
        .kill_on_drop(true)
        .spawn()
        .expect("start qemu-nbd");
    for _ in 0..200 {
        if qsock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let quri = format!("nbd+unix:///?socket={}", qsock.display());
    let theirs = map_entries(&run_ok(&nbdinfo, &["--map", "--json", &quri]).await);
    let _ = child.kill().await;
    // Compare the data ranges (qemu may split or label holes differently).
    let data = |v: &[(u64, u64, u64)]| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(o, l, t) in v {
            if t & 1 == 0 {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == o => last.1 += l,
                    _ => out.push((o, l)),
                }
            }
        }
        out
    };
    assert_eq!(
        data(&ours),
        data(&theirs),
        "ours {ours:?}\nqemu-nbd {theirs:?}"
    );
    assert_eq!(data(&ours), vec![(4 * MIB, MIB), (20 * MIB, 64 * 1024)]);
}

async fn nbdcopy_in(connections: u32, tcp: bool) {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let ts = TestServer::start().await;
    let size = 256 * MIB;
    let src = ts.path("src.raw");
    let data = urandom(size as usize);
    std::fs::write(&src, &data).unwrap();
    let dst = ts.path("dst.raw");
    sparse_file(&dst, size);
    let export = Arc::new(FileExport::open(&dst, false).unwrap());
    ts.add("disk", export.clone());
    let uri = if tcp {
        let addr = ts
            .server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let u = addr.uri("disk");
        assert!(u.starts_with("nbd://127.0.0.1:"), "{u}");
        u
    } else {
        ts.uri("disk")
    };
    let conns = format!("--connections={connections}");
    let started = std::time::Instant::now();
    run_ok(
        &nbdcopy,
        &[
            &conns,
            "--requests=64",
            "--flush",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    let took = started.elapsed();
    eprintln!("nbdcopy {connections} connection(s), tcp={tcp}: 256 MiB in {took:?}");
    let got = std::fs::read(&dst).unwrap();
    assert!(
        got == data,
        "destination differs from the source after nbdcopy"
    );

    // And back out through the server.
    let back = ts.path("back.raw");
    run_ok(&nbdcopy, &[&conns, &uri, back.to_str().unwrap()]).await;
    assert!(std::fs::read(&back).unwrap() == data, "copy back differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_256mib_one_connection() {
    nbdcopy_in(1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_256mib_four_connections() {
    nbdcopy_in(4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_over_tcp_loopback() {
    nbdcopy_in(2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_sparse_source_flushes_and_keeps_holes() {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let ts = TestServer::start().await;
    let src = ts.path("sparse.raw");
    sparse_file(&src, 64 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&pseudo_random(MIB as usize, 7), 8 * MIB)
            .unwrap();
    }
    let export = Arc::new(MemExport::new_write_back(64 * MIB));
    // Pre-fill so zeroing the holes is observable.
    export
        .write(0, &vec![0xffu8; (64 * MIB) as usize], false)
        .unwrap();
    ts.add("disk", export.clone());
    run_ok(
        &nbdcopy,
        &["--flush", src.to_str().unwrap(), &ts.uri("disk")],
    )
    .await;
    assert!(
        export.flush_count() >= 1,
        "nbdcopy --flush must reach the export"
    );
    let mut got = vec![0u8; (64 * MIB) as usize];
    export.read_durable(0, &mut got).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert!(got == want, "durable contents differ after nbdcopy --flush");
    // The holes were zeroed with WRITE_ZEROES (unmap allowed), so they are
    // unallocated again.
    let st = export
        .block_status(0, 8 * MIB, MetaContext::BaseAllocation)
        .unwrap();
    assert_eq!(st[0].flags & 1, 1, "hole expected at 0: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_zero_discard() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let ts = TestServer::start().await;
    let export = Arc::new(MemExport::new(16 * MIB));
    ts.add("disk", export.clone());
    let uri = ts.uri("disk");
    let out = run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 2M",
            "-c",
            "read -P 0xab 0 2M",
            "-c",
            "write -z 0 128k",
            "-c",
            "read -P 0 0 128k",
            "-c",
            "write -z -u 1M 256k",
            "-c",
            "read -P 0 1M 256k",
            "-c",
            "write -f -P 0xcd 4M 64k",
            "-c",
            "discard 8M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 128k 128k",
        ],
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let mut b = vec![0u8; 64 * 1024];
    export.read(4 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xcd));
    export.read(128 * 1024, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    // write -z without -u sets NO_HOLE: the range stays allocated.
    assert!(
        export.is_allocated(0),
        "NO_HOLE zeroing must keep the range allocated"
    );
    // write -z -u may unmap whole chunks.
    assert!(
        !export.is_allocated(MIB),
        "unmap-allowed zeroing should deallocate"
    );

    // Read-only export: writes fail cleanly.
    ts.add("ro", Arc::new(MemExport::new(MIB).read_only()));
    let o = run(
        &qemu_io,
        &["-f", "raw", "-r", &ts.uri("ro"), "-c", "read -P 0 0 64k"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(
        &qemu_io,
        &["-f", "raw", &ts.uri("ro"), "-c", "write -P 1 0 4k"],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            || text.to_lowercase().contains("read-only")
            || text.contains("Operation not permitted"),
        "write to a read-only export must fail: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let ts = TestServer::start().await;
    let size = 32 * MIB;
    let m = MemExport::new(size);
    m.write(0, &pseudo_random(MIB as usize, 1), false).unwrap();
    m.write(17 * MIB + 4096, &pseudo_random(300 * 1024, 2), false)
        .unwrap();
    ts.add("disk", Arc::new(m.read_only()));
    let uri = ts.uri("disk");

    let info = run_ok(&qemu_img, &["info", "--output=json", "-f", "raw", &uri]).await;
    assert_eq!(json(&info)["virtual-size"], size, "{info}");

    let raw = ts.path("out.raw");
    run_ok(
        &qemu_img,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            raw.to_str().unwrap(),
        ],
    )
    .await;
    let exported = std::fs::read(&raw).unwrap();
    let mut want = vec![0u8; size as usize];
    let e = ts.server.export("disk").unwrap();
    e.read(0, &mut want).unwrap();
    assert!(
        exported == want,
        "qemu-img convert output differs from the export"
    );

    let q = ts.path("out.qcow2");
    run_ok(
        &qemu_img,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri,
            q.to_str().unwrap(),
        ],
    )
    .await;
    let cmp = run_ok(
        &qemu_img,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &uri,
            q.to_str().unwrap(),
        ],
    )
    .await;
    assert!(cmp.contains("identical"), "{cmp}");
    // The qcow2 only allocated the data (holes were seen as holes).
    let map = run_ok(&qemu_img, &["map", "--output=json", q.to_str().unwrap()]).await;
    let data: u64 = json(&map)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data <= 2 * MIB,
        "qcow2 allocated {data} bytes for 1.3 MiB of data:\n{map}"
    );
}
