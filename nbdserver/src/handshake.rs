//! Fixed newstyle negotiation (the handshake phase), server side.
//!
//! Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS and, when the
//! server has TLS configured, STARTTLS. Any other option is answered with
//! `NBD_REP_ERR_UNSUP` and negotiation goes on. Option payloads are bounded
//! before anything is allocated.
//!
//! STARTTLS ends [`negotiate`] with [`Outcome::StartTls`]: the caller runs
//! the TLS handshake and continues with [`after_tls`] on the encrypted
//! stream. Everything negotiated before (header mode, metadata contexts) is
//! forgotten then, as the protocol requires (a client must not be able to
//! smuggle plaintext state into the TLS session; CVE-2021-3716 in nbdkit).

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, trace, warn};

use crate::export::{BlockExport, BlockSizes, Capabilities, MetaContext};
use crate::proto::{self, info, opt, rep, tflag, ContextId, HeaderMode, MAX_STRING_LEN};
use crate::server::{ExportEntry, ExportSlot, Shared};
use crate::tls::TlsMode;

/// Largest option payload read into memory. Longer payloads are skipped
/// (up to [`OPTION_DISCARD_LIMIT`]) and refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest option payload the server skips before hanging up.
pub const OPTION_DISCARD_LIMIT: u32 = 16 * 1024 * 1024;

/// Errors that end a handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket error (includes the client hanging up mid-option).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client sent an unknown client flag.
    #[error("client sent unknown flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option payload was beyond the discard limit.
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    /// NBD_OPT_EXPORT_NAME named an export we do not have (the protocol
    /// gives no way to report this except hanging up).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// NBD_OPT_EXPORT_NAME with an invalid name or after extended headers.
    #[error("invalid NBD_OPT_EXPORT_NAME: {0}")]
    BadExportName(&'static str),
    /// The client sent too many options.
    #[error("too many options")]
    TooManyOptions,
    /// The server is shutting down.
    #[error("server shutting down")]
    Shutdown,
    /// The server requires TLS and the client sent NBD_OPT_EXPORT_NAME
    /// without it (that option has no error reply: the server hangs up).
    #[error("client chose an export with NBD_OPT_EXPORT_NAME before STARTTLS; TLS is required")]
    TlsRequired,
    /// NBD_OPT_EXPORT_NAME chose an export that already has the most
    /// connections allowed (that option has no error reply).
    #[error("{0}")]
    ExportBusy(String),
    /// The TLS handshake after STARTTLS failed (bad or missing client
    /// certificate, a client that does not trust ours, garbage).
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
}

