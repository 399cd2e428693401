//! TLS settings shared by every command: `--tls-cert`, `--tls-key` and
//! `--tls-ca`.
//!
//! For `chainvault serve` they are the daemon's certificate and key (HTTPS
//! for the API, `NBD_OPT_STARTTLS` for NBD) and the CA whose client
//! certificates it requires. For every other command they are the client's
//! side: the CA that signed the daemon's certificate, and the certificate
//! the client presents when the daemon asks for one. Clients use TLS where
//! the address says so (`https://`, `nbds://`); the daemon's start and
//! restore responses give `nbds://` URIs when its NBD has TLS.
//!
//! The client settings are set once per process ([`configure_client`]) and
//! read where a connection is made ([`nbd_options`], [`http_agent`]), so
//! that every path that reaches the daemon (backup, restore, mount, the
//! inspection commands) uses the same trust.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context};
use chainvault_nbd::tls::{self, ClientTls, ServerTls, TlsMode};
use chainvault_nbd::ConnectOptions;

/// The three TLS files, as flags of the top-level command.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificate (chain): the daemon's for `serve`; for clients, the
    /// one presented when the daemon requires client certificates.
    #[arg(
        long,
        value_name = "FILE",
        env = "CHAINVAULT_TLS_CERT",
        global = true,
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "CHAINVAULT_TLS_KEY",
        global = true,
        help_heading = "TLS"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): for `serve`, clients must present a certificate
    /// signed by one of them; for clients, the CA that signed the daemon's
    /// certificate (default: the system's trust store).
    #[arg(
        long,
        value_name = "FILE",
        env = "CHAINVAULT_TLS_CA",
        global = true,
        help_heading = "TLS"
    )]
    pub tls_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The certificate and key, both or neither.
    fn identity(&self) -> anyhow::Result<Option<(&Path, &Path)>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c.as_path(), k.as_path()))),
            (None, None) => Ok(None),
            (Some(_), None) => bail!("--tls-cert needs --tls-key (the certificate's private key)"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert (the certificate it belongs to)"),
        }
    }

    /// Whether any TLS file was given.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }
}

/// What `serve` listens with when it has a certificate.
pub struct ServerSide {
    /// For the HTTPS listener (ALPN: HTTP/1.1).
    pub http: Arc<tls::rustls::ServerConfig>,
    /// For NBD's STARTTLS.
    pub nbd: ServerTls,
}

/// The daemon's TLS from its flags: `None` without a certificate (then
/// `--nbd-tls` must be `off` and `--tls-ca` unused).
pub fn server_side(
    files: &TlsFiles,
    nbd_mode: Option<TlsMode>,
) -> anyhow::Result<Option<ServerSide>> {
    let Some((cert, key)) = files.identity()? else {
        if files.tls_ca.is_some() {
            bail!("--tls-ca asks clients for certificates, which needs TLS: give serve --tls-cert and --tls-key too");
        }
        if matches!(nbd_mode, Some(TlsMode::On | TlsMode::Require)) {
            bail!("--nbd-tls on/require needs a certificate: give serve --tls-cert and --tls-key");
        }
        return Ok(None);
    };
    let ca = files.tls_ca.as_deref();
    let http = tls::server_config(cert, key, ca, &[b"http/1.1"])
        .context("cannot set up HTTPS (--tls-cert, --tls-key, --tls-ca)")?;
    let nbd = ServerTls::from_files(cert, key, ca, nbd_mode.unwrap_or(TlsMode::Require))
        .context("cannot set up NBD TLS (--tls-cert, --tls-key, --tls-ca)")?;
    Ok(Some(ServerSide { http, nbd }))
}

struct ClientSide {
    nbd: ClientTls,
}

static CLIENT: OnceLock<Option<ClientSide>> = OnceLock::new();

/// Load the client's TLS files once, for the rest of the process. Without
/// any, `https://` and `nbds://` trust the system's CAs.
pub fn configure_client(files: &TlsFiles) -> anyhow::Result<()> {
    let side = if files.any() {
        let nbd = ClientTls::from_files(files.tls_ca.as_deref(), files.identity()?)
            .context("cannot load the TLS files (--tls-ca, --tls-cert, --tls-key)")?;
        Some(ClientSide { nbd })
    } else {
        None
    };
    let _ = CLIENT.set(side);
    Ok(())
}

fn client() -> Option<&'static ClientSide> {
    CLIENT.get().and_then(|c| c.as_ref())
}

/// `opts` with the process's client TLS, for connecting to an NBD URI
/// (used when the URI is `nbds://`).
pub fn nbd_options(mut opts: ConnectOptions) -> ConnectOptions {
    if let Some(c) = client() {
        opts.tls = Some(c.nbd.clone());
    }
    opts
}

/// An HTTP agent builder that trusts what the process's client TLS trusts
/// (the system's CAs without `--tls-ca`) and presents its certificate.
pub fn http_agent() -> ureq::AgentBuilder {
    let b = ureq::AgentBuilder::new();
    match client() {
        Some(c) => b.tls_config(Arc::clone(&c.nbd.config)),
        None => b,
    }
}

/// `cause` (a transport error's text) with what to do about it when it is
/// a TLS failure the user can fix with flags.
pub fn with_hint(cause: String) -> String {
    let hint = if cause.contains("invalid peer certificate") || cause.contains("UnknownIssuer") {
        Some(
            "the daemon's certificate is not signed by a CA this client trusts, or not for this host name: \
             pass --tls-ca FILE (the CA that signed the daemon's --tls-cert) and use a host name the certificate names",
        )
    } else if cause.contains("received fatal alert") || cause.contains("CertificateRequired") {
        Some(
            "the daemon refused this client's TLS certificate (or got none): pass --tls-cert FILE and --tls-key FILE \
             signed by the CA the daemon was given with --tls-ca",
        )
    } else if cause.contains("InvalidContentType") || cause.contains("corrupt message") {
        Some("the daemon does not speak TLS there: use http:// (or nbd://) for a daemon without --tls-cert")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{cause}\n  hint: {h}"),
        None => cause,
    }
}
