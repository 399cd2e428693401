//! API tokens (docs/api.md, "Tokens and roles"): each has a name, a role
//! and optionally the VMs it is limited to. The secret is shown once, when
//! the token is created; the catalog keeps only its BLAKE3 hash (the secret
//! is 256 random bits, so a fast hash is as good as a slow one).

use std::io::Read;

use super::{cat, Engine, EngineError, EngineResult};
use crate::model::*;

/// What every secret starts with, so that one pasted in the wrong place is
/// recognisable.
pub const SECRET_PREFIX: &str = "cvt_";

/// Longest token name.
const NAME_MAX: usize = 64;

/// The hash the catalog keeps of a secret.
pub fn secret_hash(secret: &str) -> String {
    crate::digest::hex(blake3::hash(secret.as_bytes()).as_bytes())
}

/// A new secret: 32 bytes from the kernel's random source, in lower-case hex.
fn new_secret() -> EngineResult<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| EngineError::Internal(format!("reading /dev/urandom for a token: {e}")))?;
    Ok(format!("{SECRET_PREFIX}{}", crate::digest::hex(&b)))
}

/// Whether `name` matches the glob `pattern` (`*` any run of characters,
/// `?` any one character, everything else itself).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0usize, 0usize);
    // Where the last `*` was, and the name position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn check_name(name: &str) -> EngineResult<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EngineError::BadRequest(format!(
            "token name {name:?} must be 1 to {NAME_MAX} characters of letters, digits and - _ . @"
        )))
    }
}

fn check_pattern(p: &str) -> EngineResult<()> {
    if p.trim().is_empty() || p.len() > 256 || p.chars().any(|c| c.is_control()) {
        return Err(EngineError::BadRequest(format!(
            "VM pattern {p:?} must be a VM name or a glob (* and ?), without control characters"
        )));
    }
    Ok(())
}

impl Engine {
    /// Every token (without secrets), by name.
    pub fn tokens(&self) -> EngineResult<Vec<TokenView>> {
        Ok(self
            .catalog
            .tokens()
            .map_err(cat)?
            .iter()
            .map(TokenView::from)
            .collect())
    }

    /// Whether the catalog holds any token.
    pub fn has_tokens(&self) -> EngineResult<bool> {
        self.catalog.has_tokens().map_err(cat)
    }

    /// Create a token; the answer holds its secret, which is not kept.
    pub fn create_token(&self, req: &TokenRequest) -> EngineResult<TokenCreated> {
        check_name(&req.name)?;
        let role = Role::parse(&req.role).ok_or_else(|| {
            EngineError::BadRequest(format!(
                "role {:?} is not one of admin, backup, restore, audit",
                req.role
            ))
        })?;
        for p in &req.vms {
            check_pattern(p)?;
        }
        let secret = new_secret()?;
        let rec = TokenRecord {
            name: req.name.clone(),
            role,
            vms: req.vms.clone(),
            secret_hash: secret_hash(&secret),
            created_at: now(),
        };
        if !self.catalog.add_token(&rec).map_err(cat)? {
            return Err(EngineError::Conflict(format!(
                "a token named {:?} exists: revoke it first (chainvault token revoke {}) or pick another name",
                req.name, req.name
            )));
        }
        tracing::info!(token = %rec.name, role = role.as_str(), vms = ?rec.vms, "token created");
        Ok(TokenCreated {
            name: rec.name,
            role,
            vms: rec.vms,
            created_at: rec.created_at,
            token: secret,
        })
    }

    /// Revoke a token: requests with it are refused from now on.
    pub fn revoke_token(&self, name: &str) -> EngineResult<()> {
        if !self.catalog.remove_token(name).map_err(cat)? {
            return Err(EngineError::not_found("token", name));
        }
        tracing::info!(token = %name, "token revoked");
        Ok(())
    }

    /// The token whose secret is `secret`, if any. Every stored hash is
    /// compared (without an early exit), so the time taken does not say
    /// which, or how close.
    pub fn token_by_secret(&self, secret: &str) -> EngineResult<Option<TokenRecord>> {
        let want = secret_hash(secret);
        let mut found = None;
        for t in self.catalog.tokens().map_err(cat)? {
            if crate::api::constant_time_eq(t.secret_hash.as_bytes(), want.as_bytes()) {
                found = Some(t);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-01"));
        assert!(glob_match("web-*", "web-"));
        assert!(!glob_match("web-*", "db-01"));
        assert!(glob_match("*-prod", "db-prod"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("vm?", "vm1"));
        assert!(!glob_match("vm?", "vm12"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", ""));
    }
}
