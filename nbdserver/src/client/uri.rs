//! NBD URIs: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`.

use super::*;

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
    /// `nbds://` / `nbds+unix://`: upgrade with `NBD_OPT_STARTTLS` before
    /// anything else, and fail if the server cannot.
    pub tls: bool,
    /// Where the server is.
    pub transport: Transport,
    /// Export name.
    pub export: String,
}

impl NbdUri {
    /// `nbd://host:port/export`.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            tls: false,
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
            tls: false,
            transport: Transport::Unix(path.into()),
            export: export.into(),
        }
    }

    /// The same URI with TLS on or off (`nbds://` or `nbd://`).
    pub fn with_tls(mut self, tls: bool) -> NbdUri {
        self.tls = tls;
        self
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
        let (scheme, tls) = match scheme {
            "nbds" => ("nbd", true),
            "nbds+unix" => ("nbd+unix", true),
            other => (other, false),
        };
        let parsed = match scheme {
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
            other => Err(uri_err(uri, format!("unsupported scheme {other:?}"))),
        };
        parsed.map(|u| u.with_tls(tls))
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, true);
        let s = if self.tls { "s" } else { "" };
        match &self.transport {
            Transport::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "nbd{s}://[{host}]:{port}/{export}")
                } else {
                    write!(f, "nbd{s}://{host}:{port}/{export}")
                }
            }
            Transport::Unix(p) => {
                let path = percent_encode(&p.to_string_lossy(), true);
                write!(f, "nbd{s}+unix:///{export}?socket={path}")
            }
        }
    }
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
        let u: NbdUri = "nbds://h:7/e".parse().unwrap();
        assert_eq!(u, NbdUri::tcp("h", 7, "e").with_tls(true));
        let u: NbdUri = "nbds+unix:///e?socket=/s".parse().unwrap();
        assert_eq!(u, NbdUri::unix("/s", "e").with_tls(true));
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
            NbdUri::tcp("127.0.0.1", 10809, "x").with_tls(true),
            NbdUri::unix("/run/nbd.sock", "x").with_tls(true),
        ] {
            let s = u.to_string();
            assert_eq!(s.parse::<NbdUri>().unwrap(), u, "{s}");
        }
    }
}
