//! Partition tables: MBR (with extended and logical partitions) and GPT.
//!
//! Our own small parser rather than the `gpt` or `mbrman` crates: both are
//! written for editing tables on `Read + Write + Seek` devices and want to
//! own one; we only read, over a shared [`ReadAt`], must fall back to the
//! backup GPT header when the primary is damaged and explain in words what
//! was wrong, and must never panic on hostile bytes. The formats are small
//! (UEFI spec 2.10 chapter 5; the MBR/EBR layout as Linux reads it).

use crate::disk::read_vec;
use crate::ReadAt;

/// One partition, in bytes from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux's number: 1-4 primary MBR or GPT entries 1.., 5.. logical.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// The GPT partition name, if any.
    pub label: Option<String>,
}

/// What was found at the start of a disk.
#[derive(Debug)]
pub enum Table {
    Gpt(Vec<Partition>),
    Mbr(Vec<Partition>),
    /// No partition table.
    None,
}

const SECTOR: u64 = 512;
const MAX_LOGICAL: usize = 128;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

struct MbrEntry {
    kind: u8,
    start: u64,
    count: u64,
}

fn mbr_entries(sector: &[u8]) -> Option<[MbrEntry; 4]> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let e = |i: usize| {
        let o = 446 + 16 * i;
        MbrEntry {
            kind: sector[o + 4],
            start: le32(sector, o + 8) as u64,
            count: le32(sector, o + 12) as u64,
        }
    };
    Some([e(0), e(1), e(2), e(3)])
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// True when sector 0 holds a protective MBR (an entry of type 0xEE).
pub fn has_protective_mbr(disk: &dyn ReadAt) -> bool {
    let Ok(s) = read_vec(disk, 0, 512) else {
        return false;
    };
    mbr_entries(&s).is_some_and(|es| es.iter().any(|e| e.kind == 0xEE))
}

