//! The client's metadata-context negotiation against a real peer: `qemu-nbd
//! -B` exporting QEMU dirty bitmaps of a qcow2 image. The client lists the
//! bitmaps, is granted only the contexts that exist, and its extents of
//! `qemu:dirty-bitmap:NAME` and `base:allocation` equal what `nbdinfo --map`
//! reports for the same export.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chainvault_nbd::client::{dirty_bitmap_context, STATE_DIRTY};
use chainvault_nbd::proto::HeaderMode;
use chainvault_nbd::{Client, ConnectOptions, Extent, NbdUri};
use common::*;

const MIB: u64 = 1 << 20;

/// `qemu-nbd` on a unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path, socket: &Path, bitmaps: &[&str]) -> QemuNbd {
        let qemu_nbd = require_tool("qemu-nbd", "qemu-utils");
        let mut c = Command::new(qemu_nbd);
        // -e 4: nbdinfo connects while the client under test is connected.
        c.args(["-r", "-t", "-e", "4", "-f", "qcow2", "-x", "", "-k"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for b in bitmaps {
            c.args(["-B", b]);
        }
        c.arg(image);
        let mut child = c.spawn().expect("spawn qemu-nbd");
        let t0 = Instant::now();
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("qemu-nbd exited {st}: {err}");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "qemu-nbd not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd {
            child,
            socket: socket.to_path_buf(),
        }
    }

    fn uri(&self) -> String {
        NbdUri::unix(&self.socket, "").to_string()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(tool: &str, args: &[&str]) {
    let path = require_tool(tool, "qemu-utils");
    let o = Command::new(&path)
        .args(args)
        .output()
        .expect("run qemu tool");
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `nbdinfo --map=CONTEXT --json URI` as (offset, length, type).
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let o = Command::new(nbdinfo)
        .arg(format!("--map={context}"))
        .args(["--json", uri])
        .output()
        .expect("run nbdinfo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("nbdinfo json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

fn absolute(ext: &[Extent]) -> Vec<(u64, u64, u32)> {
    let mut pos = 0;
    ext.iter()
        .map(|e| {
            let r = (pos, e.length, e.flags);
            pos += e.length;
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_contexts_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let img_s = img.to_str().unwrap();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "256M"]);
    qemu(
        "qemu-io",
        &["-c", "write -P 1 0 8M", "-c", "write -P 2 100M 3M", img_s],
    );
    qemu("qemu-img", &["bitmap", "--add", img_s, "b1"]);
    // After b1: scattered writes, a zeroed range and a write spanning the
    // end of a data range.
    qemu(
        "qemu-io",
        &[
            "-c",
            "write -P 3 1M 64k",
            "-c",
            "write -P 4 50M 192k",
            "-c",
            "write -z 101M 128k",
            "-c",
            "write -P 5 255M 1M",
            img_s,
        ],
    );
    qemu("qemu-img", &["bitmap", "--add", img_s, "b2"]);
    qemu("qemu-io", &["-c", "write -P 6 20M 64k", img_s]);

    let nbd = QemuNbd::start(&img, &dir.path().join("s.sock"), &["b1", "b2"]);
    let uri: NbdUri = nbd.uri().parse().unwrap();

    for mode in [HeaderMode::Extended, HeaderMode::Structured] {
        let opts = ConnectOptions {
            extended_headers: mode == HeaderMode::Extended,
            meta_contexts: vec![
                "base:allocation".into(),
                dirty_bitmap_context("b1"),
                dirty_bitmap_context("missing"),
                dirty_bitmap_context("b2"),
            ],
            list_meta_contexts: vec!["qemu:dirty-bitmap:".into()],
            ..ConnectOptions::default()
        };
        let c = Client::connect_uri(&uri, opts).await.expect("connect");
        let info = c.info().clone();
        assert_eq!(info.mode, mode);
        assert_eq!(info.size, 256 * MIB);
        assert_eq!(info.listed_dirty_bitmaps(), vec!["b1", "b2"], "{info:?}");
        assert!(info.has_context("base:allocation"));
        assert!(info.has_context("qemu:dirty-bitmap:b1"));
        assert!(info.has_context("qemu:dirty-bitmap:b2"));
        assert!(
            !info.has_context("qemu:dirty-bitmap:missing"),
            "a bitmap the export does not have must not be granted: {info:?}"
        );
        assert_eq!(info.contexts.len(), 3);

        for ctx in [
            "qemu:dirty-bitmap:b1",
            "qemu:dirty-bitmap:b2",
            "base:allocation",
        ] {
            let ours = c.extents(ctx, 0, info.size).await.expect("extents");
            assert_eq!(ours.iter().map(|e| e.length).sum::<u64>(), info.size);
            assert_eq!(
                absolute(&ours),
                nbdinfo_map(&nbd.uri(), ctx),
                "{ctx} ({mode:?})"
            );
        }
        // Inside a range: trimmed to exactly the range.
        let part = c
            .extents("qemu:dirty-bitmap:b1", 50 * MIB + 4096, MIB)
            .await
            .unwrap();
        assert_eq!(part.iter().map(|e| e.length).sum::<u64>(), MIB);
        assert_eq!(part[0].flags & STATE_DIRTY, STATE_DIRTY);
        // A context that was not granted is refused locally.
        assert!(c
            .extents("qemu:dirty-bitmap:missing", 0, MIB)
            .await
            .is_err());
        // Beyond the end.
        assert!(c
            .extents("base:allocation", info.size - 512, 1024)
            .await
            .is_err());
        // The raw per-id answer names only granted ids.
        let raw = c.block_status_ids(0, 4 * MIB, false).await.unwrap();
        assert_eq!(raw.len(), 3);
        for (id, _) in &raw {
            assert!(info.contexts.iter().any(|(i, _)| i == id));
        }
        c.disconnect().await.unwrap();
    }

    // The b1 bitmap saw exactly the four post-b1 writes (64 KiB granularity).
    let c = Client::connect_uri(
        &uri,
        ConnectOptions::with_contexts([dirty_bitmap_context("b1")]),
    )
    .await
    .unwrap();
    let dirty: Vec<(u64, u64)> = absolute(
        &c.extents("qemu:dirty-bitmap:b1", 0, c.size())
            .await
            .unwrap(),
    )
    .into_iter()
    .filter(|e| e.2 & STATE_DIRTY != 0)
    .map(|e| (e.0, e.1))
    .collect();
    assert_eq!(
        dirty,
        vec![
            (MIB, 64 << 10),
            (20 * MIB, 64 << 10),
            (50 * MIB, 192 << 10),
            (101 * MIB, 128 << 10),
            (255 * MIB, MIB)
        ]
    );
}
