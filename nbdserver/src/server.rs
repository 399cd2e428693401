//! The listener, the export registry and graceful shutdown.
//!
//! A [`Server`] owns a registry of named exports that can change at run time,
//! any number of TCP and unix-socket listeners, and the connection tasks.
//! Each connection runs the handshake ([`crate::handshake`]) and then the
//! transmission loop ([`crate::transmission`]) inside a `tracing` span.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::export::BlockExport;
use crate::handshake::{self, HandshakeError, Negotiated, Outcome};
use crate::proto::MAX_STRING_LEN;
use crate::tls::ServerTls;
use crate::transmission::{self, TransmissionError};

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests in flight per connection (read off the socket but not yet
    /// answered). Further requests wait in the socket buffer.
    pub max_inflight_requests: usize,
    /// Payload bytes (write data being held, read buffers being filled or
    /// sent) in flight per connection.
    pub max_inflight_bytes: usize,
    /// Largest READ/WRITE payload accepted; advertised in `NBD_INFO_BLOCK_SIZE`
    /// (capped by the export's own maximum).
    pub max_payload: u32,
    /// An oversized WRITE payload up to this many bytes is read and discarded
    /// and answered with EOVERFLOW; beyond it the connection is dropped.
    pub discard_limit: u64,
    /// Payload bytes in flight over all connections together (write data
    /// held, read replies being filled or sent): the server-wide bound on
    /// request memory. A request waits for its share before its payload is
    /// read or its read buffer allocated.
    pub max_buffered_bytes: usize,
    /// Time allowed for the whole handshake phase.
    pub handshake_timeout: Duration,
    /// A transmission-phase connection with nothing in flight that sends no
    /// request for this long is closed. `None` keeps idle connections open.
    pub idle_timeout: Option<Duration>,
    /// A reply that cannot be written for this long (the client stopped
    /// reading), or a request payload that stops arriving for this long,
    /// closes the connection and frees what it held.
    pub stall_timeout: Duration,
    /// Connections accepted at once (over all listeners); extra ones are
    /// closed immediately.
    pub max_connections: usize,
    /// Connections at once from one client IP address (TCP only; unix-socket
    /// clients count only towards `max_connections`). Extra ones are closed
    /// immediately.
    pub max_connections_per_client: usize,
    /// Connections at once in the transmission phase of one export; a client
    /// choosing an export that has this many gets `NBD_REP_ERR_POLICY`.
    pub max_connections_per_export: usize,
    /// Options accepted in one handshake before the server hangs up.
    pub max_options: usize,
    /// Small requests (64 KiB or less) already waiting in the socket buffer
    /// are run together, up to this many, on one blocking thread. 1 runs
    /// every request on its own thread.
    pub max_batch: usize,
    /// TLS (`NBD_OPT_STARTTLS`): `None` answers it with `NBD_REP_ERR_UNSUP`.
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_inflight_requests: 128,
            max_inflight_bytes: 64 * 1024 * 1024,
            max_payload: crate::proto::DEFAULT_MAX_PAYLOAD,
            discard_limit: 64 * 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(3600)),
            stall_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_connections_per_client: 256,
            max_connections_per_export: 64,
            max_options: 16 * 1024,
            max_batch: 8,
            tls: None,
        }
    }
}

/// Errors of the server and registry API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export of that name is already registered.
    #[error("an export named {0:?} already exists")]
    ExportExists(String),
    /// The export name is longer than the protocol allows (4096 bytes).
    #[error("export name of {0} bytes is longer than the 4096-byte limit")]
    NameTooLong(usize),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Binding or configuring a listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address or socket path.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Why a single connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The handshake took longer than [`ServerConfig::handshake_timeout`].
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The transmission phase failed.
    #[error("transmission: {0}")]
    Transmission(#[from] TransmissionError),
}

// ---------------------------------------------------------------------------
// Export entries
// ---------------------------------------------------------------------------

