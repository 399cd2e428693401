//! `chainvault digest SOURCE`: the content digest of a disk
//! (`cvblk2-blake3:<hex>`, docs/layout.md "Block digests"), from a raw file,
//! a block device, a qcow2 image with its backing chain, or an NBD URI, so
//! that an operator can compare a production disk with a point.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::client::digests::SourceDigests;
use crate::client::plan;
use crate::client::source::{classify, Source, SourceKind};
use crate::digest::{compute, PointDigest, BLOCK};

#[derive(Debug, Args)]
pub struct DigestArgs {
    /// A raw file, block device, qcow2 image (read with its backing files)
    /// or NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Print `{"source": ..., "size": ..., "digest": ...}`.
    #[arg(long)]
    pub json: bool,
}

/// Bytes per read, and reads in flight, from raw files and NBD.
const PIECE: u64 = 4 << 20;
const IN_FLIGHT: usize = 8;

pub fn run(a: DigestArgs) -> anyhow::Result<u8> {
    let kind = match classify(&a.source) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("chainvault digest: {}", e.replacen("--disk ", "", 1));
            return Ok(2);
        }
    };
    let t0 = std::time::Instant::now();
    let (size, digest) = match kind {
        SourceKind::Qcow2(path) => {
            let opts = chainvault_qcow::ChainOptions {
                root: None,
                max_depth: 4096,
                writable: false,
                l2_cache_bytes: 32 << 20,
            };
            let chain = match chainvault_qcow::Chain::open(&path, &opts) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("chainvault digest: cannot open {}: {e}", path.display());
                    return Ok(1);
                }
            };
            match compute::chain_digest(&chain, &|_| {}) {
                Ok(d) => (chain.size(), d),
                Err(e) => {
                    eprintln!("chainvault digest: {}: {e}", path.display());
                    return Ok(1);
                }
            }
        }
        k => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            match rt.block_on(digest_source(k)) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("chainvault digest: {}: {e}", a.source);
                    return Ok(1);
                }
            }
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "source": a.source,
                "size": size,
                "digest": digest.to_string(),
                "seconds": t0.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!("{digest}  {}", a.source);
    }
    Ok(0)
}

/// Read what the source's allocation map calls data (all of it without a
/// map), on whole blocks, and hash it.
async fn digest_source(kind: SourceKind) -> Result<(u64, PointDigest), String> {
    let source = match &kind {
        SourceKind::Nbd(uri) => Source::open_nbd(uri, &[], None).await?,
        SourceKind::RawFile(p) | SourceKind::BlockDevice(p) => Source::open_file(p)?,
        SourceKind::Qcow2(_) => return Err("qcow2 images are read directly".into()),
    };
    let source = Arc::new(source);
    let size = source.size();
    let alloc = source.allocation().await?;
    let pieces = Arc::new(
        plan::full(size, alloc.as_deref(), false)
            .aligned(size, BLOCK)
            .split(PIECE, PIECE),
    );
    let digests = Arc::new(SourceDigests::new(size, None, true));
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (source, pieces, digests, next) = (
            Arc::clone(&source),
            Arc::clone(&pieces),
            Arc::clone(&digests),
            Arc::clone(&next),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = pieces.get(i).copied() else {
                    return Ok::<(), String>(());
                };
                match p.kind {
                    plan::Kind::Data => {
                        let buf = source.read(p.offset, p.len).await?;
                        let d = Arc::clone(&digests);
                        tokio::task::spawn_blocking(move || d.record(p.offset, &buf))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    plan::Kind::Zero => digests.record_zero(p.offset, p.len),
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    if let Ok(s) = Arc::try_unwrap(source) {
        s.close().await;
    }
    let root = digests
        .root()
        .ok_or_else(|| "internal error: the digest is incomplete".to_string())?;
    Ok((size, root))
}
