//! Reply messages: chunk and error headers, read replies (data, holes,
//! recycled buffers) and block-status replies.

use super::*;

/// Recycles write-payload buffers, so that a stream of large writes does not
/// map, fault in and unmap fresh memory for every request. Bounded to
/// [`POOL_MAX_BYTES`] per connection and [`POOL_TOTAL_BYTES`] over all.
pub(super) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Bytes held by every connection's pool together.
    total: Arc<AtomicUsize>,
}

pub(super) const POOL_MAX_BYTES: usize = 32 * 1024 * 1024;
pub(super) const POOL_MAX_BUFFER: usize = 4 * 1024 * 1024;
/// Idle buffers kept over all connections together.
pub(super) const POOL_TOTAL_BYTES: usize = 64 * 1024 * 1024;

impl BufPool {
    pub(super) fn new(total: Arc<AtomicUsize>) -> BufPool {
        BufPool {
            free: Mutex::default(),
            total,
        }
    }

    /// A pooled buffer with room for `len` bytes, taken out of the pool.
    fn reuse(&self, len: usize) -> Option<Vec<u8>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free.iter().position(|b| b.capacity() >= len)?;
        let v = free.swap_remove(i);
        self.total.fetch_sub(v.capacity(), Ordering::AcqRel);
        Some(v)
    }

    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        match self.reuse(len) {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(len),
        }
    }

    /// A buffer of exactly `len` initialised bytes for a read to fill. A
    /// recycled buffer keeps its old contents (only growth is cleared): every
    /// byte of it that is sent was read into it first.
    pub(super) fn take_filled(self: &Arc<Self>, len: usize) -> Recycled {
        let mut buf = self.reuse(len).unwrap_or_default();
        buf.truncate(len);
        buf.resize(len, 0);
        Recycled {
            buf,
            pool: Arc::clone(self),
        }
    }

    pub(super) fn give(&self, v: Vec<u8>) {
        if v.capacity() == 0 || v.capacity() > POOL_MAX_BUFFER {
            return;
        }
        let cap = v.capacity();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = free.iter().map(|b| b.capacity()).sum();
        if held + cap > POOL_MAX_BYTES {
            return;
        }
        let room = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + cap <= POOL_TOTAL_BYTES).then_some(t + cap)
            });
        if room.is_ok() {
            free.push(v);
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(|p| p.into_inner());
        let held: usize = free.iter().map(|b| b.capacity()).sum();
        self.total.fetch_sub(held, Ordering::AcqRel);
    }
}

/// A read's reply buffer, sent as [`Bytes`] and returned to its
/// connection's pool when the last slice of it has been written out.
pub(super) struct Recycled {
    pub(super) buf: Vec<u8>,
    pub(super) pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// Builds reply messages for one request.
#[derive(Clone, Copy)]
pub(super) struct Replier {
    pub(super) mode: HeaderMode,
    pub(super) cookie: Cookie,
    pub(super) offset: u64,
}

impl Replier {
    pub(super) fn chunk_header(
        &self,
        flags: u16,
        rtype: u16,
        payload_len: u64,
        extra: usize,
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(proto::EXTENDED_REPLY_LEN + extra);
        proto::encode_chunk_header(
            &mut v,
            self.mode,
            flags,
            rtype,
            self.cookie,
            self.offset,
            payload_len,
        );
        v
    }

    /// Success without payload.
    pub(super) fn ok(&self) -> Vec<Bytes> {
        match self.mode {
            // A simple reply is allowed for payload-less success with
            // structured replies too, and is shorter.
            HeaderMode::Simple | HeaderMode::Structured => {
                vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                    NbdErrno(0),
                    self.cookie,
                ))]
            }
            HeaderMode::Extended => vec![Bytes::from(self.chunk_header(
                REPLY_FLAG_DONE,
                reply_type::NONE,
                0,
                0,
            ))],
        }
    }

    /// Error, with a message where the protocol can carry one.
    pub(super) fn error(&self, errno: NbdErrno, msg: &str) -> Vec<Bytes> {
        trace!(cookie = self.cookie.0, %errno, msg, "error reply");
        match self.mode {
            HeaderMode::Simple => vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                errno,
                self.cookie,
            ))],
            HeaderMode::Structured | HeaderMode::Extended => {
                let msg = proto::truncate_message(msg).as_bytes();
                let plen = 6 + msg.len();
                let mut v =
                    self.chunk_header(REPLY_FLAG_DONE, reply_type::ERROR, plen as u64, plen);
                v.extend_from_slice(&errno.0.to_be_bytes());
                v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                v.extend_from_slice(msg);
                vec![Bytes::from(v)]
            }
        }
    }

    /// An export error. ENOTSUP is reserved for refused fast zeroing, so
    /// here it becomes EINVAL.
    pub(super) fn io_error(&self, what: &str, e: &io::Error) -> Vec<Bytes> {
        self.error(errno_no_enotsup(e), &format!("{what}: {e}"))
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) zero: bool,
}

