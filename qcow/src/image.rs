//! One QCOW2 image file. (Implementation in progress: API fixed.)

use std::path::Path;
use std::sync::Arc;

use crate::chain::Chain;
use crate::error::Result;
use crate::header::Header;
use crate::meta::Geometry;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub writable: bool,
    /// Memory budget for cached L2 tables, in bytes.
    pub l2_cache_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            l2_cache_bytes: 32 << 20,
        }
    }
}

/// What a range of the virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Data stored in a layer.
    Data,
    /// Reads as zeros, recorded as such in a layer.
    Zero,
    /// No layer holds it: reads as zeros (or from a backing file not attached).
    Unallocated,
}

/// A run of the virtual disk with one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// Layer that supplies it (0 = top). For unallocated runs, the bottom layer's depth.
    pub depth: u32,
    /// Host offset of the data in that layer's file, where there is one.
    pub host_offset: Option<u64>,
    pub compressed: bool,
}

/// An open QCOW2 image.
pub struct Image {
    _p: (),
}

impl Image {
    pub fn open(_path: &Path, _opts: &OpenOptions) -> Result<Image> {
        todo!()
    }
    pub fn open_with_backing(_path: &Path, _opts: &OpenOptions, _backing: Option<Arc<Chain>>) -> Result<Image> {
        todo!()
    }
    pub fn path(&self) -> &Path {
        todo!()
    }
    pub fn header(&self) -> Header {
        todo!()
    }
    pub fn geometry(&self) -> Geometry {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub fn read_at(&self, _buf: &mut [u8], _off: u64) -> Result<()> {
        todo!()
    }
    pub fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        todo!()
    }
    pub fn write_zeroes(&self, _off: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        todo!()
    }
    pub fn discard(&self, _off: u64, _len: u64) -> Result<()> {
        todo!()
    }
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
    pub fn block_status(&self, _off: u64, _len: u64) -> Result<Vec<Extent>> {
        todo!()
    }
}
