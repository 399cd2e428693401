//! The HTTP control API (axum): thin handlers over the [`Engine`].
//!
//! * Every error is JSON, `{"error": "...", "details": ...}`: see [`error`].
//! * With a token configured (`serve --token`, or tokens in the catalog),
//!   every route but `/healthz` needs `Authorization: Bearer <token>`, and
//!   each token's role decides what it may call: see [`auth`].
//! * Request bodies are limited to [`BODY_LIMIT_BYTES`].
//! * Each request runs in a tracing span with its method and path; its status
//!   and latency are logged when it ends.
//!
//! docs/api.md describes the endpoints; `GET /api/v1/openapi.json` serves
//! their OpenAPI 3 description.

pub mod auth;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod https;
pub mod lifecycle;
pub mod openapi;
pub mod tokens;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

pub use error::{ApiError, ApiResult, ErrorBody};
use handlers::AppState;

use crate::engine::Engine;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT_BYTES: usize = 1 << 20;

/// Every route: (method, path in OpenAPI syntax). The OpenAPI document and the
/// tests are checked against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/backups"),
    ("get", "/api/v1/backups"),
    ("get", "/api/v1/backups/changeid"),
    ("get", "/api/v1/backups/chain"),
    ("get", "/api/v1/backups/{backup_id}"),
    ("patch", "/api/v1/backups/{backup_id}"),
    ("delete", "/api/v1/backups/{backup_id}"),
    ("post", "/api/v1/backups/{backup_id}/complete"),
    ("post", "/api/v1/backups/{backup_id}/fail"),
    ("get", "/api/v1/backups/{backup_id}/disks/{disk_id}/digests"),
    (
        "put",
        "/api/v1/backups/{backup_id}/disks/{disk_id}/source-digests",
    ),
    ("post", "/api/v1/restores"),
    ("get", "/api/v1/restores"),
    ("delete", "/api/v1/restores/{restore_id}"),
    ("get", "/api/v1/policies"),
    ("get", "/api/v1/policies/default"),
    ("put", "/api/v1/policies/default"),
    ("delete", "/api/v1/policies/default"),
    ("get", "/api/v1/policies/vms/{vm_name}"),
    ("put", "/api/v1/policies/vms/{vm_name}"),
    ("delete", "/api/v1/policies/vms/{vm_name}"),
    ("post", "/api/v1/prune"),
    ("post", "/api/v1/imports"),
    ("post", "/api/v1/gc"),
    ("get", "/api/v1/usage"),
    ("get", "/api/v1/verify"),
    ("post", "/api/v1/verify/deep"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{name}"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/healthz"),
    ("get", "/metrics"),
];

