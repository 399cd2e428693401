//! `NBD_OPT_STARTTLS` at the byte level: what each TLS mode answers before
//! and after the upgrade, that plaintext state does not survive it, the
//! handshake deadline, and the client's `nbds+unix://` against it.
//! (libnbd, QEMU and the daemon over TLS: tests/security_tls.rs at the
//! workspace root.)

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chainvault_nbd::proto::{opt, rep, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC};
use chainvault_nbd::tls::{
    rustls::pki_types::ServerName, ClientTls, ServerTls, TlsConnector, TlsMode,
};
use chainvault_nbd::{Client, ClientError, ConnectOptions, MemExport, NbdUri, ServerConfig};
use common::TestServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

fn certs() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("run make-test-certs.sh (needs bash and openssl)");
    assert!(
        out.status.success(),
        "make-test-certs.sh failed (is openssl installed? apt-get install openssl): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = dir.path().to_path_buf();
    (dir, p)
}

async fn server(mode: Option<TlsMode>, pki: &Path, timeout: Duration) -> TestServer {
    let mut cfg = ServerConfig {
        handshake_timeout: timeout,
        ..ServerConfig::default()
    };
    if let Some(mode) = mode {
        cfg.tls = Some(
            ServerTls::from_files(
                &pki.join("server-cert.pem"),
                &pki.join("server-key.pem"),
                None,
                mode,
            )
            .unwrap(),
        );
    }
    let ts = TestServer::start_with(cfg).await;
    ts.add("d", Arc::new(MemExport::new(1 << 20)));
    ts
}

async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    assert_eq!(s.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let _flags = s.read_u16().await.unwrap();
    s.write_u32(1 | 2).await.unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
}

async fn option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    o: u32,
    data: &[u8],
) -> (u32, Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&o.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
    reply(s, o).await
}

async fn reply<S: AsyncRead + Unpin>(s: &mut S, o: u32) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
    assert_eq!(s.read_u32().await.unwrap(), o, "reply to another option");
    let t = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (t, d)
}

