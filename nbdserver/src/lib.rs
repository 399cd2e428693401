//! `chainvault-nbd`: an NBD (Network Block Device) server and a small client.
//!
//! * [`export`]: the synchronous [`BlockExport`] trait the server serves, plus
//!   [`FileExport`] (raw file) and [`MemExport`] (memory).
//! * [`server`]: [`Server`] with a run-time export registry, TCP and unix
//!   listeners, draining removal of exports and graceful shutdown.
//! * [`handshake`] / [`transmission`]: the two protocol phases, drivable over
//!   any `AsyncRead + AsyncWrite` stream (see [`Server::serve_connection`]).
//! * [`client`]: a concurrent client and NBD URI parsing.
//! * [`proto`]: wire constants and headers.
//! * [`tls`]: rustls configuration for `NBD_OPT_STARTTLS` (both sides).
//! * [`testing`]: the harness behind the fuzz target (arbitrary client bytes).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use chainvault_nbd::{MemExport, Server, ServerConfig};
//! let server = Server::new(ServerConfig::default());
//! server.add_export("disk0", Arc::new(MemExport::new(1 << 30)))?;
//! let addr = server.listen_tcp("127.0.0.1:0".parse()?).await?;
//! println!("serving {}", addr.uri("disk0"));
//! // ... later: drain and release the export, then stop.
//! let _export = server.remove_export("disk0").await;
//! server.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod testing;
pub mod tls;
pub mod transmission;

pub use client::{Client, ClientError, ConnectOptions, NbdUri};
pub use export::{
    BlockExport, BlockSizes, Capabilities, Extent, FileExport, MemExport, MetaContext, ZeroFlags,
};
pub use proto::NbdErrno;
pub use server::{ConnectionError, ListenAddr, Server, ServerConfig, ServerError, ShutdownReport};
