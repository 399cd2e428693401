//! `chainvault serve`: the daemon. Opens the repository through the engine
//! (which recovers from a crash and starts the NBD listener), serves the HTTP
//! control API, and shuts both down cleanly on SIGINT/SIGTERM.
//!
//! Once everything listens it prints exactly one line to stdout,
//! `ready api=http://HOST:PORT nbd=<NBD URI base>`, and flushes it; all logs
//! go to stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::limits::NbdLimits;
use crate::engine::{Engine, EngineConfig};
use crate::tls::TlsFiles;
use chainvault_nbd::tls::TlsMode;

/// How long in-flight HTTP requests may run after a shutdown signal before
/// the engine is shut down regardless.
const HTTP_DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Repository directory (catalog and images); created if missing.
    #[arg(
        long,
        value_name = "DIR",
        env = "CHAINVAULT_DATA",
        default_value = "chainvault-data"
    )]
    pub data: PathBuf,
    /// HTTP API address (port 0 picks a free port; see the `ready` line).
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "CHAINVAULT_LISTEN",
        default_value = "127.0.0.1:8420"
    )]
    pub listen: SocketAddr,
    /// NBD address for backup and restore exports.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "CHAINVAULT_NBD_LISTEN",
        default_value = "127.0.0.1:10809"
    )]
    pub nbd_listen: SocketAddr,
    /// NBD over TLS (NBD_OPT_STARTTLS), with --tls-cert/--tls-key: `require`
    /// (the default with a certificate) refuses plaintext clients, `on` lets
    /// them choose, `off` serves NBD in plain text while the API uses HTTPS.
    #[arg(long, value_name = "MODE", env = "CHAINVAULT_NBD_TLS", value_parser = parse_tls_mode)]
    pub nbd_tls: Option<TlsMode>,
    /// Serve NBD on this unix socket instead of TCP.
    #[arg(long, value_name = "PATH", env = "CHAINVAULT_NBD_SOCKET")]
    pub nbd_socket: Option<PathBuf>,
    /// Require `Authorization: Bearer TOKEN` on every HTTP route but /healthz.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CHAINVAULT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Fail a disk backup with no NBD activity and no completion for this long (e.g. 45s, 30m, 2h, 1h30m).
    #[arg(long, value_name = "DURATION", env = "CHAINVAULT_DISK_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub disk_timeout: Duration,
    /// Cluster size of new images (a power of two, 512 to 2M).
    #[arg(long, value_name = "SIZE", default_value = "128K", value_parser = parse_cluster_size)]
    pub cluster_size: u64,
    /// Create images with standard L2 entries (no subclusters): partial writes
    /// into an incremental then copy whole clusters from the previous point.
    #[arg(long)]
    pub no_extended_l2: bool,
    /// Deep-verify every point with block digests at least once in this
    /// period (e.g. 7d), a few points at a time, oldest result first.
    #[arg(long, value_name = "DURATION", env = "CHAINVAULT_VERIFY_EVERY", value_parser = parse_duration)]
    pub verify_every: Option<Duration>,
    /// The scheduled deep verify reads at most this many MiB per second.
    #[arg(long, value_name = "MIB_S", env = "CHAINVAULT_VERIFY_RATE", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub verify_rate: u64,
    #[command(flatten)]
    pub limits: NbdLimits,
}

impl ServeArgs {
    /// The engine configuration these flags describe.
    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let extended_l2 = !self.no_extended_l2;
        if extended_l2 && self.cluster_size < 16 << 10 {
            bail!(
                "--cluster-size {} is too small for extended L2 entries (they need 16K or more); \
                 pass a larger --cluster-size or --no-extended-l2",
                self.cluster_size
            );
        }
        Ok(EngineConfig {
            data_dir: self.data.clone(),
            nbd_listen: if self.nbd_socket.is_some() {
                None
            } else {
                Some(self.nbd_listen)
            },
            nbd_socket: self.nbd_socket.clone(),
            disk_timeout: self.disk_timeout,
            cluster_size: self.cluster_size,
            extended_l2,
            verify_every: self.verify_every,
            verify_rate_mib_s: self.verify_rate,
            nbd: self.limits.server_config(),
        })
    }

    /// The NBD address these flags ask for (the engine reports the real one,
    /// with the port it got when 0 was asked for).
    pub fn nbd_address(&self) -> chainvault_nbd::ListenAddr {
        match &self.nbd_socket {
            Some(p) => chainvault_nbd::ListenAddr::Unix(p.clone()),
            None => chainvault_nbd::ListenAddr::Tcp(self.nbd_listen),
        }
    }
}

