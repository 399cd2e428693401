//! The reply side of a connection: one task reads every reply and hands
//! each to the request waiting on its cookie.

use super::*;

pub(super) fn fail_all(inner: &Inner, why: String) {
    let pending: Vec<Pending> = {
        let mut p = inner.lock_pending();
        p.dead = Some(why.clone());
        p.map.drain().map(|(_, v)| v).collect()
    };
    for p in pending {
        let _ = p.tx.send(Err(ClientError::Disconnected(why.clone())));
    }
}

pub(super) async fn reader_task<R: AsyncRead + Unpin>(mut r: R, inner: Arc<Inner>) {
    let why = match read_replies(&mut r, &inner).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    fail_all(&inner, why);
}

async fn read_reply_header<R: AsyncRead + Unpin>(
    r: &mut R,
    mode: HeaderMode,
) -> Result<Option<ReplyHeader>, ClientError> {
    let mut m = [0u8; 4];
    let n = r.read(&mut m).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut m[n..]).await?;
    let magic = u32::from_be_bytes(m);
    match magic {
        proto::SIMPLE_REPLY_MAGIC if mode != HeaderMode::Extended => {
            let error = r.read_u32().await?;
            let cookie = Cookie(r.read_u64().await?);
            Ok(Some(ReplyHeader::Simple { error, cookie }))
        }
        proto::STRUCTURED_REPLY_MAGIC if mode == HeaderMode::Structured => {
            let flags = r.read_u16().await?;
            let reply_type = r.read_u16().await?;
            let cookie = Cookie(r.read_u64().await?);
            let length = u64::from(r.read_u32().await?);
            Ok(Some(ReplyHeader::Chunk {
                flags,
                reply_type,
                cookie,
                offset: 0,
                length,
            }))
        }
        proto::EXTENDED_REPLY_MAGIC if mode == HeaderMode::Extended => {
            let flags = r.read_u16().await?;
            let reply_type = r.read_u16().await?;
            let cookie = Cookie(r.read_u64().await?);
            let offset = r.read_u64().await?;
            let length = r.read_u64().await?;
            Ok(Some(ReplyHeader::Chunk {
                flags,
                reply_type,
                cookie,
                offset,
                length,
            }))
        }
        other => Err(ClientError::Protocol(format!(
            "unexpected reply magic {other:#010x}"
        ))),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, inner: &Inner) -> Result<(), ClientError> {
    let mode = inner.info.mode;
    loop {
        let Some(h) = read_reply_header(r, mode).await? else {
            return Ok(());
        };
        match h {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = inner.lock_pending().map.remove(&cookie.0).ok_or_else(|| {
                    ClientError::Protocol(format!("reply for unknown cookie {}", cookie.0))
                })?;
                p.reply.simple = true;
                if error != 0 {
                    p.reply.error = Some((NbdErrno(error), String::new()));
                } else if p.command == cmd::READ {
                    if mode.structured() {
                        return Err(ClientError::Protocol(
                            "simple reply to a read with structured replies".into(),
                        ));
                    }
                    ensure_read_buffer(&mut p)?;
                    r.read_exact(&mut p.reply.data).await?;
                }
                let _ = p.tx.send(Ok(p.reply));
            }
            ReplyHeader::Chunk {
                flags,
                reply_type: rt,
                cookie,
                length,
                ..
            } => {
                let mut pending = inner.lock_pending().map.remove(&cookie.0);
                let Some(p) = pending.as_mut() else {
                    return Err(ClientError::Protocol(format!(
                        "chunk for unknown cookie {}",
                        cookie.0
                    )));
                };
                handle_chunk(r, p, rt, length).await?;
                let p = pending.take();
                if let Some(mut p) = p {
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        if p.command == cmd::READ && p.reply.error.is_none() {
                            let covered: u64 =
                                p.reply
                                    .chunks
                                    .iter()
                                    .map(|c| match c {
                                        ReadChunk::Data { len, .. }
                                        | ReadChunk::Hole { len, .. } => *len,
                                    })
                                    .sum();
                            if covered != p.len {
                                p.reply.error = Some((
                                    NbdErrno::EIO,
                                    format!("server covered {covered} of {} bytes", p.len),
                                ));
                            }
                        }
                        let _ = p.tx.send(Ok(p.reply));
                    } else {
                        inner.lock_pending().map.insert(cookie.0, p);
                    }
                }
            }
        }
    }
}