/// The API's router. `auth_token`: the `serve --token` secret, an admin
/// token; with it, or with tokens in the catalog, every route but
/// `/healthz` requires `Authorization: Bearer <token>`.
pub fn router(engine: Arc<Engine>, auth_token: Option<String>) -> Router {
    let auth = auth::AuthState {
        engine: engine.clone(),
        serve_token: auth_token.filter(|t| !t.is_empty()).map(Arc::from),
    };
    let state = AppState { engine };
    let app = Router::new()
        .route(
            "/api/v1/backups",
            post(handlers::start_backup).get(handlers::list_backups),
        )
        .route(
            "/api/v1/backups/changeid",
            get(handlers::previous_change_id),
        )
        .route("/api/v1/backups/chain", get(handlers::chain))
        .route(
            "/api/v1/backups/{backup_id}",
            get(handlers::get_backup)
                .patch(handlers::annotate_backup)
                .delete(handlers::delete_backup),
        )
        .route(
            "/api/v1/backups/{backup_id}/complete",
            post(handlers::complete_disk),
        )
        .route(
            "/api/v1/backups/{backup_id}/fail",
            post(handlers::fail_backup),
        )
        .route(
            "/api/v1/backups/{backup_id}/disks/{disk_id}/digests",
            get(handlers::point_digests),
        )
        .route(
            "/api/v1/backups/{backup_id}/disks/{disk_id}/source-digests",
            axum::routing::put(handlers::put_source_digests)
                .layer(DefaultBodyLimit::max(handlers::SOURCE_DIGESTS_LIMIT)),
        )
        .route(
            "/api/v1/restores",
            post(handlers::open_restore).get(handlers::list_restores),
        )
        .route(
            "/api/v1/restores/{restore_id}",
            axum::routing::delete(handlers::close_restore),
        )
        .route("/api/v1/policies", get(lifecycle::list_policies))
        .route(
            "/api/v1/policies/default",
            get(lifecycle::get_default_policy)
                .put(lifecycle::put_default_policy)
                .delete(lifecycle::delete_default_policy),
        )
        .route(
            "/api/v1/policies/vms/{vm_name}",
            get(lifecycle::get_vm_policy)
                .put(lifecycle::put_vm_policy)
                .delete(lifecycle::delete_vm_policy),
        )
        .route("/api/v1/prune", post(lifecycle::prune))
        .route("/api/v1/imports", post(lifecycle::import))
        .route("/api/v1/gc", post(lifecycle::gc))
        .route("/api/v1/usage", get(lifecycle::usage))
        .route("/api/v1/verify", get(handlers::verify))
        .route("/api/v1/verify/deep", post(handlers::deep_verify))
        .route(
            "/api/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/api/v1/tokens/{name}",
            axum::routing::delete(tokens::revoke_token),
        )
        .route("/api/v1/openapi.json", get(handlers::openapi))
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .fallback(no_route)
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES));
    // The middleware wraps the whole router as one service (not each route, as
    // `Router::layer` would), so that it sees the finished responses, e.g.
    // axum's 405 with its `Allow` header.
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn_with_state(auth, auth::authorize))
        .layer(middleware::from_fn(declared_length))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(trace))
}

/// A body announced larger than the limit is refused from its headers, before
/// any of it is read (and the connection is closed rather than drained).
async fn declared_length(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Source-digest uploads have their own, larger limit (the route's).
    let limit = if req.uri().path().ends_with("/source-digests") {
        handlers::SOURCE_DIGESTS_LIMIT
    } else {
        BODY_LIMIT_BYTES
    };
    if declared.is_some_and(|n| n > limit as u64) {
        let mut resp = ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the {} this API accepts",
                crate::units::human(BODY_LIMIT_BYTES as u64)
            ),
        )
        .into_response();
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return resp;
    }
    next.run(req).await
}

/// Fallback for paths no route serves: 404 JSON.
async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

/// Outermost layer: a span per request; status and latency logged at the end.
async fn trace(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("http", %method, %path, token = tracing::field::Empty);
    async move {
        let resp = next.run(req).await;
        let status = resp.status().as_u16();
        let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        if resp.status().is_server_error() {
            tracing::warn!(status, latency_ms, "request failed");
        } else if path == "/healthz" || path == "/metrics" {
            tracing::debug!(status, latency_ms, "request");
        } else {
            tracing::info!(status, latency_ms, "request");
        }
        resp
    }
    .instrument(span)
    .await
}

/// Safety net: a handler that panics gives a JSON 500 (the request runs in
/// its own task), and any error response that is not JSON (axum's own 405,
/// anything an extractor we missed produced) is rewritten as the JSON error
/// body, so plain-text errors never reach a client.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let task = tokio::spawn(next.run(req).in_current_span());
    let resp = match task.await {
        Ok(resp) => resp,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = resp
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return ApiError::method_not_allowed(method.as_str(), &path, &allowed).into_response();
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut e = ApiError::new(status, message);
    for (k, v) in parts.headers.iter() {
        if k == header::WWW_AUTHENTICATE || k == header::ALLOW || k == header::RETRY_AFTER {
            e.headers.push((k.clone(), v.clone()));
        }
    }
    e.into_response()
}

fn is_json(resp: &Response<Body>) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Compare without an early exit, so the time taken does not tell how many
/// leading bytes matched (it depends on the longer length only).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc = openapi::document();
        for (method, path) in ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "openapi.json lacks {method} {path}"
            );
        }
        let paths = doc["paths"].as_object().unwrap();
        for (path, item) in paths {
            for (method, _) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    ROUTES.iter().any(|(m, p)| m == method && p == path),
                    "openapi.json documents {method} {path}, which the router does not serve"
                );
            }
        }
    }
}
