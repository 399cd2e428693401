//! `/api/v1/tokens`: create, list and revoke API tokens (admin only; see
//! [`super::auth`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::error::ApiResult;
use super::extract::{ApiJson, ApiPath};
use super::handlers::{AppState, DeletedResponse};
use crate::model::*;

/// `GET /api/v1/tokens`: every token, without secrets.
pub async fn list_tokens(State(st): State<AppState>) -> ApiResult<Json<TokenList>> {
    let e = st.engine.clone();
    let tokens = tokio::task::spawn_blocking(move || e.tokens()).await??;
    Ok(Json(TokenList { tokens }))
}

/// `POST /api/v1/tokens`: a new token; the answer is the only place its
/// secret appears.
pub async fn create_token(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    let e = st.engine.clone();
    let t = tokio::task::spawn_blocking(move || e.create_token(&req)).await??;
    Ok((StatusCode::CREATED, Json(t)))
}

/// `DELETE /api/v1/tokens/{name}`.
pub async fn revoke_token(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<DeletedResponse>> {
    let e = st.engine.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || e.revoke_token(&n)).await??;
    Ok(Json(DeletedResponse {
        status: "revoked".into(),
        backup_id: None,
        restore_id: None,
        message: format!("token {name:?} was revoked; requests with it are refused from now on"),
        timestamp: now(),
    }))
}
