//! Replay of an ext3/ext4 (jbd2) journal, in memory.
//!
//! A backup of a running guest is crash-consistent: its ext4 has the
//! "needs recovery" flag and the newest metadata may sit only in the
//! journal. The kernel would replay it at mount; we cannot write, so we
//! compute which journal block holds the newest committed copy of each
//! filesystem block and read those instead. Format: the kernel's
//! Documentation/filesystems/ext4/journal.rst (all fields big-endian).
//! Fast-commit areas are not replayed (the last fast commits after the
//! newest full commit are lost, as on a kernel without fast-commit support).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use crate::ext4::{be32_at as be32, Ext4, Replayed};

const MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SB_V1: u32 = 3;
const SB_V2: u32 = 4;
const REVOKE: u32 = 5;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const TAG_ESCAPE: u32 = 1;
const TAG_SAME_UUID: u32 = 2;
const TAG_LAST: u32 = 8;

fn bad(msg: impl Into<String>) -> String {
    msg.into()
}

pub(crate) fn replay(fs: &Ext4, jino: u64) -> Result<BTreeMap<u64, Replayed>, String> {
    if jino == 0 {
        return Err(bad(
            "the journal is on an external device, which this reader does not open",
        ));
    }
    let bs = fs.block_size() as usize;
    let io = |e: io::Error| e.to_string();
    let jlen = fs.journal_len_blocks(jino).map_err(io)?;
    let read = |lblk: u64| -> Result<Vec<u8>, String> {
        let off = fs.journal_block_offset(jino, lblk).map_err(io)?;
        let mut b = vec![0u8; bs];
        fs.meta().read_exact_at(&mut b, off).map_err(io)?;
        Ok(b)
    };
    let sb = read(0)?;
    if be32(&sb, 0) != MAGIC || !matches!(be32(&sb, 4), SB_V1 | SB_V2) {
        return Err(bad("the journal superblock has no jbd2 magic"));
    }
    if be32(&sb, 12) as usize != bs {
        return Err(bad(format!(
            "journal block size {} differs from the filesystem's {bs}",
            be32(&sb, 12)
        )));
    }
    let maxlen = (be32(&sb, 16) as u64).min(jlen);
    let first = be32(&sb, 20) as u64;
    let mut seq = be32(&sb, 24);
    let start = be32(&sb, 28) as u64;
    if start == 0 {
        return Ok(BTreeMap::new()); // clean journal
    }
    if first == 0 || first >= maxlen || start < first || start >= maxlen {
        return Err(bad(format!(
            "journal bounds are invalid (first {first}, start {start}, length {maxlen})"
        )));
    }
    let incompat = if be32(&sb, 4) == SB_V2 {
        be32(&sb, 40)
    } else {
        0
    };
    let csum3 = incompat & INCOMPAT_CSUM_V3 != 0;
    let csum = csum3 || incompat & INCOMPAT_CSUM_V2 != 0;
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let tag_size = if csum3 {
        16
    } else if is64 {
        12
    } else {
        8
    };
    let next = |b: u64| if b + 1 >= maxlen { first } else { b + 1 };

    // Pass 1: find committed transactions and revocations.
    struct Tx {
        seq: u32,
        blocks: Vec<(u64, u64, bool)>, // fs block, journal block, escaped
    }
    let mut committed: Vec<Tx> = Vec::new();
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    let mut pending = Tx {
        seq,
        blocks: Vec::new(),
    };
    let mut pending_revokes: Vec<u64> = Vec::new();
    let mut pos = start;
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > 2 * maxlen + 2 {
            return Err(bad("the journal does not end (a loop of transactions)"));
        }
        let b = read(pos)?;
        if be32(&b, 0) != MAGIC || be32(&b, 8) != seq {
            break;
        }
        match be32(&b, 4) {
            DESCRIPTOR => {
                let end = bs - if csum { 4 } else { 0 };
                let mut o = 12;
                let mut data_pos = pos;
                while o + tag_size <= end {
                    let lo = be32(&b, o) as u64;
                    let (flags, hi) = if csum3 {
                        (
                            be32(&b, o + 4),
                            if is64 { be32(&b, o + 8) as u64 } else { 0 },
                        )
                    } else {
                        let f = u16::from_be_bytes([b[o + 6], b[o + 7]]) as u32;
                        (f, if is64 { be32(&b, o + 8) as u64 } else { 0 })
                    };
                    data_pos = next(data_pos);
                    pending
                        .blocks
                        .push((hi << 32 | lo, data_pos, flags & TAG_ESCAPE != 0));
                    o += tag_size;
                    if flags & TAG_SAME_UUID == 0 {
                        o += 16;
                    }
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
                pos = data_pos;
            }
            COMMIT => {
                let tx = std::mem::replace(
                    &mut pending,
                    Tx {
                        seq: seq.wrapping_add(1),
                        blocks: Vec::new(),
                    },
                );
                for r in pending_revokes.drain(..) {
                    let e = revoked.entry(r).or_insert(tx.seq);
                    *e = (*e).max(tx.seq);
                }
                committed.push(tx);
                seq = seq.wrapping_add(1);
            }
            REVOKE => {
                let used = (be32(&b, 12) as usize).min(bs);
                let w = if is64 { 8 } else { 4 };
                let mut o = 16;
                while o + w <= used {
                    let blk = if is64 {
                        (be32(&b, o) as u64) << 32 | be32(&b, o + 4) as u64
                    } else {
                        be32(&b, o) as u64
                    };
                    pending_revokes.push(blk);
                    o += w;
                }
            }
            _ => break,
        }
        pos = next(pos);
    }

    // Pass 2: the newest committed copy of each block wins, unless a
    // revocation in the same or a later transaction cancels it.
    let mut map = BTreeMap::new();
    for tx in &committed {
        for &(blk, jblk, escaped) in &tx.blocks {
            if revoked.get(&blk).is_some_and(|&r| r >= tx.seq) {
                continue;
            }
            let off = fs.journal_block_offset(jino, jblk).map_err(io)?;
            let v = if escaped {
                let mut d = read(jblk)?;
                d[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                Replayed::Mem(Arc::from(d))
            } else {
                Replayed::At(off)
            };
            map.insert(blk, v);
        }
    }
    Ok(map)
}
