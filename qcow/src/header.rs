//! The QCOW2 header and its extensions: parsed with nom, written back byte-exact.
//!
//! Layout (all big-endian), from QEMU's `docs/interop/qcow2.txt`:
//!
//! | bytes   | field |
//! |---------|-------|
//! | 0-3     | magic `QFI\xfb` |
//! | 4-7     | version (2 or 3) |
//! | 8-15    | backing_file_offset |
//! | 16-19   | backing_file_size |
//! | 20-23   | cluster_bits |
//! | 24-31   | size (virtual, bytes) |
//! | 32-35   | crypt_method |
//! | 36-39   | l1_size (entries) |
//! | 40-47   | l1_table_offset |
//! | 48-55   | refcount_table_offset |
//! | 56-59   | refcount_table_clusters |
//! | 60-63   | nb_snapshots |
//! | 64-71   | snapshots_offset |
//! | 72-79   | incompatible_features (v3) |
//! | 80-87   | compatible_features (v3) |
//! | 88-95   | autoclear_features (v3) |
//! | 96-99   | refcount_order (v3) |
//! | 100-103 | header_length (v3) |
//! | 104     | compression_type (v3, when header_length > 104) |
//!
//! Header extensions follow at `header_length` (72 for v2): `u32 type, u32 len`,
//! data padded to 8 bytes, ending with type 0.

use std::path::Path;

use nom::bytes::complete::take;
use nom::number::complete::{be_u32, be_u64, be_u8};
use nom::{IResult, Parser};

use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: usize = 72;
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Header length we write for v3 images: 104 bytes, the compression type byte,
/// and padding to a multiple of 8.
pub const V3_HEADER_LEN: usize = 112;
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table accepted, in bytes (QEMU's limit too).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (QEMU's limit too).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}
/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// Header extension type codes.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA: u32 = 0x4441_5441;
}

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// Raw deflate, which QEMU calls zlib.
    #[serde(rename = "zlib")]
    Deflate,
    Zstd,
}

/// Kind of a feature in the feature name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
    Other(u8),
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    pub bit: u8,
    pub name: String,
}

/// The persistent-bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    BackingFormat(String),
    FeatureTable(Vec<FeatureName>),
    Bitmaps(BitmapsExt),
    ExternalDataFile(String),
    /// Any other extension, kept verbatim so that rewriting the header preserves it.
    Unknown {
        kind: u32,
        data: Vec<u8>,
    },
}

/// A parsed QCOW2 header with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

struct Fixed {
    magic: u32,
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
}

fn parse_fixed(i: &[u8]) -> IResult<&[u8], Fixed> {
    let (
        i,
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method),
    ) = (be_u32, be_u32, be_u64, be_u32, be_u32, be_u64, be_u32).parse(i)?;
    let (
        i,
        (
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ),
    ) = (be_u32, be_u64, be_u64, be_u32, be_u32, be_u64).parse(i)?;
    Ok((
        i,
        Fixed {
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        },
    ))
}

struct V3Fields {
    incompatible: u64,
    compatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
}

fn parse_v3(i: &[u8]) -> IResult<&[u8], V3Fields> {
    let (i, (incompatible, compatible, autoclear, refcount_order, header_length)) =
        (be_u64, be_u64, be_u64, be_u32, be_u32).parse(i)?;
    Ok((
        i,
        V3Fields {
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
        },
    ))
}

/// One raw extension record: type, and its data (without padding).
fn parse_ext_record(i: &[u8]) -> IResult<&[u8], (u32, &[u8])> {
    let (i, (kind, len)) = (be_u32, be_u32).parse(i)?;
    let (i, data) = take(len as usize).parse(i)?;
    let pad = (8 - (len as usize % 8)) % 8;
    // Padding may be missing on the very last record before the end of the cluster.
    let pad = pad.min(i.len());
    let (i, _) = take(pad).parse(i)?;
    Ok((i, (kind, data)))
}

fn parse_feature_entry(i: &[u8]) -> IResult<&[u8], FeatureName> {
    let (i, (kind, bit, name)) = (be_u8, be_u8, take(46usize)).parse(i)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let kind = match kind {
        0 => FeatureKind::Incompatible,
        1 => FeatureKind::Compatible,
        2 => FeatureKind::Autoclear,
        k => FeatureKind::Other(k),
    };
    Ok((
        i,
        FeatureName {
            kind,
            bit,
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
        },
    ))
}

