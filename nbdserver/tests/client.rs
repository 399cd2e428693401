//! The crate's client against the crate's server: every header mode,
//! concurrency, error replies, export removal and shutdown.

mod common;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainvault_nbd::client::{list_exports, ReadChunk, Transport, ZeroRequest};
use chainvault_nbd::proto::{cflag, cmd, HeaderMode};
use chainvault_nbd::{
    BlockExport, Capabilities, Client, ClientError, ConnectOptions, MemExport, NbdErrno, NbdUri,
    Server, ServerConfig,
};
use common::*;

const MIB: u64 = 1024 * 1024;

const MODES: [HeaderMode; 3] = [
    HeaderMode::Extended,
    HeaderMode::Structured,
    HeaderMode::Simple,
];

/// Each header mode writes its own 16 MiB region of a shared export.
fn region(mode: HeaderMode) -> u64 {
    match mode {
        HeaderMode::Extended => 0,
        HeaderMode::Structured => 16 * MIB,
        HeaderMode::Simple => 32 * MIB,
    }
}

fn options(mode: HeaderMode) -> ConnectOptions {
    ConnectOptions {
        extended_headers: mode == HeaderMode::Extended,
        structured_replies: mode != HeaderMode::Simple,
        meta_contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        ..ConnectOptions::default()
    }
}

async fn connect(ts: &TestServer, name: &str, mode: HeaderMode) -> Client {
    Client::connect_unix(&ts.socket, name, options(mode))
        .await
        .expect("connect")
}

