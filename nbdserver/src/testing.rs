//! A harness that feeds arbitrary bytes to the server as if they came from a
//! client. Used by the cargo-fuzz target (`fuzz/fuzz_targets/client_stream.rs`)
//! and by the stream tests, so both exercise exactly the same path.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::export::{BlockExport, MemExport};
use crate::server::{Server, ServerConfig};

/// The server did not finish within the time limit after its input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server did not finish within the time limit: it hangs on this input")]
pub struct Hang;

/// A fresh server with small in-memory exports: `""` (1 MiB, empty),
/// `"disk"` (8 MiB write-back, some data) and `"ro"` (read-only, 64 KiB).
/// Limits are tightened so a fuzz run stays small.
pub fn fuzz_server() -> Server {
    let server = Server::new(ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        max_inflight_bytes: 16 * 1024 * 1024,
        max_inflight_requests: 32,
        ..ServerConfig::default()
    });
    let disk = MemExport::new_write_back(8 * 1024 * 1024).with_description("fuzz disk");
    // Cannot fail: in range.
    let _ = disk.write(4096, &[0xa5; 70_000], false);
    let ro = MemExport::from_bytes(&[7u8; 65536]).read_only();
    let exports: [(&str, Arc<dyn BlockExport>); 3] = [
        ("", Arc::new(MemExport::new(1024 * 1024))),
        ("disk", Arc::new(disk)),
        ("ro", Arc::new(ro)),
    ];
    for (name, e) in exports {
        // Names are short and unique.
        let _ = server.add_export(name, e);
    }
    server
}

/// Serve one connection whose client side sends `input` and then closes its
/// sending half, while everything the server sends is read and discarded.
/// Returns [`Hang`] if the connection has not ended within `limit`.
pub async fn feed_client_bytes(server: &Server, input: &[u8], limit: Duration) -> Result<(), Hang> {
    let (client, server_side) = tokio::io::duplex(256 * 1024);
    let srv = server.clone();
    let conn = tokio::spawn(async move {
        // Errors are expected for garbage input; only hangs and panics count.
        let _ = srv.serve_connection(server_side, "fuzz").await;
    });
    let (mut rd, mut wr) = tokio::io::split(client);
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let input = input.to_vec();
    let feed = tokio::spawn(async move {
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        // Keep the half open until the server is done with it.
        wr
    });
    let outcome = tokio::time::timeout(limit, conn).await;
    feed.abort();
    drain.abort();
    // Wait for the helpers to be dropped so that nothing from this input
    // outlives the call (fuzzers check for leaks between inputs).
    let _ = feed.await;
    let _ = drain.await;
    match outcome {
        Ok(Ok(())) => Ok(()),
        // A panic inside the connection task: re-raise it so fuzzers see it.
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(_)) => Ok(()),
        Err(_) => Err(Hang),
    }
}