/// A registered export plus the bookkeeping needed to drain it.
pub(crate) struct ExportEntry {
    pub(crate) name: String,
    /// Shown to `NBD_OPT_LIST`.
    listed: bool,
    state: Mutex<EntryState>,
    drained: Notify,
    /// Connections in the transmission phase on this export.
    connections: AtomicUsize,
}

struct EntryState {
    export: Option<Arc<dyn BlockExport>>,
    inflight: usize,
}

impl ExportEntry {
    fn new(name: String, export: Arc<dyn BlockExport>, listed: bool) -> ExportEntry {
        ExportEntry {
            name,
            listed,
            state: Mutex::new(EntryState {
                export: Some(export),
                inflight: 0,
            }),
            drained: Notify::new(),
            connections: AtomicUsize::new(0),
        }
    }

    /// Count one more connection on this export, unless it already has
    /// `limit`: the slot is given back when the returned guard drops.
    pub(crate) fn attach(self: &Arc<Self>, limit: usize) -> Option<ExportSlot> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(ExportSlot(Arc::clone(self)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export, unless it has been removed.
    pub(crate) fn export(&self) -> Option<Arc<dyn BlockExport>> {
        self.lock().export.clone()
    }

    /// Start a request: counts it as in flight. `None` once removed.
    pub(crate) fn begin(self: &Arc<Self>) -> Option<InflightGuard> {
        let mut st = self.lock();
        let export = st.export.clone()?;
        st.inflight += 1;
        Some(InflightGuard {
            entry: Arc::clone(self),
            export: Some(export),
        })
    }

    /// Detach the export and wait until no request is running on it.
    async fn close_and_drain(&self) -> Option<Arc<dyn BlockExport>> {
        let export = self.lock().export.take();
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().inflight == 0 {
                break;
            }
            notified.await;
        }
        export
    }
}

/// One connection counted on an export (see [`ExportEntry::attach`]).
pub(crate) struct ExportSlot(Arc<ExportEntry>);

impl Drop for ExportSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps one request counted as in flight on an export.
pub(crate) struct InflightGuard {
    entry: Arc<ExportEntry>,
    export: Option<Arc<dyn BlockExport>>,
}

impl InflightGuard {
    /// The export the request runs on.
    pub(crate) fn export(&self) -> &dyn BlockExport {
        match &self.export {
            Some(e) => e.as_ref(),
            // Only taken in Drop.
            None => unreachable_export(),
        }
    }
}

#[cold]
fn unreachable_export() -> ! {
    // The option is only emptied in Drop, so this cannot be reached; keep a
    // clear message rather than an unwrap.
    panic!("export guard used after drop")
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        // Release our reference before announcing the drain, so that when
        // remove_export returns the server holds no reference to the export.
        self.export.take();
        let mut st = self.entry.lock();
        st.inflight = st.inflight.saturating_sub(1);
        if st.inflight == 0 {
            drop(st);
            self.entry.drained.notify_waiters();
        }
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    exports: RwLock<HashMap<String, Arc<ExportEntry>>>,
    /// Cancelled when shutdown starts: listeners stop, handshakes end.
    pub(crate) stopping: CancellationToken,
    /// Cancelled when open connections must close (after the grace period).
    pub(crate) closing: CancellationToken,
    tracker: TaskTracker,
    listeners: Mutex<Vec<(JoinHandle<()>, Option<PathBuf>)>>,
    next_conn: AtomicU64,
    active: AtomicUsize,
    /// Open TCP connections per client address.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Server-wide payload budget ([`ServerConfig::max_buffered_bytes`]).
    pub(crate) budget: Arc<Semaphore>,
    /// Bytes held in all connections' buffer pools together.
    pub(crate) pooled: Arc<AtomicUsize>,
}

impl Shared {
    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn list(&self) -> Vec<(String, String)> {
        let map = self.exports.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, String)> = map
            .values()
            .filter(|e| e.listed)
            .filter_map(|e| e.export().map(|x| (e.name.clone(), x.description())))
            .collect();
        v.sort();
        v
    }
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (with the real port when 0 was asked for).
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The NBD URI of `export` on this listener (`nbd://…` or `nbd+unix://…`).
    pub fn uri(&self, export: &str) -> String {
        self.nbd_uri(export, false).to_string()
    }

