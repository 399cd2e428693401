//! Content digests of disks and points (docs/layout.md, "Block digests").
//!
//! A disk of `size` bytes is cut into blocks of [`BLOCK`] bytes (the last one
//! may be shorter). Each block's digest is the BLAKE3 hash (32 bytes) of its
//! bytes. The disk's digest is the BLAKE3 hash of a 32-byte header (the
//! domain string, the disk size, the block size) followed by every block
//! digest in order. It is written `cvblk2-blake3:<64 hex digits>`.
//!
//! All-zero blocks are common and never hashed: their digest is a constant
//! (the hash of that many zero bytes), so a reimplementation that hashes
//! them gets the same result.
//!
//! BLAKE3 rather than SHA-256: every byte of a full backup, of a restore's
//! check and of a deep verify is hashed, and BLAKE3 is 3.3× SHA-256 with
//! SHA-NI on the machines the benchmarks run on (5.8 vs 1.75 GB/s per core,
//! 64 KiB blocks), and more where the CPU has no SHA instructions. The first
//! construction (`cvblk1-sha256`) was replaced before any release; its
//! files are read as absent (docs/layout.md, "Block digests").
//!
//! | file | what it does |
//! |---|---|
//! | `mod.rs` | the construction: block digests, [`RootHasher`], [`PointDigest`] |
//! | `file.rs` | the per-layer digest file and its reader; resolving a chain |
//! | `compute.rs` | digests of a layer at completion, and of any source |

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

pub mod compute;
pub mod file;

/// Bytes per block.
pub const BLOCK: u64 = 64 << 10;
/// The name of the construction, as it appears before the colon.
pub const ALGORITHM: &str = "cvblk2-blake3";
/// The construction digest files and digests of development builds used.
pub const OLD_ALGORITHM: &str = "cvblk1-sha256";
/// The first 16 bytes of the disk digest's header.
const DOMAIN: &[u8; 16] = b"chainvault-cvb2\0";

/// The BLAKE3 hash of one block.
pub type BlockDigest = [u8; 32];

/// Blocks of a disk of `size` bytes.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Bytes of block `i` of a disk of `size` bytes.
pub fn block_len(size: u64, i: u64) -> usize {
    (size.saturating_sub(i * BLOCK)).min(BLOCK) as usize
}

/// The digest of `len` zero bytes; the full-block one is computed once.
pub fn zero_digest(len: usize) -> BlockDigest {
    static FULL: OnceLock<BlockDigest> = OnceLock::new();
    if len == BLOCK as usize {
        return *FULL.get_or_init(|| hash_bytes(&[0u8; BLOCK as usize]));
    }
    hash_bytes(&vec![0u8; len])
}

fn hash_bytes(b: &[u8]) -> BlockDigest {
    blake3::hash(b).into()
}

/// Whether `b` is all zero bytes. (OR-folding 4 KiB at a time lets the
/// compiler vectorise it and still stops early on data.) The one copy: the
/// transfer client, the restore and `image convert` use it too.
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The digest of one block's bytes.
pub fn hash_block(b: &[u8]) -> BlockDigest {
    if is_zero(b) {
        zero_digest(b.len())
    } else {
        hash_bytes(b)
    }
}

/// Hash every block of `buf`, which holds the disk's bytes from the start of
/// block `first`: `out(i, digest)` for each.
pub fn hash_blocks(size: u64, first: u64, buf: &[u8], mut out: impl FnMut(u64, BlockDigest)) {
    let mut at = 0usize;
    let mut i = first;
    while at < buf.len() {
        let n = block_len(size, i).min(buf.len() - at);
        out(i, hash_block(&buf[at..at + n]));
        at += n;
        i += 1;
    }
}

/// Block digests hashed at a time by [`RootHasher`].
const ROOT_CHUNK: usize = 64 << 10;

/// Builds a disk digest from its block digests, given in order.
pub struct RootHasher {
    h: blake3::Hasher,
    /// Block digests not yet hashed (BLAKE3 is several times faster given
    /// 64 KiB at a time than 32 bytes at a time).
    pending: Vec<u8>,
    size: u64,
    next: u64,
    zero_full: BlockDigest,
}

