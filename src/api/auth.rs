//! Who may call what (docs/api.md, "Tokens and roles").
//!
//! * With no token configured (no `serve --token`, no token in the
//!   catalog) the API is open, as on a loopback-only daemon; every request
//!   acts as admin.
//! * Otherwise every route but `/healthz` needs `Authorization: Bearer
//!   <token>`: the `serve --token` secret (an admin token named `serve`) or
//!   one made with `chainvault token create`.
//! * [`PERMISSIONS`] says which roles may call each route, and what a token
//!   limited to some VMs gets there. The middleware refuses by role (403);
//!   the handlers refuse another VM's things (404, as if they did not exist)
//!   and filter lists, with [`Access`].
//! * Each refusal is logged with the token's name, never its secret.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::engine::tokens::glob_match;
use crate::engine::Engine;
use crate::model::Role;

/// What a token limited to VMs gets on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The route names no VM (the OpenAPI document, health).
    None,
    /// The route names one VM's thing: another VM's is 404.
    Vm,
    /// A list: another VM's entries are left out.
    Filtered,
    /// The route acts on the whole repository: 403.
    Repository,
    /// The route takes an optional VM: another VM's is 404, none is 403.
    OptionalVm,
}

use Role::{Admin as A, Audit as U, Backup as B, Restore as R};

/// One route's permission: method, path, the roles that may call it, what
/// a VM-limited token gets.
pub type Permission = (&'static str, &'static str, &'static [Role], Scope);

/// Every route: (method, path as in [`super::ROUTES`], the roles that may
/// call it, what a VM-limited token gets). docs/api.md has the same as a
/// table, which the tests read.
pub const PERMISSIONS: &[Permission] = &[
    ("post", "/api/v1/backups", &[A, B], Scope::Vm),
    ("get", "/api/v1/backups", &[A, B, R, U], Scope::Filtered),
    ("get", "/api/v1/backups/changeid", &[A, B, U], Scope::Vm),
    ("get", "/api/v1/backups/chain", &[A, B, R, U], Scope::Vm),
    (
        "get",
        "/api/v1/backups/{backup_id}",
        &[A, B, R, U],
        Scope::Vm,
    ),
    ("patch", "/api/v1/backups/{backup_id}", &[A], Scope::Vm),
    ("delete", "/api/v1/backups/{backup_id}", &[A], Scope::Vm),
    (
        "post",
        "/api/v1/backups/{backup_id}/complete",
        &[A, B],
        Scope::Vm,
    ),
    (
        "post",
        "/api/v1/backups/{backup_id}/fail",
        &[A, B],
        Scope::Vm,
    ),
    (
        "get",
        "/api/v1/backups/{backup_id}/disks/{disk_id}/digests",
        &[A, B, R, U],
        Scope::Vm,
    ),
    (
        "put",
        "/api/v1/backups/{backup_id}/disks/{disk_id}/source-digests",
        &[A, B],
        Scope::Vm,
    ),
    ("post", "/api/v1/restores", &[A, R], Scope::Vm),
    ("get", "/api/v1/restores", &[A, R, U], Scope::Filtered),
    (
        "delete",
        "/api/v1/restores/{restore_id}",
        &[A, R],
        Scope::Vm,
    ),
    ("get", "/api/v1/policies", &[A, U], Scope::Filtered),
    ("get", "/api/v1/policies/default", &[A, U], Scope::None),
    ("put", "/api/v1/policies/default", &[A], Scope::Repository),
    (
        "delete",
        "/api/v1/policies/default",
        &[A],
        Scope::Repository,
    ),
    ("get", "/api/v1/policies/vms/{vm_name}", &[A, U], Scope::Vm),
    ("put", "/api/v1/policies/vms/{vm_name}", &[A], Scope::Vm),
    ("delete", "/api/v1/policies/vms/{vm_name}", &[A], Scope::Vm),
    ("post", "/api/v1/prune", &[A], Scope::OptionalVm),
    ("post", "/api/v1/imports", &[A], Scope::Vm),
    ("post", "/api/v1/gc", &[A], Scope::Repository),
    ("get", "/api/v1/usage", &[A, U], Scope::OptionalVm),
    ("get", "/api/v1/verify", &[A, U], Scope::OptionalVm),
    ("post", "/api/v1/verify/deep", &[A], Scope::OptionalVm),
    ("get", "/api/v1/tokens", &[A], Scope::Repository),
    ("post", "/api/v1/tokens", &[A], Scope::Repository),
    ("delete", "/api/v1/tokens/{name}", &[A], Scope::Repository),
    ("get", "/api/v1/openapi.json", &[A, B, R, U], Scope::None),
    ("get", "/healthz", &[A, B, R, U], Scope::None),
    ("get", "/metrics", &[A, U], Scope::Repository),
];

/// The paths that need no token.
pub const PUBLIC_PATHS: &[&str] = &["/healthz"];

/// The permission entry of a request, by matching its path against the
/// route templates (a literal segment beats a `{parameter}`).
pub fn permission_of(method: &str, path: &str) -> Option<&'static Permission> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut best: Option<(usize, &'static Permission)> = None;
    for p in PERMISSIONS {
        if !p.0.eq_ignore_ascii_case(method) {
            continue;
        }
        let t: Vec<&str> = p.1.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let fits = t.iter().zip(&segs).all(|(a, b)| {
            if a.starts_with('{') {
                !b.is_empty()
            } else {
                literal += 1;
                a == b
            }
        });
        if fits && best.is_none_or(|(n, _)| literal > n) {
            best = Some((literal, p));
        }
    }
    best.map(|b| b.1)
}

