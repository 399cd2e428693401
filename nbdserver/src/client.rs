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

// ---------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------

/// How to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP host (name or address, no brackets) and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// Export name.
    pub export: String,
}

impl NbdUri {
    /// `nbd://host:port/export`.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    /// `nbd+unix:///export?socket=path`.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            transport: Transport::Unix(path.into()),
            export: export.into(),
        }
    }
}

fn uri_err(uri: &str, reason: impl Into<String>) -> ClientError {
    ClientError::Uri {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        let keep = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && c == b'/');
        if keep {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl FromStr for NbdUri {
    type Err = ClientError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| uri_err(uri, "missing scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)
            .ok_or_else(|| uri_err(uri, "bad percent-encoding in the export name"))?;
        if export.len() > MAX_STRING_LEN {
            return Err(uri_err(uri, "export name longer than 4096 bytes"));
        }
        let params: Vec<(String, String)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                Ok((
                    percent_decode(k).ok_or_else(|| uri_err(uri, "bad percent-encoding"))?,
                    percent_decode(v).ok_or_else(|| uri_err(uri, "bad percent-encoding"))?,
                ))
            })
            .collect::<Result<_, ClientError>>()?;
        match scheme {
            "nbd" => {
                if authority.is_empty() {
                    return Err(uri_err(uri, "missing host"));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6
                        .split_once(']')
                        .ok_or_else(|| uri_err(uri, "unterminated IPv6 address"))?;
                    let port = match after.strip_prefix(':') {
                        Some(p) => p.parse().map_err(|_| uri_err(uri, "bad port"))?,
                        None if after.is_empty() => DEFAULT_PORT,
                        None => return Err(uri_err(uri, "garbage after IPv6 address")),
                    };
                    (h.to_string(), port)
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (
                            h.to_string(),
                            p.parse().map_err(|_| uri_err(uri, "bad port"))?,
                        ),
                        None => (authority.to_string(), DEFAULT_PORT),
                    }
                };
                if host.is_empty() {
                    return Err(uri_err(uri, "missing host"));
                }
                Ok(NbdUri::tcp(host, port, export))
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(uri_err(
                        uri,
                        "nbd+unix URIs have no host (use nbd+unix:///export?socket=PATH)",
                    ));
                }
                let socket = params
                    .iter()
                    .find(|(k, _)| k == "socket")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| uri_err(uri, "missing ?socket=PATH"))?;
                if socket.is_empty() {
                    return Err(uri_err(uri, "empty socket path"));
                }
                Ok(NbdUri::unix(socket, export))
            }
            "nbds" | "nbds+unix" => Err(uri_err(uri, "TLS is not supported")),
            other => Err(uri_err(uri, format!("unsupported scheme {other:?}"))),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, true);
        match &self.transport {
            Transport::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "nbd://[{host}]:{port}/{export}")
                } else {
                    write!(f, "nbd://{host}:{port}/{export}")
                }
            }
            Transport::Unix(p) => {
                let path = percent_encode(&p.to_string_lossy(), true);
                write!(f, "nbd+unix:///{export}?socket={path}")
            }
        }
    }
}

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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            extended_headers: true,
            structured_replies: true,
            meta_contexts: vec![proto::CONTEXT_BASE_ALLOCATION.to_string()],
            list_meta_contexts: Vec::new(),
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

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    expect: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let magic = r.read_u64().await?;
    if magic != proto::OPTION_REPLY_MAGIC {
        return Err(ClientError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let option = r.read_u32().await?;
    if option != expect {
        return Err(ClientError::Protocol(format!(
            "reply for option {option}, expected {expect}"
        )));
    }
    let rtype = r.read_u32().await?;
    let len = r.read_u32().await?;
    if len > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol(format!(
            "option reply of {len} bytes"
        )));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok((rtype, data))
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

fn refused(option: u32, rtype: u32, data: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        option: opt::name(option),
        reply: rtype,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Send `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` for
/// `export` with `queries`, and collect the `NBD_REP_META_CONTEXT` answers
/// (id, name) up to the final ACK. (For LIST the ids mean nothing.)
async fn meta_context_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    export: &str,
    queries: &[String],
) -> Result<Vec<(u32, String)>, ClientError> {
    let mut b = Vec::new();
    put_string(&mut b, export);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for c in queries {
        if c.len() > MAX_STRING_LEN {
            return Err(ClientError::Protocol(format!(
                "metadata context name longer than {MAX_STRING_LEN} bytes: {:?}...",
                &c[..32]
            )));
        }
        put_string(&mut b, c);
    }
    send_option(s, option, &b).await?;
    let mut out = Vec::new();
    loop {
        let (rtype, data) = read_option_reply(s, option).await?;
        match rtype {
            rep::META_CONTEXT if data.len() >= 4 => {
                let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                out.push((id, String::from_utf8_lossy(&data[4..]).into_owned()));
            }
            rep::META_CONTEXT => {
                return Err(ClientError::Protocol("short NBD_REP_META_CONTEXT".into()))
            }
            rep::ACK => break,
            other => return Err(refused(option, other, &data)),
        }
        if out.len() > 65536 {
            return Err(ClientError::Protocol(
                "server sent more than 65536 metadata contexts".into(),
            ));
        }
    }
    Ok(out)
}

/// Greet the server; returns whether it supports NO_ZEROES.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    let magic = s.read_u64().await?;
    if magic != proto::NBD_MAGIC {
        return Err(ClientError::Protocol(
            "not an NBD server (bad magic)".into(),
        ));
    }
    let style = s.read_u64().await?;
    if style != proto::IHAVEOPT {
        return Err(ClientError::Protocol(
            "server does not speak newstyle negotiation".into(),
        ));
    }
    let flags = s.read_u16().await?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol(
            "server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut cf = proto::FLAG_C_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        cf |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_u32(cf).await?;
    Ok(())
}

async fn connect_stream_box(transport: &Transport) -> Result<(BoxRead, BoxWrite), ClientError> {
    Ok(match transport {
        Transport::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            (Box::pin(r), Box::pin(w))
        }
        Transport::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await?;
            let (r, w) = s.into_split();
            (Box::pin(r), Box::pin(w))
        }
    })
}

