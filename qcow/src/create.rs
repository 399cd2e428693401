//! Creating images: fulls and overlays.
//!
//! Layout of a new image, cluster by cluster: the header (with extensions and
//! the backing file name), the refcount table, the refcount blocks that cover
//! all of this metadata, then the L1 table. The refcount table is sized up
//! front to cover the whole virtual disk fully allocated plus its metadata, so
//! that it never has to move while an image is written.

use std::fs::OpenOptions as FsOpen;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, CompressionType, Extension, Header};
use crate::meta::{set_refcount, Geometry};

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    Qcow2,
    Raw,
}

impl BackingFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

/// The backing file of a new overlay.
#[derive(Debug, Clone)]
pub struct BackingSpec {
    /// The name stored in the header. Relative names resolve against the
    /// overlay's own directory; chainvault stores relative names.
    pub name: String,
    pub format: BackingFormat,
}

/// Options for a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub extended_l2: bool,
    pub refcount_bits: u32,
    pub backing: Option<BackingSpec>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            extended_l2: false,
            refcount_bits: 16,
            backing: None,
        }
    }
}

impl CreateOptions {
    fn validate(&self) -> Result<(u32, u32)> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {cs} must be a power of two from 512 to 2097152 bytes"
            )));
        }
        let bits = cs.trailing_zeros();
        if self.extended_l2 && cs < 16384 {
            return Err(Error::InvalidArgument(format!(
                "extended L2 entries need a cluster size of at least 16384 bytes, not {cs}"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::InvalidArgument(format!(
                "refcount bits {} must be a power of two from 1 to 64",
                self.refcount_bits
            )));
        }
        if !self.size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(format!(
                "virtual size {} must be a multiple of 512 bytes",
                self.size
            )));
        }
        let l1 = Header::l1_entries_for(self.size, bits, self.extended_l2);
        if l1 * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "virtual size {} is too large for {cs}-byte clusters (its L1 table would exceed {} bytes)",
                self.size,
                header::MAX_L1_BYTES
            )));
        }
        Ok((bits, self.refcount_bits.trailing_zeros()))
    }
}

/// Create a new image at `path`. Fails if the file exists.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let (cluster_bits, refcount_order) = opts.validate()?;
    let geo = Geometry::new(cluster_bits, opts.extended_l2, refcount_order, opts.size);
    let cs = geo.cluster_size;
    let l1_entries = Header::l1_entries_for(opts.size, cluster_bits, opts.extended_l2);
    let l1_clusters = (l1_entries * 8).div_ceil(cs);

    // Size the refcount table to cover the disk fully allocated, plus its L2
    // tables, plus slack, so it does not have to grow while the image is written.
    let data_clusters = opts.size.div_ceil(cs);
    let l2_clusters = l1_entries;
    let expected = data_clusters + l2_clusters + data_clusters / 8 + 64;
    let mut rt_clusters = 1u64;
    let mut rb_count;
    loop {
        let meta = 1 + rt_clusters + l1_clusters;
        rb_count = 1u64;
        loop {
            let need = (meta + rb_count).div_ceil(geo.rb_entries);
            if need <= rb_count {
                break;
            }
            rb_count = need;
        }
        let covered = (expected + meta + rb_count)
            .div_ceil(geo.rb_entries)
            .max(rb_count);
        let need_rt = (covered * 8)
            .div_ceil(cs)
            .min(header::MAX_REFTABLE_BYTES / cs)
            .max(1);
        if need_rt <= rt_clusters {
            break;
        }
        rt_clusters = need_rt;
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total = 1 + rt_clusters + rb_count + l1_clusters;

    let mut extensions = Vec::new();
    if let Some(b) = &opts.backing {
        extensions.push(Extension::BackingFormat(b.format.as_str().to_string()));
    }
    extensions.push(Header::standard_feature_table());
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: opts.size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_clusters > 0 { l1_off } else { 0 },
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.extended_l2 {
            header::incompat::EXTENDED_L2
        } else {
            0
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: header::V3_HEADER_LEN as u32,
        compression_type: CompressionType::Deflate,
        extensions,
        backing_file: opts.backing.as_ref().map(|b| b.name.clone()),
    };
    // The feature name table is informational; small clusters may not have room for it.
    let header_bytes = match h.to_cluster() {
        Ok(b) => b,
        Err(_) => {
            h.extensions
                .retain(|e| !matches!(e, Extension::FeatureTable(_)));
            h.to_cluster()
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?
        }
    };

    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let off = rb_off + i * cs;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let mut rbs = vec![0u8; (rb_count * cs) as usize];
    for c in 0..total {
        let blk = (c / geo.rb_entries) as usize;
        let bs = cs as usize;
        set_refcount(
            &mut rbs[blk * bs..(blk + 1) * bs],
            refcount_order,
            c % geo.rb_entries,
            1,
        );
    }

    let mut file = FsOpen::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, "create", e))?;
    let result = (|| -> std::io::Result<()> {
        file.write_all(&header_bytes)?;
        file.write_all_at(&rt, rt_off)?;
        file.write_all_at(&rbs, rb_off)?;
        file.set_len(total * cs)?;
        file.flush()?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(path, "write", e));
    }
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
