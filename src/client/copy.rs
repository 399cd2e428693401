//! One disk's copy: open the source, plan (whole blocks), fetch the parent
//! point's block digests, copy to the daemon's NBD target and flush.

use super::*;

/// Open the source (creating the new checkpoint first with --rotate), plan,
/// copy and flush. Returns the open source so that completion happens
/// while it is still held.
pub(super) async fn copy_disk(
    ctx: &Ctx,
    p: &mut Prepared,
    target: &DiskTarget,
    state: &DiskState,
    bar: ProgressBar,
) -> (Option<Arc<Source>>, Result<(), DiskFailure>) {
    let d = p.arg.disk_id;
    let err = |m: String| DiskFailure {
        message: format!("disk {d}: {m}"),
        daemon_gone: false,
    };
    let incremental = target.mode == BackupType::Incremental;
    if incremental {
        if target.previous_change_id != p.previous.change_id {
            return (p.nbd.take().map(Arc::new), Err(err(format!(
                "the daemon asks for changes since {:?}, but {:?} was checked on the source; run again",
                target.previous_change_id, p.previous.change_id
            ))));
        }
        if p.read_from.is_none() {
            return (p.nbd.take().map(Arc::new), Err(err(format!(
                "the daemon made this disk incremental from {:?}, but the source has no such bitmap",
                target.previous_change_id
            ))));
        }
    }
    let read_from = if incremental {
        p.read_from.clone()
    } else {
        None
    };

    // The source.
    let source = match &p.kind {
        SourceKind::Nbd(_) => match p.nbd.take() {
            Some(s) => s,
            None => return (None, Err(err("the NBD source is not open".into()))),
        },
        SourceKind::Qcow2(path) => {
            if p.create {
                if let Some(n) = &p.checkpoint {
                    if let Err(e) = bitmap::add(path, n).await {
                        return (
                            None,
                            Err(err(format!("cannot create the checkpoint bitmap: {e}"))),
                        );
                    }
                    ctx.created.add(path.clone(), n.clone(), d);
                }
            }
            let mut bitmaps: Vec<String> = read_from.iter().cloned().collect();
            if let Some(n) = &p.checkpoint {
                if !bitmaps.contains(n) {
                    bitmaps.push(n.clone());
                }
            }
            let server = match QemuNbd::start(path, &bitmaps).await {
                Ok(s) => s,
                Err(e) => return (None, Err(err(e))),
            };
            let uri = server.uri();
            match Source::open_nbd(&uri, &bitmaps, Some(server)).await {
                Ok(s) => s,
                Err(e) => return (None, Err(err(e))),
            }
        }
        SourceKind::RawFile(path) | SourceKind::BlockDevice(path) => {
            match Source::open_file(path) {
                Ok(s) => s,
                Err(e) => return (None, Err(err(e))),
            }
        }
    };
    let source = Arc::new(source);
    if source.size() != p.size {
        let now = source.size();
        return (
            Some(source),
            Err(err(format!(
                "the source changed size during the run ({} then {now} bytes)",
                p.size
            ))),
        );
    }
    if let Some(n) = &p.checkpoint {
        if !source.has_bitmap(n) {
            return (
                Some(source),
                Err(err(format!(
                "the checkpoint bitmap {n:?} is not on the source any more; nothing was recorded"
            ))),
            );
        }
    }
    if let Some(b) = &read_from {
        if !source.has_bitmap(b) {
            return (
                Some(source),
                Err(err(format!(
                    "the bitmap {b:?} to read changes from is gone"
                ))),
            );
        }
    }
    let r = copy_planned(ctx, &source, read_from.as_deref(), target, state, bar).await;
    (Some(source), r.map_err(err_with(d)))
}

pub(super) fn err_with(d: u32) -> impl Fn(DiskFailure) -> DiskFailure {
    move |f| DiskFailure {
        message: format!("disk {d}: {}", f.message),
        daemon_gone: f.daemon_gone,
    }
}

