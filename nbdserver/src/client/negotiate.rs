//! The handshake: fixed newstyle greeting, options (GO, STRUCTURED_REPLY,
//! EXTENDED_HEADERS, SET_META_CONTEXT, LIST) and their replies.

use super::*;

pub(super) async fn read_option_reply<R: AsyncRead + Unpin>(
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

pub(super) async fn send_option<W: AsyncWrite + Unpin>(
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

pub(super) fn refused(option: u32, rtype: u32, data: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        option: opt::name(option),
        reply: rtype,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

pub(super) fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Send `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` for
/// `export` with `queries`, and collect the `NBD_REP_META_CONTEXT` answers
/// (id, name) up to the final ACK. (For LIST the ids mean nothing.)
pub(super) async fn meta_context_option<S: AsyncRead + AsyncWrite + Unpin>(
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
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
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

pub(super) async fn connect_stream_box(
    transport: &Transport,
) -> Result<(BoxRead, BoxWrite), ClientError> {
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

/// Connect, greet, upgrade with `NBD_OPT_STARTTLS` and run the TLS
/// handshake; the option haggling then goes on over the returned halves.
pub(super) async fn connect_tls(
    uri: &NbdUri,
    opts: &ConnectOptions,
) -> Result<(BoxRead, BoxWrite), ClientError> {
    let tls = match &opts.tls {
        Some(t) => t.clone(),
        None => crate::tls::ClientTls::from_files(None, None)
            .map_err(|e| ClientError::Tls(e.to_string()))?,
    };
    let name = match (&tls.server_name, &uri.transport) {
        (Some(n), _) => n.clone(),
        (None, Transport::Tcp { host, .. }) => host.clone(),
        (None, Transport::Unix(_)) => "localhost".to_string(),
    };
    let server_name = crate::tls::rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| ClientError::Tls(format!("{name:?} is not a valid server name: {e}")))?;
    let connector = crate::tls::TlsConnector::from(tls.config);
    let fail = |e: io::Error| ClientError::Tls(format!("handshake with {name}: {e}"));
    let t = match &uri.transport {
        Transport::Tcp { host, port } => {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            let _ = s.set_nodelay(true);
            starttls(&mut s).await?;
            let (r, w) = tokio::io::split(connector.connect(server_name, s).await.map_err(fail)?);
            (Box::pin(r) as BoxRead, Box::pin(w) as BoxWrite)
        }
        Transport::Unix(p) => {
            let mut s = tokio::net::UnixStream::connect(p).await?;
            starttls(&mut s).await?;
            let (r, w) = tokio::io::split(connector.connect(server_name, s).await.map_err(fail)?);
            (Box::pin(r) as BoxRead, Box::pin(w) as BoxWrite)
        }
    };
    Ok(t)
}

async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    greet(s).await?;
    send_option(s, opt::STARTTLS, &[]).await?;
    let (rtype, data) = read_option_reply(s, opt::STARTTLS).await?;
    if rtype != rep::ACK {
        let why = if rtype == rep::ERR_UNSUP {
            "the server does not offer TLS (use an nbd:// URI, or turn TLS on at the server)"
                .to_string()
        } else {
            refused(opt::STARTTLS, rtype, &data).to_string()
        };
        return Err(ClientError::Tls(why));
    }
    Ok(())
}

/// A read half and write half glued together for the handshake.
pub(super) struct Joined<'a> {
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
    pub(super) async fn handshake(
        mut r: BoxRead,
        mut w: BoxWrite,
        export: &str,
        opts: ConnectOptions,
        greeted: bool,
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
        if !greeted {
            greet(&mut s).await?;
        }
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
}
