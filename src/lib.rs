//! chainvault: backup repository daemon for virtual machine disks.
//!
//! The binary's pieces live here so that integration tests and the CLI share
//! them: [`cli`] (clap commands), [`api`] (the HTTP control API), [`engine`],
//! and, as the daemon grows, the catalog.

#![recursion_limit = "256"]

pub mod api;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod digest;
pub mod engine;
pub mod export;
pub mod model;
pub mod restore;
pub mod tls;
pub mod units;
