//! Handlers of the lifecycle routes: retention policies, prune, import,
//! garbage collection and usage.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::auth::Access;
use super::error::ApiResult;
use super::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use super::handlers::AppState;
use crate::engine::space::{GcReport, GcRequest, UsageReport};
use crate::model::*;

/// `GET /api/v1/policies`: the default and every VM's own policy.
#[derive(Debug, Serialize)]
pub struct PolicyList {
    pub policies: Vec<PolicyView>,
}

pub async fn list_policies(
    State(st): State<AppState>,
    access: Access,
) -> ApiResult<Json<PolicyList>> {
    let mut policies = st.engine.policies()?;
    policies.retain(|p| p.vm_name.as_deref().is_none_or(|v| access.sees(v)));
    Ok(Json(PolicyList { policies }))
}

pub async fn get_default_policy(State(st): State<AppState>) -> ApiResult<Json<PolicyView>> {
    Ok(Json(st.engine.policy(None)?))
}

pub async fn put_default_policy(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<PolicyRequest>,
) -> ApiResult<Json<PolicyView>> {
    Ok(Json(st.engine.set_policy(None, &req)?))
}

pub async fn delete_default_policy(State(st): State<AppState>) -> ApiResult<Json<PolicyView>> {
    st.engine.clear_policy(None)?;
    Ok(Json(st.engine.policy(None)?))
}

/// The policy that applies to the VM: its own, else the default.
pub async fn get_vm_policy(
    State(st): State<AppState>,
    access: Access,
    ApiPath(vm): ApiPath<String>,
) -> ApiResult<Json<PolicyView>> {
    access.vm(&vm)?;
    Ok(Json(st.engine.policy(Some(&vm))?))
}

pub async fn put_vm_policy(
    State(st): State<AppState>,
    access: Access,
    ApiPath(vm): ApiPath<String>,
    ApiJson(req): ApiJson<PolicyRequest>,
) -> ApiResult<Json<PolicyView>> {
    access.vm(&vm)?;
    Ok(Json(st.engine.set_policy(Some(&vm), &req)?))
}

/// Remove the VM's own policy; the answer is what applies now (the default).
pub async fn delete_vm_policy(
    State(st): State<AppState>,
    access: Access,
    ApiPath(vm): ApiPath<String>,
) -> ApiResult<Json<PolicyView>> {
    access.vm(&vm)?;
    st.engine.clear_policy(Some(&vm))?;
    Ok(Json(st.engine.policy(Some(&vm))?))
}

/// `POST /api/v1/prune` (an empty body prunes every VM by its policy).
pub async fn prune(
    State(st): State<AppState>,
    access: Access,
    OptionalJson(req): OptionalJson<PruneRequest>,
) -> ApiResult<Json<PruneReport>> {
    access.optional_vm(req.vm_name.as_deref())?;
    Ok(Json(st.engine.prune(&req).await?))
}

/// `POST /api/v1/imports`: adopt existing qcow2 files as the next points of a disk.
pub async fn import(
    State(st): State<AppState>,
    access: Access,
    ApiJson(req): ApiJson<ImportRequest>,
) -> ApiResult<Json<ImportReport>> {
    access.vm(&req.vm_name)?;
    Ok(Json(st.engine.import(req).await?))
}

/// `POST /api/v1/gc`: find (and unless `dry_run`, remove) orphans.
pub async fn gc(
    State(st): State<AppState>,
    OptionalJson(req): OptionalJson<GcRequest>,
) -> ApiResult<Json<GcReport>> {
    Ok(Json(st.engine.gc(req.dry_run).await?))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    #[serde(default)]
    pub vm_name: Option<String>,
}

/// `GET /api/v1/usage?vm_name=`.
pub async fn usage(
    State(st): State<AppState>,
    access: Access,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    access.optional_vm(q.vm_name.as_deref())?;
    let engine = st.engine.clone();
    let r = tokio::task::spawn_blocking(move || engine.usage(q.vm_name.as_deref(), true)).await??;
    Ok(Json(r))
}