impl RootHasher {
    pub fn new(size: u64) -> RootHasher {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&size.to_le_bytes());
        h.update(&(BLOCK as u32).to_le_bytes());
        h.update(&[0u8; 4]);
        RootHasher {
            h,
            pending: Vec::with_capacity(ROOT_CHUNK),
            size,
            next: 0,
            zero_full: zero_digest(BLOCK as usize),
        }
    }

    /// Blocks given so far.
    pub fn next_block(&self) -> u64 {
        self.next
    }

    /// The digest of the next block.
    pub fn push(&mut self, d: &BlockDigest) {
        self.feed(d);
        self.next += 1;
    }

    fn feed(&mut self, d: &BlockDigest) {
        self.pending.extend_from_slice(d);
        if self.pending.len() >= ROOT_CHUNK {
            self.h.update(&self.pending);
            self.pending.clear();
        }
    }

    /// Zero blocks up to (not including) block `end`.
    pub fn zeros_until(&mut self, end: u64) {
        let end = end.min(blocks(self.size));
        while self.next < end {
            let len = block_len(self.size, self.next);
            let z = if len == BLOCK as usize {
                self.zero_full
            } else {
                zero_digest(len)
            };
            self.feed(&z);
            self.next += 1;
        }
    }

    /// Block `i`'s digest, with zero blocks before it; `i` must not go back.
    pub fn put(&mut self, i: u64, d: &BlockDigest) {
        self.zeros_until(i);
        self.push(d);
    }

    /// The disk's digest; blocks not given are zero blocks.
    pub fn finish(mut self) -> PointDigest {
        self.zeros_until(blocks(self.size));
        self.h.update(&self.pending);
        PointDigest(self.h.finalize().into())
    }
}

/// A disk digest, shown as `cvblk2-blake3:<hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointDigest(pub [u8; 32]);

impl fmt::Display for PointDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", hex(&self.0))
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

impl FromStr for PointDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hx)) = s.split_once(':') else {
            return Err(format!(
                "digest {s:?} is not ALGORITHM:HEX (chainvault writes {ALGORITHM}:<64 hex digits>)"
            ));
        };
        if alg == OLD_ALGORITHM {
            return Err(format!(
                "digest algorithm {OLD_ALGORITHM} is the construction of chainvault's development \
                 builds, replaced by {ALGORITHM} (docs/layout.md, \"Block digests\"); use a \
                 transfer client of the same version as the daemon"
            ));
        }
        if alg != ALGORITHM {
            return Err(format!(
                "digest algorithm {alg:?} is not the one chainvault computes ({ALGORITHM}); \
                 compute it with `chainvault digest` or the construction in docs/layout.md"
            ));
        }
        if hx.len() != 64 || !hx.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "digest {s:?}: {ALGORITHM} wants 64 hex digits after the colon"
            ));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hx[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(PointDigest(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_hash_like_their_bytes() {
        assert_eq!(zero_digest(BLOCK as usize), hash_bytes(&[0u8; 65536]));
        assert_eq!(hash_block(&[0u8; 100]), hash_bytes(&[0u8; 100]));
        let mut b = vec![0u8; 65536];
        b[65535] = 1;
        assert_eq!(hash_block(&b), hash_bytes(&b));
    }

    #[test]
    fn root_of_zero_disk_matches_explicit_hashing() {
        let size = 3 * BLOCK + 512;
        let mut h = blake3::Hasher::new();
        h.update(b"chainvault-cvb2\0");
        h.update(&size.to_le_bytes());
        h.update(&65536u32.to_le_bytes());
        h.update(&[0u8; 4]);
        for i in 0..4 {
            h.update(blake3::hash(&vec![0u8; block_len(size, i)]).as_bytes());
        }
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(RootHasher::new(size).finish().0, want);
    }

    #[test]
    fn parse_and_show() {
        let d = PointDigest([0xab; 32]);
        let s = d.to_string();
        assert!(s.starts_with("cvblk2-blake3:abab"));
        assert_eq!(s.parse::<PointDigest>().unwrap(), d);
        assert!("sha256:00"
            .parse::<PointDigest>()
            .unwrap_err()
            .contains("algorithm"));
        assert!("cvblk2-blake3:zz".parse::<PointDigest>().is_err());
        assert!(format!("cvblk1-sha256:{}", "0".repeat(64))
            .parse::<PointDigest>()
            .unwrap_err()
            .contains("development builds"));
        assert!("nocolon".parse::<PointDigest>().is_err());
    }
}