/// Size the reply buffer of a read, refusing absurd lengths (only possible
/// through `raw_request`) instead of trying to allocate them.
fn ensure_read_buffer(p: &mut Pending) -> Result<(), ClientError> {
    if p.reply.data.len() as u64 == p.len {
        return Ok(());
    }
    if p.len > MAX_CHUNK_EXTRA {
        return Err(ClientError::Protocol(format!(
            "server sent data for a {}-byte read",
            p.len
        )));
    }
    p.reply.data = vec![0u8; p.len as usize];
    Ok(())
}

async fn handle_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    rt: u16,
    length: u64,
) -> Result<(), ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_string());
    match rt {
        reply_type::NONE => {
            if length != 0 {
                return Err(bad("NONE chunk with a payload"));
            }
        }
        reply_type::OFFSET_DATA => {
            if p.command != cmd::READ || length < 9 {
                return Err(bad("unexpected OFFSET_DATA chunk"));
            }
            let off = r.read_u64().await?;
            let n = length - 8;
            let end = off
                .checked_add(n)
                .ok_or_else(|| bad("data chunk overflows"))?;
            if off < p.offset || end > p.offset.saturating_add(p.len) {
                return Err(bad("data chunk outside the request"));
            }
            ensure_read_buffer(p)?;
            let from = (off - p.offset) as usize;
            r.read_exact(&mut p.reply.data[from..from + n as usize])
                .await?;
            p.reply.chunks.push(ReadChunk::Data {
                offset: off,
                len: n,
            });
        }
        reply_type::OFFSET_HOLE => {
            if p.command != cmd::READ || length != 12 {
                return Err(bad("unexpected OFFSET_HOLE chunk"));
            }
            let off = r.read_u64().await?;
            let n = u64::from(r.read_u32().await?);
            let end = off
                .checked_add(n)
                .ok_or_else(|| bad("hole chunk overflows"))?;
            if n == 0 || off < p.offset || end > p.offset.saturating_add(p.len) {
                return Err(bad("hole chunk outside the request"));
            }
            ensure_read_buffer(p)?;
            let from = (off - p.offset) as usize;
            p.reply.data[from..from + n as usize].fill(0);
            p.reply.chunks.push(ReadChunk::Hole {
                offset: off,
                len: n,
            });
        }
        reply_type::BLOCK_STATUS | reply_type::BLOCK_STATUS_EXT => {
            if p.command != cmd::BLOCK_STATUS || length > MAX_CHUNK_EXTRA {
                return Err(bad("unexpected block status chunk"));
            }
            let mut b = vec![0u8; length as usize];
            r.read_exact(&mut b).await?;
            let ext = rt == reply_type::BLOCK_STATUS_EXT;
            let (head, item) = if ext { (8, 16) } else { (4, 8) };
            if b.len() < head + item || !(b.len() - head).is_multiple_of(item) {
                return Err(bad("malformed block status chunk"));
            }
            let id = be32(&b, 0);
            let mut extents = Vec::new();
            let mut at = head;
            while at < b.len() {
                let (length, flags) = if ext {
                    (be64(&b, at), be64(&b, at + 8) as u32)
                } else {
                    (u64::from(be32(&b, at)), be32(&b, at + 4))
                };
                extents.push(Extent { length, flags });
                at += item;
            }
            p.reply.status.push((id, extents));
        }
        t if reply_type::is_error(t) => {
            if !(6..=MAX_CHUNK_EXTRA).contains(&length) {
                return Err(bad("malformed error chunk"));
            }
            let mut b = vec![0u8; length as usize];
            r.read_exact(&mut b).await?;
            let errno = be32(&b, 0);
            let mlen = usize::from(u16::from_be_bytes([b[4], b[5]]));
            let msg = b
                .get(6..6 + mlen)
                .ok_or_else(|| bad("error message overruns the chunk"))?;
            if p.reply.error.is_none() {
                p.reply.error = Some((NbdErrno(errno), String::from_utf8_lossy(msg).into_owned()));
            }
        }
        _ => return Err(bad("unknown chunk type")),
    }
    Ok(())
}