/// How a handshake phase ended.
pub(crate) enum Outcome {
    /// The client aborted or hung up before choosing an export.
    Closed,
    /// An export was chosen: the transmission phase follows.
    Export(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake follows, then
    /// [`after_tls`].
    StartTls(Resume),
}

/// What carries over a STARTTLS: only the greeting's flags and the option
/// count (so the option limit still bounds the whole handshake).
pub(crate) struct Resume {
    no_zeroes: bool,
    options: usize,
}

/// The result of a successful negotiation.
pub(crate) struct Negotiated {
    pub(crate) mode: HeaderMode,
    pub(crate) entry: Arc<ExportEntry>,
    /// The connection's place among the export's connections (`None` only
    /// for `NBD_OPT_INFO`, which selects nothing).
    pub(crate) slot: Option<ExportSlot>,
    pub(crate) size: u64,
    pub(crate) tx_flags: u16,
    pub(crate) caps: Capabilities,
    pub(crate) block_sizes: BlockSizes,
    pub(crate) contexts: Vec<(ContextId, MetaContext)>,
}

/// Compute the transmission flags for an export under a header mode. Only
/// what the export really supports is advertised.
pub fn transmission_flags(caps: &Capabilities, read_only: bool, mode: HeaderMode) -> u16 {
    let mut f = tflag::HAS_FLAGS;
    if read_only {
        f |= tflag::READ_ONLY;
    }
    if caps.flush {
        f |= tflag::SEND_FLUSH;
    }
    if !read_only {
        if caps.fua {
            f |= tflag::SEND_FUA;
        }
        if caps.trim {
            f |= tflag::SEND_TRIM;
        }
        if caps.write_zeroes {
            f |= tflag::SEND_WRITE_ZEROES;
            if caps.fast_zero {
                f |= tflag::SEND_FAST_ZERO;
            }
        }
    }
    if mode.structured() {
        f |= tflag::SEND_DF;
    }
    if caps.multi_conn {
        f |= tflag::CAN_MULTI_CONN;
    }
    if caps.cache {
        f |= tflag::SEND_CACHE;
    }
    f
}

/// Effective block sizes: the export's, with the maximum capped by the server.
pub(crate) fn effective_block_sizes(export: &dyn BlockExport, server_max: u32) -> BlockSizes {
    let mut bs = export.block_sizes();
    if !bs.minimum.is_power_of_two() || bs.minimum > 65536 {
        bs.minimum = 1;
    }
    let floor = bs.minimum.max(512);
    if !bs.preferred.is_power_of_two() || bs.preferred < floor {
        bs.preferred = floor.max(4096);
    }
    bs.maximum = bs.maximum.min(server_max).max(bs.preferred);
    bs
}

struct State {
    mode: HeaderMode,
    no_zeroes: bool,
    /// Export name and contexts chosen by the last SET_META_CONTEXT.
    meta: Option<(String, Vec<MetaContext>)>,
}

/// A tiny bounds-checked reader over an option payload.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A u32-length-prefixed UTF-8 string of at most MAX_STRING_LEN bytes.
    fn string(&mut self) -> Result<&'a str, &'static str> {
        let len = self.u32().ok_or("truncated string length")? as usize;
        if len > MAX_STRING_LEN {
            return Err("string longer than 4096 bytes");
        }
        let b = self
            .take(len)
            .ok_or("string runs past the option payload")?;
        std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8")
    }
}

async fn send_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    // Replies we build are small (bounded strings), so this cannot truncate.
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await
}

async fn send_error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    msg: &str,
) -> io::Result<()> {
    debug!(
        option = opt::name(option),
        reply = reply_type & !rep::ERR_BIT,
        msg,
        "option refused"
    );
    send_reply(
        s,
        option,
        reply_type,
        proto::truncate_message(msg).as_bytes(),
    )
    .await?;
    s.flush().await
}

async fn discard<S: AsyncRead + Unpin>(s: &mut S, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let want = (buf.len() as u64).min(n) as usize;
        s.read_exact(&mut buf[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}

/// Run the handshake on `s`: the greeting, then options until an export is
/// chosen, the client leaves, or STARTTLS is acknowledged.
pub(crate) async fn negotiate<S>(s: &mut S, shared: &Shared) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = match s.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(client_flags));
    }
    let resume = Resume {
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        options: 0,
    };
    options(s, shared, resume, false).await
}

/// Go on with option haggling over the TLS stream that STARTTLS started.
pub(crate) async fn after_tls<S>(
    s: &mut S,
    shared: &Shared,
    resume: Resume,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    options(s, shared, resume, true).await
}

