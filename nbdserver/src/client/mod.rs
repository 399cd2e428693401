//! A small NBD client on tokio.
//!
//! It negotiates fixed newstyle with `NBD_OPT_GO`, asks for extended headers
//! (falling back to structured replies, then simple replies) and for metadata
//! contexts, and then lets any number of tasks issue requests concurrently on
//! one connection: a background task reads replies and routes them by cookie.
//!
//! URIs: `nbd://host[:port]/export` (default port 10809) and
//! `nbd+unix:///export?socket=PATH`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::export::Extent;
use crate::proto::{
    self, cflag, cmd, info, opt, rep, reply_type, tflag, Cookie, HeaderMode, NbdErrno, ReplyHeader,
    RequestHeader, MAX_STRING_LEN,
};

/// Prefix of QEMU's dirty bitmap metadata contexts (`qemu:dirty-bitmap:NAME`).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// Extent flag of a `qemu:dirty-bitmap:NAME` context: the extent was written
/// since the bitmap was created (bit 0, QEMU's docs/interop/nbd.txt).
pub const STATE_DIRTY: u32 = 1 << 0;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest option reply payload the client accepts.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest structured reply chunk payload the client accepts (beyond data).
const MAX_CHUNK_EXTRA: u64 = 64 * 1024 * 1024;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The URI could not be parsed or uses an unsupported scheme.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused a handshake option.
    #[error("server refused {option}: reply {reply:#x}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        /// Option name.
        option: &'static str,
        /// Reply type (an `NBD_REP_ERR_*` value).
        reply: u32,
        /// Server message.
        message: String,
    },
    /// A request failed on the server.
    #[error("server error {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        /// Error value.
        errno: NbdErrno,
        /// Server message (structured replies only).
        message: String,
    },
    /// The export does not support the operation (flag not advertised).
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// The connection is gone.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// TLS could not be set up: the server refused STARTTLS, or the TLS
    /// handshake failed (an untrusted certificate, a name mismatch, a
    /// client certificate the server does not accept).
    #[error("TLS: {0}")]
    Tls(String),
}

impl ClientError {
    /// The NBD error value, if the server failed the request.
    pub fn errno(&self) -> Option<NbdErrno> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

mod negotiate;
mod replies;
mod uri;

pub use negotiate::list_exports;
use negotiate::*;
use replies::reader_task;
pub use uri::{NbdUri, Transport};

// ---------------------------------------------------------------------------
// Options and results
// ---------------------------------------------------------------------------

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Ask for extended headers first (falls back if refused).
    pub extended_headers: bool,
    /// Ask for structured replies (if extended headers are off or refused).
    pub structured_replies: bool,
    /// Metadata contexts to select (needs structured replies or extended
    /// headers). Defaults to `base:allocation`. A server that does not know a
    /// context simply leaves it out: [`ExportInfo::contexts`] says which were
    /// granted, e.g. whether `qemu:dirty-bitmap:NAME` exists on the export.
    pub meta_contexts: Vec<String>,
    /// Queries sent with `NBD_OPT_LIST_META_CONTEXT` before selecting, on the
    /// same connection (e.g. `qemu:dirty-bitmap:` lists every exported
    /// bitmap); the answers land in [`ExportInfo::available_contexts`]. Empty
    /// (the default) sends no list request. Listing on the same connection
    /// matters for servers such as `qemu-nbd` without `-t`, which exit after
    /// their first client.
    pub list_meta_contexts: Vec<String>,
    /// Trust and identity for `nbds://` URIs. `None` with an `nbds://` URI
    /// trusts the system's CA bundle and presents no client certificate.
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            extended_headers: true,
            structured_replies: true,
            meta_contexts: vec![proto::CONTEXT_BASE_ALLOCATION.to_string()],
            list_meta_contexts: Vec::new(),
            tls: None,
        }
    }
}

impl ConnectOptions {
    /// Default options selecting exactly these metadata contexts.
    pub fn with_contexts<I, S>(contexts: I) -> ConnectOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ConnectOptions {
            meta_contexts: contexts.into_iter().map(Into::into).collect(),
            ..ConnectOptions::default()
        }
    }
}