/// A read half and write half glued together for the handshake.
struct Joined<'a> {
    r: &'a mut BoxRead,
    w: &'a mut BoxWrite,
}

impl AsyncRead for Joined<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        this.r.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Joined<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.w.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        this.w.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        this.w.as_mut().poll_shutdown(cx)
    }
}

/// List the exports of the server at `transport` (NBD_OPT_LIST), as
/// (name, description) pairs.
pub async fn list_exports(transport: &Transport) -> Result<Vec<(String, String)>, ClientError> {
    let (mut r, mut w) = connect_stream_box(transport).await?;
    let mut s = Joined {
        r: &mut r,
        w: &mut w,
    };
    greet(&mut s).await?;
    send_option(&mut s, opt::LIST, &[]).await?;
    let mut out = Vec::new();
    loop {
        let (rtype, data) = read_option_reply(&mut s, opt::LIST).await?;
        match rtype {
            rep::SERVER => {
                if data.len() < 4 {
                    return Err(ClientError::Protocol("short NBD_REP_SERVER".into()));
                }
                let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let name = data
                    .get(4..4 + n)
                    .ok_or_else(|| ClientError::Protocol("NBD_REP_SERVER name too long".into()))?;
                let desc = &data[4 + n..];
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(desc).into_owned(),
                ));
            }
            rep::ACK => break,
            other => return Err(refused(opt::LIST, other, &data)),
        }
    }
    send_option(&mut s, opt::ABORT, &[]).await?;
    // The ACK to ABORT is optional; ignore whatever happens next.
    let _ = read_option_reply(&mut s, opt::ABORT).await;
    Ok(out)
}

impl Client {
    /// Connect to an `nbd://` or `nbd+unix://` URI with default options.
    pub async fn connect(uri: &str) -> Result<Client, ClientError> {
        let uri: NbdUri = uri.parse()?;
        Client::connect_uri(&uri, ConnectOptions::default()).await
    }

    /// Connect to a parsed URI.
    pub async fn connect_uri(uri: &NbdUri, opts: ConnectOptions) -> Result<Client, ClientError> {
        let (r, w) = connect_stream_box(&uri.transport).await?;
        Client::handshake(r, w, &uri.export, opts).await
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
        Client::handshake(Box::pin(r), Box::pin(w), export, opts).await
    }

