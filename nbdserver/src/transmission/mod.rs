//! The transmission phase, server side.
//!
//! One task reads requests off the socket, validates them, and hands them
//! to tokio's blocking pool (`spawn_blocking`), because exports are
//! synchronous: large requests one per thread, small ones that are already
//! buffered in batches of up to `ServerConfig::max_batch`. The worker that
//! ran a request also gets its reply written: replies go into one queue, and
//! whoever queues while nobody is writing becomes the writer for everything
//! queued (no thread hop at queue depth 1, batched writes under load).
//! Requests in flight per connection are bounded by count and by payload
//! bytes, both acquired *before* a payload is read or a read buffer
//! allocated, and released once the reply has been written.

use std::io::{self, IoSlice};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::export::{BlockExport, Capabilities, Extent, MetaContext, ZeroFlags};
use crate::handshake::Negotiated;
use crate::proto::{
    self, cflag, cmd, reply_type, tflag, ContextId, Cookie, HeaderError, HeaderMode, NbdErrno,
    RequestHeader, REPLY_FLAG_DONE, STATE_ZERO,
};
use crate::server::{semaphore_permits, ExportEntry, ExportSlot, InflightGuard, Shared};

/// Errors that end the transmission phase abnormally.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// Socket error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A request header had the wrong magic: the stream is out of sync.
    #[error("{0}; closing the connection")]
    BadHeader(#[from] HeaderError),
    /// A request carried a payload beyond what the server will read.
    #[error("request payload of {0} bytes is beyond the discard limit; closing the connection")]
    PayloadTooLarge(u64),
}

/// Smallest zero run worth sending as a hole chunk instead of data.
const MIN_HOLE: u64 = 4096;
/// At most this many content chunks in one read reply.
const MAX_READ_CHUNKS: usize = 1024;
/// At most this many extents in one block-status chunk.
const MAX_STATUS_EXTENTS: usize = 32 * 1024;

mod replies;
mod sink;

use replies::*;
use sink::*;

#[derive(Default)]
struct Permits {
    _count: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
    /// The same bytes, from the server-wide budget.
    _shared: Option<OwnedSemaphorePermit>,
}

/// Per-connection facts shared with the worker closures.
struct Conn {
    mode: HeaderMode,
    size: u64,
    tx_flags: u16,
    caps: Capabilities,
    min_block: u64,
    max_payload: u64,
    contexts: Vec<(ContextId, MetaContext)>,
    entry: Arc<ExportEntry>,
    /// Counts this connection on its export while it lives.
    _slot: Option<ExportSlot>,
    pool: Arc<BufPool>,
}

/// Run the transmission phase until the client disconnects, the stream
/// fails, or the server closes the connection.
pub(crate) async fn run<S>(
    stream: S,
    neg: Negotiated,
    shared: &Shared,
) -> Result<(), TransmissionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let cfg = &shared.config;
    let conn = Arc::new(Conn {
        mode: neg.mode,
        size: neg.size,
        tx_flags: neg.tx_flags,
        caps: neg.caps,
        min_block: u64::from(neg.block_sizes.minimum.max(1)),
        max_payload: u64::from(neg.block_sizes.maximum),
        contexts: neg.contexts,
        entry: neg.entry,
        _slot: neg.slot,
        pool: Arc::new(BufPool::new(Arc::clone(&shared.pooled))),
    });
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let stop = shared.closing.child_token();
    let sink = Arc::new(ReplySink {
        w: tokio::sync::Mutex::new(Box::pin(wr)),
        queue: Mutex::new(Queue::default()),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        stop: stop.clone(),
        stall_timeout: cfg.stall_timeout,
    });

    let max_count = semaphore_permits(cfg.max_inflight_requests);
    // One request never needs more than the server-wide budget either.
    let max_bytes =
        semaphore_permits(cfg.max_inflight_bytes).min(semaphore_permits(cfg.max_buffered_bytes));
    let count_sem = Arc::new(Semaphore::new(max_count));
    let budget = Budget {
        own: Arc::new(Semaphore::new(max_bytes)),
        shared: Arc::clone(&shared.budget),
        max: max_bytes,
    };
    let limits = Limits {
        discard_limit: cfg.discard_limit,
        max_batch: cfg.max_batch.max(1),
        idle_timeout: cfg.idle_timeout,
        stall_timeout: cfg.stall_timeout,
        max_count,
    };

    // The loop also watches `stop` between requests; this outer select
    // covers a client that stalls in the middle of a header or payload.
    let result = tokio::select! {
        r = read_loop(&mut rd, &conn, &sink, &count_sem, &budget, &limits, &stop) => r,
        _ = stop.cancelled() => Ok(()),
    };

    // Let every request in flight finish and its reply be written.
    let _all = count_sem.acquire_many(max_count as u32).await;
    let closed = sink.close().await;
    match (result, closed) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e.into()),
        (Ok(()), Ok(())) => Ok(()),
    }
}

