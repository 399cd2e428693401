//! `chainvault-qcow`: a QCOW2 (v2 read, v3 read/write) implementation.
//!
//! Layers, bottom up:
//! - [`header`]: the header and its extensions (nom parser, writer).
//! - [`meta`]: on-disk table entries and their codecs (pure functions).
//! - [`image`]: one image file: read, write, write-zeroes, discard, flush,
//!   block status, with an L2 table cache and a refcount allocator.
//! - [`chain`]: an image and its backing files opened through a gate.
//! - [`check`]: consistency check and leak repair, straight from the on-disk
//!   structures.
//! - [`create`]: creating fulls and overlays.
//! - [`merge`]: copying one layer into another and rebasing, the pieces of
//!   a consolidation.
//!
//! There is no network code and no catalog here.

pub mod chain;
pub mod check;
mod compress;
pub mod create;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod image;
pub mod merge;
pub mod meta;
pub mod raw;

pub use chain::{Chain, ChainOptions, Layer};
pub use check::{check, CheckOptions, CheckReport};
pub use create::{BackingFormat, BackingSpec, CreateOptions};
pub use error::{Error, Result};
pub use image::{Extent, ExtentKind, Image, OpenOptions};
