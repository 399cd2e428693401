//! An image and its backing files, opened through a gate. (Implementation in progress: API fixed.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::image::{Extent, Image};
use crate::raw::RawFile;

/// Limits on following backing files.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// Backing files must resolve inside this directory. None: the top image's directory.
    pub root: Option<PathBuf>,
    /// Most layers below the top that may be followed.
    pub max_depth: usize,
    /// Open the top layer read-write.
    pub writable: bool,
    pub l2_cache_bytes: u64,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            root: None,
            max_depth: 256,
            writable: false,
            l2_cache_bytes: 32 << 20,
        }
    }
}

/// One layer of a chain.
#[derive(Clone)]
pub enum Layer {
    Qcow(Arc<Image>),
    Raw(Arc<RawFile>),
}

/// A top image and the layers below it; layer 0 is the top.
pub struct Chain {
    _layers: Vec<Layer>,
}

impl Chain {
    pub fn open(_top: &Path, _opts: &ChainOptions) -> Result<Chain> {
        todo!()
    }
    pub fn layers(&self) -> &[Layer] {
        todo!()
    }
    pub fn top(&self) -> &Layer {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub fn read_at(&self, _buf: &mut [u8], _off: u64) -> Result<()> {
        todo!()
    }
    pub fn block_status(&self, _off: u64, _len: u64) -> Result<Vec<Extent>> {
        todo!()
    }
}
