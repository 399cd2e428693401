//! The server's limits against clients that misbehave: connections per
//! export and per client address, idle connections, clients that stop
//! reading replies or stop sending a payload, and the server-wide payload
//! budget. (Thousands of stalled handshakes and floods against the daemon:
//! tests/security_hostile.rs at the workspace root.)

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainvault_nbd::proto::{
    cmd, opt, rep, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC,
};
use chainvault_nbd::{Client, ListenAddr, MemExport, Server, ServerConfig};
use common::TestServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

const MIB: u64 = 1 << 20;

/// Read the greeting and answer it (fixed newstyle, no zeroes).
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    assert_eq!(s.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let _flags = s.read_u16().await.unwrap();
    s.write_u32(1 | 2).await.unwrap();
}

/// Send NBD_OPT_GO for `name`; the final reply's type and data.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, name: &str) -> (u32, Vec<u8>) {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(&data);
    s.write_all(&b).await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        assert_eq!(s.read_u32().await.unwrap(), opt::GO);
        let t = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).await.unwrap();
        if t != rep::INFO {
            return (t, d);
        }
    }
}

/// A compact READ request header.
fn read_request(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd::READ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Wait until the server has `n` open connections (or fail after `limit`).
async fn wait_connections(server: &Server, n: usize, limit: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while server.active_connections() != n {
        assert!(
            t0.elapsed() < limit,
            "{what}: still {} connections after {limit:?}, expected {n}",
            server.active_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// Whether the server closed `s` without a word (EOF within `within`).
async fn closed_silently(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 8];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn connect_from(src: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_takes_at_most_its_limit_of_connections() {
    let ts = TestServer::start_with(ServerConfig {
        max_connections_per_export: 2,
        ..ServerConfig::default()
    })
    .await;
    ts.add("d", Arc::new(MemExport::new(MIB)));
    ts.add("other", Arc::new(MemExport::new(MIB)));
    let a = Client::connect(&ts.uri("d")).await.unwrap();
    let b = Client::connect(&ts.uri("d")).await.unwrap();

    // A third one is refused with NBD_REP_ERR_POLICY and a message that says why.
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    let (t, msg) = go(&mut s, "d").await;
    let msg = String::from_utf8_lossy(&msg).into_owned();
    assert_eq!(
        t,
        rep::ERR_POLICY,
        "third connection on a 2-connection export: {msg}"
    );
    assert!(
        msg.contains("limit per export"),
        "the refusal says why: {msg:?}"
    );
    // The same handshake may still choose another export.
    let (t, _) = go(&mut s, "other").await;
    assert_eq!(t, rep::ACK, "another export is not affected");
    drop(s);

    // NBD_INFO does not count; a slot is given back when its client leaves.
    a.disconnect().await.unwrap();
    wait_connections(
        &ts.server,
        1,
        Duration::from_secs(5),
        "after one client left",
    )
    .await;
    let c = Client::connect(&ts.uri("d"))
        .await
        .expect("a freed slot is reusable");
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    assert_eq!(b.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_takes_at_most_its_limit_of_connections() {
    common::init_tracing();
    let server = Server::new(ServerConfig {
        max_connections_per_client: 3,
        ..ServerConfig::default()
    });
    server
        .add_export("d", Arc::new(MemExport::new(MIB)))
        .unwrap();
    let ListenAddr::Tcp(addr) = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
    else {
        unreachable!()
    };
    let hostile: IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from(hostile, addr).await;
        greet(&mut s).await;
        held.push(s);
    }
    // The fourth from the same address is closed before the greeting.
    let mut s = connect_from(hostile, addr).await;
    assert!(
        closed_silently(&mut s, Duration::from_secs(5)).await,
        "a fourth connection from one address must be closed at once"
    );
    // Another address is served as usual.
    let c = Client::connect(&format!("nbd://127.0.0.1:{}/d", addr.port()))
        .await
        .unwrap();
    assert_eq!(c.read(0, 512).await.unwrap(), vec![0u8; 512]);
    // Closing one gives its place back.
    held.pop();
    let t0 = Instant::now();
    loop {
        let mut s = connect_from(hostile, addr).await;
        let greeted = tokio::time::timeout(Duration::from_secs(1), s.read_u64()).await;
        if matches!(greeted, Ok(Ok(m)) if m == NBD_MAGIC) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the freed place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let ts = TestServer::start_with(ServerConfig {
        idle_timeout: Some(Duration::from_millis(400)),
        ..ServerConfig::default()
    })
    .await;
    ts.add("d", Arc::new(MemExport::new(MIB)));
    let busy = Client::connect(&ts.uri("d")).await.unwrap();
    let idle = Client::connect(&ts.uri("d")).await.unwrap();
    // The busy one asks something every 100 ms for 1.2 s: three idle periods.
    for _ in 0..12 {
        busy.read(0, 4096)
            .await
            .expect("a client that keeps asking stays connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = idle.read(0, 4096).await;
    assert!(
        e.is_err(),
        "an idle client must have been disconnected, got {e:?}"
    );
    wait_connections(
        &ts.server,
        1,
        Duration::from_secs(5),
        "after the idle timeout",
    )
    .await;
    busy.read(0, 4096).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_replies_is_cut_off_and_others_go_on() {
    // The whole server may buffer 16 MiB; one connection at most 8 MiB of it.
    let ts = TestServer::start_with(ServerConfig {
        stall_timeout: Duration::from_millis(800),
        max_inflight_bytes: 8 * MIB as usize,
        max_buffered_bytes: 16 * MIB as usize,
        ..ServerConfig::default()
    })
    .await;
    ts.add("d", Arc::new(MemExport::new(64 * MIB)));

    // Two hogs ask for 64 MiB of reads each and never read a reply.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut s = UnixStream::connect(&ts.socket).await.unwrap();
        greet(&mut s).await;
        assert_eq!(go(&mut s, "d").await.0, rep::ACK);
        let (_r, mut w) = tokio::io::split(s);
        let t = tokio::spawn(async move {
            for i in 0..64u64 {
                if w.write_all(&read_request(i, i * MIB, MIB as u32))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Keep the read half open and unread.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(_r);
        });
        hogs.push(t);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A well-behaved client still gets its reads answered meanwhile (the
    // hogs hold at most the server-wide budget, not all of it each)...
    let good = Client::connect(&ts.uri("d")).await.unwrap();
    for i in 0..32u64 {
        let t = Instant::now();
        good.read(i * MIB, MIB).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "a read waited {:?} behind the hogs",
            t.elapsed()
        );
    }
    // ...and the hogs are disconnected once their replies stall.
    let took = wait_connections(&ts.server, 1, Duration::from_secs(10), "stalled readers").await;
    eprintln!("stalled readers disconnected {took:?} after the good client's reads");
    good.read(0, MIB).await.unwrap();
    for h in hogs {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_stops_arriving_ends_the_connection() {
    let ts = TestServer::start_with(ServerConfig {
        stall_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await;
    ts.add("d", Arc::new(MemExport::new(MIB)));
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    assert_eq!(go(&mut s, "d").await.0, rep::ACK);
    // A 64 KiB WRITE with only 1 KiB of its payload sent.
    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&cmd::WRITE.to_be_bytes());
    h.extend_from_slice(&1u64.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&(64u32 * 1024).to_be_bytes());
    h.extend_from_slice(&[0xAB; 1024]);
    s.write_all(&h).await.unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the server must hang up on a stalled payload, got {r:?}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "hung up too early: {:?}",
        t0.elapsed()
    );
}
