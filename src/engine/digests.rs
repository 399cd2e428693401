//! Block digests in the life of a disk backup: the client's digests of
//! what it read (uploaded before completion), the point's digests computed
//! at completion, and the comparison of the two.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chainvault_qcow::Chain;
use tracing::info;

use super::{repo, Engine, EngineError, EngineResult};
use crate::digest::compute::{self, LayerDigests};
use crate::digest::file::{Kind, Reader, Resolved};
use crate::digest::{block_len, hex, zero_digest, PointDigest, BLOCK};
use crate::model::*;

/// Where a running disk's uploaded source digests wait for its completion.
pub fn source_digests_path(image: &Path) -> PathBuf {
    image.with_extension("source-digests")
}

/// The first block whose uploaded digest differs from what `layers`
/// resolve to, as a sentence naming its offset.
fn first_difference(
    source: &Path,
    layers: &[PathBuf],
    size: u64,
) -> Result<Option<String>, String> {
    let Some(mut point) = Resolved::open(layers, size)? else {
        return Ok(None);
    };
    let mut src = Reader::open(source)?;
    let mut held = point.next_entry()?;
    while let Some((i, want)) = src.next_entry()? {
        while held.is_some_and(|(j, _)| j < i) {
            held = point.next_entry()?;
        }
        let got = match held {
            Some((j, d)) if j == i => d,
            _ => zero_digest(block_len(size, i)),
        };
        if got != want {
            let what = if got == zero_digest(block_len(size, i)) {
                "reads zeroes there (was the write lost?)".to_string()
            } else {
                format!("holds other bytes there (blake3 {}…)", &hex(&got)[..16])
            };
            return Ok(Some(format!(
                "the first differing block is block {i} at offset {} ({} bytes): the client read \
                 blake3 {}…, the point {what}",
                i * BLOCK,
                block_len(size, i),
                &hex(&want)[..16]
            )));
        }
    }
    Ok(None)
}

impl Engine {
    /// `PUT /api/v1/backups/{id}/disks/{disk}/source-digests`: the client's
    /// block digests of what it read, checked and kept until completion.
    pub async fn put_source_digests(
        &self,
        backup_id: &str,
        disk_id: u32,
        body: Vec<u8>,
    ) -> EngineResult<u64> {
        let disk = self.disk_record(backup_id, disk_id)?;
        if disk.status != Status::Running {
            return Err(EngineError::Conflict(format!(
                "disk {disk_id} of backup {backup_id} is {}: source digests are taken only while it runs",
                disk.status.as_str()
            )));
        }
        let mut r = Reader::new(&body[..], body.len() as u64, "in the request".into())
            .map_err(EngineError::BadRequest)?;
        if r.size != disk.capacity_bytes {
            return Err(EngineError::BadRequest(format!(
                "the source digests describe a disk of {} bytes; disk {disk_id} has {}",
                r.size, disk.capacity_bytes
            )));
        }
        if r.kind != Kind::Layer {
            return Err(EngineError::BadRequest(
                "source digests list the blocks the client read (kind 0, layer)".into(),
            ));
        }
        let mut n = 0u64;
        while r.next_entry().map_err(EngineError::BadRequest)?.is_some() {
            n += 1;
        }
        let p = source_digests_path(&self.abs(&disk.image));
        repo::write_atomic(&p, &body).map_err(EngineError::internal)?;
        Ok(n)
    }

    /// Compute the completed layer's digests (its file beside the image) and,
    /// when the client sent a digest, compare. The outer Err is a failure to
    /// compute, the inner one a mismatch; either fails the disk.
    pub(super) async fn digest_completed(
        &self,
        image_rel: &str,
        claimed: Option<PointDigest>,
    ) -> Result<Result<LayerDigests, String>, String> {
        let image = self.abs(image_rel);
        let opts = self.chain_options(false);
        tokio::task::spawn_blocking(move || -> Result<Result<LayerDigests, String>, String> {
            let chain = Chain::open(&image, &opts)
                .map_err(|e| format!("opening {}: {e}", image.display()))?;
            let t0 = std::time::Instant::now();
            let got = compute::complete_layer(&chain, &|_| {})?;
            info!(
                digest = %got.digest,
                blocks = got.blocks_hashed,
                whole = got.whole,
                ms = t0.elapsed().as_millis() as u64,
                "block digests computed"
            );
            let src = source_digests_path(&image);
            let res = match claimed {
                Some(c) if c != got.digest => {
                    let layers = compute::layer_paths(&chain);
                    let place = if src.exists() {
                        first_difference(&src, &layers, chain.size())?.unwrap_or_else(|| {
                            "every block the client read matches; the difference is in blocks it \
                             did not send (it built on other digests of the parent point)"
                                .into()
                        })
                    } else {
                        "the client sent no block digests, so the block is not known".into()
                    };
                    Err(format!(
                        "the stored disk does not match the source: the client's digest is {c}, \
                         the point's {}; {place}",
                        got.digest
                    ))
                }
                // No digest of the whole source (an incremental on a point
                // without digests): the blocks read are still compared.
                None if src.exists() => {
                    match first_difference(&src, &compute::layer_paths(&chain), chain.size())? {
                        Some(place) => Err(format!(
                            "the stored disk does not match the source: {place}"
                        )),
                        None => Ok(got),
                    }
                }
                _ => Ok(got),
            };
            let _ = std::fs::remove_file(&src);
            Ok(res)
        })
        .await
        .map_err(|e| format!("internal error: {e}"))?
    }

    /// `GET /api/v1/backups/{id}/disks/{disk}/digests`: the point's block
    /// digests as a whole digest file (docs/layout.md), for a client that
    /// builds an incremental on it.
    pub async fn point_digests(&self, backup_id: &str, disk_id: u32) -> EngineResult<Vec<u8>> {
        let disk = self.disk_record(backup_id, disk_id)?;
        if disk.status != Status::Completed {
            return Err(EngineError::Conflict(format!(
                "disk {disk_id} of backup {backup_id} is {}; only completed points have digests",
                disk.status.as_str()
            )));
        }
        let image = self.abs(&disk.image);
        let opts = self.chain_options(false);
        let backup_id = backup_id.to_string();
        tokio::task::spawn_blocking(move || -> EngineResult<Vec<u8>> {
            let chain = Arc::new(Chain::open(&image, &opts)?);
            match Resolved::open(&compute::layer_paths(&chain), chain.size())
                .map_err(EngineError::Internal)?
            {
                Some(r) => r.to_whole_bytes().map_err(EngineError::Internal),
                None => Err(EngineError::Conflict(format!(
                    "point {backup_id} disk {disk_id} has no block digests recorded (it was made or \
                     imported before chainvault kept them, or by a development build that used \
                     another construction); the next backup of this disk records them"
                ))),
            }
        })
        .await
        .map_err(EngineError::internal)?
    }
}