    async fn handshake(
        mut r: BoxRead,
        mut w: BoxWrite,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        if export.len() > MAX_STRING_LEN {
            return Err(ClientError::Protocol(
                "export name longer than 4096 bytes".into(),
            ));
        }
        let mut s = Joined {
            r: &mut r,
            w: &mut w,
        };
        greet(&mut s).await?;
        let mut mode = HeaderMode::Simple;
        if opts.extended_headers {
            send_option(&mut s, opt::EXTENDED_HEADERS, &[]).await?;
            let (rtype, _) = read_option_reply(&mut s, opt::EXTENDED_HEADERS).await?;
            if rtype == rep::ACK {
                mode = HeaderMode::Extended;
            }
        }
        if mode == HeaderMode::Simple && opts.structured_replies {
            send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await?;
            let (rtype, _) = read_option_reply(&mut s, opt::STRUCTURED_REPLY).await?;
            if rtype == rep::ACK {
                mode = HeaderMode::Structured;
            }
        }
        let mut available_contexts = None;
        if mode.structured() && !opts.list_meta_contexts.is_empty() {
            // A refusal to list is not fatal: the caller learns which
            // contexts exist from what SET_META_CONTEXT grants anyway.
            available_contexts = match meta_context_option(
                &mut s,
                opt::LIST_META_CONTEXT,
                export,
                &opts.list_meta_contexts,
            )
            .await
            {
                Ok(v) => Some(v.into_iter().map(|(_, n)| n).collect()),
                Err(ClientError::OptionRefused { .. }) => None,
                Err(e) => return Err(e),
            };
        }
        let mut contexts = Vec::new();
        if mode.structured() && !opts.meta_contexts.is_empty() {
            contexts =
                meta_context_option(&mut s, opt::SET_META_CONTEXT, export, &opts.meta_contexts)
                    .await?;
            let mut ids: Vec<u32> = contexts.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != contexts.len() {
                return Err(ClientError::Protocol(
                    "server gave two metadata contexts the same id".into(),
                ));
            }
        }
        let mut b = Vec::new();
        put_string(&mut b, export);
        let wanted = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];
        b.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for i in wanted {
            b.extend_from_slice(&i.to_be_bytes());
        }
        send_option(&mut s, opt::GO, &b).await?;
        let mut info = ExportInfo {
            name: export.to_string(),
            size: 0,
            flags: 0,
            description: None,
            block_sizes: None,
            mode,
            contexts,
            available_contexts,
        };
        let mut got_export = false;
        loop {
            let (rtype, data) = read_option_reply(&mut s, opt::GO).await?;
            match rtype {
                rep::INFO if data.len() >= 2 => {
                    let it = u16::from_be_bytes([data[0], data[1]]);
                    let p = &data[2..];
                    match it {
                        info::EXPORT if p.len() == 10 => {
                            let mut sz = [0u8; 8];
                            sz.copy_from_slice(&p[..8]);
                            info.size = u64::from_be_bytes(sz);
                            info.flags = u16::from_be_bytes([p[8], p[9]]);
                            got_export = true;
                        }
                        info::NAME => info.name = String::from_utf8_lossy(p).into_owned(),
                        info::DESCRIPTION => {
                            info.description = Some(String::from_utf8_lossy(p).into_owned())
                        }
                        info::BLOCK_SIZE if p.len() == 12 => {
                            let g =
                                |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
                            info.block_sizes = Some((g(0), g(4), g(8)));
                        }
                        _ => {}
                    }
                }
                rep::INFO => return Err(ClientError::Protocol("short NBD_REP_INFO".into())),
                rep::ACK => break,
                other => return Err(refused(opt::GO, other, &data)),
            }
        }
        if !got_export {
            return Err(ClientError::Protocol(
                "server did not send NBD_INFO_EXPORT".into(),
            ));
        }
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(PendingMap::default()),
            next_cookie: AtomicU64::new(1),
            info,
        });
        let reader = tokio::spawn(reader_task(
            BufReader::with_capacity(256 * 1024, r),
            Arc::clone(&inner),
        ));
        Ok(Client { inner, reader })
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

fn fail_all(inner: &Inner, why: String) {
    let pending: Vec<Pending> = {
        let mut p = inner.lock_pending();
        p.dead = Some(why.clone());
        p.map.drain().map(|(_, v)| v).collect()
    };
    for p in pending {
        let _ = p.tx.send(Err(ClientError::Disconnected(why.clone())));
    }
}

async fn reader_task<R: AsyncRead + Unpin>(mut r: R, inner: Arc<Inner>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_uris() {
        let u: NbdUri = "nbd://127.0.0.1:10810/disk0".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("127.0.0.1", 10810, "disk0"));
        let u: NbdUri = "nbd://localhost".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("localhost", DEFAULT_PORT, ""));
        let u: NbdUri = "nbd://[::1]:99/a%20b".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("::1", 99, "a b"));
        let u: NbdUri = "nbd+unix:///exp?socket=/tmp/x.sock".parse().unwrap();
        assert_eq!(u, NbdUri::unix("/tmp/x.sock", "exp"));
        let u: NbdUri = "nbd+unix:///?socket=/tmp/x.sock".parse().unwrap();
        assert_eq!(u.export, "");
        assert!("nbd+unix:///exp".parse::<NbdUri>().is_err());
        assert!("nbds://h/e".parse::<NbdUri>().is_err());
        assert!("http://h/e".parse::<NbdUri>().is_err());
        assert!("nbd://h:notaport/e".parse::<NbdUri>().is_err());
        assert!("nbd://h/%zz".parse::<NbdUri>().is_err());
    }

    #[test]
    fn uri_roundtrip() {
        for u in [
            NbdUri::tcp("127.0.0.1", 10809, "vm1/disk 0"),
            NbdUri::tcp("::1", 1, ""),
            NbdUri::unix("/run/chain vault/nbd.sock", "backup-1-disk-0"),
        ] {
            let s = u.to_string();
            assert_eq!(s.parse::<NbdUri>().unwrap(), u, "{s}");
        }
    }
}
