//! The daemon's HTTP control API as the transfer client speaks it
//! (docs/api.md): changeid, start, complete, fail, one backup.
//!
//! `ureq` is blocking, so every call runs on tokio's blocking pool; the
//! transfers keep running meanwhile.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;
use crate::model::{
    BackupView, ChangeIdResponse, CompleteRequest, CompleteResponse, StartRequest, StartResponse,
};

/// How an API call went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No HTTP answer at all: connection refused or reset, DNS, timeout.
    #[error("the chainvault daemon at {url} is unreachable: {cause}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What the transport said.
        cause: String,
    },
    /// An HTTP error status with the daemon's JSON error message.
    #[error("{method} {path} answered HTTP {status}: {message}")]
    Status {
        /// Request method.
        method: &'static str,
        /// Path called.
        path: String,
        /// HTTP status.
        status: u16,
        /// The `error` field of the JSON body (or the raw body).
        message: String,
    },
    /// A 2xx answer whose body is not what the API documents.
    #[error("{method} {path}: unexpected answer from the daemon: {cause}")]
    BadAnswer {
        /// Request method.
        method: &'static str,
        /// Path called.
        path: String,
        /// Why it could not be read.
        cause: String,
    },
}

impl ApiError {
    /// The HTTP status, when the daemon answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A handle on one daemon.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base", &self.base).finish()
    }
}

fn encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// What a request carries.
enum Payload {
    None,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

impl Api {
    /// `base` is the daemon URL (`http://127.0.0.1:8420`).
    pub fn new(base: &str, token: Option<String>) -> Result<Api, String> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "--server {base:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:8420)"
            ));
        }
        // Completion flushes, fsyncs and checks the image: give it time.
        let agent = crate::tls::http_agent()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(30 * 60))
            .timeout_write(Duration::from_secs(60))
            .build();
        Ok(Api { base, token, agent })
    }

    /// The daemon URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.call_blocking(method, path, body))
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::BadAnswer {
                    method,
                    path: String::new(),
                    cause: format!("HTTP worker failed: {e}"),
                })
            })
    }

    fn call_blocking<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        let resp = self.send_blocking(
            method,
            &path,
            body.map(Payload::Json).unwrap_or(Payload::None),
        )?;
        let text = resp.into_string().map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            cause: format!("reading the answer to {method} {path}: {e}"),
        })?;
        serde_json::from_str(&text).map_err(|e| ApiError::BadAnswer {
            method,
            path,
            cause: format!("{e}; body: {}", text.chars().take(300).collect::<String>()),
        })
    }

    fn send_blocking(
        &self,
        method: &'static str,
        path: &str,
        body: Payload,
    ) -> Result<ureq::Response, ApiError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Payload::Json(b) => req.send_json(b),
            Payload::Bytes(b) => req
                .set("Content-Type", "application/octet-stream")
                .send_bytes(&b),
            Payload::None => req.call(),
        };
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                let message = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| text.trim().chars().take(500).collect());
                Err(ApiError::Status {
                    method,
                    path: path.to_string(),
                    status,
                    message,
                })
            }
            Err(e) => Err(ApiError::Unreachable {
                url: self.base.clone(),
                cause: crate::tls::with_hint(e.to_string()),
            }),
        }
    }

    /// A binary request: the answer's bytes.
    async fn call_bytes(
        &self,
        method: &'static str,
        path: String,
        body: Payload,
    ) -> Result<Vec<u8>, ApiError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let resp = this.send_blocking(method, &path, body)?;
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut resp.into_reader(), &mut out).map_err(|e| {
                ApiError::Unreachable {
                    url: this.base.clone(),
                    cause: format!("reading the answer to {method} {path}: {e}"),
                }
            })?;
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::BadAnswer {
                method,
                path: String::new(),
                cause: format!("HTTP worker failed: {e}"),
            })
        })
    }

    /// `GET /api/v1/backups/{id}/disks/{disk}/digests`: a point's block
    /// digests (a whole digest file).
    pub async fn point_digests(&self, backup_id: &str, disk_id: u32) -> Result<Vec<u8>, ApiError> {
        self.call_bytes(
            "GET",
            format!(
                "/api/v1/backups/{}/disks/{disk_id}/digests",
                encode(backup_id)
            ),
            Payload::None,
        )
        .await
    }

    /// `PUT /api/v1/backups/{id}/disks/{disk}/source-digests`: the block
    /// digests of what the client read.
    pub async fn put_source_digests(
        &self,
        backup_id: &str,
        disk_id: u32,
        bytes: Vec<u8>,
    ) -> Result<(), ApiError> {
        self.call_bytes(
            "PUT",
            format!(
                "/api/v1/backups/{}/disks/{disk_id}/source-digests",
                encode(backup_id)
            ),
            Payload::Bytes(bytes),
        )
        .await
        .map(|_| ())
    }

    fn json<B: Serialize>(b: &B) -> Option<serde_json::Value> {
        serde_json::to_value(b).ok()
    }

    /// `GET /api/v1/backups/changeid`.
    pub async fn changeid(&self, vm: &str, disk_id: u32) -> Result<ChangeIdResponse, ApiError> {
        let path = format!(
            "/api/v1/backups/changeid?vm_name={}&disk_id={disk_id}",
            encode(vm)
        );
        self.call("GET", path, None).await
    }

    /// `GET /api/v1/backups/{id}`.
    pub async fn backup(&self, backup_id: &str) -> Result<BackupView, ApiError> {
        self.call(
            "GET",
            format!("/api/v1/backups/{}", encode(backup_id)),
            None,
        )
        .await
    }

    /// `POST /api/v1/backups`.
    pub async fn start(&self, req: &StartRequest) -> Result<StartResponse, ApiError> {
        self.call("POST", "/api/v1/backups".into(), Self::json(req))
            .await
    }

    /// `POST /api/v1/backups/{id}/complete` for one disk.
    pub async fn complete(
        &self,
        backup_id: &str,
        disk_id: u32,
        change_id: &str,
        bytes_transferred: u64,
        digest: Option<String>,
    ) -> Result<CompleteResponse, ApiError> {
        let body = CompleteRequest {
            change_id: Some(change_id.to_string()),
            disk_id: Some(disk_id),
            bytes_transferred: Some(bytes_transferred),
            digest,
        };
        self.call(
            "POST",
            format!("/api/v1/backups/{}/complete", encode(backup_id)),
            Self::json(&body),
        )
        .await
    }

    /// `POST /api/v1/backups/{id}/fail`.
    pub async fn fail(&self, backup_id: &str, reason: &str) -> Result<BackupView, ApiError> {
        self.call(
            "POST",
            format!("/api/v1/backups/{}/fail", encode(backup_id)),
            Some(serde_json::json!({ "reason": reason })),
        )
        .await
    }
}