struct Limits {
    discard_limit: u64,
    max_batch: usize,
    idle_timeout: Option<Duration>,
    stall_timeout: Duration,
    max_count: usize,
}

/// Payload bytes a connection may hold: its own share, and the same bytes
/// again from the server-wide budget.
struct Budget {
    own: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    /// Most one request takes (larger ones take this much).
    max: usize,
}

/// Requests with at most this much payload or read data may be batched.
const SMALL_REQUEST: u64 = 64 * 1024;

/// One validated request ready to run on the export.
struct Job {
    guard: InflightGuard,
    rp: Replier,
    h: RequestHeader,
    work: Work,
    payload: Option<Vec<u8>>,
    permits: Permits,
}

/// Run jobs one after the other on the blocking pool and queue their
/// replies together.
fn dispatch(jobs: Vec<Job>, conn: &Arc<Conn>, sink: &Arc<ReplySink>) {
    if jobs.is_empty() {
        return;
    }
    let conn2 = Arc::clone(conn);
    let sink2 = Arc::clone(sink);
    tokio::task::spawn_blocking(move || {
        let mut msgs = Vec::with_capacity(jobs.len());
        // Count permits are released last, after this worker has let go of
        // everything it shares with the connection: once the reader holds
        // every count permit, no worker touches the connection any more
        // (and the replies are written by then: `close` waits for the
        // active writer).
        let mut counts = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Job {
                guard,
                rp,
                h,
                work,
                payload,
                mut permits,
            } = job;
            counts.push(permits._count.take());
            let bufs = match catch_unwind(AssertUnwindSafe(|| {
                execute(guard.export(), &conn2, &rp, &h, work, payload)
            })) {
                Ok(b) => b,
                Err(_) => {
                    warn!(
                        cmd = cmd::name(h.command),
                        "export panicked while serving a request"
                    );
                    rp.error(NbdErrno::EIO, "internal error in the export")
                }
            };
            // Finished with the export before the reply goes out.
            drop(guard);
            msgs.push(OutMsg {
                bufs,
                _permits: permits,
            });
        }
        sink2.send_many_blocking(msgs);
        drop(sink2);
        drop(conn2);
        drop(counts);
    });
}

/// Take `n` permits. If they are not free right away, first send the
/// pending batch on its way (its jobs hold permits that would otherwise
/// never be released), then wait. `None` when the connection is stopping.
async fn acquire(
    sem: &Arc<Semaphore>,
    n: u32,
    batch: &mut Vec<Job>,
    conn: &Arc<Conn>,
    sink: &Arc<ReplySink>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = Arc::clone(sem).try_acquire_many_owned(n) {
        return Some(p);
    }
    dispatch(std::mem::take(batch), conn, sink);
    tokio::select! {
        _ = stop.cancelled() => None,
        p = Arc::clone(sem).acquire_many_owned(n) => p.ok(),
    }
}

/// Take `bytes` (at most the connection's share) from the connection's and
/// the server's budgets into `permits`. False when the connection stops.
async fn take_bytes(
    budget: &Budget,
    bytes: usize,
    permits: &mut Permits,
    batch: &mut Vec<Job>,
    conn: &Arc<Conn>,
    sink: &Arc<ReplySink>,
    stop: &CancellationToken,
) -> bool {
    let want = bytes.clamp(1, budget.max) as u32;
    let Some(own) = acquire(&budget.own, want, batch, conn, sink, stop).await else {
        return false;
    };
    let Some(shared) = acquire(&budget.shared, want, batch, conn, sink, stop).await else {
        return false;
    };
    permits._bytes = Some(own);
    permits._shared = Some(shared);
    true
}