/// The metadata context name of the QEMU dirty bitmap `name`
/// (`qemu:dirty-bitmap:NAME`). In its extents, flag bit 0
/// ([`STATE_DIRTY`]) marks blocks written since the bitmap was
/// created (QEMU's docs/interop/nbd.txt).
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("{}{name}", DIRTY_BITMAP_PREFIX)
}

/// What the handshake established.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Description, if the server sent one.
    pub description: Option<String>,
    /// Block sizes (minimum, preferred, maximum), if sent.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Negotiated header mode.
    pub mode: HeaderMode,
    /// Selected metadata contexts: id → name.
    pub contexts: Vec<(u32, String)>,
    /// What `NBD_OPT_LIST_META_CONTEXT` answered for
    /// [`ConnectOptions::list_meta_contexts`]; `None` when nothing was asked
    /// or the server refused to list.
    pub available_contexts: Option<Vec<String>>,
}

impl ExportInfo {
    /// The id the server gave metadata context `name`, if it was granted.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Whether metadata context `name` was granted.
    pub fn has_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }

    /// Names of the dirty bitmaps the server listed
    /// (from a `qemu:dirty-bitmap:` list query), sorted.
    pub fn listed_dirty_bitmaps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .available_contexts
            .iter()
            .flatten()
            .filter_map(|c| c.strip_prefix(DIRTY_BITMAP_PREFIX))
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    /// Export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.has(tflag::READ_ONLY)
    }
    /// Flush supported.
    pub fn can_flush(&self) -> bool {
        self.has(tflag::SEND_FLUSH)
    }
    /// FUA supported.
    pub fn can_fua(&self) -> bool {
        self.has(tflag::SEND_FUA)
    }
    /// Trim supported.
    pub fn can_trim(&self) -> bool {
        self.has(tflag::SEND_TRIM)
    }
    /// Write zeroes supported.
    pub fn can_zero(&self) -> bool {
        self.has(tflag::SEND_WRITE_ZEROES)
    }
    /// Fast zero supported.
    pub fn can_fast_zero(&self) -> bool {
        self.has(tflag::SEND_FAST_ZERO)
    }
    /// DF supported.
    pub fn can_df(&self) -> bool {
        self.has(tflag::SEND_DF)
    }
    /// Multi-conn promised.
    pub fn can_multi_conn(&self) -> bool {
        self.has(tflag::CAN_MULTI_CONN)
    }
    /// Cache supported.
    pub fn can_cache(&self) -> bool {
        self.has(tflag::SEND_CACHE)
    }
    fn max_payload(&self) -> u64 {
        self.block_sizes
            .map(|(_, _, m)| u64::from(m))
            .unwrap_or(u64::from(proto::DEFAULT_MAX_PAYLOAD))
            .max(512)
    }
}

/// One content chunk of a structured read reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadChunk {
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    Data {
        /// Absolute offset.
        offset: u64,
        /// Bytes of data.
        len: u64,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    Hole {
        /// Absolute offset.
        offset: u64,
        /// Bytes of zeroes.
        len: u64,
    },
}

/// A read with the chunks it arrived in.
#[derive(Debug, Clone)]
pub struct ReadReply {
    /// The bytes read.
    pub data: Vec<u8>,
    /// Content chunks, in arrival order (empty for simple replies).
    pub chunks: Vec<ReadChunk>,
}

/// Flags for [`Client::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroRequest {
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub fast: bool,
    /// `NBD_CMD_FLAG_FUA`.
    pub fua: bool,
}

/// The reply to a raw request.
#[derive(Debug, Clone, Default)]
pub struct RawReply {
    /// First error reported, if any.
    pub error: Option<(NbdErrno, String)>,
    /// Read data (for reads).
    pub data: Vec<u8>,
    /// Read chunks (structured reads).
    pub chunks: Vec<ReadChunk>,
    /// Block status per context id.
    pub status: Vec<(u32, Vec<Extent>)>,
    /// Whether the server answered with a simple reply.
    pub simple: bool,
}

// ---------------------------------------------------------------------------
// Connection plumbing
// ---------------------------------------------------------------------------

type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

