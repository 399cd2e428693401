//! Points through a running daemon: the catalog from its HTTP API, each
//! point's bytes from a restore export (`POST /api/v1/restores`) read with
//! the NBD client. The export is closed (`DELETE /api/v1/restores/{id}`)
//! when the point has been idle for a while and when the mount ends, so the
//! daemon can delete that backup again.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chainvault_fuse::guestfs::{Disk, ReadAt};
use chainvault_fuse::{PointInfo, Source};
use chainvault_nbd::Client;
use serde::de::DeserializeOwned;

use crate::api::handlers::BackupList;
use crate::api::ErrorBody;
use crate::model::{RestoreRequest, RestoreView, Status};

/// The daemon's HTTP API (blocking).
#[derive(Clone)]
struct Http {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Http {
    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn answer<T: DeserializeOwned>(
        &self,
        what: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, String> {
        match r {
            Ok(resp) => resp.into_json::<T>().map_err(|e| {
                format!(
                    "{what}: the daemon at {} sent an unreadable answer: {e}",
                    self.base
                )
            }),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp
                    .into_json::<ErrorBody>()
                    .map(|b| b.error)
                    .unwrap_or_else(|_| "no error message".into());
                let hint = if code == 401 {
                    "; pass --token TOKEN or set CHAINVAULT_TOKEN"
                } else {
                    ""
                };
                Err(format!(
                    "{what}: HTTP {code} from {}: {msg}{hint}",
                    self.base
                ))
            }
            Err(ureq::Error::Transport(t)) => Err(format!(
                "{what}: cannot reach the daemon at {}: {}",
                self.base,
                crate::tls::with_hint(t.to_string())
            )),
        }
    }
}

pub struct ServerSource {
    http: Http,
    vm: Option<String>,
    rt: Arc<tokio::runtime::Runtime>,
}

impl ServerSource {
    pub fn new(
        url: &str,
        token: Option<String>,
        vm: Option<String>,
    ) -> anyhow::Result<ServerSource> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("--server {url:?} is not a URL: use e.g. http://127.0.0.1:8420");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nbd-client")
            .enable_all()
            .build()
            .context("cannot start the NBD client runtime")?;
        Ok(ServerSource {
            http: Http {
                base: url.trim_end_matches('/').to_string(),
                token: token.filter(|t| !t.is_empty()),
                agent: crate::tls::http_agent()
                    .timeout_connect(Duration::from_secs(5))
                    .timeout(Duration::from_secs(60))
                    .build(),
            },
            vm,
            rt: Arc::new(rt),
        })
    }
}

impl Source for ServerSource {
    fn describe(&self) -> String {
        format!("daemon {}", self.http.base)
    }

    fn list(&self) -> Result<Vec<PointInfo>, String> {
        let mut req = self.http.req("GET", "/api/v1/backups");
        if let Some(vm) = &self.vm {
            req = req.query("vm_name", vm);
        }
        let list: BackupList = self.http.answer("listing backups", req.call())?;
        let recs: Vec<_> = list
            .backups
            .iter()
            .flat_map(|b| b.disks.iter().map(move |d| (&b.backup, d)))
            .filter(|(_, d)| d.status == Status::Completed)
            .collect();
        Ok(super::point_infos(&recs))
    }

    fn open(&self, p: &PointInfo) -> io::Result<Disk> {
        let body = RestoreRequest {
            backup_id: p.backup_id.clone(),
            disk_id: p.disk_id,
            writable: false,
        };
        let what = format!("opening a restore of disk {} of {}", p.disk_id, p.backup_id);
        let view: RestoreView = self
            .http
            .answer(
                &what,
                self.http
                    .req("POST", "/api/v1/restores")
                    .send_json(serde_json::to_value(&body).map_err(io::Error::other)?),
            )
            .map_err(io::Error::other)?;
        let close = RestoreCloser {
            http: self.http.clone(),
            restore_id: view.restore_id.clone(),
        };
        let client = self
            .rt
            .block_on(connect_restore(&view.nbd_uri))
            .map_err(|e| io::Error::other(format!("connecting to {}: {e}", view.nbd_uri)))?;
        tracing::info!(restore = %view.restore_id, uri = %view.nbd_uri, "opened a restore export");
        Ok(Arc::new(NbdDisk {
            client: Some(client),
            size: view.size,
            rt: self.rt.clone(),
            _close: close,
        }))
    }
}

/// Closes a restore export when dropped.
struct RestoreCloser {
    http: Http,
    restore_id: String,
}

impl Drop for RestoreCloser {
    fn drop(&mut self) {
        let path = format!("/api/v1/restores/{}", self.restore_id);
        match self.http.req("DELETE", &path).call() {
            Ok(_) => tracing::info!(restore = %self.restore_id, "closed the restore export"),
            Err(e) => {
                tracing::warn!(restore = %self.restore_id, error = %e, "cannot close the restore export")
            }
        }
    }
}

/// A restore export read over NBD.
struct NbdDisk {
    client: Option<Client>,
    size: u64,
    rt: Arc<tokio::runtime::Runtime>,
    // Dropped after the client has disconnected (field order).
    _close: RestoreCloser,
}

impl ReadAt for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} is past the end ({} bytes)",
                    buf.len(),
                    self.size
                ),
            ));
        }
        let c = self
            .client
            .as_ref()
            .ok_or_else(|| io::Error::other("closed"))?;
        let data = self
            .rt
            .block_on(c.read(offset, buf.len() as u64))
            .map_err(|e| io::Error::other(format!("NBD read at {offset}: {e}")))?;
        if data.len() != buf.len() {
            return Err(io::Error::other(format!(
                "NBD read at {offset}: got {} bytes, asked for {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), c.disconnect()).await
            });
        }
    }
}

/// Connect to a restore export the daemon opened (`nbds://` with the
/// process's TLS settings).
async fn connect_restore(uri: &str) -> Result<Client, chainvault_nbd::ClientError> {
    let parsed: chainvault_nbd::NbdUri = uri.parse()?;
    Client::connect_uri(
        &parsed,
        crate::tls::nbd_options(chainvault_nbd::ConnectOptions::default()),
    )
    .await
}