fn errno(r: Result<impl std::fmt::Debug, ClientError>) -> NbdErrno {
    match r {
        Err(e) => e
            .errno()
            .unwrap_or_else(|| panic!("expected a server error, got {e}")),
        Ok(v) => panic!("expected a server error, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_every_header_mode() {
    let ts = TestServer::start().await;
    ts.add("disk", Arc::new(MemExport::new(64 * MIB)));
    for mode in MODES {
        let c = connect(&ts, "disk", mode).await;
        let info = c.info().clone();
        assert_eq!(info.mode, mode);
        assert_eq!(info.size, 64 * MIB);
        assert!(info.can_flush() && info.can_fua() && info.can_trim() && info.can_zero());
        assert!(info.can_fast_zero() && info.can_multi_conn() && info.can_cache());
        assert_eq!(
            info.can_df(),
            mode != HeaderMode::Simple,
            "DF only with structured replies"
        );
        assert_eq!(info.block_sizes, Some((1, 4096, 32 * 1024 * 1024)));
        assert_eq!(info.description.as_deref(), Some("in-memory export"));

        let base = region(mode);
        let data = pseudo_random(3 * MIB as usize + 17, base);
        c.write(base + 5, &data, false).await.unwrap();
        assert_eq!(c.read(base + 5, data.len() as u64).await.unwrap(), data);
        c.write(base, b"fua!", true).await.unwrap();
        assert_eq!(c.read(base, 4).await.unwrap(), b"fua!");
        c.flush().await.unwrap();
        c.cache(base, MIB).await.unwrap();
        c.write_zeroes(base + MIB, MIB, ZeroRequest::default())
            .await
            .unwrap();
        assert_eq!(
            c.read(base + MIB, MIB).await.unwrap(),
            vec![0u8; MIB as usize]
        );
        c.write_zeroes(
            base + 2 * MIB,
            4096,
            ZeroRequest {
                no_hole: true,
                fast: true,
                fua: true,
            },
        )
        .await
        .unwrap();
        c.trim(base + 8 * MIB, MIB, false).await.unwrap();

        if mode == HeaderMode::Simple {
            assert!(matches!(
                c.block_status(base, MIB, false).await,
                Err(ClientError::Unsupported(_))
            ));
            assert!(matches!(
                c.read_chunks(base, 4096, true).await,
                Err(ClientError::Unsupported(_))
            ));
        } else {
            let st = c.block_status(base, 4 * MIB, false).await.unwrap();
            assert_eq!(st.len(), 2);
            let alloc = &st.iter().find(|(n, _)| n == "base:allocation").unwrap().1;
            let total: u64 = alloc.iter().map(|e| e.length).sum();
            assert_eq!(total, 4 * MIB);
            // The unmap-allowed zero of a whole 1 MiB range became a hole.
            assert!(alloc.iter().any(|e| e.flags == 3), "{alloc:?}");
            let one = c.block_status(base, 4 * MIB, true).await.unwrap();
            assert!(one
                .iter()
                .all(|(_, e)| e.len() == 1 && e[0].length <= 4 * MIB));

            // A read spanning data and a hole: chunks cover it exactly.
            let r = c
                .read_chunks(base + MIB - 4096, 2 * MIB, false)
                .await
                .unwrap();
            assert_eq!(r.data, c.read(base + MIB - 4096, 2 * MIB).await.unwrap());
            assert!(
                r.chunks
                    .iter()
                    .any(|ch| matches!(ch, ReadChunk::Hole { .. })),
                "{:?}",
                r.chunks
            );
            let r = c
                .read_chunks(base + MIB - 4096, 2 * MIB, true)
                .await
                .unwrap();
            assert_eq!(
                r.chunks,
                vec![ReadChunk::Data {
                    offset: base + MIB - 4096,
                    len: 2 * MIB
                }]
            );
        }
        c.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    // A small byte budget forces requests to wait for each other.
    let ts = TestServer::start_with(ServerConfig {
        max_inflight_bytes: MIB as usize,
        max_inflight_requests: 16,
        ..ServerConfig::default()
    })
    .await;
    ts.add("disk", Arc::new(MemExport::new(64 * MIB)));
    let c = Arc::new(connect(&ts, "disk", HeaderMode::Extended).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..128u64 {
        let c = Arc::clone(&c);
        tasks.spawn(async move {
            let data = pseudo_random(256 * 1024, i + 1);
            c.write(i * 256 * 1024, &data, false).await.unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    for i in 0..128u64 {
        let c = Arc::clone(&c);
        tasks.spawn(async move {
            let got = c.read(i * 256 * 1024, 256 * 1024).await.unwrap();
            assert!(got == pseudo_random(256 * 1024, i + 1), "block {i} differs");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_survives() {
    let ts = TestServer::start().await;
    ts.add("disk", Arc::new(MemExport::new(64 * MIB)));
    ts.add("big", Arc::new(MemExport::new(8 << 30)));
    for mode in MODES {
        let c = connect(&ts, "disk", mode).await;
        let ext_flag = if mode == HeaderMode::Extended {
            cflag::PAYLOAD_LEN
        } else {
            0
        };
        let raw = |command, flags, offset, len, payload: Option<Vec<u8>>| {
            let c = &c;
            async move {
                let r = c
                    .raw_request(command, flags, offset, len, payload.as_deref())
                    .await
                    .unwrap();
                r.error.map(|(e, _)| e)
            }
        };
        assert_eq!(
            raw(99, 0, 0, 0, None).await,
            Some(NbdErrno::EINVAL),
            "unknown command"
        );
        assert_eq!(
            raw(cmd::READ, cflag::FUA, 0, 512, None).await,
            Some(NbdErrno::EINVAL),
            "bad flag"
        );
        assert_eq!(
            raw(cmd::READ, 0, 64 * MIB, 1, None).await,
            Some(NbdErrno::EINVAL),
            "read past end"
        );
        assert_eq!(
            raw(cmd::READ, 0, u64::MAX, 2, None).await,
            Some(NbdErrno::EINVAL),
            "offset overflow"
        );
        assert_eq!(
            raw(cmd::TRIM, 0, 64 * MIB - 1, 2, None).await,
            Some(NbdErrno::EINVAL),
            "trim past end"
        );
        assert_eq!(
            raw(cmd::WRITE, ext_flag, 64 * MIB - 1, 2, Some(vec![1, 2])).await,
            Some(NbdErrno::ENOSPC),
            "write past end"
        );
        assert_eq!(
            raw(cmd::READ, 0, 0, 33 * MIB, None).await,
            Some(NbdErrno::EOVERFLOW),
            "huge read"
        );
        let huge = vec![7u8; (33 * MIB) as usize];
        assert_eq!(
            raw(cmd::WRITE, ext_flag, 0, huge.len() as u64, Some(huge)).await,
            Some(NbdErrno::EOVERFLOW),
            "huge write"
        );
        if mode != HeaderMode::Simple {
            assert_eq!(
                raw(cmd::BLOCK_STATUS, 0, 0, 0, None).await,
                Some(NbdErrno::EINVAL),
                "empty status"
            );
            assert_eq!(
                raw(cmd::READ, cflag::DF | cflag::REQ_ONE, 0, 512, None).await,
                Some(NbdErrno::EINVAL),
                "REQ_ONE on read"
            );
        } else {
            assert_eq!(
                raw(cmd::BLOCK_STATUS, 0, 0, 512, None).await,
                Some(NbdErrno::EINVAL),
                "no contexts"
            );
            assert_eq!(
                raw(cmd::READ, cflag::DF, 0, 512, None).await,
                Some(NbdErrno::EINVAL),
                "DF w/o structured"
            );
        }
        if mode == HeaderMode::Extended {
            // A payload on a command that takes none is consumed, then refused.
            let r = raw(
                cmd::BLOCK_STATUS,
                cflag::PAYLOAD_LEN,
                0,
                12,
                Some(vec![0u8; 12]),
            )
            .await;
            assert_eq!(r, Some(NbdErrno::EINVAL));
            // 64-bit effect lengths are range-checked.
            assert_eq!(
                raw(cmd::TRIM, 0, 0, 1 << 40, None).await,
                Some(NbdErrno::EINVAL)
            );
        } else {
            // PAYLOAD_LEN does not exist without extended headers.
            assert_eq!(
                raw(cmd::FLUSH, cflag::PAYLOAD_LEN, 0, 0, None).await,
                Some(NbdErrno::EINVAL)
            );
        }
        // Zero-length requests are fine.
        assert_eq!(raw(cmd::READ, 0, 0, 0, None).await, None);
        assert_eq!(raw(cmd::WRITE, ext_flag, 0, 0, Some(vec![])).await, None);
        // And the connection still works.
        c.write(0, b"alive", false).await.unwrap();
        assert_eq!(c.read(0, 5).await.unwrap(), b"alive");
        c.disconnect().await.unwrap();

        // Exports beyond 4 GiB: 64-bit block status with extended headers,
        // clipped 32-bit answers otherwise.
        let c = connect(&ts, "big", mode).await;
        if mode != HeaderMode::Simple {
            let st = c.block_status(0, 8 << 30, false).await.unwrap();
            let (_, alloc) = st.iter().find(|(n, _)| n == "base:allocation").unwrap();
            let want = if mode == HeaderMode::Extended {
                8 << 30
            } else {
                u64::from(u32::MAX) & !0xfff
            };
            assert_eq!(alloc.iter().map(|e| e.length).sum::<u64>(), want);
        }
        c.write_zeroes(5 << 30, 5 << 20, ZeroRequest::default())
            .await
            .unwrap();
        c.write(7 << 30, b"far", false).await.unwrap();
        assert_eq!(c.read(7 << 30, 3).await.unwrap(), b"far");
        c.disconnect().await.unwrap();
    }
}

/// An export whose reads take a while, to observe draining.
struct SlowReads(MemExport, Duration);

impl BlockExport for SlowReads {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::thread::sleep(self.1);
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.0.write(offset, buf, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_export_drains_in_flight_requests() {
    let ts = TestServer::start().await;
    ts.add(
        "slow",
        Arc::new(SlowReads(MemExport::new(MIB), Duration::from_millis(400))),
    );
    ts.add("other", Arc::new(MemExport::new(MIB)));
    let c = Arc::new(connect(&ts, "slow", HeaderMode::Structured).await);
    let other = connect(&ts, "other", HeaderMode::Structured).await;
    c.write(0, b"kept", false).await.unwrap();

    let reader = {
        let c = Arc::clone(&c);
        tokio::spawn(async move { c.read(0, 4).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let removed = ts
        .server
        .remove_export("slow")
        .await
        .expect("export was registered");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "remove_export returned after {waited:?}, before the read finished"
    );
    // The read in flight completed normally.
    assert_eq!(reader.await.unwrap().unwrap(), b"kept");
    // The server holds no reference any more.
    assert_eq!(Arc::strong_count(&removed), 1);
    // Later requests on the old connection fail with ESHUTDOWN.
    assert_eq!(errno(c.read(0, 4).await), NbdErrno::ESHUTDOWN);
    assert_eq!(errno(c.write(0, b"x", false).await), NbdErrno::ESHUTDOWN);
    // New connections cannot pick it.
    match Client::connect_unix(&ts.socket, "slow", ConnectOptions::default()).await {
        Err(ClientError::OptionRefused { .. }) => {}
        other => panic!("expected the export to be gone: {other:?}"),
    }
    assert!(ts.server.remove_export("slow").await.is_none());
    // Other exports are untouched.
    other.write(0, b"ok", false).await.unwrap();
    assert_eq!(ts.server.export_names(), vec!["other".to_string()]);
    // The name can be reused.
    ts.add("slow", Arc::new(MemExport::new(MIB)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_after_grace_and_flushes() {
    let ts = TestServer::start().await;
    let export = Arc::new(MemExport::new_write_back(4 * MIB));
    ts.add("disk", export.clone());
    let c = connect(&ts, "disk", HeaderMode::Extended).await;
    c.write(0, b"unflushed", false).await.unwrap();
    assert_eq!(ts.server.active_connections(), 1);
    let report = ts.server.shutdown(Duration::from_millis(200)).await;
    assert!(
        report.forced_close,
        "the idle client had to be disconnected"
    );
    assert!(report.flush_errors.is_empty());
    let mut b = [0u8; 9];
    export.read_durable(0, &mut b).unwrap();
    assert_eq!(&b, b"unflushed", "shutdown must flush the exports");
    assert!(c.read(0, 1).await.is_err(), "connection must be closed");
    assert!(!ts.socket.exists(), "socket file removed");
    assert!(
        Client::connect_unix(&ts.socket, "disk", ConnectOptions::default())
            .await
            .is_err()
    );
    assert!(ts
        .server
        .add_export("late", Arc::new(MemExport::new(1)))
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_clients_finish_within_grace() {
    let ts = TestServer::start().await;
    ts.add("disk", Arc::new(MemExport::new(4 * MIB)));
    let c = connect(&ts, "disk", HeaderMode::Structured).await;
    let server = ts.server.clone();
    let stopper = tokio::spawn(async move { server.shutdown(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Still serving during the grace period.
    c.write(0, b"late write", false).await.unwrap();
    c.disconnect().await.unwrap();
    let t = Instant::now();
    let report = stopper.await.unwrap();
    assert!(!report.forced_close);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_stream_tcp_and_listing() {
    init_tracing();
    let server = Server::new(ServerConfig::default());
    server
        .add_export(
            "",
            Arc::new(MemExport::new(MIB).with_description("default")),
        )
        .unwrap();
    server
        .add_export("named", Arc::new(MemExport::new(2 * MIB)))
        .unwrap();
    assert!(matches!(
        server.add_export("named", Arc::new(MemExport::new(1))),
        Err(chainvault_nbd::ServerError::ExportExists(_))
    ));
    assert!(server
        .add_export("x".repeat(5000), Arc::new(MemExport::new(1)))
        .is_err());

    // Over tokio::io::duplex.
    let (a, b) = tokio::io::duplex(1 << 16);
    let s2 = server.clone();
    let conn = tokio::spawn(async move { s2.serve_connection(b, "duplex").await });
    let c = Client::connect_stream(a, "named", ConnectOptions::default())
        .await
        .unwrap();
    c.write(MIB, b"duplex", true).await.unwrap();
    assert_eq!(c.read(MIB, 6).await.unwrap(), b"duplex");
    c.disconnect().await.unwrap();
    conn.await.unwrap().unwrap();

    // Over TCP on an ephemeral loopback port, via a URI.
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let uri = addr.uri("");
    let parsed: NbdUri = uri.parse().unwrap();
    let c = Client::connect(&uri).await.unwrap();
    assert_eq!(c.size(), MIB);
    c.disconnect().await.unwrap();
    let list = list_exports(&parsed.transport).await.unwrap();
    assert_eq!(
        list,
        vec![
            ("".to_string(), "default".to_string()),
            ("named".to_string(), "in-memory export".to_string())
        ]
    );
    let missing = Client::connect_uri(
        &NbdUri {
            export: "nope".into(),
            ..parsed.clone()
        },
        ConnectOptions::default(),
    )
    .await;
    assert!(
        matches!(missing, Err(ClientError::OptionRefused { .. })),
        "{missing:?}"
    );
    assert!(matches!(parsed.transport, Transport::Tcp { .. }));
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_stalled_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ts = TestServer::start().await;
    ts.add("disk", Arc::new(MemExport::new(4 * MIB)));

    // A client that stops in the middle of the handshake.
    let mut stuck_handshake = tokio::net::UnixStream::connect(&ts.socket).await.unwrap();
    let mut greeting = [0u8; 18];
    stuck_handshake.read_exact(&mut greeting).await.unwrap();

    // A client that stops in the middle of a write payload.
    let mut stuck_write = tokio::net::UnixStream::connect(&ts.socket).await.unwrap();
    stuck_write.read_exact(&mut greeting).await.unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&3u32.to_be_bytes());
    hello.extend_from_slice(&chainvault_nbd::proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&1u32.to_be_bytes());
    hello.extend_from_slice(&4u32.to_be_bytes());
    hello.extend_from_slice(b"disk");
    stuck_write.write_all(&hello).await.unwrap();
    let mut export_info = [0u8; 10];
    stuck_write.read_exact(&mut export_info).await.unwrap();
    let header = chainvault_nbd::proto::RequestHeader {
        flags: 0,
        command: cmd::WRITE,
        cookie: chainvault_nbd::proto::Cookie(1),
        offset: 0,
        length: MIB,
    };
    stuck_write
        .write_all(&header.encode_compact().unwrap())
        .await
        .unwrap();
    stuck_write.write_all(&[0u8; 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ts.server.active_connections(), 2);

    let t = Instant::now();
    let report = ts.server.shutdown(Duration::from_millis(100)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(report.forced_close);
    assert_eq!(report.stuck_connections, 0);
    let mut b = [0u8; 1];
    assert_eq!(stuck_handshake.read(&mut b).await.unwrap_or(0), 0);
    assert_eq!(stuck_write.read(&mut b).await.unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_small_requests_with_tight_limits() {
    // Fewer permits than the batch size: batching must never hold the
    // permits the reader is waiting for.
    for (requests, bytes) in [(3usize, 16 * MIB as usize), (64, 20_000)] {
        let ts = TestServer::start_with(ServerConfig {
            max_inflight_requests: requests,
            max_inflight_bytes: bytes,
            max_batch: 8,
            ..ServerConfig::default()
        })
        .await;
        ts.add("disk", Arc::new(MemExport::new(16 * MIB)));
        let c = Arc::new(connect(&ts, "disk", HeaderMode::Structured).await);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..256u64 {
            let c = Arc::clone(&c);
            tasks.spawn(async move {
                let data = pseudo_random(4096, i + 7);
                c.write(i * 4096, &data, false).await.unwrap();
                assert_eq!(c.read(i * 4096, 4096).await.unwrap(), data);
                if i % 16 == 0 {
                    c.flush().await.unwrap();
                }
            });
        }
        let all = async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("requests stalled");
    }
}

/// Reply buffers are recycled on both sides (the server's per-connection
/// pool, the caller's buffer in `read_into`): a read that covers holes must
/// still return zeroes there, never the bytes an earlier read left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_read_buffers_never_show_stale_bytes() {
    let ts = TestServer::start().await;
    ts.add("disk", Arc::new(MemExport::new(64 * MIB)));
    for mode in MODES {
        let c = connect(&ts, "disk", mode).await;
        let base = region(mode);
        // Fill the pools with 1 MiB buffers full of data.
        let full = vec![0xa5u8; MIB as usize];
        c.write(base, &full, false).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..8 {
            buf = c.read_into(base, vec![0; MIB as usize]).await.unwrap();
            assert_eq!(buf, full);
        }
        // The next MiB: data, a hole that was never written, data.
        let (a, b) = (base + MIB, base + MIB + 768 * 1024);
        c.write(a, &[1u8; 128 * 1024], false).await.unwrap();
        c.write(b, &[2u8; 256 * 1024], false).await.unwrap();
        let mut want = vec![0u8; MIB as usize];
        want[..128 * 1024].fill(1);
        want[768 * 1024..].fill(2);
        buf.fill(0xee);
        for _ in 0..4 {
            buf = c.read_into(a, buf).await.unwrap();
            assert_eq!(buf, want, "{mode:?}: stale bytes in a hole (read_into)");
            assert_eq!(c.read(a, MIB).await.unwrap(), want, "{mode:?}: read");
        }
    }
}