    /// The NBD URI of `export` on this listener, `nbds://…` when `tls`.
    pub fn nbd_uri(&self, export: &str, tls: bool) -> crate::client::NbdUri {
        let uri = match self {
            ListenAddr::Tcp(a) => crate::client::NbdUri::tcp(a.ip().to_string(), a.port(), export),
            ListenAddr::Unix(p) => crate::client::NbdUri::unix(p.clone(), export),
        };
        uri.with_tls(tls)
    }
}

/// What [`Server::shutdown`] did.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Connections that had to be closed by the server after the grace period.
    pub forced_close: bool,
    /// Exports whose final flush failed, with the error.
    pub flush_errors: Vec<(String, io::Error)>,
    /// Connections still busy inside an export call 30 s after they were
    /// told to close (they are left to finish in the background).
    pub stuck_connections: usize,
}

/// How long [`Server::shutdown`] waits for closing connections whose
/// requests are still running inside an export.
const STUCK_LIMIT: Duration = Duration::from_secs(30);

/// An NBD server: a registry of exports plus listeners. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.export_names())
            .field("connections", &self.active_connections())
            .finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::new(ServerConfig::default())
    }
}

impl Server {
    /// A server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            shared: Arc::new(Shared {
                exports: RwLock::new(HashMap::new()),
                stopping: CancellationToken::new(),
                closing: CancellationToken::new(),
                tracker: TaskTracker::new(),
                listeners: Mutex::new(Vec::new()),
                next_conn: AtomicU64::new(1),
                active: AtomicUsize::new(0),
                per_client: Mutex::new(HashMap::new()),
                budget: Arc::new(Semaphore::new(semaphore_permits(config.max_buffered_bytes))),
                pooled: Arc::new(AtomicUsize::new(0)),
                config,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Register `export` under `name` (the empty name is the default export).
    pub fn add_export(
        &self,
        name: impl Into<String>,
        export: Arc<dyn BlockExport>,
    ) -> Result<(), ServerError> {
        self.register(name.into(), export, true)
    }

    /// Register `export` under `name` without showing it to `NBD_OPT_LIST`:
    /// only a client that knows the name can select it (for exports whose
    /// unguessable name is handed out to one client).
    pub fn add_unlisted_export(
        &self,
        name: impl Into<String>,
        export: Arc<dyn BlockExport>,
    ) -> Result<(), ServerError> {
        self.register(name.into(), export, false)
    }