/// Resolves once the connection has been idle for the idle timeout: no
/// request read and none in flight. Pending forever without a timeout.
async fn idle(limits: &Limits, count_sem: &Semaphore) {
    let Some(limit) = limits.idle_timeout else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(limit).await;
        // Requests still in flight: the client is waiting on us, not idle.
        if count_sem.available_permits() == limits.max_count {
            return;
        }
    }
}

/// Read part of a request under the stall timeout: a client that stops
/// sending in the middle of a request is disconnected.
async fn within_stall<T>(
    limits: &Limits,
    what: &str,
    read: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(limits.stall_timeout, read).await {
        Ok(r) => r,
        Err(_) => {
            warn!(timeout = ?limits.stall_timeout, "client stalled in the middle of {what}; closing");
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "client sent nothing for {:?} in the middle of {what}",
                    limits.stall_timeout
                ),
            ))
        }
    }
}

/// Whether the next request (header and any payload) is already buffered.
fn next_request_buffered(buf: &[u8], mode: HeaderMode) -> bool {
    let hl = mode.request_len();
    if buf.len() < hl {
        return false;
    }
    let h = if mode == HeaderMode::Extended {
        let mut b = [0u8; proto::EXTENDED_REQUEST_LEN];
        b.copy_from_slice(&buf[..hl]);
        RequestHeader::decode_extended(&b)
    } else {
        let mut b = [0u8; proto::COMPACT_REQUEST_LEN];
        b.copy_from_slice(&buf[..hl]);
        RequestHeader::decode_compact(&b)
    };
    let Ok(h) = h else { return false };
    let payload = if h.command == cmd::WRITE
        || (mode == HeaderMode::Extended && h.flags & cflag::PAYLOAD_LEN != 0)
    {
        h.length
    } else {
        0
    };
    (buf.len() as u64).saturating_sub(hl as u64) >= payload
}