struct Pending {
    command: u16,
    offset: u64,
    len: u64,
    reply: RawReply,
    tx: oneshot::Sender<Result<RawReply, ClientError>>,
}

#[derive(Default)]
struct PendingMap {
    map: HashMap<u64, Pending>,
    dead: Option<String>,
}

struct Inner {
    writer: tokio::sync::Mutex<BoxWrite>,
    pending: Mutex<PendingMap>,
    next_cookie: AtomicU64,
    info: ExportInfo,
}

impl Inner {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, PendingMap> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connected NBD client. Requests take `&self` and may run concurrently.
pub struct Client {
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connect to an `nbd://` or `nbd+unix://` URI with default options.
    pub async fn connect(uri: &str) -> Result<Client, ClientError> {
        let uri: NbdUri = uri.parse()?;
        Client::connect_uri(&uri, ConnectOptions::default()).await
    }

    /// Connect to a parsed URI (`nbds://` upgrades with STARTTLS first).
    pub async fn connect_uri(uri: &NbdUri, opts: ConnectOptions) -> Result<Client, ClientError> {
        if uri.tls {
            let (r, w) = connect_tls(uri, &opts).await?;
            return Client::handshake(r, w, &uri.export, opts, true).await;
        }
        let (r, w) = connect_stream_box(&uri.transport).await?;
        Client::handshake(r, w, &uri.export, opts, false).await
    }

    /// Connect over TCP.
    pub async fn connect_tcp(
        host: &str,
        port: u16,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        Client::connect_uri(&NbdUri::tcp(host, port, export), opts).await
    }

    /// Connect over a unix socket.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        Client::connect_uri(&NbdUri::unix(path.as_ref(), export), opts).await
    }

    /// Run the handshake over any byte stream (e.g. `tokio::io::duplex`).
    pub async fn connect_stream<S>(
        stream: S,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Client::handshake(Box::pin(r), Box::pin(w), export, opts, false).await
    }

