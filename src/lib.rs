//! chainvault: backup repository daemon for virtual machine disks.
//!
//! The binary's pieces live here so that integration tests and the CLI share
//! them: [`cli`] (clap commands), and, as the daemon grows, the catalog, the
//! engine and the HTTP API.

pub mod cli;
pub mod engine;
pub mod export;
pub mod model;
pub mod units;
