//! On-disk table entries and their codecs: L1, L2 (standard and extended),
//! refcount table and refcount blocks of every width, compressed-cluster
//! descriptors. Pure functions, no I/O.

use crate::header::Header;

/// A byte offset into the guest's virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset into the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster in the image file (host offset >> cluster_bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;

/// Image geometry derived from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub extended_l2: bool,
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub l2_entry_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// log2 of the bytes one L2 table maps.
    pub l2_span_bits: u32,
    /// Subcluster size (cluster_size / 32 with extended L2, else cluster_size).
    pub subcluster_size: u64,
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    pub size: u64,
}

impl Geometry {
    pub fn from_header(h: &Header) -> Geometry {
        Geometry::new(h.cluster_bits, h.extended_l2(), h.refcount_order, h.size)
    }

    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32, size: u64) -> Geometry {
        let cluster_size = 1u64 << cluster_bits;
        let l2_entry_size = if extended_l2 { 16 } else { 8 };
        let l2_entries = cluster_size / l2_entry_size;
        Geometry {
            cluster_bits,
            cluster_size,
            extended_l2,
            l2_entry_size,
            l2_entries,
            l2_span_bits: cluster_bits + l2_entries.trailing_zeros(),
            subcluster_size: if extended_l2 {
                cluster_size / 32
            } else {
                cluster_size
            },
            refcount_order,
            rb_entries: (cluster_size * 8) >> refcount_order,
            size,
        }
    }

    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> self.l2_span_bits
    }
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries - 1)
    }
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }
    pub fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }
    pub fn cluster_offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }
    /// Largest refcount value representable.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }
}

/// How one guest cluster is mapped by a standard (non-extended) or extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file (or zero without one).
    Unallocated,
    /// Reads as zeros; `host` is kept when the cluster stays preallocated.
    Zero { host: Option<HostOffset> },
    /// Data at `host`; `copied` is the COPIED flag (refcount exactly 1).
    Normal { host: HostOffset, copied: bool },
    /// Compressed data: descriptor bits as stored.
    Compressed { descriptor: u64 },
    /// Extended L2: the cluster's 32 subclusters, each data/zero/unallocated.
    /// `host` is the cluster's host offset, or None if no data subcluster exists.
    Sub {
        host: Option<HostOffset>,
        copied: bool,
        bitmap: u64,
    },
}

/// Subcluster state in an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    Unallocated,
    Zero,
    Data,
    /// Both the allocated and the zero bit are set: invalid.
    Invalid,
}

impl L2Entry {
    /// Decode an L2 entry. `raw` is the first 8 bytes; `bitmap` the second 8 with extended L2.
    pub fn decode(raw: u64, bitmap: Option<u64>) -> L2Entry {
        if raw & COMPRESSED != 0 {
            return L2Entry::Compressed {
                descriptor: raw & !(COMPRESSED | COPIED),
            };
        }
        let off = raw & L2_OFFSET_MASK;
        let copied = raw & COPIED != 0;
        let host = if off != 0 {
            Some(HostOffset(off))
        } else {
            None
        };
        match bitmap {
            Some(bm) => L2Entry::Sub {
                host,
                copied,
                bitmap: bm,
            },
            None => {
                if raw & ZERO != 0 {
                    L2Entry::Zero { host }
                } else if let Some(host) = host {
                    L2Entry::Normal { host, copied }
                } else {
                    L2Entry::Unallocated
                }
            }
        }
    }

    /// Encode back into (raw, bitmap).
    pub fn encode(&self, extended: bool) -> (u64, u64) {
        match *self {
            L2Entry::Unallocated => (0, 0),
            L2Entry::Zero { host } => {
                if extended {
                    (host.map_or(0, |h| h.0 | COPIED), ALL_ZERO_BITS)
                } else {
                    (host.map_or(0, |h| h.0 | COPIED) | ZERO, 0)
                }
            }
            L2Entry::Normal { host, copied } => (
                host.0 | if copied { COPIED } else { 0 },
                if extended { ALL_ALLOC_BITS } else { 0 },
            ),
            L2Entry::Compressed { descriptor } => (descriptor | COMPRESSED, 0),
            L2Entry::Sub {
                host,
                copied,
                bitmap,
            } => (
                host.map_or(0, |h| h.0) | if copied && host.is_some() { COPIED } else { 0 },
                bitmap,
            ),
        }
    }