    /// What the handshake established.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Send one request exactly as given and wait for its complete reply.
    /// Errors reported by the server are returned in [`RawReply::error`].
    /// Useful for tests of edge cases; normal code uses the typed methods.
    pub async fn raw_request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
    ) -> Result<RawReply, ClientError> {
        self.raw_request_into(command, flags, offset, length, payload, Vec::new())
            .await
    }

    /// [`Client::raw_request`] with the buffer a read's data lands in: one of
    /// exactly `length` bytes is used as it is (the reply fills all of it,
    /// holes included), so a caller that reuses buffers pays no allocation
    /// and no clearing per read.
    async fn raw_request_into(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
        data: Vec<u8>,
    ) -> Result<RawReply, ClientError> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.lock_pending();
            if let Some(why) = &p.dead {
                return Err(ClientError::Disconnected(why.clone()));
            }
            p.map.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    len: length,
                    reply: RawReply {
                        data,
                        ..RawReply::default()
                    },
                    tx,
                },
            );
        }
        let h = RequestHeader {
            flags,
            command,
            cookie: Cookie(cookie),
            offset,
            length,
        };
        let sent = async {
            let head = match self.inner.info.mode {
                HeaderMode::Extended => h.encode_extended().to_vec(),
                _ => h
                    .encode_compact()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "length needs extended headers")
                    })?
                    .to_vec(),
            };
            let mut w = self.inner.writer.lock().await;
            write_all_two(&mut w, &head, payload.unwrap_or_default()).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.inner.lock_pending().map.remove(&cookie);
            return Err(e.into());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Disconnected("reply reader stopped".into())),
        }
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
    ) -> Result<RawReply, ClientError> {
        self.request_into(command, flags, offset, length, payload, Vec::new())
            .await
    }

    async fn request_into(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
        data: Vec<u8>,
    ) -> Result<RawReply, ClientError> {
        let mut flags = flags;
        if payload.is_some() && self.inner.info.mode == HeaderMode::Extended {
            flags |= cflag::PAYLOAD_LEN;
        }
        let r = self
            .raw_request_into(command, flags, offset, length, payload, data)
            .await?;
        if let Some((errno, message)) = r.error {
            return Err(ClientError::Server { errno, message });
        }
        Ok(r)
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        let max = self.inner.info.max_payload();
        if len <= max {
            return Ok(self.request(cmd::READ, 0, offset, len, None).await?.data);
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut done = 0u64;
        while done < len {
            let n = max.min(len - done);
            out.extend_from_slice(
                &self
                    .request(cmd::READ, 0, offset + done, n, None)
                    .await?
                    .data,
            );
            done += n;
        }
        Ok(out)
    }

    /// Read `buf.len()` bytes at `offset` into `buf`, which is handed back
    /// filled: callers that copy many blocks reuse one buffer per request in
    /// flight instead of allocating and clearing one per read. Reads longer
    /// than the maximum payload go through [`Client::read`].
    pub async fn read_into(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let len = buf.len() as u64;
        if len > self.inner.info.max_payload() {
            return self.read(offset, len).await;
        }
        Ok(self
            .request_into(cmd::READ, 0, offset, len, None, buf)
            .await?
            .data)
    }

    /// Read with the structured chunks visible; `df` sets NBD_CMD_FLAG_DF.
    pub async fn read_chunks(
        &self,
        offset: u64,
        len: u64,
        df: bool,
    ) -> Result<ReadReply, ClientError> {
        if df && !self.inner.info.can_df() {
            return Err(ClientError::Unsupported("NBD_CMD_FLAG_DF"));
        }
        let flags = if df { cflag::DF } else { 0 };
        let r = self.request(cmd::READ, flags, offset, len, None).await?;
        Ok(ReadReply {
            data: r.data,
            chunks: r.chunks,
        })
    }

    /// Write `data` at `offset` (split at the maximum payload size).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        if self.inner.info.is_read_only() {
            return Err(ClientError::Unsupported("writes (the export is read-only)"));
        }
        if fua && !self.inner.info.can_fua() {
            return Err(ClientError::Unsupported("FUA"));
        }
        let flags = if fua { cflag::FUA } else { 0 };
        let max = self.inner.info.max_payload() as usize;
        if data.is_empty() {
            self.request(cmd::WRITE, flags, offset, 0, Some(&[]))
                .await?;
            return Ok(());
        }
        for (i, piece) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            self.request(cmd::WRITE, flags, off, piece.len() as u64, Some(piece))
                .await?;
        }
        Ok(())
    }

    /// Flush.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.inner.info.can_flush() {
            return Err(ClientError::Unsupported("flush"));
        }
        self.request(cmd::FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    /// Trim (discard).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        if !self.inner.info.can_trim() {
            return Err(ClientError::Unsupported("trim"));
        }
        let flags = if fua { cflag::FUA } else { 0 };
        self.request_ranged(cmd::TRIM, flags, offset, len).await
    }

    /// Prefetch hint.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.inner.info.can_cache() {
            return Err(ClientError::Unsupported("cache"));
        }
        self.request_ranged(cmd::CACHE, 0, offset, len).await
    }

    /// Write zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        z: ZeroRequest,
    ) -> Result<(), ClientError> {
        if !self.inner.info.can_zero() {
            return Err(ClientError::Unsupported("write zeroes"));
        }
        if z.fast && !self.inner.info.can_fast_zero() {
            return Err(ClientError::Unsupported("fast zero"));
        }
        let mut flags = 0;
        if z.no_hole {
            flags |= cflag::NO_HOLE;
        }
        if z.fast {
            flags |= cflag::FAST_ZERO;
        }
        if z.fua {
            flags |= cflag::FUA;
        }
        self.request_ranged(cmd::WRITE_ZEROES, flags, offset, len)
            .await
    }

    /// Commands without payload; split into 32-bit pieces without extended
    /// headers.
    async fn request_ranged(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        if self.inner.info.mode == HeaderMode::Extended || len <= u64::from(u32::MAX) {
            return self
                .request(command, flags, offset, len, None)
                .await
                .map(|_| ());
        }
        let step = u64::from(u32::MAX) & !0xfff;
        let mut done = 0u64;
        while done < len {
            let n = step.min(len - done);
            self.request(command, flags, offset + done, n, None).await?;
            done += n;
        }
        Ok(())
    }

    /// Block status for every negotiated context, by context name.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<(String, Vec<Extent>)>, ClientError> {
        // Every id was checked against the negotiated contexts.
        let by_id = self.block_status_ids(offset, len, req_one).await?;
        Ok(by_id
            .into_iter()
            .map(|(id, ext)| {
                let name = self
                    .inner
                    .info
                    .contexts
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                (name, ext)
            })
            .collect())
    }

    /// Block status for every negotiated context, by context id, as the
    /// server answered one request (each context's extents may cover less
    /// than `len`, never more than the server chose).
    pub async fn block_status_ids(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<(u32, Vec<Extent>)>, ClientError> {
        if self.inner.info.contexts.is_empty() {
            return Err(ClientError::Unsupported(
                "block status (no metadata context negotiated)",
            ));
        }
        let len = if self.inner.info.mode == HeaderMode::Extended {
            len
        } else {
            len.min(u64::from(u32::MAX) & !0xfff).max(1)
        };
        let flags = if req_one { cflag::REQ_ONE } else { 0 };
        let r = self
            .request(cmd::BLOCK_STATUS, flags, offset, len, None)
            .await?;
        for (id, _) in &r.status {
            if !self.inner.info.contexts.iter().any(|(i, _)| i == id) {
                return Err(ClientError::Protocol(format!(
                    "block status for unknown context id {id}"
                )));
            }
        }
        Ok(r.status)
    }

    /// The extents of metadata context `context` covering exactly
    /// `[offset, offset + len)`: asks as many times as the server needs
    /// (servers may answer for less than asked) and trims the last extent
    /// to the range. Adjacent extents with the same flags are merged.
    ///
    /// Errors: [`ClientError::Unsupported`] when the context was not
    /// granted; [`ClientError::Protocol`] when the server makes no progress
    /// or leaves the context out of its answer.
    pub async fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, ClientError> {
        let id = self
            .inner
            .info
            .context_id(context)
            .ok_or(ClientError::Unsupported(
                "block status for a metadata context that was not negotiated",
            ))?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size())
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "extents of {offset}+{len} lie beyond the export size {}",
                    self.size()
                ))
            })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let answer = self.block_status_ids(pos, end - pos, false).await?;
            let Some((_, ext)) = answer.into_iter().find(|(i, _)| *i == id) else {
                return Err(ClientError::Protocol(format!(
                    "block status at {pos} did not describe context {context:?}"
                )));
            };
            let before = pos;
            for e in ext {
                if pos >= end {
                    break;
                }
                let length = e.length.min(end - pos);
                if length == 0 {
                    return Err(ClientError::Protocol(format!(
                        "zero-length extent at {pos} for context {context:?}"
                    )));
                }
                match out.last_mut() {
                    Some(l) if l.flags == e.flags => l.length += length,
                    _ => out.push(Extent {
                        length,
                        flags: e.flags,
                    }),
                }
                pos += length;
            }
            if pos == before {
                return Err(ClientError::Protocol(format!(
                    "block status at {pos} for context {context:?} made no progress"
                )));
            }
        }
        Ok(out)
    }

    /// Send NBD_CMD_DISC after the requests in flight have been answered,
    /// and close the connection.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        // Wait (briefly) for requests in flight.
        for _ in 0..1000 {
            if self.inner.lock_pending().map.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let h = RequestHeader {
            flags: 0,
            command: cmd::DISC,
            cookie: Cookie(0),
            offset: 0,
            length: 0,
        };
        let mut w = self.inner.writer.lock().await;
        match self.inner.info.mode {
            HeaderMode::Extended => w.write_all(&h.encode_extended()).await?,
            _ => {
                if let Some(b) = h.encode_compact() {
                    w.write_all(&b).await?
                }
            }
        }
        w.flush().await?;
        let _ = w.shutdown().await;
        Ok(())
    }
}

/// Write a request header and its payload with as few system calls as the
/// socket allows (one `writev` for both, normally): a server that wakes on the
/// header does not then wait for the payload in a second read.
async fn write_all_two(w: &mut BoxWrite, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = w
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}