/// The option loop. `tls` says whether the stream is already encrypted.
async fn options<S>(
    s: &mut S,
    shared: &Shared,
    resume: Resume,
    tls: bool,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls_mode = shared
        .config
        .tls
        .as_ref()
        .map(|t| t.mode)
        .unwrap_or(TlsMode::Off);
    // Fresh state: nothing negotiated in plain text survives STARTTLS.
    let mut st = State {
        mode: HeaderMode::Simple,
        no_zeroes: resume.no_zeroes,
        meta: None,
    };
    let mut count = resume.options;
    loop {
        count += 1;
        if count > shared.config.max_options {
            return Err(HandshakeError::TooManyOptions);
        }
        let mut head = [0u8; 16];
        let first = tokio::select! {
            _ = shared.stopping.cancelled() => return Err(HandshakeError::Shutdown),
            r = s.read(&mut head) => r?,
        };
        if first == 0 {
            return Ok(Outcome::Closed);
        }
        s.read_exact(&mut head[first..]).await?;
        let magic = u64::from_be_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let option = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        trace!(option = opt::name(option), len, "option");
        if len > MAX_OPTION_LEN {
            if len > OPTION_DISCARD_LIMIT {
                return Err(HandshakeError::OptionTooLarge(len));
            }
            discard(s, u64::from(len)).await?;
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::BadExportName("name too long"));
            }
            send_error(s, option, rep::ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;

        if shared.stopping.is_cancelled() {
            if option == opt::ABORT {
                let _ = send_reply(s, option, rep::ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(Outcome::Closed);
            }
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::Shutdown);
            }
            send_error(s, option, rep::ERR_SHUTDOWN, "server is shutting down").await?;
            continue;
        }

        if option == opt::STARTTLS {
            if tls_mode == TlsMode::Off {
                send_error(
                    s,
                    option,
                    rep::ERR_UNSUP,
                    "TLS is not configured on this server",
                )
                .await?;
            } else if tls {
                send_error(s, option, rep::ERR_INVALID, "TLS is already negotiated").await?;
            } else if !data.is_empty() {
                send_error(
                    s,
                    option,
                    rep::ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                )
                .await?;
            } else {
                send_reply(s, option, rep::ACK, &[]).await?;
                s.flush().await?;
                return Ok(Outcome::StartTls(Resume {
                    no_zeroes: st.no_zeroes,
                    options: count,
                }));
            }
            continue;
        }
        if tls_mode == TlsMode::Require && !tls && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            send_error(
                s,
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first (nbds:// URIs)",
            )
            .await?;
            continue;
        }

        match option {
            opt::ABORT => {
                // The client may already have hung up; that is fine.
                let _ = send_reply(s, option, rep::ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(Outcome::Closed);
            }
            opt::EXPORT_NAME => {
                return export_name(s, shared, &st, &data)
                    .await
                    .map(Outcome::Export)
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_error(s, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for (name, desc) in shared.list() {
                    let mut b = Vec::with_capacity(4 + name.len() + desc.len());
                    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    b.extend_from_slice(name.as_bytes());
                    b.extend_from_slice(proto::truncate_message(&desc).as_bytes());
                    send_reply(s, option, rep::SERVER, &b).await?;
                }
                send_reply(s, option, rep::ACK, &[]).await?;
                s.flush().await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if st.mode == HeaderMode::Extended {
                    send_error(
                        s,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    st.mode = HeaderMode::Structured;
                    send_reply(s, option, rep::ACK, &[]).await?;
                    s.flush().await?;
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_error(
                        s,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )
                    .await?;
                } else {
                    st.mode = HeaderMode::Extended;
                    send_reply(s, option, rep::ACK, &[]).await?;
                    s.flush().await?;
                }
            }
            opt::INFO | opt::GO => {
                if let Some(n) = info_or_go(s, shared, &st, option, &data).await? {
                    return Ok(Outcome::Export(n));
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(s, shared, &mut st, option, &data).await?;
            }
            _ => {
                send_error(
                    s,
                    option,
                    rep::ERR_UNSUP,
                    &format!("option {} ({}) is not supported", option, opt::name(option)),
                )
                .await?;
            }
        }
    }
}

fn negotiated(
    entry: Arc<ExportEntry>,
    slot: Option<ExportSlot>,
    export: &dyn BlockExport,
    st: &State,
    shared: &Shared,
) -> Negotiated {
    let caps = export.capabilities();
    let contexts = match &st.meta {
        Some((name, ctxs)) if *name == entry.name => ctxs
            .iter()
            .enumerate()
            .map(|(i, c)| (ContextId(i as u32 + 1), *c))
            .collect(),
        _ => Vec::new(),
    };
    Negotiated {
        mode: st.mode,
        size: export.size(),
        tx_flags: transmission_flags(&caps, export.read_only(), st.mode),
        caps,
        block_sizes: effective_block_sizes(export, shared.config.max_payload),
        contexts,
        entry,
        slot,
    }
}

/// Count this connection on `entry`, or say why not: the export already
/// has the most connections the server allows on one export.
fn attach(entry: &Arc<ExportEntry>, shared: &Shared) -> Result<ExportSlot, String> {
    let limit = shared.config.max_connections_per_export;
    entry.attach(limit).ok_or_else(|| {
        warn!(export = %entry.name, limit, "export has too many connections; refusing another");
        format!(
            "export {:?} already has {limit} connections, the server's limit per export",
            entry.name
        )
    })
}

async fn export_name<S>(
    s: &mut S,
    shared: &Shared,
    st: &State,
    data: &[u8],
) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if st.mode == HeaderMode::Extended {
        return Err(HandshakeError::BadExportName(
            "used after extended headers were negotiated",
        ));
    }
    if data.len() > MAX_STRING_LEN {
        return Err(HandshakeError::BadExportName("name too long"));
    }
    let name = std::str::from_utf8(data)
        .map_err(|_| HandshakeError::BadExportName("name is not UTF-8"))?;
    let entry = shared
        .lookup(name)
        .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
    let export = entry
        .export()
        .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
    // NBD_OPT_EXPORT_NAME has no error reply: a busy export is a hang-up.
    let slot = attach(&entry, shared).map_err(HandshakeError::ExportBusy)?;
    let n = negotiated(Arc::clone(&entry), Some(slot), export.as_ref(), st, shared);
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&n.size.to_be_bytes());
    b.extend_from_slice(&n.tx_flags.to_be_bytes());
    if !st.no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(n)
}

async fn info_or_go<S>(
    s: &mut S,
    shared: &Shared,
    st: &State,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiated>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Cursor::new(data);
    let name = match c.string() {
        Ok(n) => n,
        Err(e) => {
            send_error(s, option, rep::ERR_INVALID, e).await?;
            return Ok(None);
        }
    };
    let Some(nreq) = c.u16() else {
        send_error(
            s,
            option,
            rep::ERR_INVALID,
            "missing information request count",
        )
        .await?;
        return Ok(None);
    };
    if c.remaining() != usize::from(nreq) * 2 {
        send_error(
            s,
            option,
            rep::ERR_INVALID,
            "information request list has the wrong length",
        )
        .await?;
        return Ok(None);
    }
    let mut requests = Vec::with_capacity(usize::from(nreq));
    for _ in 0..nreq {
        if let Some(r) = c.u16() {
            requests.push(r);
        }
    }
    let found = shared.lookup(name).and_then(|e| e.export().map(|x| (e, x)));
    let Some((entry, export)) = found else {
        send_error(
            s,
            option,
            rep::ERR_UNKNOWN,
            &format!("export {name:?} not found"),
        )
        .await?;
        return Ok(None);
    };
    let slot = if option == opt::GO {
        match attach(&entry, shared) {
            Ok(slot) => Some(slot),
            Err(msg) => {
                send_error(s, option, rep::ERR_POLICY, &msg).await?;
                return Ok(None);
            }
        }
    } else {
        None
    };
    let n = negotiated(entry, slot, export.as_ref(), st, shared);

    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&n.size.to_be_bytes());
    b.extend_from_slice(&n.tx_flags.to_be_bytes());
    send_reply(s, option, rep::INFO, &b).await?;

    if requests.contains(&info::NAME) {
        let mut b = Vec::with_capacity(2 + name.len());
        b.extend_from_slice(&info::NAME.to_be_bytes());
        b.extend_from_slice(n.entry.name.as_bytes());
        send_reply(s, option, rep::INFO, &b).await?;
    }
    if requests.contains(&info::DESCRIPTION) {
        let desc = export.description();
        if !desc.is_empty() {
            let desc = proto::truncate_message(&desc);
            let mut b = Vec::with_capacity(2 + desc.len());
            b.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
            b.extend_from_slice(desc.as_bytes());
            send_reply(s, option, rep::INFO, &b).await?;
        }
    }
    // Block sizes are always sent; clients that did not ask ignore them.
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&n.block_sizes.minimum.to_be_bytes());
    b.extend_from_slice(&n.block_sizes.preferred.to_be_bytes());
    b.extend_from_slice(&n.block_sizes.maximum.to_be_bytes());
    send_reply(s, option, rep::INFO, &b).await?;
    send_reply(s, option, rep::ACK, &[]).await?;
    s.flush().await?;
    Ok(if option == opt::GO { Some(n) } else { None })
}