    fn register(
        &self,
        name: String,
        export: Arc<dyn BlockExport>,
        listed: bool,
    ) -> Result<(), ServerError> {
        if name.len() > MAX_STRING_LEN {
            return Err(ServerError::NameTooLong(name.len()));
        }
        if self.shared.stopping.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        let mut map = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&name) {
            return Err(ServerError::ExportExists(name));
        }
        info!(export = %name, size = export.size(), read_only = export.read_only(), listed, "export added");
        map.insert(
            name.clone(),
            Arc::new(ExportEntry::new(name, export, listed)),
        );
        Ok(())
    }

    /// Unregister `name` and wait until requests running on it have finished.
    ///
    /// From the moment this is called, new connections cannot select the
    /// export, and further requests on connections already using it fail
    /// with `NBD_ESHUTDOWN` (clients then disconnect). When it returns, no
    /// request is running on the export and the server holds no reference to
    /// it, so the caller can flush and close it. Returns `None` if no such
    /// export was registered.
    pub async fn remove_export(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        let entry = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        let export = entry.close_and_drain().await;
        info!(export = %name, "export removed and drained");
        export
    }

    /// Names of the registered exports (listed or not), sorted.
    pub fn export_names(&self) -> Vec<String> {
        let map = self
            .shared
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = map
            .values()
            .filter(|e| e.export().is_some())
            .map(|e| e.name.clone())
            .collect();
        v.sort();
        v
    }

    /// The export registered under `name`.
    pub fn export(&self, name: &str) -> Option<Arc<dyn BlockExport>> {
        self.shared.lookup(name).and_then(|e| e.export())
    }

    /// Number of open connections.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Listen on a TCP address (pass a loopback address unless remote access
    /// is intended; port 0 picks a free port). Returns the bound address.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<ListenAddr, ServerError> {
        if self.shared.stopping.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        info!(%local, "listening on TCP");
        let server = self.clone();
        let handle = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = server.shared.stopping.cancelled() => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let Some(slot) = server.client_slot(peer.ip()) else {
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        server.spawn_connection(stream, peer.to_string(), Some(slot));
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        self.lock_listeners().push((handle, None));
        Ok(ListenAddr::Tcp(local))
    }

    /// Listen on a unix socket at `path`. A stale socket file nobody listens
    /// on is replaced; the file is removed again on shutdown.
    pub async fn listen_unix(&self, path: impl AsRef<Path>) -> Result<ListenAddr, ServerError> {
        let path = path.as_ref().to_path_buf();
        if self.shared.stopping.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale_socket(&path).await => {
                let _ = std::fs::remove_file(&path);
                UnixListener::bind(&path).map_err(|source| ServerError::Listen {
                    addr: path.display().to_string(),
                    source,
                })?
            }
            Err(source) => {
                return Err(ServerError::Listen {
                    addr: path.display().to_string(),
                    source,
                })
            }
        };
        info!(path = %path.display(), "listening on unix socket");
        let server = self.clone();
        let handle = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = server.shared.stopping.cancelled() => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, _)) => server.spawn_connection(stream, "unix".to_string(), None),
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        self.lock_listeners().push((handle, Some(path.clone())));
        Ok(ListenAddr::Unix(path))
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<(JoinHandle<()>, Option<PathBuf>)>> {
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection from `ip`, or refuse it (logged) when that
    /// address already has [`ServerConfig::max_connections_per_client`].
    fn client_slot(&self, ip: IpAddr) -> Option<ClientSlot> {
        let limit = self.shared.config.max_connections_per_client;
        let mut map = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            drop(map);
            warn!(client = %ip, limit, "too many connections from one client address; closing");
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            shared: Arc::clone(&self.shared),
            ip,
        })
    }

    fn spawn_connection<S>(&self, stream: S, peer: String, slot: Option<ClientSlot>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let server = self.clone();
        self.shared.tracker.spawn(async move {
            if let Err(e) = server.serve_connection(stream, &peer).await {
                debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }

    /// Serve one client connection over any byte stream until it ends: the
    /// handshake and then the transmission phase. Listeners call this for
    /// each accepted socket; tests and fuzzers can call it with an in-memory
    /// stream such as `tokio::io::duplex`.
    pub async fn serve_connection<S>(&self, stream: S, peer: &str) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let shared = &self.shared;
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd_conn", id, peer = %peer);
        let active = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
        let _count = ActiveGuard(&shared.active);
        async move {
            if active > shared.config.max_connections {
                warn!(
                    limit = shared.config.max_connections,
                    "too many connections; closing"
                );
                return Ok(());
            }
            debug!("connected");
            // One deadline for the whole handshake, TLS included.
            let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
            let mut stream = Box::pin(stream);
            let outcome =
                within_handshake(deadline, shared, handshake::negotiate(&mut stream, shared))
                    .await?;
            let resume = match outcome {
                Outcome::Closed => return ended_handshake(),
                Outcome::Export(n) => return transmit(stream, n, shared).await,
                Outcome::StartTls(resume) => resume,
            };
            let Some(tls) = shared.config.tls.as_ref() else {
                // negotiate() acknowledges STARTTLS only with TLS configured.
                return Err(HandshakeError::Tls(io::Error::other(
                    "STARTTLS without TLS configured",
                ))
                .into());
            };
            let accept = async {
                tls.acceptor
                    .accept(stream)
                    .await
                    .map_err(HandshakeError::Tls)
            };
            let mut stream = within_handshake(deadline, shared, accept).await?;
            debug!(
                client_certificate = stream.get_ref().1.peer_certificates().is_some(),
                "TLS established"
            );
            let outcome = within_handshake(
                deadline,
                shared,
                handshake::after_tls(&mut stream, shared, resume),
            )
            .await?;
            match outcome {
                Outcome::Closed | Outcome::StartTls(_) => ended_handshake(),
                Outcome::Export(n) => transmit(stream, n, shared).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Shut down: stop accepting, end handshakes, give transmission-phase
    /// connections up to `grace` to finish on their own, then make the rest
    /// stop reading, answer what is in flight and disconnect. Finally flush
    /// every writable export still registered. Exports stay registered (use
    /// [`Server::remove_export`] for those that must be released).
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let shared = &self.shared;
        info!(?grace, "server shutting down");
        shared.stopping.cancel();
        let listeners: Vec<_> = std::mem::take(&mut *self.lock_listeners());
        for (handle, path) in listeners {
            let _ = handle.await;
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
        }
        shared.tracker.close();
        let mut report = ShutdownReport::default();
        if tokio::time::timeout(grace, shared.tracker.wait())
            .await
            .is_err()
        {
            info!("grace period over; closing remaining connections");
            report.forced_close = true;
            shared.closing.cancel();
            // Connections now only wait for requests already running in the
            // exports; do not wait forever on an export that is stuck.
            if tokio::time::timeout(STUCK_LIMIT, shared.tracker.wait())
                .await
                .is_err()
            {
                warn!(limit = ?STUCK_LIMIT, "connections still busy in their exports; giving up on them");
                report.stuck_connections = shared.active.load(Ordering::SeqCst);
            }
        }
        let entries: Vec<Arc<ExportEntry>> = shared
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for entry in entries {
            let Some(export) = entry.export() else {
                continue;
            };
            if export.read_only() || !export.capabilities().flush {
                continue;
            }
            let name = entry.name.clone();
            let r = tokio::task::spawn_blocking(move || export.flush())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(format!("flush panicked: {e}"))));
            if let Err(e) = r {
                warn!(export = %name, error = %e, "final flush failed");
                report.flush_errors.push((name, e));
            }
        }
        info!("server stopped");
        report
    }
}

/// Run one step of the handshake (option haggling, the TLS handshake)
/// under the connection's handshake deadline, ending it when the server
/// stops.
async fn within_handshake<T, F>(
    deadline: tokio::time::Instant,
    shared: &Shared,
    step: F,
) -> Result<T, ConnectionError>
where
    F: std::future::Future<Output = Result<T, HandshakeError>>,
{
    let step = async {
        tokio::select! {
            r = step => r,
            _ = shared.stopping.cancelled() => Err(HandshakeError::Shutdown),
        }
    };
    match tokio::time::timeout_at(deadline, step).await {
        Err(_) => {
            warn!("handshake timed out");
            Err(ConnectionError::HandshakeTimeout)
        }
        Ok(Err(e)) => {
            info!(error = %e, "handshake failed");
            Err(e.into())
        }
        Ok(Ok(v)) => Ok(v),
    }
}

fn ended_handshake() -> Result<(), ConnectionError> {
    debug!("client ended the handshake");
    Ok(())
}

/// The transmission phase of a negotiated connection.
async fn transmit<S>(stream: S, n: Negotiated, shared: &Shared) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    info!(export = %n.entry.name, mode = ?n.mode, "transmission started");
    let r = transmission::run(stream, n, shared).await;
    match &r {
        Ok(()) => info!("disconnected"),
        Err(e) => info!(error = %e, "connection closed after an error"),
    }
    r.map_err(ConnectionError::from)
}

/// A limit (of requests or bytes) as a number of semaphore permits.
pub(crate) fn semaphore_permits(limit: usize) -> usize {
    limit.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize))
}

/// One connection counted against its client address.
struct ClientSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn is_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => tokio::net::UnixStream::connect(path).await.is_err(),
        _ => false,
    }
}