/// Split a read into data and zero segments using `base:allocation`.
pub(super) fn read_segments(export: &dyn BlockExport, offset: u64, len: u64) -> Vec<Segment> {
    let whole = vec![Segment {
        start: offset,
        len,
        zero: false,
    }];
    let extents = match export.block_status(offset, len, MetaContext::BaseAllocation) {
        Ok(e) => e,
        Err(e) => {
            debug!(error = %e, "block status failed; sending the read as data");
            return whole;
        }
    };
    let end = offset + len;
    let mut raw: Vec<Segment> = Vec::new();
    let mut pos = offset;
    for e in extents {
        if pos >= end || e.length == 0 {
            break;
        }
        let l = e.length.min(end - pos);
        raw.push(Segment {
            start: pos,
            len: l,
            zero: e.flags & STATE_ZERO != 0,
        });
        pos += l;
    }
    if pos < end {
        raw.push(Segment {
            start: pos,
            len: end - pos,
            zero: false,
        });
    }
    // Small holes are cheaper as data; merge neighbours of the same kind and
    // cap the number of chunks.
    let mut out: Vec<Segment> = Vec::new();
    for mut s in raw {
        if s.zero && (s.len < MIN_HOLE || out.len() >= MAX_READ_CHUNKS - 1) {
            s.zero = false;
        }
        match out.last_mut() {
            Some(last) if last.zero == s.zero => last.len += s.len,
            _ => out.push(s),
        }
    }
    out
}

pub(super) fn read_reply(
    export: &dyn BlockExport,
    conn: &Conn,
    rp: &Replier,
    offset: u64,
    len: u64,
    df: bool,
) -> Vec<Bytes> {
    // `len` is bounded by the maximum payload (32 MiB by default).
    let n = len as usize;
    if !rp.mode.structured() {
        let mut buf = conn.pool.take_filled(n);
        return match export.read(offset, &mut buf.buf) {
            Ok(()) => vec![
                Bytes::copy_from_slice(&proto::encode_simple_reply(NbdErrno(0), rp.cookie)),
                Bytes::from_owner(buf),
            ],
            Err(e) => rp.error(errno_no_enotsup(&e), ""),
        };
    }
    let segments = if !df && conn.caps.base_allocation && len >= 2 * MIN_HOLE {
        read_segments(export, offset, len)
    } else {
        vec![Segment {
            start: offset,
            len,
            zero: false,
        }]
    };
    // Hole segments of the buffer are never sent, so they are not cleared.
    let mut buf = conn.pool.take_filled(n);
    for s in segments.iter().filter(|s| !s.zero) {
        let from = (s.start - offset) as usize;
        let to = from + s.len as usize;
        if let Err(e) = export.read(s.start, &mut buf.buf[from..to]) {
            return rp.error(errno_no_enotsup(&e), &format!("read failed: {e}"));
        }
    }
    let data = Bytes::from_owner(buf);
    let mut out = Vec::with_capacity(segments.len() * 2);
    let last = segments.len().saturating_sub(1);
    for (i, s) in segments.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if s.zero {
            let mut v = rp.chunk_header(flags, reply_type::OFFSET_HOLE, 12, 12);
            v.extend_from_slice(&s.start.to_be_bytes());
            // Holes lie within one read, bounded by the maximum payload.
            v.extend_from_slice(&(s.len as u32).to_be_bytes());
            out.push(Bytes::from(v));
        } else {
            let mut v = rp.chunk_header(flags, reply_type::OFFSET_DATA, 8 + s.len, 8);
            v.extend_from_slice(&s.start.to_be_bytes());
            out.push(Bytes::from(v));
            let from = (s.start - offset) as usize;
            out.push(data.slice(from..from + s.len as usize));
        }
    }
    out
}