/// Contexts a LIST query matches (namespace wildcards allowed, and
/// `qemu:dirty-bitmap:` for every bitmap).
fn list_matches(query: &str, export: &dyn BlockExport) -> Vec<MetaContext> {
    let candidates = MetaContext::offered(export).into_iter();
    match query {
        "base:" | "qemu:" | "qemu:dirty-bitmap:" => candidates
            .filter(|c| c.wire_name(export).starts_with(query))
            .collect(),
        q => candidates.filter(|c| c.wire_name(export) == q).collect(),
    }
}

async fn meta_context<S>(
    s: &mut S,
    shared: &Shared,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // A SET replaces the previous selection even when it fails.
        st.meta = None;
    }
    if !st.mode.structured() {
        return send_error(
            s,
            option,
            rep::ERR_INVALID,
            "structured replies must be negotiated first",
        )
        .await;
    }
    let mut c = Cursor::new(data);
    let name = match c.string() {
        Ok(n) => n,
        Err(e) => return send_error(s, option, rep::ERR_INVALID, e).await,
    };
    let Some(nq) = c.u32() else {
        return send_error(s, option, rep::ERR_INVALID, "missing query count").await;
    };
    // Each query needs at least its 4-byte length, which bounds the count.
    if nq as usize > c.remaining() / 4 {
        return send_error(
            s,
            option,
            rep::ERR_INVALID,
            "query count exceeds the option payload",
        )
        .await;
    }
    let mut queries = Vec::with_capacity(nq as usize);
    for _ in 0..nq {
        match c.string() {
            Ok(q) => queries.push(q),
            Err(e) => return send_error(s, option, rep::ERR_INVALID, e).await,
        }
    }
    if c.remaining() != 0 {
        return send_error(
            s,
            option,
            rep::ERR_INVALID,
            "trailing bytes after the queries",
        )
        .await;
    }
    let Some(export) = shared.lookup(name).and_then(|e| e.export()) else {
        return send_error(
            s,
            option,
            rep::ERR_UNKNOWN,
            &format!("export {name:?} not found"),
        )
        .await;
    };
    let caps = export.capabilities();

    let mut chosen: Vec<MetaContext> = Vec::new();
    if set {
        for q in &queries {
            if let Some(ctx) = MetaContext::from_wire_name(q, export.as_ref()) {
                if caps.supports(ctx) && !chosen.contains(&ctx) {
                    chosen.push(ctx);
                }
            }
        }
    } else if queries.is_empty() {
        chosen = MetaContext::offered(export.as_ref());
    } else {
        for q in &queries {
            for ctx in list_matches(q, export.as_ref()) {
                if !chosen.contains(&ctx) {
                    chosen.push(ctx);
                }
            }
        }
    }
    for (i, ctx) in chosen.iter().enumerate() {
        let id: u32 = if set { i as u32 + 1 } else { 0 };
        let name = ctx.wire_name(export.as_ref());
        let mut b = Vec::with_capacity(4 + name.len());
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        send_reply(s, option, rep::META_CONTEXT, &b).await?;
    }
    send_reply(s, option, rep::ACK, &[]).await?;
    s.flush().await?;
    if set {
        debug!(export = name, contexts = ?chosen, "meta contexts selected");
        st.meta = Some((name.to_string(), chosen));
    }
    Ok(())
}