/// Who is asking. Handlers take it as an argument.
#[derive(Debug, Clone)]
pub struct Access {
    /// The token's name (`serve` for the `serve --token` secret,
    /// `anonymous` when the API is open).
    pub name: Arc<str>,
    pub role: Role,
    /// VM names or patterns; empty means every VM.
    pub vms: Arc<[String]>,
}

impl Access {
    /// The open API: admin of everything.
    pub fn open() -> Access {
        Access {
            name: Arc::from("anonymous"),
            role: Role::Admin,
            vms: Arc::from(Vec::new()),
        }
    }

    /// Whether the token is limited to some VMs.
    pub fn limited(&self) -> bool {
        !self.vms.is_empty()
    }

    /// Whether the token may see VM `vm`.
    pub fn sees(&self, vm: &str) -> bool {
        self.vms.is_empty() || self.vms.iter().any(|p| glob_match(p, vm))
    }

    /// Ok when the token may see VM `vm`; else the 404 of a VM that does
    /// not exist.
    pub fn vm(&self, vm: &str) -> Result<(), ApiError> {
        self.owns(vm, "VM", vm)
    }

    /// Ok when the token may act on the thing `what` `id` of VM `vm`; else
    /// the 404 the engine gives for one that does not exist.
    pub fn owns(&self, vm: &str, what: &'static str, id: &str) -> Result<(), ApiError> {
        if self.sees(vm) {
            Ok(())
        } else {
            self.log_hidden(what, id);
            Err(crate::engine::EngineError::not_found(what, id).into())
        }
    }

    /// For routes that take an optional VM: a VM-limited token must name
    /// one of its own.
    pub fn optional_vm(&self, vm: Option<&str>) -> Result<(), ApiError> {
        match vm {
            Some(v) => self.vm(v),
            None if self.limited() => {
                tracing::warn!(token = %self.name, "refused: a VM-limited token asked for every VM");
                Err(forbidden(format!(
                    "token {:?} is limited to the VMs {}; name one of them (vm_name)",
                    self.name,
                    self.vms.join(", ")
                )))
            }
            None => Ok(()),
        }
    }

    /// Ok when the token's role is one of `roles`; else 403.
    pub fn role_in(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            return Ok(());
        }
        tracing::warn!(token = %self.name, role = self.role.as_str(), what, "refused by role");
        Err(forbidden(format!(
            "token {:?} has the role {}, which may not {what}",
            self.name,
            self.role.as_str()
        )))
    }

    fn log_hidden(&self, what: &str, id: &str) {
        tracing::warn!(token = %self.name, what, id, "refused: outside the token's VMs (answered 404)");
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

impl<S: Send + Sync> FromRequestParts<S> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Access>()
            .cloned()
            .unwrap_or_else(Access::open))
    }
}

/// State of the auth middleware.
#[derive(Clone)]
pub struct AuthState {
    pub engine: Arc<Engine>,
    /// The `serve --token` secret: an admin token named `serve`.
    pub serve_token: Option<Arc<str>>,
}