/// Clip, merge and bound the extents an export returned.
pub(super) fn normalize_extents(
    extents: Vec<Extent>,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    for e in extents {
        if pos >= end || e.length == 0 {
            break;
        }
        let l = e.length.min(end - pos);
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += l,
            _ => {
                if out.len() >= MAX_STATUS_EXTENTS {
                    break;
                }
                out.push(Extent {
                    length: l,
                    flags: e.flags,
                })
            }
        }
        pos += l;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

pub(super) fn block_status_reply(
    export: &dyn BlockExport,
    conn: &Conn,
    rp: &Replier,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Vec<Bytes> {
    let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(conn.contexts.len());
    for &(id, ctx) in &conn.contexts {
        let supported = match ctx {
            MetaContext::BaseAllocation => conn.caps.base_allocation,
            MetaContext::AllocationDepth => conn.caps.allocation_depth,
            MetaContext::DirtyBitmap(_) => true,
        };
        let extents = if supported {
            match export.block_status(offset, len, ctx) {
                Ok(e) => normalize_extents(e, offset, len, req_one),
                Err(e) => {
                    return rp.error(errno_no_enotsup(&e), &format!("block status failed: {e}"))
                }
            }
        } else {
            // base:allocation without support in the export: all data.
            vec![Extent {
                length: len,
                flags: 0,
            }]
        };
        if extents.is_empty() {
            return rp.error(NbdErrno::EIO, "the export returned no block status");
        }
        let mut v;
        match rp.mode {
            HeaderMode::Extended => {
                let plen = 8 + 16 * extents.len();
                v = rp.chunk_header(0, reply_type::BLOCK_STATUS_EXT, plen as u64, plen);
                v.extend_from_slice(&id.0.to_be_bytes());
                v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                for e in &extents {
                    v.extend_from_slice(&e.length.to_be_bytes());
                    v.extend_from_slice(&u64::from(e.flags).to_be_bytes());
                }
            }
            _ => {
                let plen = 4 + 8 * extents.len();
                v = rp.chunk_header(0, reply_type::BLOCK_STATUS, plen as u64, plen);
                v.extend_from_slice(&id.0.to_be_bytes());
                for e in &extents {
                    // Compact requests have 32-bit lengths and extents are
                    // clipped to the request, so this fits.
                    let l = u32::try_from(e.length).unwrap_or(u32::MAX);
                    v.extend_from_slice(&l.to_be_bytes());
                    v.extend_from_slice(&e.flags.to_be_bytes());
                }
            }
        }
        chunks.push(v);
    }
    // Mark the last chunk as final: the flags field sits at bytes 4..6 of
    // both structured and extended chunk headers.
    if let Some(last) = chunks.last_mut() {
        last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    }
    chunks.into_iter().map(Bytes::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::STATE_HOLE;

    #[test]
    pub(super) fn normalize_clips_and_merges() {
        let e = vec![
            Extent {
                length: 100,
                flags: 0,
            },
            Extent {
                length: 100,
                flags: 0,
            },
            Extent {
                length: 0,
                flags: 3,
            },
            Extent {
                length: 500,
                flags: 3,
            },
        ];
        let n = normalize_extents(e.clone(), 1000, 250, false);
        assert_eq!(
            n,
            vec![Extent {
                length: 200,
                flags: 0
            }]
        );
        let n = normalize_extents(e.clone(), 1000, 150, true);
        assert_eq!(
            n,
            vec![Extent {
                length: 150,
                flags: 0
            }]
        );
        let e = vec![
            Extent {
                length: 100,
                flags: 0,
            },
            Extent {
                length: 500,
                flags: 3,
            },
        ];
        let n = normalize_extents(e, 0, 300, false);
        assert_eq!(
            n,
            vec![
                Extent {
                    length: 100,
                    flags: 0
                },
                Extent {
                    length: 200,
                    flags: 3
                }
            ]
        );
    }

    #[test]
    pub(super) fn segments_coalesce_small_holes() {
        let m = crate::export::MemExport::new(1 << 20);
        m.write(0, &[1u8; 10], false).unwrap();
        m.write(200 * 1024, &[1u8; 10], false).unwrap();
        let s = read_segments(&m, 0, 1 << 20);
        assert_eq!(s.iter().map(|s| s.len).sum::<u64>(), 1 << 20);
        assert!(s.iter().any(|s| s.zero));
        assert!(!s[0].zero);
        let _ = STATE_HOLE;
    }
}
