//! Serve a raw file or an in-memory disk over NBD, for manual testing and
//! benchmarking:
//!
//! ```text
//! cargo run --release -p chainvault-nbd --example serve -- \
//!     (--socket PATH | --tcp 127.0.0.1:10809) (--file PATH [--read-only] | --mem BYTES) [--name NAME]
//!     [--tls-dir DIR [--tls on|require] [--tls-verify-clients]]
//! ```
//!
//! `--tls-dir` names a directory laid out as QEMU's tls-creds-x509 expects
//! (server-cert.pem, server-key.pem, ca-cert.pem; see
//! scripts/make-test-certs.sh). TLS is then required unless `--tls on`.
//!
//! Stops on Ctrl-C (or SIGTERM) with a 5 second grace period.

use std::sync::Arc;
use std::time::Duration;

use chainvault_nbd::tls::{ServerTls, TlsMode};
use chainvault_nbd::{BlockExport, FileExport, MemExport, Server, ServerConfig};

fn usage() -> ! {
    eprintln!(
        "usage: serve (--socket PATH | --tcp ADDR) (--file PATH [--read-only] | --mem BYTES) [--name NAME] [--tls-dir DIR [--tls on|require] [--tls-verify-clients]]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let (mut socket, mut tcp, mut file, mut mem, mut name, mut read_only) =
        (None, None, None, None, String::new(), false);
    let (mut tls_dir, mut tls_mode, mut verify_clients) = (None, TlsMode::Require, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next(),
            "--tcp" => tcp = args.next(),
            "--file" => file = args.next(),
            "--mem" => mem = args.next().and_then(|s| s.parse::<u64>().ok()),
            "--name" => name = args.next().unwrap_or_else(|| usage()),
            "--read-only" => read_only = true,
            "--tls-dir" => tls_dir = args.next().map(std::path::PathBuf::from),
            "--tls" => {
                tls_mode = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--tls-verify-clients" => verify_clients = true,
            _ => usage(),
        }
    }
    let export: Arc<dyn BlockExport> = match (file, mem) {
        (Some(f), None) => Arc::new(FileExport::open(&f, read_only).unwrap_or_else(|e| {
            eprintln!("cannot open {f}: {e}");
            std::process::exit(1)
        })),
        (None, Some(size)) => Arc::new(MemExport::new(size)),
        _ => usage(),
    };
    let mut config = ServerConfig::default();
    if let Some(d) = &tls_dir {
        let ca = d.join("ca-cert.pem");
        let tls = ServerTls::from_files(
            &d.join("server-cert.pem"),
            &d.join("server-key.pem"),
            verify_clients.then_some(ca.as_path()),
            tls_mode,
        );
        config.tls = Some(tls.unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        }));
    }
    let server = Server::new(config);
    if let Err(e) = server.add_export(name.clone(), export) {
        eprintln!("{e}");
        std::process::exit(1)
    }
    let addr = match (socket, tcp) {
        (Some(p), None) => server.listen_unix(p).await,
        (None, Some(a)) => match a.parse() {
            Ok(a) => server.listen_tcp(a).await,
            Err(_) => usage(),
        },
        _ => usage(),
    };
    match addr {
        Ok(a) => println!("{}", a.nbd_uri(&name, tls_dir.is_some())),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot watch SIGTERM: {e}");
            std::process::exit(1)
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let report = server.shutdown(Duration::from_secs(5)).await;
    if !report.flush_errors.is_empty() {
        eprintln!("flush errors: {:?}", report.flush_errors);
        std::process::exit(1)
    }
}