/// Read a request header; `Ok(None)` on a clean EOF between requests.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    mode: HeaderMode,
) -> Result<Option<RequestHeader>, TransmissionError> {
    let mut buf = [0u8; proto::EXTENDED_REQUEST_LEN];
    let want = mode.request_len();
    let n = rd.read(&mut buf[..want]).await?;
    if n == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut buf[n..want]).await?;
    let h = if mode == HeaderMode::Extended {
        RequestHeader::decode_extended(&buf)?
    } else {
        let mut c = [0u8; proto::COMPACT_REQUEST_LEN];
        c.copy_from_slice(&buf[..proto::COMPACT_REQUEST_LEN]);
        RequestHeader::decode_compact(&c)?
    };
    Ok(Some(h))
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let want = (buf.len() as u64).min(n) as usize;
        rd.read_exact(&mut buf[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R>(
    rd: &mut BufReader<R>,
    conn: &Arc<Conn>,
    sink: &Arc<ReplySink>,
    count_sem: &Arc<Semaphore>,
    budget: &Budget,
    limits: &Limits,
    stop: &CancellationToken,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin,
{
    // Small requests that are already buffered are collected and run
    // together on one blocking thread: fewer thread hand-offs and batched
    // replies at high queue depth.
    let mut batch: Vec<Job> = Vec::new();
    loop {
        if !batch.is_empty()
            && (batch.len() >= limits.max_batch || !next_request_buffered(rd.buffer(), conn.mode))
        {
            dispatch(std::mem::take(&mut batch), conn, sink);
        }
        let header = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                debug!("connection asked to close");
                return Ok(());
            }
            h = read_header(rd, conn.mode) => h?,
            _ = idle(limits, count_sem) => {
                info!(timeout = ?limits.idle_timeout, "connection idle; closing it");
                dispatch(batch, conn, sink);
                return Ok(());
            }
        };
        let Some(h) = header else {
            debug!("client closed the connection");
            dispatch(batch, conn, sink);
            return Ok(());
        };
        trace!(
            cmd = cmd::name(h.command),
            flags = h.flags,
            offset = h.offset,
            len = h.length,
            cookie = h.cookie.0,
            "request"
        );
        if h.command == cmd::DISC {
            debug!("client sent NBD_CMD_DISC");
            dispatch(batch, conn, sink);
            return Ok(());
        }
        let count = match acquire(count_sem, 1, &mut batch, conn, sink, stop).await {
            Some(p) => p,
            None => return Ok(()),
        };
        let rp = Replier {
            mode: conn.mode,
            cookie: h.cookie,
            offset: h.offset,
        };
        // Replies the reader answers itself (refusals): written right away,
        // then the request's permits are released. Pending batched work is
        // sent on its way first, since writing may wait for the client.
        let send = |bufs: Vec<Bytes>, permits: Permits| async move {
            sink.send(OutMsg {
                bufs,
                _permits: permits,
            })
            .await;
        };

        // --- Payload: find out how many bytes follow the header. ---
        let has_payload_flag = h.flags & cflag::PAYLOAD_LEN != 0;
        // A WRITE always carries its data. With extended headers the
        // extension text asks clients to also set PAYLOAD_LEN on writes, but
        // QEMU's client does not, so the flag is optional for WRITE here.
        let payload_len =
            if h.command == cmd::WRITE || (conn.mode == HeaderMode::Extended && has_payload_flag) {
                h.length
            } else {
                0
            };
        let mut permits = Permits {
            _count: Some(count),
            ..Permits::default()
        };
        if payload_len > conn.max_payload || (payload_len > 0 && h.command != cmd::WRITE) {
            if payload_len > limits.discard_limit.max(conn.max_payload) {
                warn!(
                    len = payload_len,
                    "request payload beyond the discard limit"
                );
                return Err(TransmissionError::PayloadTooLarge(payload_len));
            }
            within_stall(limits, "a refused payload", discard(rd, payload_len)).await?;
            let (errno, msg) = if h.command == cmd::WRITE {
                (
                    NbdErrno::EOVERFLOW,
                    "write payload larger than the maximum payload size",
                )
            } else {
                (NbdErrno::EINVAL, "this command does not take a payload")
            };
            dispatch(std::mem::take(&mut batch), conn, sink);
            send(rp.error(errno, msg), permits).await;
            continue;
        }
        let mut payload: Option<Vec<u8>> = None;
        if h.command == cmd::WRITE {
            if !take_bytes(
                budget,
                payload_len as usize,
                &mut permits,
                &mut batch,
                conn,
                sink,
                stop,
            )
            .await
            {
                return Ok(());
            }
            let mut v = conn.pool.take(payload_len as usize);
            let got = within_stall(
                limits,
                "a write payload",
                (&mut *rd).take(payload_len).read_to_end(&mut v),
            )
            .await?;
            if (got as u64) < payload_len {
                return Err(TransmissionError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a write payload",
                )));
            }
            payload = Some(v);
        }

        // --- Validation. ---
        let work = match validate(conn, &h) {
            Ok(w) => w,
            Err((errno, msg)) => {
                dispatch(std::mem::take(&mut batch), conn, sink);
                send(rp.error(errno, msg), permits).await;
                continue;
            }
        };
        if let Work::Nothing = work {
            dispatch(std::mem::take(&mut batch), conn, sink);
            send(zero_length_reply(&rp, h.command), permits).await;
            continue;
        }
        // Reply buffers count against the byte budget too: a read's data, or
        // the largest block-status reply this request could produce.
        let reply_bytes = match work {
            Work::Read { len, .. } => Some(len as usize),
            Work::BlockStatus { .. } => Some(conn.contexts.len() * (8 + 16 * MAX_STATUS_EXTENTS)),
            _ => None,
        };
        if let Some(bytes) = reply_bytes {
            if !take_bytes(budget, bytes, &mut permits, &mut batch, conn, sink, stop).await {
                return Ok(());
            }
        }
        let Some(guard) = conn.entry.begin() else {
            dispatch(std::mem::take(&mut batch), conn, sink);
            send(
                rp.error(
                    NbdErrno::ESHUTDOWN,
                    "the export has been removed from the server",
                ),
                permits,
            )
            .await;
            continue;
        };
        let small = match work {
            Work::Read { len, .. } => len <= SMALL_REQUEST,
            Work::Write { .. } => h.length <= SMALL_REQUEST,
            Work::BlockStatus { .. } => false,
            _ => true,
        };
        let job = Job {
            guard,
            rp,
            h,
            work,
            payload,
            permits,
        };
        if small && limits.max_batch > 1 {
            batch.push(job);
        } else {
            dispatch(vec![job], conn, sink);
        }
    }
}