pub(super) async fn copy_planned(
    ctx: &Ctx,
    source: &Arc<Source>,
    read_from: Option<&str>,
    target: &DiskTarget,
    state: &DiskState,
    bar: ProgressBar,
) -> Result<(), DiskFailure> {
    let plain = |m: String| DiskFailure {
        message: m,
        daemon_gone: false,
    };
    let size = source.size();
    let fresh = target.parent_backup_id.is_none();
    let alloc = source.allocation().await.map_err(plain)?;
    let plan = match read_from {
        Some(b) => {
            let dirty = source.dirty(b).await.map_err(plain)?;
            lock(&state.report).dirty_bytes = Some(plan::dirty_bytes(&dirty));
            plan::incremental(size, &dirty, alloc.as_deref())
        }
        None => plan::full(size, alloc.as_deref(), !fresh),
    };
    // Whole blocks, so that each block read is hashed whole.
    let plan = plan.aligned(size, crate::digest::BLOCK);
    bar.set_length(plan.data_bytes);
    let request = ctx
        .opts
        .request_size
        .clamp(4096, 32 << 20)
        .next_multiple_of(crate::digest::BLOCK);
    let parent_digests = match &target.parent_backup_id {
        None => Some(None),
        Some(parent) => match ctx.api.point_digests(parent, target.disk_id).await {
            Ok(bytes) => Some(Some(
                crate::digest::file::dense_from_bytes(&bytes, size, "from the daemon")
                    .map_err(|e| plain(format!("the parent point's block digests: {e}")))?,
            )),
            Err(e) if matches!(e.status(), Some(404 | 409)) => None,
            Err(e) => {
                return Err(plain(format!(
                    "reading the parent point's block digests: {e}"
                )))
            }
        },
    };
    let sd = Arc::new(match parent_digests {
        Some(p) => digests::SourceDigests::new(size, p, true),
        None => digests::SourceDigests::new(size, None, false),
    });
    *lock(&state.digests) = Some(Arc::clone(&sd));
    let pieces = Arc::new(plan.split(request, 1 << 30));

    // Connect to the target.
    let uri: NbdUri = target
        .nbd_uri
        .parse()
        .map_err(|e| plain(format!("the daemon gave an unusable NBD URI: {e}")))?;
    let mut targets = Vec::new();
    for _ in 0..ctx.opts.connections {
        let opts = crate::tls::nbd_options(ConnectOptions {
            meta_contexts: Vec::new(),
            ..ConnectOptions::default()
        });
        let c = Client::connect_uri(&uri, opts)
            .await
            .map_err(|e| DiskFailure {
                message: format!("cannot connect to the target {}: {e}", target.nbd_uri),
                daemon_gone: true,
            })?;
        if c.size() != size {
            return Err(plain(format!(
                "the target {} is {} bytes, the source {size}",
                target.nbd_uri,
                c.size()
            )));
        }
        targets.push(c);
        if !targets[0].info().can_multi_conn() {
            break;
        }
    }
    let targets = Arc::new(targets);
    let cfg = transfer::CopyConfig {
        in_flight: ctx.opts.requests,
        fresh_target: fresh,
        limit: ctx.limit.clone(),
        digests: Some(sd),
        drop_write_at: std::env::var("CHAINVAULT_FAULT_DROP_WRITE")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    let copied = transfer::copy(
        Arc::clone(source),
        Arc::clone(&targets),
        pieces,
        cfg,
        Arc::clone(&state.counters),
        bar,
    )
    .await;
    if let Err(e) = copied {
        return Err(DiskFailure {
            message: e.message,
            daemon_gone: e.target_gone,
        });
    }
    // Durable before completion (the daemon flushes again, but a client
    // that never flushed was one of the old system's faults).
    for t in targets.iter() {
        t.flush().await.map_err(|e| DiskFailure {
            message: format!("flush of the target failed: {e}"),
            daemon_gone: matches!(e, chainvault_nbd::ClientError::Disconnected(_)),
        })?;
    }
    if let Ok(v) = Arc::try_unwrap(targets) {
        for t in v {
            let _ = t.disconnect().await;
        }
    }
    Ok(())
}
