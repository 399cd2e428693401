//! Route handlers: read the request, call the engine, shape the response.
//! They hold no state and write nothing themselves; the engine does.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::Access;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use crate::engine::Engine;
use crate::model::*;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
}

/// Run a synchronous engine call (a catalog read, a check) off the async
/// workers; a panic inside becomes a 500.
async fn blocking<T, F>(st: &AppState, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Engine) -> crate::engine::EngineResult<T> + Send + 'static,
{
    let engine = st.engine.clone();
    Ok(tokio::task::spawn_blocking(move || f(&engine)).await??)
}

/// Ok when the token may see backup `id` (its VM is one of the token's);
/// else the 404 of a backup that does not exist.
pub(super) async fn check_backup(st: &AppState, access: &Access, id: &str) -> ApiResult<()> {
    if !access.limited() {
        return Ok(());
    }
    let i = id.to_string();
    let b = blocking(st, move |e| e.get_backup(&i)).await?;
    access.owns(&b.backup.vm_name, "backup", id)
}

/// A required text query parameter: present and not blank.
fn required<'a>(v: &'a Option<String>, name: &str, example: &str) -> ApiResult<&'a str> {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::bad_request(format!(
            "query parameter {name} is required, e.g. {example}"
        ))
        .with_details(serde_json::json!({ "parameter": name }))),
    }
}

/// A disk index from a query parameter.
fn disk_index(v: &Option<String>, example: &str) -> ApiResult<u32> {
    let s = required(v, "disk_id", example)?;
    s.parse::<u32>().map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter disk_id must be a disk index (0, 1, 2, ...), not {s:?}, e.g. {example}"
        ))
        .with_details(serde_json::json!({ "parameter": "disk_id", "value": s }))
    })
}

