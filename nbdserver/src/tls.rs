//! TLS for NBD (`NBD_OPT_STARTTLS`) with rustls, and the PEM loading that the
//! daemon's HTTPS listener shares.
//!
//! * [`ServerTls`]: a server certificate and key, optionally a CA whose
//!   client certificates are required (mutual TLS), and a [`TlsMode`].
//! * [`client_config`]: what a client trusts (a CA file, or the system's
//!   trust store) and, for mutual TLS, its own certificate and key.
//!
//! The crypto provider is *ring*, named explicitly, so the choice does not
//! depend on which rustls features other crates in a build turn on.
//!
//! X.509 only: rustls has no external pre-shared keys (TLS-PSK as GnuTLS
//! offers it to qemu-nbd and libnbd); its PSK support is session resumption.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use tokio_rustls;
pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Where the system keeps its trusted CAs on Debian (`ca-certificates`).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is answered with `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS` or stay in plain text.
    On,
    /// Clients must upgrade first: other options get
    /// `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME` a hang-up.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(format!(
                "unknown TLS mode {other:?}: use off, on or require"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// Why certificates or keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the kind wanted.
    #[error("{what} {path}: {reason}")]
    File {
        /// "certificate", "private key" or "CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the
    /// certificate, a CA that is not a CA certificate, ...).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(what: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_certs("certificate", path)
}

/// The certificates of a PEM file; errors name it as `what`.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| file_err(what, path, e))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(
            what,
            path,
            "no \"BEGIN CERTIFICATE\" block in the file",
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        file_err(
            "private key",
            path,
            format!("{e} (expected a PEM \"PRIVATE KEY\" block)"),
        )
    })
}

/// A store holding every certificate of a PEM file as a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA", path)? {
        roots
            .add(cert)
            .map_err(|e| file_err("CA", path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration from a certificate chain and key, asking
/// for client certificates signed by `client_ca` when it is given. `alpn`
/// lists the application protocols offered (empty for NBD).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "certificate {} with key: {e} (does the key belong to the certificate?)",
            cert.display()
        ))
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A rustls client configuration: trust `ca` (or, without it, the system's
/// CA bundle), and present `identity` (certificate, key) when the server
/// asks for a client certificate.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => load_roots(ca)?,
        None => {
            let bundle = Path::new(SYSTEM_CA_BUNDLE);
            if !bundle.exists() {
                return Err(file_err(
                    "CA",
                    bundle,
                    "no CA was given and the system bundle is missing: pass the CA that signed the server's certificate (--tls-ca FILE)",
                ));
            }
            let mut roots = RootCertStore::empty();
            let certs = load_certs(bundle)?;
            let _ = roots.add_parsable_certificates(certs);
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                TlsError::Config(format!(
                    "client certificate {} with key: {e}",
                    cert.display()
                ))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The server side of NBD TLS: the acceptor and the mode.
#[derive(Clone)]
pub struct ServerTls {
    /// Runs the TLS handshake after `NBD_OPT_STARTTLS` is acknowledged.
    pub acceptor: TlsAcceptor,
    /// Whether TLS is offered or required.
    pub mode: TlsMode,
    /// Whether clients must present a certificate (for logs and reports).
    pub client_certs: bool,
}

impl ServerTls {
    /// From files, as [`server_config`] loads them.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        mode: TlsMode,
    ) -> Result<ServerTls, TlsError> {
        let config = server_config(cert, key, client_ca, &[])?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(config),
            mode,
            client_certs: client_ca.is_some(),
        })
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("client_certs", &self.client_certs)
            .finish()
    }
}

/// The client side of NBD TLS.
#[derive(Clone)]
pub struct ClientTls {
    /// The rustls configuration (trust anchors, client identity).
    pub config: Arc<ClientConfig>,
    /// The name checked against the server's certificate; `None` uses the
    /// URI's host.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// From files, as [`client_config`] loads them.
    pub fn from_files(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            config: client_config(ca, identity)?,
            server_name: None,
        })
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}