/// Validated work for one request.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Zero-length request: succeed without touching the export.
    Nothing,
    Read {
        len: u64,
        df: bool,
    },
    Write {
        fua: bool,
    },
    Flush,
    Trim {
        len: u64,
        fua: bool,
    },
    Cache {
        len: u64,
    },
    Zero {
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        len: u64,
        req_one: bool,
    },
}

type Refusal = (NbdErrno, &'static str);

fn validate(conn: &Conn, h: &RequestHeader) -> Result<Work, Refusal> {
    // PAYLOAD_LEN only exists with extended headers (and was dealt with
    // when the payload was read).
    let flags = if conn.mode == HeaderMode::Extended {
        h.flags & !cflag::PAYLOAD_LEN
    } else {
        h.flags
    };
    let allowed = match h.command {
        cmd::READ => cflag::DF,
        cmd::WRITE | cmd::TRIM => cflag::FUA,
        cmd::FLUSH | cmd::CACHE => 0,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => return Err((NbdErrno::EINVAL, "unknown command")),
    };
    if flags & !allowed != 0 {
        return Err((NbdErrno::EINVAL, "command flag not valid for this command"));
    }
    let tf = conn.tx_flags;
    if flags & cflag::FUA != 0 && tf & tflag::SEND_FUA == 0 {
        return Err((NbdErrno::EINVAL, "FUA was not negotiated"));
    }
    if flags & cflag::DF != 0 && tf & tflag::SEND_DF == 0 {
        return Err((NbdErrno::EINVAL, "DF was not negotiated"));
    }
    if flags & cflag::FAST_ZERO != 0 && tf & tflag::SEND_FAST_ZERO == 0 {
        return Err((NbdErrno::EINVAL, "FAST_ZERO was not negotiated"));
    }
    let read_only = tf & tflag::READ_ONLY != 0;
    let writes = matches!(h.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && read_only {
        return Err((NbdErrno::EPERM, "the export is read-only"));
    }
    match h.command {
        cmd::FLUSH => {
            if tf & tflag::SEND_FLUSH == 0 {
                return Err((NbdErrno::EINVAL, "flush is not supported by this export"));
            }
            return Ok(Work::Flush);
        }
        cmd::TRIM if tf & tflag::SEND_TRIM == 0 => {
            return Err((NbdErrno::EINVAL, "trim is not supported by this export"));
        }
        cmd::WRITE_ZEROES if tf & tflag::SEND_WRITE_ZEROES == 0 => {
            return Err((
                NbdErrno::EINVAL,
                "write zeroes is not supported by this export",
            ));
        }
        cmd::BLOCK_STATUS => {
            if !conn.mode.structured() {
                return Err((NbdErrno::EINVAL, "block status needs structured replies"));
            }
            if conn.contexts.is_empty() {
                return Err((NbdErrno::EINVAL, "no metadata context was negotiated"));
            }
        }
        _ => {}
    }
    let len = h.length;
    let end = h.offset.checked_add(len);
    let in_range = matches!(end, Some(e) if e <= conn.size);
    if !in_range {
        return Err(if writes && h.command != cmd::TRIM {
            (
                NbdErrno::ENOSPC,
                "request extends beyond the end of the export",
            )
        } else {
            (
                NbdErrno::EINVAL,
                "request extends beyond the end of the export",
            )
        });
    }
    if conn.min_block > 1
        && (!h.offset.is_multiple_of(conn.min_block) || !len.is_multiple_of(conn.min_block))
    {
        return Err((
            NbdErrno::EINVAL,
            "request is not aligned to the minimum block size",
        ));
    }
    if h.command == cmd::READ && len > conn.max_payload {
        return Err((
            NbdErrno::EOVERFLOW,
            "read larger than the maximum payload size",
        ));
    }
    if h.command == cmd::BLOCK_STATUS && len == 0 {
        return Err((NbdErrno::EINVAL, "block status of length zero"));
    }
    if len == 0 {
        return Ok(Work::Nothing);
    }
    let fua = flags & cflag::FUA != 0;
    Ok(match h.command {
        cmd::READ => Work::Read {
            len,
            df: flags & cflag::DF != 0,
        },
        cmd::WRITE => Work::Write { fua },
        cmd::TRIM => Work::Trim { len, fua },
        cmd::CACHE => Work::Cache { len },
        cmd::WRITE_ZEROES => Work::Zero {
            len,
            flags: ZeroFlags {
                may_unmap: flags & cflag::NO_HOLE == 0,
                fast: flags & cflag::FAST_ZERO != 0,
                fua,
            },
        },
        cmd::BLOCK_STATUS => Work::BlockStatus {
            len,
            req_one: flags & cflag::REQ_ONE != 0,
        },
        _ => return Err((NbdErrno::EINVAL, "unknown command")),
    })
}

fn zero_length_reply(rp: &Replier, command: u16) -> Vec<Bytes> {
    if command == cmd::READ && rp.mode.structured() {
        // A read must be answered with chunks once structured replies are on.
        let v = rp.chunk_header(REPLY_FLAG_DONE, reply_type::NONE, 0, 0);
        return vec![Bytes::from(v)];
    }
    rp.ok()
}

fn execute(
    export: &dyn BlockExport,
    conn: &Conn,
    rp: &Replier,
    h: &RequestHeader,
    work: Work,
    payload: Option<Vec<u8>>,
) -> Vec<Bytes> {
    let off = h.offset;
    match work {
        Work::Nothing => rp.ok(),
        Work::Read { len, df } => read_reply(export, conn, rp, off, len, df),
        Work::Write { fua } => {
            let data = payload.unwrap_or_default();
            let r = match export.write(off, &data, fua) {
                Ok(()) => rp.ok(),
                Err(e) => rp.io_error("write failed", &e),
            };
            conn.pool.give(data);
            r
        }
        Work::Flush => match export.flush() {
            Ok(()) => rp.ok(),
            Err(e) => rp.io_error("flush failed", &e),
        },
        Work::Trim { len, fua } => match export.trim(off, len, fua) {
            Ok(()) => rp.ok(),
            Err(e) => rp.io_error("trim failed", &e),
        },
        Work::Cache { len } => {
            if !conn.caps.cache {
                return rp.ok();
            }
            match export.cache(off, len) {
                Ok(()) => rp.ok(),
                Err(e) => rp.io_error("cache failed", &e),
            }
        }
        Work::Zero { len, flags } => match export.write_zeroes(off, len, flags) {
            Ok(()) => rp.ok(),
            Err(e) => {
                let errno = NbdErrno::from_io(&e);
                if flags.fast && errno == NbdErrno::ENOTSUP {
                    rp.error(NbdErrno::ENOTSUP, "fast zeroing is not possible here")
                } else if errno == NbdErrno::ENOTSUP {
                    // ENOTSUP is reserved for fast-zero refusals.
                    rp.error(NbdErrno::EIO, &format!("write zeroes failed: {e}"))
                } else {
                    rp.io_error("write zeroes failed", &e)
                }
            }
        },
        Work::BlockStatus { len, req_one } => {
            block_status_reply(export, conn, rp, off, len, req_one)
        }
    }
}

/// Map an export error for a command that must not report ENOTSUP.
fn errno_no_enotsup(e: &io::Error) -> NbdErrno {
    match NbdErrno::from_io(e) {
        NbdErrno::ENOTSUP => NbdErrno::EINVAL,
        x => x,
    }
}