/// An optional filter: absent or blank means "any".
fn optional(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------
// Backups
// ---------------------------------------------------------------------------

/// `POST /api/v1/backups`: start a VM-level backup, one NBD target per disk.
pub async fn start_backup(
    State(st): State<AppState>,
    access: Access,
    ApiJson(req): ApiJson<StartRequest>,
) -> ApiResult<Json<StartResponse>> {
    access.vm(&req.vm_name)?;
    Ok(Json(st.engine.start_backup(req).await?))
}

/// `POST /api/v1/backups/{id}/complete`: complete one disk with its change_id.
pub async fn complete_disk(
    State(st): State<AppState>,
    access: Access,
    ApiPath(backup_id): ApiPath<String>,
    ApiJson(req): ApiJson<CompleteRequest>,
) -> ApiResult<Json<CompleteResponse>> {
    check_backup(&st, &access, &backup_id).await?;
    if req
        .change_id
        .as_deref()
        .map(str::trim)
        .unwrap_or("")
        .is_empty()
    {
        return Err(ApiError::bad_request(
            "change_id is required: send the change_id the hypervisor reported for this disk's snapshot \
             (VMware: the CBT change ID, e.g. \"52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490\"); \
             without it the next backup of this disk could not be incremental",
        )
        .with_details(serde_json::json!({ "field": "change_id" })));
    }
    if req.disk_id.is_none() {
        return Err(ApiError::bad_request(
            "disk_id is required: every disk completes on its own; send one complete request per disk \
             with its disk_id (0, 1, 2, ...)",
        )
        .with_details(serde_json::json!({ "field": "disk_id" })));
    }
    Ok(Json(st.engine.complete_disk(&backup_id, req).await?))
}

/// Body of `POST /api/v1/backups/{id}/fail`; may be left out.
#[derive(Debug, Default, Deserialize)]
pub struct FailRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/v1/backups/{id}/fail`: the client gives up; its images are removed.
pub async fn fail_backup(
    State(st): State<AppState>,
    access: Access,
    ApiPath(backup_id): ApiPath<String>,
    OptionalJson(req): OptionalJson<FailRequest>,
) -> ApiResult<Json<BackupView>> {
    check_backup(&st, &access, &backup_id).await?;
    let reason = req
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("failed by the transfer client");
    Ok(Json(st.engine.fail_backup(&backup_id, reason).await?))
}

/// Query of `GET /api/v1/backups/changeid` and `GET /api/v1/backups/chain`.
/// Taken as text so that a bad value gets a precise message.
#[derive(Debug, Deserialize)]
pub struct DiskQuery {
    pub vm_name: Option<String>,
    pub disk_id: Option<String>,
}

/// `GET /api/v1/backups/changeid?vm_name=&disk_id=`: the change_id to start
/// the next incremental from ("" when there is none).
pub async fn previous_change_id(
    State(st): State<AppState>,
    access: Access,
    ApiQuery(q): ApiQuery<DiskQuery>,
) -> ApiResult<Json<ChangeIdResponse>> {
    const EX: &str = "/api/v1/backups/changeid?vm_name=pgtest1&disk_id=0";
    let vm = required(&q.vm_name, "vm_name", EX)?.to_string();
    access.vm(&vm)?;
    let disk = disk_index(&q.disk_id, EX)?;
    Ok(Json(
        blocking(&st, move |e| e.previous_change_id(&vm, disk)).await?,
    ))
}

/// Query of `GET /api/v1/backups`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub vm_name: Option<String>,
    pub status: Option<String>,
}

/// Response of `GET /api/v1/backups`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackupList {
    pub count: usize,
    pub backups: Vec<BackupView>,
}

/// `GET /api/v1/backups?vm_name=&status=`: backups, oldest first.
pub async fn list_backups(
    State(st): State<AppState>,
    access: Access,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<BackupList>> {
    let vm = optional(&q.vm_name).map(str::to_string);
    let status = match optional(&q.status) {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "query parameter status must be one of running, completed, failed, interrupted, not {s:?}"
            ))
            .with_details(serde_json::json!({ "parameter": "status", "value": s }))
        })?),
    };
    let mut backups = blocking(&st, move |e| e.list_backups(vm.as_deref(), status)).await?;
    backups.retain(|b| access.sees(&b.backup.vm_name));
    Ok(Json(BackupList {
        count: backups.len(),
        backups,
    }))
}

/// `GET /api/v1/backups/chain?vm_name=&disk_id=`: every point of one disk.
pub async fn chain(
    State(st): State<AppState>,
    access: Access,
    ApiQuery(q): ApiQuery<DiskQuery>,
) -> ApiResult<Json<ChainView>> {
    const EX: &str = "/api/v1/backups/chain?vm_name=pgtest1&disk_id=0";
    let vm = required(&q.vm_name, "vm_name", EX)?.to_string();
    access.vm(&vm)?;
    let disk = disk_index(&q.disk_id, EX)?;
    Ok(Json(blocking(&st, move |e| e.chain(&vm, disk)).await?))
}

/// Largest source-digest upload: a digest file of a 64 TiB disk read whole.
pub const SOURCE_DIGESTS_LIMIT: usize = 64 + 40 * (1 << 30);

/// `GET /api/v1/backups/{id}/disks/{disk}/digests`.
pub async fn point_digests(
    State(st): State<AppState>,
    access: Access,
    ApiPath((backup_id, disk_id)): ApiPath<(String, u32)>,
) -> ApiResult<axum::response::Response> {
    check_backup(&st, &access, &backup_id).await?;
    let bytes = st.engine.point_digests(&backup_id, disk_id).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// `PUT /api/v1/backups/{id}/disks/{disk}/source-digests`.
pub async fn put_source_digests(
    State(st): State<AppState>,
    access: Access,
    ApiPath((backup_id, disk_id)): ApiPath<(String, u32)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    check_backup(&st, &access, &backup_id).await?;
    let n = st
        .engine
        .put_source_digests(&backup_id, disk_id, body.to_vec())
        .await?;
    Ok(Json(serde_json::json!({ "blocks": n })))
}

/// `POST /api/v1/verify/deep`: read every stored block of every point (or
/// one VM's) and compare it with its block digest.
pub async fn deep_verify(
    State(st): State<AppState>,
    access: Access,
    ApiJson(req): ApiJson<DeepVerifyRequest>,
) -> ApiResult<Json<DeepVerifyReport>> {
    access.optional_vm(req.vm_name.as_deref())?;
    Ok(Json(st.engine.deep_verify(req).await?))
}

/// `GET /api/v1/backups/{id}`.
pub async fn get_backup(
    State(st): State<AppState>,
    access: Access,
    ApiPath(backup_id): ApiPath<String>,
) -> ApiResult<Json<BackupView>> {
    let id = backup_id.clone();
    let b = blocking(&st, move |e| e.get_backup(&id)).await?;
    access.owns(&b.backup.vm_name, "backup", &backup_id)?;
    Ok(Json(b))
}

/// Response of the DELETE endpoints.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeletedResponse {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_id: Option<String>,
    pub message: String,
    pub timestamp: String,
}

/// `DELETE /api/v1/backups/{id}`: remove a backup (409 while later points depend on it).
/// `PATCH /api/v1/backups/{backup_id}`: protection and note.
pub async fn annotate_backup(
    State(st): State<AppState>,
    access: Access,
    ApiPath(backup_id): ApiPath<String>,
    ApiJson(req): ApiJson<AnnotateRequest>,
) -> ApiResult<Json<BackupView>> {
    check_backup(&st, &access, &backup_id).await?;
    Ok(Json(
        st.engine
            .annotate_backup(&backup_id, req.protected, req.note)
            .await?,
    ))
}

pub async fn delete_backup(
    State(st): State<AppState>,
    access: Access,
    ApiPath(backup_id): ApiPath<String>,
) -> ApiResult<Json<DeletedResponse>> {
    check_backup(&st, &access, &backup_id).await?;
    st.engine.delete_backup(&backup_id).await?;
    Ok(Json(DeletedResponse {
        status: "deleted".into(),
        message: format!("backup {backup_id} and its images were deleted"),
        backup_id: Some(backup_id),
        restore_id: None,
        timestamp: now(),
    }))
}

// ---------------------------------------------------------------------------
// Restores
// ---------------------------------------------------------------------------

/// `GET /api/v1/restores`: every open restore.
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreList {
    pub restores: Vec<RestoreView>,
}

pub async fn list_restores(
    State(st): State<AppState>,
    access: Access,
) -> ApiResult<Json<RestoreList>> {
    let mut r = blocking(&st, |e| Ok(e.restores())).await?;
    r.retain(|x| access.sees(&x.vm_name));
    Ok(Json(RestoreList { restores: r }))
}

/// Query of `DELETE /api/v1/restores/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseQuery {
    /// Instant restores: keep the point with the writes merged in as a
    /// standalone qcow2 image at this path (on the daemon's machine).
    #[serde(default)]
    pub keep_as: Option<String>,
}

/// `POST /api/v1/restores`: export one point in time over NBD (read-only,
/// or with `writable` through a scratch overlay).
pub async fn open_restore(
    State(st): State<AppState>,
    access: Access,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> ApiResult<Json<RestoreView>> {
    check_backup(&st, &access, &req.backup_id).await?;
    if req.writable {
        access.role_in(&[Role::Admin], "open a writable (instant) restore")?;
    }
    Ok(Json(st.engine.open_restore(req).await?))
}

/// `DELETE /api/v1/restores/{id}`: close a restore export.
pub async fn close_restore(
    State(st): State<AppState>,
    access: Access,
    ApiPath(restore_id): ApiPath<String>,
    ApiQuery(q): ApiQuery<CloseQuery>,
) -> ApiResult<Json<DeletedResponse>> {
    if access.limited() {
        let restores = blocking(&st, |e| Ok(e.restores())).await?;
        if let Some(r) = restores.iter().find(|r| r.restore_id == restore_id) {
            access.owns(&r.vm_name, "restore", &restore_id)?;
        }
    }
    if q.keep_as.is_some() {
        access.role_in(
            &[Role::Admin],
            "keep an instant restore's writes as a file (keep_as)",
        )?;
    }
    let kept = st
        .engine
        .close_restore(&restore_id, q.keep_as.as_deref())
        .await?;
    Ok(Json(DeletedResponse {
        status: "closed".into(),
        message: match kept {
            Some(p) => format!(
                "restore {restore_id} was closed; the point with its writes is kept as {p} (a standalone qcow2)"
            ),
            None => format!("restore {restore_id} was closed; its NBD export is gone"),
        },
        backup_id: None,
        restore_id: Some(restore_id),
        timestamp: now(),
    }))
}

// ---------------------------------------------------------------------------
// Verify, health, metrics, OpenAPI
// ---------------------------------------------------------------------------

/// Query of `GET /api/v1/verify`.
#[derive(Debug, Deserialize)]
pub struct VerifyQuery {
    pub vm_name: Option<String>,
}

/// `GET /api/v1/verify?vm_name=`: check the catalog against the images.
/// 200 with the report whether or not it found problems.
pub async fn verify(
    State(st): State<AppState>,
    access: Access,
    ApiQuery(q): ApiQuery<VerifyQuery>,
) -> ApiResult<Json<VerifyReport>> {
    let vm = optional(&q.vm_name).map(str::to_string);
    access.optional_vm(vm.as_deref())?;
    Ok(Json(blocking(&st, move |e| e.verify(vm.as_deref())).await?))
}

/// `GET /healthz` (no auth).
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(st): State<AppState>) -> ApiResult<Response> {
    let m = blocking(&st, |e| Ok(e.metrics())).await?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&m),
    )
        .into_response())
}