/// The NBD URI base for the `ready` line: `nbd://HOST:PORT` or
/// `nbd+unix:///?socket=PATH` (append an export name to the TCP form after a
/// `/`; the unix form takes it before the `?`).
pub fn nbd_uri_base(addr: &chainvault_nbd::ListenAddr, tls: bool) -> String {
    let uri = addr.nbd_uri("", tls).to_string();
    match addr {
        chainvault_nbd::ListenAddr::Tcp(_) => {
            uri.strip_suffix('/').map(str::to_string).unwrap_or(uri)
        }
        chainvault_nbd::ListenAddr::Unix(_) => uri,
    }
}

/// Parse a duration: `90` (seconds), `45s`, `30m`, `2h`, `1d`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: use e.g. 45s, 30m, 2h or 1h30m".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return nonzero(Duration::from_secs(secs), s);
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("duration {s:?} is not like 45s, 30m, 2h or 1h30m"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {s:?} has a number that is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "secs" => Duration::from_secs(n),
            "m" | "min" | "mins" => n
                .checked_mul(60)
                .map(Duration::from_secs)
                .ok_or("duration too large")?,
            "h" => n
                .checked_mul(3600)
                .map(Duration::from_secs)
                .ok_or("duration too large")?,
            "d" => n
                .checked_mul(86400)
                .map(Duration::from_secs)
                .ok_or("duration too large")?,
            "" => {
                return Err(format!(
                    "duration {s:?} needs a unit after {n} (ms, s, m, h or d)"
                ))
            }
            other => {
                return Err(format!(
                    "duration {s:?} has an unknown unit {other:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.checked_add(part).ok_or("duration too large")?;
    }
    nonzero(total, s)
}

fn nonzero(d: Duration, s: &str) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("duration {s:?} must be more than zero"))
    } else {
        Ok(d)
    }
}

fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    s.parse()
}

/// Parse a cluster size: a power of two from 512 bytes to 2 MiB.
fn parse_cluster_size(s: &str) -> Result<u64, String> {
    let n = crate::units::parse_size(s)?;
    if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
        return Err(format!(
            "cluster size {s:?} must be a power of two from 512 to 2M (e.g. 64K, 128K)"
        ));
    }
    Ok(n)
}

/// Run the daemon until SIGINT or SIGTERM.
pub fn run(a: ServeArgs, tls: &TlsFiles) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chainvault")
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(serve(a, tls));
    // Do not wait forever for a blocking task that is stuck.
    rt.shutdown_timeout(Duration::from_secs(10));
    result
}

async fn serve(a: ServeArgs, tls_files: &TlsFiles) -> anyhow::Result<u8> {
    let mut cfg = a.engine_config()?;
    // Every NBD and HTTP connection is a file descriptor, and each open
    // chain holds one per layer.
    let files = super::raise_fd_limit();
    let wanted = cfg.nbd.max_connections as u64 + 512;
    if let Some(n) = files.filter(|n| *n < wanted) {
        tracing::warn!(
            open_files = n,
            nbd_max_connections = cfg.nbd.max_connections,
            "the open-file limit is below --nbd-max-connections plus room for images and HTTP; \
             raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or lower --nbd-max-connections"
        );
    }
    let tls = crate::tls::server_side(tls_files, a.nbd_tls)?;
    if let Some(t) = &tls {
        if a.nbd_tls != Some(TlsMode::Off) {
            cfg.nbd.tls = Some(t.nbd.clone());
        }
    }

    // Bind HTTP first: a port in use is reported before any recovery work
    // starts, and nothing listens on NBD for a daemon that cannot serve HTTP.
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (--listen / CHAINVAULT_LISTEN)",
                a.listen
            )
        })?;
    let http_addr = listener
        .local_addr()
        .context("cannot read the HTTP listener's address")?;
    tracing::info!(data = %a.data.display(), "opening the repository");
    let engine = Engine::open(cfg)
        .await
        .with_context(|| format!("cannot open the repository in {}", a.data.display()))?;
    let token = a.token.clone().filter(|t| !t.is_empty());
    warn_about_exposure(&a, http_addr, tls.is_some(), engine.nbd_tls());
    if token.is_none() && !engine.has_tokens().unwrap_or(false) {
        if !http_addr.ip().is_loopback() {
            tracing::warn!(
                %http_addr,
                "HTTP API on a non-loopback address WITHOUT A TOKEN: anyone who can reach it can start, \
                 fail and delete backups. Pass --token (or CHAINVAULT_TOKEN), make tokens with `chainvault token create`, or listen on 127.0.0.1"
            );
            if !tracing::enabled!(tracing::Level::WARN) {
                eprintln!(
                    "chainvault serve: WARNING: the HTTP API on {http_addr} accepts requests from anyone who can \
                     reach it (no --token given)"
                );
            }
        }
        if a.nbd_socket.is_none() && !a.nbd_listen.ip().is_loopback() {
            tracing::warn!(
                nbd_listen = %a.nbd_listen,
                "NBD on a non-loopback address: anyone who can reach it and guess an export name can read or write it"
            );
        }
    }

    let app = crate::api::router(engine.clone(), token);

    let nbd = nbd_uri_base(
        &engine
            .nbd_address()
            .cloned()
            .unwrap_or_else(|| a.nbd_address()),
        engine.nbd_tls(),
    );
    // The signal handlers are in place before anyone can know the daemon is
    // up (the ready line, an answered request): a SIGINT right after the
    // first /healthz must shut down cleanly, not kill the process.
    let signals = Signals::install()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready api={scheme}://{} nbd={nbd}",
            http_authority(http_addr)
        )
        .and_then(|_| out.flush())
        .context("cannot write the ready line to stdout")?;
    }
    tracing::info!(api = %http_addr, %nbd, "chainvault is ready");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stop_rx.await;
    };
    let server = match &tls {
        Some(t) => {
            let listener = crate::api::https::TlsListener::new(listener, t.http.clone())
                .context("cannot start the HTTPS listener")?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }),
    };
    let signal = signals.wait().await;
    tracing::info!(
        signal,
        "shutting down: no new HTTP requests; waiting for running ones"
    );
    let _ = stop_tx.send(());
    match tokio::time::timeout(HTTP_DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server task failed"),
        Err(_) => tracing::warn!(
            seconds = HTTP_DRAIN.as_secs(),
            "HTTP requests still running after the drain time; shutting the engine down anyway"
        ),
    }
    engine.shutdown().await;
    tracing::info!("stopped");
    Ok(0)
}

