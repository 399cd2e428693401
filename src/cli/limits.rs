//! `chainvault serve`'s NBD limits: how many connections, how long a
//! client may stall or idle, and how much request memory the server holds.
//! Each flag maps to one field of `chainvault_nbd::ServerConfig`;
//! docs/operations.md ("Limits against hostile clients") says what each
//! bounds and the memory figure they add up to.

use std::time::Duration;

use clap::Args;

use super::serve::parse_duration;
use chainvault_nbd::ServerConfig;

#[derive(Debug, Args)]
#[command(next_help_heading = "NBD limits")]
pub struct NbdLimits {
    /// NBD connections open at once, over all clients; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_connections: u32,
    /// NBD connections open at once from one client IP address.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_per_client: u32,
    /// NBD connections using one export at once; a client asking for more
    /// is refused with NBD_REP_ERR_POLICY.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_per_export: u32,
    /// Requests in flight per NBD connection; further ones wait unread.
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_requests: u32,
    /// Request data (write payloads, read replies) held in memory over all
    /// NBD connections together, e.g. 256M.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_buffered)]
    pub nbd_max_buffered: u64,
    /// Time a client has from connecting to choosing an export, TLS included.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub nbd_handshake_timeout: Duration,
    /// Close an NBD connection that has sent no request and has none in
    /// flight for this long; `off` keeps idle connections open.
    #[arg(long, value_name = "DURATION|off", default_value = "1h", value_parser = parse_idle)]
    pub nbd_idle_timeout: Idle,
    /// Close an NBD connection whose client stops reading replies, or stops
    /// sending a request's data, for this long.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub nbd_stall_timeout: Duration,
}

/// `--nbd-idle-timeout`: a duration, or off.
#[derive(Debug, Clone, Copy)]
pub struct Idle(pub Option<Duration>);

fn parse_idle(s: &str) -> Result<Idle, String> {
    match s.trim() {
        "off" | "never" => Ok(Idle(None)),
        t => parse_duration(t).map(|d| Idle(Some(d))),
    }
}

fn parse_buffered(s: &str) -> Result<u64, String> {
    let n = crate::units::parse_size(s)?;
    if n < 4 << 20 {
        return Err(format!(
            "--nbd-max-buffered {s} is below the 4M minimum; give 64M or more \
             (room for several requests of up to 32M each)"
        ));
    }
    Ok(n)
}

impl NbdLimits {
    /// The NBD server configuration these flags describe (TLS is set apart).
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_connections: self.nbd_max_connections as usize,
            max_connections_per_client: self.nbd_max_per_client as usize,
            max_connections_per_export: self.nbd_max_per_export as usize,
            max_inflight_requests: self.nbd_max_requests as usize,
            max_buffered_bytes: usize::try_from(self.nbd_max_buffered).unwrap_or(usize::MAX),
            handshake_timeout: self.nbd_handshake_timeout,
            idle_timeout: self.nbd_idle_timeout.0,
            stall_timeout: self.nbd_stall_timeout,
            ..ServerConfig::default()
        }
    }
}