/// The Prometheus text format of [`Metrics`]. Every status has a line, 0 when
/// the engine reports none.
pub fn render_metrics(m: &Metrics) -> String {
    use std::fmt::Write;
    let mut by_status: Vec<(String, u64)> = ["running", "completed", "failed", "interrupted"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for (s, n) in &m.backups_by_status {
        match by_status.iter_mut().find(|(k, _)| k == s) {
            Some(slot) => slot.1 += n,
            None => by_status.push((s.clone(), *n)),
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP chainvault_backups Backups in the catalog, by status."
    );
    let _ = writeln!(out, "# TYPE chainvault_backups gauge");
    for (s, n) in &by_status {
        let _ = writeln!(
            out,
            "chainvault_backups{{status=\"{}\"}} {n}",
            escape_label(s)
        );
    }
    let _ = writeln!(
        out,
        "# HELP chainvault_bytes_received_total Bytes written into backup images over NBD since the daemon started."
    );
    let _ = writeln!(out, "# TYPE chainvault_bytes_received_total counter");
    let _ = writeln!(out, "chainvault_bytes_received_total {}", m.bytes_received);
    let _ = writeln!(
        out,
        "# HELP chainvault_active_exports NBD exports open for backups being written."
    );
    let _ = writeln!(out, "# TYPE chainvault_active_exports gauge");
    let _ = writeln!(out, "chainvault_active_exports {}", m.active_exports);
    let _ = writeln!(
        out,
        "# HELP chainvault_active_restores Read-only NBD exports open for restores."
    );
    let _ = writeln!(out, "# TYPE chainvault_active_restores gauge");
    let _ = writeln!(out, "chainvault_active_restores {}", m.active_restores);
    let _ = writeln!(
        out,
        "# HELP chainvault_repository_bytes Bytes the repository directory occupies (images, sidecars, journals, catalog)."
    );
    let _ = writeln!(out, "# TYPE chainvault_repository_bytes gauge");
    let _ = writeln!(out, "chainvault_repository_bytes {}", m.repository_bytes);
    let _ = writeln!(
        out,
        "# HELP chainvault_repository_free_bytes Free bytes of the file system the repository is on."
    );
    let _ = writeln!(out, "# TYPE chainvault_repository_free_bytes gauge");
    let _ = writeln!(out, "chainvault_repository_free_bytes {}", m.free_bytes);
    let _ = writeln!(
        out,
        "# HELP chainvault_points_deep_verify Completed points by the outcome of their last deep verify."
    );
    let _ = writeln!(out, "# TYPE chainvault_points_deep_verify gauge");
    for (label, n) in [
        ("never", m.deep_verify.0),
        ("ok", m.deep_verify.1),
        ("bad", m.deep_verify.2),
    ] {
        let _ = writeln!(
            out,
            "chainvault_points_deep_verify{{result=\"{label}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP chainvault_vm_bytes Bytes the images of a VM occupy."
    );
    let _ = writeln!(out, "# TYPE chainvault_vm_bytes gauge");
    for (vm, bytes, _) in &m.vms {
        let _ = writeln!(
            out,
            "chainvault_vm_bytes{{vm=\"{}\"}} {bytes}",
            escape_label(vm)
        );
    }
    let _ = writeln!(
        out,
        "# HELP chainvault_vm_points Completed points of a VM (all disks)."
    );
    let _ = writeln!(out, "# TYPE chainvault_vm_points gauge");
    for (vm, _, points) in &m.vms {
        let _ = writeln!(
            out,
            "chainvault_vm_points{{vm=\"{}\"}} {points}",
            escape_label(vm)
        );
    }
    out
}

/// Escape a Prometheus label value.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Json<&'static serde_json::Value> {
    Json(super::openapi::document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text() {
        let m = Metrics {
            backups_by_status: vec![("completed".into(), 3), ("odd\"one".into(), 1)],
            bytes_received: 42,
            active_exports: 2,
            active_restores: 1,
            vms: vec![("web01".into(), 1000, 3)],
            repository_bytes: 5000,
            free_bytes: 9000,
            deep_verify: (1, 2, 3),
        };
        let t = render_metrics(&m);
        assert!(
            t.contains("chainvault_vm_bytes{vm=\"web01\"} 1000\n"),
            "{t}"
        );
        assert!(t.contains("chainvault_vm_points{vm=\"web01\"} 3\n"), "{t}");
        assert!(t.contains("chainvault_repository_free_bytes 9000\n"), "{t}");
        assert!(
            t.contains("chainvault_points_deep_verify{result=\"bad\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("chainvault_backups{status=\"completed\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("chainvault_backups{status=\"running\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("chainvault_backups{status=\"odd\\\"one\"} 1\n"),
            "{t}"
        );
        assert!(t.contains(
            "# TYPE chainvault_bytes_received_total counter\nchainvault_bytes_received_total 42\n"
        ));
        assert!(t.contains("chainvault_active_exports 2\n"));
        assert!(t.contains("chainvault_active_restores 1\n"));
        for line in t.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("chainvault_"),
                "{line}"
            );
        }
    }

    #[test]
    fn query_helpers() {
        assert!(required(&None, "vm_name", "x").is_err());
        assert!(required(&Some("  ".into()), "vm_name", "x").is_err());
        assert_eq!(required(&Some("vm".into()), "vm_name", "x").unwrap(), "vm");
        assert_eq!(disk_index(&Some("3".into()), "x").unwrap(), 3);
        let e = disk_index(&Some("-1".into()), "x").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("disk index"));
    }
}