fn parse_bitmaps_ext(i: &[u8]) -> IResult<&[u8], BitmapsExt> {
    let (i, (nb_bitmaps, _reserved, directory_size, directory_offset)) =
        (be_u32, be_u32, be_u64, be_u64).parse(i)?;
    Ok((
        i,
        BitmapsExt {
            nb_bitmaps,
            directory_size,
            directory_offset,
        },
    ))
}

fn utf8(path: &Path, field: &'static str, b: &[u8]) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| Error::format(path, field, "is not valid UTF-8"))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The backing format named by the backing-format extension, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    pub fn bitmaps(&self) -> Option<BitmapsExt> {
        self.extensions.iter().find_map(|e| match e {
            Extension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }

    /// Name of an incompatible feature bit, from the image's own feature table when it has one.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::FeatureTable(t) => t
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
                .map(|f| f.name.as_str()),
            _ => None,
        })
    }

    /// Number of L1 entries needed to map `size` bytes with this geometry.
    pub fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
        let entry_bits = if extended_l2 { 4 } else { 3 };
        let l2_bits = cluster_bits - entry_bits;
        let bytes_per_l2 = 1u128 << (cluster_bits + l2_bits);
        (size as u128).div_ceil(bytes_per_l2) as u64
    }

    /// Parse and validate a header from the first bytes of a file (at least the first
    /// cluster, or the whole file if it is shorter). `path` names the file in errors.
    pub fn parse(buf: &[u8], path: &Path) -> Result<Header> {
        let fail = |field: &'static str, detail: String| Error::format(path, field, detail);
        let (_, f) = parse_fixed(buf).map_err(|_| {
            fail(
                "header",
                format!(
                    "file is {} bytes, shorter than the {V2_HEADER_LEN}-byte header",
                    buf.len()
                ),
            )
        })?;
        if f.magic != MAGIC {
            return Err(fail(
                "magic",
                format!("{:#010x} is not the qcow2 magic QFI\\xfb", f.magic),
            ));
        }
        if f.version != 2 && f.version != 3 {
            return Err(Error::unsupported(
                path,
                format!("qcow2 version {} (only 2 and 3 exist)", f.version),
            ));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&f.cluster_bits) {
            return Err(fail(
                "cluster_bits",
                format!("{} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)", f.cluster_bits),
            ));
        }
        let cluster_size = 1u64 << f.cluster_bits;
        let (v3, header_length) = if f.version == 3 {
            let (_, v3) = parse_v3(&buf[V2_HEADER_LEN.min(buf.len())..]).map_err(|_| {
                fail(
                    "header",
                    format!("file is {} bytes, shorter than the {V3_MIN_HEADER_LEN}-byte version 3 header", buf.len()),
                )
            })?;
            let hl = v3.header_length as u64;
            if hl < V3_MIN_HEADER_LEN as u64 || hl > cluster_size || !hl.is_multiple_of(8) {
                return Err(fail(
                    "header_length",
                    format!("{hl} must be a multiple of 8 between {V3_MIN_HEADER_LEN} and the cluster size {cluster_size}"),
                ));
            }
            if hl as usize > buf.len() {
                return Err(fail(
                    "header",
                    format!("header_length {hl} runs past the end of the file"),
                ));
            }
            (Some(v3), hl as usize)
        } else {
            (None, V2_HEADER_LEN)
        };
        let (incompatible, compatible, autoclear, refcount_order) = match &v3 {
            Some(v) => (v.incompatible, v.compatible, v.autoclear, v.refcount_order),
            None => (0, 0, 0, 4),
        };
        if refcount_order > 6 {
            return Err(fail(
                "refcount_order",
                format!("{refcount_order} is above 6 (64-bit refcounts)"),
            ));
        }
        let compression_byte = if header_length > V3_MIN_HEADER_LEN {
            buf[V3_MIN_HEADER_LEN]
        } else {
            0
        };
        let compression_type = match (
            incompatible & incompat::COMPRESSION_TYPE != 0,
            compression_byte,
        ) {
            (_, 0) => CompressionType::Deflate,
            (true, 1) => CompressionType::Zstd,
            (false, n) => {
                return Err(fail(
                    "compression_type",
                    format!("{n} is set but the compression-type incompatible bit is not"),
                ))
            }
            (true, n) => {
                return Err(Error::unsupported(
                    path,
                    format!("compression type {n} (known: 0 deflate, 1 zstd)"),
                ))
            }
        };

        // Extensions.
        let mut extensions = Vec::new();
        let ext_area_end = (cluster_size as usize).min(buf.len());
        let mut rest = if header_length <= ext_area_end {
            &buf[header_length..ext_area_end]
        } else {
            &buf[..0]
        };
        let mut saw_end = false;
        while rest.len() >= 8 {
            let (next, (kind, data)) = parse_ext_record(rest).map_err(|_| {
                fail(
                    "header extension",
                    "a header extension runs past the end of the first cluster".to_string(),
                )
            })?;
            rest = next;
            match kind {
                ext::END => {
                    saw_end = true;
                    break;
                }
                ext::BACKING_FORMAT => extensions.push(Extension::BackingFormat(utf8(
                    path,
                    "backing format",
                    data,
                )?)),
                ext::FEATURE_TABLE => {
                    if data.len() % 48 != 0 {
                        return Err(fail(
                            "feature name table",
                            format!("length {} is not a multiple of 48", data.len()),
                        ));
                    }
                    let mut names = Vec::with_capacity(data.len() / 48);
                    let mut d = data;
                    while !d.is_empty() {
                        let (n, e) = parse_feature_entry(d).map_err(|_| {
                            fail("feature name table", "truncated entry".to_string())
                        })?;
                        names.push(e);
                        d = n;
                    }
                    extensions.push(Extension::FeatureTable(names));
                }
                ext::BITMAPS => {
                    let (_, b) = parse_bitmaps_ext(data).map_err(|_| {
                        fail(
                            "bitmaps extension",
                            format!("length {} is shorter than 24", data.len()),
                        )
                    })?;
                    extensions.push(Extension::Bitmaps(b));
                }
                ext::EXTERNAL_DATA => extensions.push(Extension::ExternalDataFile(utf8(
                    path,
                    "external data file name",
                    data,
                )?)),
                kind => extensions.push(Extension::Unknown {
                    kind,
                    data: data.to_vec(),
                }),
            }
        }
        if !saw_end && f.version == 3 && buf.len() >= cluster_size as usize {
            return Err(fail(
                "header extension",
                "no end-of-extensions marker in the first cluster".to_string(),
            ));
        }

        // Backing file name.
        let backing_file = if f.backing_file_offset != 0 && f.backing_file_size != 0 {
            if f.backing_file_size > MAX_BACKING_NAME {
                return Err(fail(
                    "backing_file_size",
                    format!(
                        "{} is longer than {MAX_BACKING_NAME} bytes",
                        f.backing_file_size
                    ),
                ));
            }
            let start = f.backing_file_offset;
            if start > cluster_size {
                return Err(fail(
                    "backing_file_offset",
                    format!("{start:#x} is outside the first cluster"),
                ));
            }
            let end = start + f.backing_file_size as u64;
            if end > cluster_size || end as usize > buf.len() {
                return Err(fail(
                    "backing_file_offset",
                    format!("name at {start}..{end} is outside the first cluster or past the end of the file"),
                ));
            }
            Some(utf8(
                path,
                "backing file name",
                &buf[start as usize..end as usize],
            )?)
        } else {
            None
        };

        let h = Header {
            version: f.version,
            backing_file_offset: f.backing_file_offset,
            backing_file_size: f.backing_file_size,
            cluster_bits: f.cluster_bits,
            size: f.size,
            crypt_method: f.crypt_method,
            l1_size: f.l1_size,
            l1_table_offset: f.l1_table_offset,
            refcount_table_offset: f.refcount_table_offset,
            refcount_table_clusters: f.refcount_table_clusters,
            nb_snapshots: f.nb_snapshots,
            snapshots_offset: f.snapshots_offset,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length: header_length as u32,
            compression_type,
            extensions,
            backing_file,
        };
        h.validate(path)?;
        Ok(h)
    }

    /// Structural checks that do not need the rest of the file.
    fn validate(&self, path: &Path) -> Result<()> {
        let fail = |field: &'static str, detail: String| Error::format(path, field, detail);
        let cs = self.cluster_size();
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(
                    |b| match self.feature_name(FeatureKind::Incompatible, b as u8) {
                        Some(n) => format!("bit {b} ({n})"),
                        None => format!("bit {b}"),
                    },
                )
                .collect();
            return Err(Error::unsupported(
                path,
                format!(
                    "unknown incompatible feature {}; this image needs a newer reader",
                    names.join(", ")
                ),
            ));
        }
        if self.incompatible_features & incompat::EXTERNAL_DATA != 0 {
            return Err(Error::unsupported(
                path,
                "external data files are not supported; convert the image with qemu-img convert",
            ));
        }
        if self.crypt_method != 0 {
            return Err(Error::unsupported(
                path,
                format!("encrypted images (crypt_method {})", self.crypt_method),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(fail(
                "cluster_bits",
                format!("extended L2 entries need clusters of at least 16 KiB, not {cs} bytes"),
            ));
        }
        for (field, off) in [
            ("l1_table_offset", self.l1_table_offset),
            ("refcount_table_offset", self.refcount_table_offset),
            ("snapshots_offset", self.snapshots_offset),
        ] {
            if off % cs != 0 {
                return Err(fail(
                    field,
                    format!("{off:#x} is not aligned to the cluster size {cs}"),
                ));
            }
        }
        if self.refcount_table_offset == 0 {
            return Err(fail(
                "refcount_table_offset",
                "is zero (the header cluster)".to_string(),
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(fail("refcount_table_clusters", "is zero".to_string()));
        }
        if self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            return Err(fail(
                "refcount_table_clusters",
                format!(
                    "{} clusters is larger than the {MAX_REFTABLE_BYTES}-byte limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(fail(
                "l1_size",
                format!(
                    "{} entries is larger than the {MAX_L1_BYTES}-byte limit",
                    self.l1_size
                ),
            ));
        }
        let needed = Self::l1_entries_for(self.size, self.cluster_bits, self.extended_l2());
        if needed > self.l1_size as u64 {
            return Err(fail(
                "l1_size",
                format!(
                    "{} entries cannot map the virtual size {} (needs {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(fail(
                "l1_table_offset",
                "is zero but l1_size is not".to_string(),
            ));
        }
        Ok(())
    }

    /// Serialise the header, its extensions and the backing file name into one
    /// cluster-sized buffer (the rest of which is zero). Updates
    /// `backing_file_offset`/`backing_file_size`/`header_length` to where they land.
    pub fn to_cluster(&mut self) -> std::result::Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut out = Vec::with_capacity(cs);
        let v3 = self.version >= 3;
        if v3 {
            self.header_length = V3_HEADER_LEN as u32;
        }
        let push32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_be_bytes());
        let push64 = |o: &mut Vec<u8>, v: u64| o.extend_from_slice(&v.to_be_bytes());
        push32(&mut out, MAGIC);
        push32(&mut out, self.version);
        push64(&mut out, 0); // backing_file_offset, patched below
        push32(&mut out, 0); // backing_file_size, patched below
        push32(&mut out, self.cluster_bits);
        push64(&mut out, self.size);
        push32(&mut out, self.crypt_method);
        push32(&mut out, self.l1_size);
        push64(&mut out, self.l1_table_offset);
        push64(&mut out, self.refcount_table_offset);
        push32(&mut out, self.refcount_table_clusters);
        push32(&mut out, self.nb_snapshots);
        push64(&mut out, self.snapshots_offset);
        if v3 {
            push64(&mut out, self.incompatible_features);
            push64(&mut out, self.compatible_features);
            push64(&mut out, self.autoclear_features);
            push32(&mut out, self.refcount_order);
            push32(&mut out, self.header_length);
            out.push(match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            out.resize(V3_HEADER_LEN, 0);
        }
        let push_ext = |o: &mut Vec<u8>, kind: u32, data: &[u8]| {
            push32(o, kind);
            push32(o, data.len() as u32);
            o.extend_from_slice(data);
            o.resize(o.len() + (8 - data.len() % 8) % 8, 0);
        };
        for e in &self.extensions {
            match e {
                Extension::BackingFormat(f) => {
                    push_ext(&mut out, ext::BACKING_FORMAT, f.as_bytes())
                }
                Extension::FeatureTable(t) => {
                    let mut d = Vec::with_capacity(t.len() * 48);
                    for f in t {
                        d.push(match f.kind {
                            FeatureKind::Incompatible => 0,
                            FeatureKind::Compatible => 1,
                            FeatureKind::Autoclear => 2,
                            FeatureKind::Other(k) => k,
                        });
                        d.push(f.bit);
                        let mut name = f.name.as_bytes().to_vec();
                        name.resize(46, 0);
                        d.extend_from_slice(&name);
                    }
                    push_ext(&mut out, ext::FEATURE_TABLE, &d);
                }
                Extension::Bitmaps(b) => {
                    let mut d = Vec::with_capacity(24);
                    d.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                    d.extend_from_slice(&0u32.to_be_bytes());
                    d.extend_from_slice(&b.directory_size.to_be_bytes());
                    d.extend_from_slice(&b.directory_offset.to_be_bytes());
                    push_ext(&mut out, ext::BITMAPS, &d);
                }
                Extension::ExternalDataFile(n) => {
                    push_ext(&mut out, ext::EXTERNAL_DATA, n.as_bytes())
                }
                Extension::Unknown { kind, data } => push_ext(&mut out, *kind, data),
            }
        }
        if v3 || !self.extensions.is_empty() {
            push_ext(&mut out, ext::END, &[]);
        }
        match &self.backing_file {
            Some(name) => {
                if name.len() as u32 > MAX_BACKING_NAME {
                    return Err(format!(
                        "backing file name is longer than {MAX_BACKING_NAME} bytes"
                    ));
                }
                self.backing_file_offset = out.len() as u64;
                self.backing_file_size = name.len() as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        if out.len() > cs {
            return Err(format!(
                "header and extensions need {} bytes, more than one {cs}-byte cluster",
                out.len()
            ));
        }
        out[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        out.resize(cs, 0);
        Ok(out)
    }

    /// The feature name table chainvault writes into images it creates.
    pub fn standard_feature_table() -> Extension {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        Extension::FeatureTable(vec![
            f(FeatureKind::Incompatible, 0, "dirty bit"),
            f(FeatureKind::Incompatible, 1, "corrupt bit"),
            f(FeatureKind::Incompatible, 2, "external data file"),
            f(FeatureKind::Incompatible, 3, "compression type"),
            f(FeatureKind::Incompatible, 4, "extended L2 entries"),
            f(FeatureKind::Compatible, 0, "lazy refcounts"),
            f(FeatureKind::Autoclear, 0, "bitmaps"),
            f(FeatureKind::Autoclear, 1, "raw external data"),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: CompressionType::Deflate,
            extensions: vec![
                Extension::BackingFormat("qcow2".into()),
                Header::standard_feature_table(),
                Extension::Unknown {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing_file: Some("../base.qcow2".into()),
        }
    }

    #[test]
    fn round_trip() {
        let mut h = sample();
        let bytes = h.to_cluster().unwrap();
        assert_eq!(bytes.len(), 65536);
        let p = Header::parse(&bytes, Path::new("x")).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.backing_format(), Some("qcow2"));
    }

    #[test]
    fn refuses_unknown_incompatible_bit() {
        let mut h = sample();
        h.incompatible_features |= 1 << 9;
        let bytes = h.to_cluster().unwrap();
        let e = Header::parse(&bytes, Path::new("img.qcow2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("img.qcow2") && e.contains("bit 9"), "{e}");
    }

    #[test]
    fn refuses_external_data() {
        let mut h = sample();
        h.incompatible_features |= incompat::EXTERNAL_DATA;
        let bytes = h.to_cluster().unwrap();
        let e = Header::parse(&bytes, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("external data"), "{e}");
    }

    #[test]
    fn truncated_header_is_clear() {
        let mut h = sample();
        let bytes = h.to_cluster().unwrap();
        for len in [0, 10, 71, 80, 103] {
            let e = Header::parse(&bytes[..len], Path::new("t.qcow2"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("t.qcow2") && e.contains("shorter"), "{len}: {e}");
        }
    }

    #[test]
    fn hostile_backing_offset_does_not_overflow() {
        let mut h = sample();
        let mut bytes = h.to_cluster().unwrap();
        bytes[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        let e = Header::parse(&bytes, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backing_file_offset"), "{e}");
    }

    #[test]
    fn rejects_small_l1() {
        let mut h = sample();
        h.size = 1 << 40;
        let bytes = h.to_cluster().unwrap();
        let e = Header::parse(&bytes, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("l1_size"), "{e}");
    }
}