/// NBD_OPT_INFO / GO payload for export `name` with no info requests.
fn info_req(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// SET_META_CONTEXT payload for `base:allocation` on `name`.
fn meta_req(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    let q = "base:allocation";
    b.extend_from_slice(&(q.len() as u32).to_be_bytes());
    b.extend_from_slice(q.as_bytes());
    b
}

fn connector(pki: &Path) -> TlsConnector {
    let cfg = chainvault_nbd::tls::client_config(Some(&pki.join("ca-cert.pem")), None).unwrap();
    TlsConnector::from(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_starttls_is_unsupported() {
    let (_d, pki) = certs();
    let ts = server(None, &pki, Duration::from_secs(5)).await;
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    let (t, msg) = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(t, rep::ERR_UNSUP, "{}", String::from_utf8_lossy(&msg));
    // Negotiation goes on in plain text.
    let (t, _) = option(&mut s, opt::INFO, &info_req("d")).await;
    assert_eq!(t, rep::INFO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_options_until_starttls_and_forgets_plaintext_state() {
    let (_d, pki) = certs();
    let ts = server(Some(TlsMode::Require), &pki, Duration::from_secs(5)).await;
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    for (o, data) in [
        (opt::LIST, Vec::new()),
        (opt::INFO, info_req("d")),
        (opt::GO, info_req("d")),
        (opt::STRUCTURED_REPLY, Vec::new()),
        (opt::EXTENDED_HEADERS, Vec::new()),
    ] {
        let (t, msg) = option(&mut s, o, &data).await;
        assert_eq!(
            t,
            rep::ERR_TLS_REQD,
            "option {} before STARTTLS",
            opt::name(o)
        );
        assert!(
            String::from_utf8_lossy(&msg).contains("STARTTLS"),
            "{:?}",
            msg
        );
    }
    let (t, _) = option(&mut s, opt::STARTTLS, b"x").await;
    assert_eq!(t, rep::ERR_INVALID, "STARTTLS with data");
    let (t, _) = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(t, rep::ACK);
    let mut s = connector(&pki)
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await
        .expect("TLS handshake");
    let (t, _) = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(t, rep::ERR_INVALID, "a second STARTTLS");
    let (t, _) = option(&mut s, opt::INFO, &info_req("d")).await;
    assert_eq!(t, rep::INFO, "INFO over TLS");
    let (t, _) = reply(&mut s, opt::INFO).await; // block sizes
    assert_eq!(t, rep::INFO);
    let (t, _) = reply(&mut s, opt::INFO).await;
    assert_eq!(t, rep::ACK);

    // On a server that allows plain text, state from before STARTTLS is
    // forgotten: structured replies negotiated in the clear do not count.
    let ts = server(Some(TlsMode::On), &pki, Duration::from_secs(5)).await;
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    let (t, _) = option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(t, rep::ACK);
    let (t, _) = option(&mut s, opt::SET_META_CONTEXT, &meta_req("d")).await;
    assert_eq!(
        t,
        rep::META_CONTEXT,
        "structured replies count before STARTTLS"
    );
    let (t, _) = reply(&mut s, opt::SET_META_CONTEXT).await;
    assert_eq!(t, rep::ACK);
    let (t, _) = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(t, rep::ACK);
    let mut s = connector(&pki)
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await
        .expect("TLS handshake");
    let (t, msg) = option(&mut s, opt::SET_META_CONTEXT, &meta_req("d")).await;
    assert_eq!(
        t,
        rep::ERR_INVALID,
        "structured replies from before STARTTLS survived it: {}",
        String::from_utf8_lossy(&msg)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_hangs_up_on_export_name_and_on_a_stalled_tls_handshake() {
    let (_d, pki) = certs();
    let ts = server(Some(TlsMode::Require), &pki, Duration::from_millis(700)).await;
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.push(b'd');
    s.write_all(&b).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the server did not hang up on EXPORT_NAME without TLS")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server answered EXPORT_NAME without TLS");

    // STARTTLS acknowledged, then no ClientHello: closed at the deadline.
    let mut s = UnixStream::connect(&ts.socket).await.unwrap();
    greet(&mut s).await;
    let (t, _) = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(t, rep::ACK);
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("a stalled TLS handshake was not closed")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_over_nbds_unix_and_plaintext_refusal() {
    let (_d, pki) = certs();
    let ts = server(Some(TlsMode::Require), &pki, Duration::from_secs(5)).await;
    let tls = ClientTls::from_files(Some(&pki.join("ca-cert.pem")), None).unwrap();
    let uri: NbdUri = format!("nbds+unix:///d?socket={}", ts.socket.display())
        .parse()
        .unwrap();
    let c = Client::connect_uri(
        &uri,
        ConnectOptions {
            tls: Some(tls.clone()),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("connect over TLS");
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    c.write(4096, &data, true).await.unwrap();
    assert_eq!(c.read(4096, 65536).await.unwrap(), data);
    c.disconnect().await.unwrap();

    let plain = uri.clone().with_tls(false);
    match Client::connect_uri(&plain, ConnectOptions::default()).await {
        Err(ClientError::OptionRefused { reply, .. }) => assert_eq!(reply, rep::ERR_TLS_REQD),
        other => panic!("plaintext client not refused with ERR_TLS_REQD: {other:?}"),
    }

    // A client that trusts another CA fails the handshake.
    let other = ClientTls::from_files(Some(&pki.join("other/ca-cert.pem")), None).unwrap();
    let r = Client::connect_uri(
        &uri,
        ConnectOptions {
            tls: Some(other),
            ..ConnectOptions::default()
        },
    )
    .await;
    assert!(matches!(r, Err(ClientError::Tls(_))), "{r:?}");

    // nbds:// against a server without TLS says so.
    let off = server(None, &pki, Duration::from_secs(5)).await;
    let uri: NbdUri = format!("nbds+unix:///d?socket={}", off.socket.display())
        .parse()
        .unwrap();
    match Client::connect_uri(
        &uri,
        ConnectOptions {
            tls: Some(tls),
            ..ConnectOptions::default()
        },
    )
    .await
    {
        Err(ClientError::Tls(m)) => assert!(m.contains("does not offer TLS"), "{m}"),
        other => panic!("nbds:// to a plain server: {other:?}"),
    }
}