/// Find who is asking, refuse what their role may not do, and hand the
/// [`Access`] to the handlers.
pub async fn authorize(State(st): State<AuthState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_ascii_lowercase();
    let access = match identify(&st, &req, &path) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%method, %path, "refused: {}", e.message);
            return e.into_response();
        }
    };
    if let Some((_, _, roles, scope)) = permission_of(&method, &path) {
        if !roles.contains(&access.role) {
            tracing::warn!(token = %access.name, role = access.role.as_str(), %method, %path, "refused by role (403)");
            return forbidden(format!(
                "token {:?} has the role {}, which may not call {} {path}; the roles each route allows are in docs/api.md (\"Tokens and roles\")",
                access.name,
                access.role.as_str(),
                method.to_ascii_uppercase()
            ))
            .into_response();
        }
        if *scope == Scope::Repository && access.limited() {
            tracing::warn!(token = %access.name, %method, %path, "refused: a VM-limited token on a repository-wide route (403)");
            return forbidden(format!(
                "token {:?} is limited to the VMs {}, and {} {path} acts on the whole repository",
                access.name,
                access.vms.join(", "),
                method.to_ascii_uppercase()
            ))
            .into_response();
        }
    }
    tracing::Span::current().record("token", &*access.name);
    req.extensions_mut().insert(access);
    next.run(req).await
}

/// The [`Access`] of a request, or its 401.
///
/// (The catalog's token tree is small and sled serves it from memory, so
/// it is read on the request's own task.)
fn identify(st: &AuthState, req: &Request, path: &str) -> Result<Access, ApiError> {
    if PUBLIC_PATHS.contains(&path) {
        return Ok(Access::open());
    }
    if st.serve_token.is_none() && !st.engine.has_tokens()? {
        return Ok(Access::open());
    }
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing Authorization header: this daemon requires `Authorization: Bearer <token>` \
             (the chainvault serve --token secret, or one made with `chainvault token create`)",
        ));
    };
    let Some(given) = bearer(value) else {
        return Err(ApiError::unauthorized(
            "malformed Authorization header: expected `Authorization: Bearer <token>`",
        ));
    };
    if let Some(t) = &st.serve_token {
        if super::constant_time_eq(given.as_bytes(), t.as_bytes()) {
            return Ok(Access {
                name: Arc::from("serve"),
                role: Role::Admin,
                vms: Arc::from(Vec::new()),
            });
        }
    }
    match st.engine.token_by_secret(given)? {
        Some(t) => Ok(Access {
            name: Arc::from(t.name.as_str()),
            role: t.role,
            vms: Arc::from(t.vms),
        }),
        None => Err(ApiError::unauthorized(
            "invalid bearer token: it is not the serve --token secret and no token made with \
             `chainvault token create` has it (was it revoked?)",
        )),
    }
}

/// The token of a `Bearer` Authorization header (scheme case-insensitive).
pub fn bearer(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?.trim();
    let (scheme, token) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_permission_and_no_more() {
        for (m, p) in super::super::ROUTES {
            assert!(
                PERMISSIONS.iter().any(|x| x.0 == *m && x.1 == *p),
                "{m} {p} has no entry in PERMISSIONS"
            );
        }
        for x in PERMISSIONS {
            assert!(
                super::super::ROUTES
                    .iter()
                    .any(|(m, p)| x.0 == *m && x.1 == *p),
                "PERMISSIONS lists {} {}, which is not a route",
                x.0,
                x.1
            );
        }
    }

    #[test]
    fn literal_segments_win() {
        let p = permission_of("GET", "/api/v1/backups/changeid").unwrap();
        assert_eq!(p.1, "/api/v1/backups/changeid");
        let p = permission_of("get", "/api/v1/backups/2026-abc").unwrap();
        assert_eq!(p.1, "/api/v1/backups/{backup_id}");
        let p = permission_of("put", "/api/v1/backups/x/disks/0/source-digests").unwrap();
        assert_eq!(p.2, &[Role::Admin, Role::Backup]);
        assert!(permission_of("get", "/api/v1/nothing").is_none());
    }

    #[test]
    fn bearer_header() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer")), None);
    }
}