/// Warn when something listens beyond this machine without encryption.
fn warn_about_exposure(a: &ServeArgs, http_addr: SocketAddr, https: bool, nbd_tls: bool) {
    let mut said = Vec::new();
    if !https && !http_addr.ip().is_loopback() {
        said.push(format!(
            "the HTTP API on {http_addr} is plain HTTP: tokens and data cross the network unencrypted (give --tls-cert and --tls-key)"
        ));
    }
    if !nbd_tls && a.nbd_socket.is_none() && !a.nbd_listen.ip().is_loopback() {
        said.push(format!(
            "NBD on {} is plain text: disk contents cross the network unencrypted (give --tls-cert and --tls-key, and leave --nbd-tls at require)",
            a.nbd_listen
        ));
    }
    for s in said {
        tracing::warn!("{s}");
        if !tracing::enabled!(tracing::Level::WARN) {
            eprintln!("chainvault serve: WARNING: {s}");
        }
    }
}

/// `HOST:PORT` for a URL (IPv6 in brackets). A wildcard address (0.0.0.0,
/// ::) is shown as the loopback address of its family, which reaches it.
fn http_authority(a: SocketAddr) -> String {
    let mut a = a;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    match a {
        SocketAddr::V4(v4) => format!("{}:{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

/// The SIGINT and SIGTERM handlers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    /// Wait for SIGINT or SIGTERM; returns its name.
    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn cluster_sizes() {
        assert_eq!(parse_cluster_size("128K").unwrap(), 128 << 10);
        assert!(parse_cluster_size("100K").is_err());
        assert!(parse_cluster_size("4M").is_err());
        assert!(parse_cluster_size("256").is_err());
    }

    fn args(extra: &[&str]) -> ServeArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: ServeArgs,
        }
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).unwrap().a
    }

    #[test]
    fn authorities() {
        assert_eq!(
            http_authority("0.0.0.0:8420".parse().unwrap()),
            "127.0.0.1:8420"
        );
        assert_eq!(http_authority("[::]:8420".parse().unwrap()), "[::1]:8420");
        assert_eq!(
            http_authority("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80"
        );
    }

    #[test]
    fn nbd_uri_bases() {
        assert_eq!(
            nbd_uri_base(&args(&[]).nbd_address(), false),
            "nbd://127.0.0.1:10809"
        );
        assert_eq!(
            nbd_uri_base(&args(&["--nbd-listen", "[::1]:1234"]).nbd_address(), true),
            "nbds://[::1]:1234"
        );
        assert_eq!(
            nbd_uri_base(
                &args(&["--nbd-socket", "/run/cv/nbd.sock"]).nbd_address(),
                false
            ),
            "nbd+unix:///?socket=/run/cv/nbd.sock"
        );
    }

    #[test]
    fn config_from_flags() {
        let c = args(&["--nbd-socket", "/tmp/x.sock", "--disk-timeout", "30m"])
            .engine_config()
            .unwrap();
        assert!(c.nbd_listen.is_none());
        assert_eq!(c.disk_timeout, Duration::from_secs(1800));
        assert!(c.extended_l2);
        assert!(args(&["--cluster-size", "4K"]).engine_config().is_err());
        let c = args(&["--cluster-size", "4K", "--no-extended-l2"])
            .engine_config()
            .unwrap();
        assert!(!c.extended_l2);
        assert_eq!(c.cluster_size, 4096);
    }
}
