//! `chainvault export`: serve one image or chain over NBD, like qemu-nbd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chainvault_nbd::{Server, ServerConfig};
use chainvault_qcow::{Chain, ChainOptions};
use clap::Args;

use crate::export::QcowExport;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image to serve (qcow2 with its backing chain, or raw).
    pub file: PathBuf,
    /// Serve read-only (always the case for raw files).
    #[arg(long, short = 'r')]
    pub read_only: bool,
    /// Export name clients ask for.
    #[arg(long, short = 'x', default_value = "")]
    pub name: String,
    /// Listen on this unix socket.
    #[arg(long, short = 'k', value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address [default: 127.0.0.1:10809].
    #[arg(long, short = 'l', value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Backing files must resolve inside this directory [default: the image's directory].
    #[arg(long, value_name = "DIR")]
    pub backing_root: Option<PathBuf>,
    /// Most backing layers to follow below the top.
    #[arg(long, default_value_t = 256)]
    pub max_depth: usize,
    /// Memory for cached L2 tables, per image.
    #[arg(long, value_parser = crate::units::parse_size, default_value = "32M")]
    pub cache_size: u64,
}

pub fn run(a: ExportArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chainvault-nbd")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(a))
}

async fn serve(a: ExportArgs) -> anyhow::Result<u8> {
    let writable = !a.read_only
        && chainvault_qcow::chain::probe_format(&a.file)? == chainvault_qcow::chain::Format::Qcow2;
    let opts = ChainOptions {
        root: a.backing_root.clone(),
        max_depth: a.max_depth,
        writable,
        l2_cache_bytes: a.cache_size,
    };
    let file = a.file.clone();
    let chain = tokio::task::spawn_blocking(move || Chain::open(&file, &opts)).await??;
    let chain = Arc::new(chain);
    let layers = chain.layers().len();
    let desc = format!(
        "{}{}",
        a.file.display(),
        if layers > 1 {
            format!(" ({layers} layers)")
        } else {
            String::new()
        }
    );
    let export = Arc::new(QcowExport::new(chain.clone(), desc));

    let server = Server::new(ServerConfig::default());
    server.add_export(a.name.clone(), export)?;
    let addr = match (&a.socket, a.listen) {
        (Some(p), _) => server.listen_unix(p).await?,
        (None, Some(addr)) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "listening on a non-loopback address: anyone who can reach it can read and write the image");
            }
            server.listen_tcp(addr).await?
        }
        (None, None) => server.listen_tcp("127.0.0.1:10809".parse()?).await?,
    };
    println!(
        "Serving {} {} at {}",
        a.file.display(),
        if writable { "read-write" } else { "read-only" },
        addr.uri(&a.name)
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    eprintln!("chainvault export: shutting down");
    let report = server.shutdown(Duration::from_secs(10)).await;
    tracing::info!(?report, "server stopped");
    let flushed = tokio::task::spawn_blocking(move || chain.flush()).await?;
    if let Err(e) = flushed {
        bail!("final flush of {} failed: {e}", a.file.display());
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(0)
}
