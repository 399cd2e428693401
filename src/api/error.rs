//! The one error type of the HTTP API.
//!
//! Every error the API returns, whatever produced it (the engine, an extractor
//! that could not read the request, the router, the auth layer, a panic), is
//! an [`ApiError`] and reaches the client as
//! `{"error": "<what went wrong and how to fix it>", "details": <JSON or null>}`
//! with a fitting 4xx/5xx status.

use std::error::Error as _;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::engine::EngineError;

/// An error response: status, message, optional structured details and any
/// headers the status calls for (`WWW-Authenticate` on 401, `Allow` on 405).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Option<Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The JSON body of every error response.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with a status and a message, no details.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            details: None,
            headers: Vec::new(),
        }
    }

    /// 400: the request is malformed or misses something.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}; the endpoints are listed in GET /api/v1/openapi.json"),
        )
        .with_details(json!({ "method": method, "path": path }))
    }

    /// 405 for a known path with a method it does not serve.
    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        let list: Vec<&str> = allowed
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {method} is not allowed on {path}; use {}",
                if list.is_empty() {
                    "another method".to_string()
                } else {
                    list.join(" or ")
                }
            ),
        )
        .with_details(json!({ "method": method, "path": path, "allowed": list }));
        if let Ok(v) = HeaderValue::from_str(allowed) {
            e.headers.push((header::ALLOW, v));
        }
        e
    }

    /// 401 with the `WWW-Authenticate` challenge.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, message);
        e.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"chainvault\""),
        ));
        e
    }

    /// 500 for a handler that panicked or a task that could not run.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Attach structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A `Json` extractor's rejection, in words a client can act on.
    ///
    /// Shape errors (a missing field, a wrong type) are 400 like syntax errors,
    /// as the clients of the old hub expect, not axum's default 422.
    pub fn from_json_rejection(rej: JsonRejection) -> Self {
        let cause = cause_of(&rej.body_text());
        match rej {
            JsonRejection::JsonDataError(_) => Self::bad_request(format!(
                "the JSON body does not have the expected fields: {cause}; \
                 see GET /api/v1/openapi.json for the request schema"
            ))
            .with_details(json!({ "cause": cause })),
            JsonRejection::JsonSyntaxError(_) => {
                Self::bad_request(format!("the request body is not valid JSON: {cause}"))
                    .with_details(json!({ "cause": cause }))
            }
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON: send the header `Content-Type: application/json`",
            ),
            other => {
                let status = other.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    Self::new(
                        status,
                        format!(
                            "the request body is larger than the {} this API accepts",
                            crate::units::human(super::BODY_LIMIT_BYTES as u64)
                        ),
                    )
                } else {
                    Self::new(status, format!("could not read the request body: {cause}"))
                }
            }
        }
    }

    /// A `Query` extractor's rejection.
    pub fn from_query_rejection(rej: QueryRejection) -> Self {
        let cause = cause_of(&rej.body_text());
        Self::bad_request(format!("invalid query string: {cause}"))
            .with_details(json!({ "cause": cause }))
    }

    /// A `Path` extractor's rejection.
    pub fn from_path_rejection(rej: PathRejection) -> Self {
        let cause = cause_of(&rej.body_text());
        Self::bad_request(format!("invalid path parameter: {cause}"))
            .with_details(json!({ "cause": cause }))
    }
}

/// axum's rejection texts read "Failed to …: <cause>"; keep the cause.
fn cause_of(body_text: &str) -> String {
    match body_text.split_once(": ") {
        Some((_, cause)) if !cause.is_empty() => cause.to_string(),
        _ => body_text.to_string(),
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status =
            StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let details = match &e {
            EngineError::NotFound { what, id } => Some(json!({ "what": what, "id": id })),
            _ => None,
        };
        if status.is_server_error() {
            let source = e.source().map(|s| s.to_string());
            tracing::error!(error = %e, ?source, "engine error");
        }
        ApiError {
            status,
            message: e.to_string(),
            details,
            headers: Vec::new(),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "request task failed");
        if e.is_panic() {
            ApiError::internal("internal error: the request handler panicked (a bug; the daemon log has the details)")
        } else {
            ApiError::internal("internal error: the request was cancelled")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            details: self.details,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_status() {
        let e: ApiError = EngineError::not_found("backup", "b-1").into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.details, Some(json!({"what": "backup", "id": "b-1"})));
        let e: ApiError = EngineError::Conflict("has dependents".into()).into();
        assert_eq!(e.status, StatusCode::CONFLICT);
        let e: ApiError = EngineError::ShuttingDown.into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn method_not_allowed_lists_methods() {
        let e = ApiError::method_not_allowed("PUT", "/api/v1/backups", "GET,HEAD,POST");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(e.message.contains("GET or HEAD or POST"), "{}", e.message);
        assert!(e.headers.iter().any(|(k, _)| k == header::ALLOW));
    }

    #[test]
    fn cause_is_kept() {
        assert_eq!(
            cause_of("Failed to parse: missing field `x`"),
            "missing field `x`"
        );
        assert_eq!(cause_of("plain"), "plain");
    }
}