/// Reads an MBR table, following the chain of EBRs of an extended
/// partition. `Ok(None)` when sector 0 has no usable MBR.
pub fn read_mbr(disk: &dyn ReadAt) -> Result<Option<Vec<Partition>>, String> {
    let sectors = disk.size() / SECTOR;
    let s = read_vec(disk, 0, 512).map_err(|e| format!("cannot read the MBR: {e}"))?;
    let Some(entries) = mbr_entries(&s) else {
        return Ok(None);
    };
    // Status bytes must be 0 or 0x80: a boot sector of a filesystem that
    // happens to end in 55 AA rarely passes this and the checks below.
    for i in 0..4 {
        let st = s[446 + 16 * i];
        if st != 0 && st != 0x80 {
            return Ok(None);
        }
    }
    let used: Vec<(usize, &MbrEntry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind != 0 && e.count != 0)
        .collect();
    if used.is_empty() {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (i, e) in used {
        if e.start == 0 || e.start.saturating_add(e.count) > sectors {
            return Err(format!(
                "MBR partition {} (sectors {}..{}) does not fit in the disk ({} sectors)",
                i + 1,
                e.start,
                e.start.saturating_add(e.count),
                sectors
            ));
        }
        if is_extended(e.kind) {
            read_logical(disk, e.start, e.count, &mut parts)?;
        } else {
            parts.push(Partition {
                number: i as u32 + 1,
                start: e.start * SECTOR,
                len: e.count * SECTOR,
                label: None,
            });
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(Some(parts))
}

/// Walks the EBR chain of the extended partition at `ext_start` sectors.
fn read_logical(
    disk: &dyn ReadAt,
    ext_start: u64,
    ext_len: u64,
    out: &mut Vec<Partition>,
) -> Result<(), String> {
    let ext_end = ext_start + ext_len;
    let mut ebr = ext_start;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5u32;
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL {
            return Err(format!("the chain of extended boot records loops or is longer than {MAX_LOGICAL} (at sector {ebr})"));
        }
        let s = read_vec(disk, ebr * SECTOR, 512)
            .map_err(|e| format!("cannot read the EBR at sector {ebr}: {e}"))?;
        let Some(es) = mbr_entries(&s) else {
            if ebr == ext_start {
                return Ok(()); // an empty extended partition
            }
            return Err(format!(
                "the extended boot record at sector {ebr} has no 55 AA signature"
            ));
        };
        let (l, next) = (&es[0], &es[1]);
        if l.kind != 0 && l.count != 0 {
            let start = ebr + l.start;
            if l.start == 0 || start + l.count > ext_end {
                return Err(format!(
                    "logical partition {number} (sectors {start}..{}) lies outside its extended partition (sectors {ext_start}..{ext_end})",
                    start + l.count
                ));
            }
            out.push(Partition {
                number,
                start: start * SECTOR,
                len: l.count * SECTOR,
                label: None,
            });
            number += 1;
        }
        if next.kind == 0 || next.count == 0 || !is_extended(next.kind) {
            return Ok(());
        }
        let n = ext_start + next.start;
        if n <= ext_start || n >= ext_end {
            return Err(format!(
                "the extended boot record at sector {ebr} points outside its extended partition"
            ));
        }
        ebr = n;
    }
}

/// Reads a GPT: the primary header at LBA 1, or the backup header at the
/// last LBA when the primary (or its entry array) fails its checksum.
/// `Ok(None)` when neither header is there at all.
pub fn read_gpt(disk: &dyn ReadAt) -> Result<Option<Vec<Partition>>, String> {
    let mut problems = Vec::new();
    for sector in [512u64, 4096] {
        let lbas = disk.size() / sector;
        if lbas < 3 {
            continue;
        }
        for (which, lba) in [("primary", 1), ("backup", lbas - 1)] {
            match gpt_at(disk, sector, lba) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(e) => problems.push(format!("{which} GPT header: {e}")),
            }
        }
        if !problems.is_empty() {
            break;
        }
    }
    if problems.is_empty() {
        Ok(None)
    } else {
        Err(problems.join("; "))
    }
}

fn gpt_at(disk: &dyn ReadAt, sector: u64, lba: u64) -> Result<Option<Vec<Partition>>, String> {
    let h = read_vec(disk, lba * sector, sector as usize)
        .map_err(|e| format!("cannot read LBA {lba}: {e}"))?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=sector as usize).contains(&hsize) {
        return Err(format!(
            "header size {hsize} is not between 92 and {sector}"
        ));
    }
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    let want = le32(&h, 16);
    let got = crc32fast::hash(&copy);
    if want != got {
        return Err(format!(
            "header CRC32 mismatch (stored {want:08x}, computed {got:08x})"
        ));
    }
    let my_lba = le64(&h, 24);
    if my_lba != lba {
        return Err(format!("header at LBA {lba} says it is at LBA {my_lba}"));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as u64;
    let esize = le32(&h, 84) as u64;
    if esize < 128 || !esize.is_multiple_of(8) || esize > 4096 {
        return Err(format!(
            "partition entry size {esize} is invalid (want a multiple of 8, 128..4096)"
        ));
    }
    if count > 4096 {
        return Err(format!(
            "{count} partition entries is more than this reader accepts (4096)"
        ));
    }
    let bytes = (count * esize) as usize;
    let arr = read_vec(disk, entries_lba.saturating_mul(sector), bytes)
        .map_err(|e| format!("cannot read the partition entries at LBA {entries_lba}: {e}"))?;
    let want = le32(&h, 88);
    let got = crc32fast::hash(&arr);
    if want != got {
        return Err(format!(
            "partition entry array CRC32 mismatch (stored {want:08x}, computed {got:08x})"
        ));
    }
    let lbas = disk.size() / sector;
    let mut parts = Vec::new();
    for i in 0..count as usize {
        let e = &arr[i * esize as usize..(i + 1) * esize as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue; // unused entry
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if first == 0 || last < first || last >= lbas {
            return Err(format!(
                "GPT partition {} (LBA {first}..={last}) does not fit in the disk ({lbas} LBAs)",
                i + 1
            ));
        }
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        parts.push(Partition {
            number: i as u32 + 1,
            start: first * sector,
            len: (last - first + 1) * sector,
            label: (!name.trim().is_empty()).then_some(name),
        });
    }
    Ok(Some(parts))
}

/// Makes a partition label usable in a file name: keeps letters, digits
/// and `-_.+`, turns everything else into `_`, at most 64 characters.
pub fn safe_label(label: &str) -> String {
    let s: String = label
        .trim()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.chars().all(|c| c == '.' || c == '_') {
        String::new()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_filename_safe() {
        assert_eq!(safe_label("EFI boot"), "EFI_boot");
        assert_eq!(safe_label("a/b\0c"), "a_b_c");
        assert_eq!(safe_label(".."), "");
        assert_eq!(safe_label("Données"), "Données");
        assert_eq!(safe_label("  "), "");
    }
}
