//! `chainvault token create|list|revoke`: API tokens with roles (docs/api.md,
//! "Tokens and roles"), against a daemon (`--server`, with an admin token)
//! or a repository no daemon serves (`--data DIR`).

use clap::{Args, Subcommand};

use super::inspect::{print_json, Source, SourceArgs};
use crate::model::*;

/// `chainvault token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a token. Its secret is printed once and never again: the
    /// repository keeps only a hash of it.
    Create(CreateArgs),
    /// List the tokens (names, roles, VMs; never secrets).
    List(ListArgs),
    /// Revoke a token: the daemon refuses it from the next request on.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The token's name, shown in logs and listings (letters, digits, - _ . @).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// admin (everything), backup (start, complete and fail backups),
    /// restore (list, open read-only restores, read files) or audit
    /// (read-only: lists, metrics, verify results).
    #[arg(long, value_name = "ROLE", value_parser = ["admin", "backup", "restore", "audit"])]
    pub role: String,
    /// Limit the token to these VMs (a name, or a glob with * and ?);
    /// repeat for more. Another VM's backups are 404 to it.
    #[arg(long = "vm", value_name = "PATTERN")]
    pub vms: Vec<String>,
    /// Print JSON ({"name", "role", "token", ...}) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token's name.
    pub name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

fn vms_text(vms: &[String]) -> String {
    if vms.is_empty() {
        "every VM".into()
    } else {
        vms.join(", ")
    }
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<u8> {
    match cmd {
        TokenCmd::Create(a) => {
            let req = TokenRequest {
                name: a.name.clone(),
                role: a.role.clone(),
                vms: a.vms.clone(),
            };
            let t: TokenCreated = match Source::open_writable(&a.source)? {
                Source::Offline(e) => e.create_token(&req)?,
                Source::Http(h) => h.call(
                    "POST",
                    "/api/v1/tokens",
                    &[],
                    Some(&serde_json::to_value(&req)?),
                )?,
            };
            if a.json {
                print_json(&t)?;
            } else {
                println!(
                    "token {:?} (role {}, {}) created; its secret, shown only now:",
                    t.name,
                    t.role.as_str(),
                    vms_text(&t.vms)
                );
                println!("{}", t.token);
            }
            Ok(0)
        }
        TokenCmd::List(a) => {
            let tokens: Vec<TokenView> = match Source::open(&a.source)? {
                Source::Offline(e) => e.tokens()?,
                Source::Http(h) => {
                    let l: TokenList = h.call("GET", "/api/v1/tokens", &[], None)?;
                    l.tokens
                }
            };
            if a.json {
                print_json(&TokenList { tokens })?;
            } else if tokens.is_empty() {
                println!("no tokens (the API is open unless the daemon has --token)");
            } else {
                println!("{:<24} {:<8} {:<24} VMS", "NAME", "ROLE", "CREATED");
                for t in &tokens {
                    println!(
                        "{:<24} {:<8} {:<24} {}",
                        t.name,
                        t.role.as_str(),
                        t.created_at,
                        vms_text(&t.vms)
                    );
                }
            }
            Ok(0)
        }
        TokenCmd::Revoke(a) => {
            match Source::open_writable(&a.source)? {
                Source::Offline(e) => e.revoke_token(&a.name)?,
                Source::Http(h) => {
                    let _: serde_json::Value = h.call(
                        "DELETE",
                        &format!("/api/v1/tokens/{}", super::policy::percent(&a.name)),
                        &[],
                        None,
                    )?;
                }
            }
            if a.json {
                print_json(&serde_json::json!({ "name": a.name, "status": "revoked" }))?;
            } else {
                println!("token {:?} revoked", a.name);
            }
            Ok(0)
        }
    }
}