    /// The host cluster this entry holds a reference to (not for compressed entries).
    pub fn host(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Zero { host } | L2Entry::Sub { host, .. } => host,
            L2Entry::Normal { host, .. } => Some(host),
            _ => None,
        }
    }
}

pub const ALL_ALLOC_BITS: u64 = 0x0000_0000_ffff_ffff;
pub const ALL_ZERO_BITS: u64 = 0xffff_ffff_0000_0000;

/// State of subcluster `i` (0..32) in an extended L2 bitmap.
pub fn sub_state(bitmap: u64, i: u32) -> SubState {
    let a = bitmap >> i & 1 != 0;
    let z = bitmap >> (32 + i) & 1 != 0;
    match (a, z) {
        (false, false) => SubState::Unallocated,
        (true, false) => SubState::Data,
        (false, true) => SubState::Zero,
        (true, true) => SubState::Invalid,
    }
}

/// Decode a compressed-cluster descriptor into (host offset, bytes to read).
pub fn compressed_extent(descriptor: u64, cluster_bits: u32) -> (HostOffset, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset_mask = (1u64 << x) - 1;
    let off = descriptor & offset_mask;
    let sectors = ((descriptor >> x) & ((1u64 << (62 - x)) - 1)) + 1;
    let len = sectors * 512 - (off & 511);
    (HostOffset(off), len)
}

/// Read refcount entry `idx` of a refcount block with the given order.
pub fn get_refcount(block: &[u8], order: u32, idx: u64) -> u64 {
    let idx = idx as usize;
    match order {
        0 => (block[idx / 8] >> (idx % 8) & 1) as u64,
        1 => (block[idx / 4] >> (2 * (idx % 4)) & 3) as u64,
        2 => (block[idx / 2] >> (4 * (idx % 2)) & 15) as u64,
        3 => block[idx] as u64,
        4 => u16::from_be_bytes([block[idx * 2], block[idx * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(block[idx * 4..idx * 4 + 4].try_into().unwrap_or([0; 4])) as u64,
        _ => u64::from_be_bytes(block[idx * 8..idx * 8 + 8].try_into().unwrap_or([0; 8])),
    }
}

/// Set refcount entry `idx`. The caller has checked `value` fits the width.
pub fn set_refcount(block: &mut [u8], order: u32, idx: u64, value: u64) {
    let idx = idx as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = bits * (idx % per_byte);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[idx * 2..idx * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[idx * 4..idx * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[idx * 8..idx * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Read big-endian u64 entry `i` of a table.
pub fn be64(table: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&table[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_codec_all_orders() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            for i in 0..n {
                set_refcount(&mut block, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i * 7 + 3) & max,
                    "order {order} idx {i}"
                );
            }
        }
    }

    #[test]
    fn refcount_order0_is_lsb_first() {
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set_refcount(&mut block, 0, 3, 1);
        assert_eq!(block[0], 0b1001);
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 62 - 8 = 54
        let d = (3u64 << 54) | 0x1_0200;
        let (off, len) = compressed_extent(d, 16);
        assert_eq!(off.0, 0x1_0200);
        assert_eq!(len, 4 * 512);
    }

    #[test]
    fn l2_roundtrip() {
        for ext in [false, true] {
            for e in [
                L2Entry::Normal {
                    host: HostOffset(0x20000),
                    copied: true,
                },
                L2Entry::Zero { host: None },
                L2Entry::Unallocated,
            ] {
                let (r, b) = e.encode(ext);
                let d = L2Entry::decode(r, ext.then_some(b));
                if ext {
                    match (e, d) {
                        (
                            L2Entry::Unallocated,
                            L2Entry::Sub {
                                host: None,
                                bitmap: 0,
                                ..
                            },
                        ) => {}
                        (
                            L2Entry::Zero { host: None },
                            L2Entry::Sub {
                                host: None,
                                bitmap: ALL_ZERO_BITS,
                                ..
                            },
                        ) => {}
                        (
                            L2Entry::Normal { host, .. },
                            L2Entry::Sub {
                                host: Some(h),
                                bitmap: ALL_ALLOC_BITS,
                                ..
                            },
                        ) => {
                            assert_eq!(host, h)
                        }
                        other => panic!("{other:?}"),
                    }
                } else {
                    assert_eq!(e, d);
                }
            }
        }
    }
}
