//! NTFS compressed files: where each compression unit's bytes are and how
//! to turn them back into file data.
//!
//! A compressed `$DATA` attribute is non-resident, and its clusters come in
//! compression units of `2^exponent` clusters (16 in practice; the exponent
//! is in the attribute header). Each unit is, by its data runs:
//! - sparse from its first cluster: all zeroes;
//! - allocated in every cluster: stored as is (the data did not compress);
//! - allocated clusters followed by sparse ones: the allocated clusters
//!   hold LZNT1 chunks ([`crate::lznt1`]) for the whole unit.
//!
//! This is the rule ntfs-3g and Windows read by. A read decompresses only
//! the units it covers; the caller keeps recent units in a cache.
//!
//! [`RunMap`] also reads plain (uncompressed) attributes whose runs the
//! `ntfs` crate 0.4 gets wrong: those split over several records by an
//! attribute list when the first piece is in the base record (the crate
//! then starts at the second piece, with a data size of 0).

use std::io;

use crate::lznt1;
use crate::ReadAt;

/// The largest compression unit we accept (Windows writes 64 KiB).
const MAX_UNIT: u64 = 4 << 20;

/// Clusters `vcn .. vcn + clusters` of the attribute, at byte `at` of the
/// volume, or a hole (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub vcn: u64,
    pub clusters: u64,
    pub at: Option<u64>,
}

/// Where an attribute's clusters are: its runs from VCN 0, sorted, without
/// gaps or overlaps.
#[derive(Debug)]
pub(crate) struct RunMap {
    runs: Vec<Run>,
    cluster: u64,
}

impl RunMap {
    pub fn new(mut runs: Vec<Run>, cluster: u64) -> Result<RunMap, String> {
        if cluster == 0 {
            return Err("the cluster size is 0".into());
        }
        runs.sort_by_key(|r| r.vcn);
        let mut next = 0u64;
        for r in &runs {
            if r.vcn != next {
                return Err(format!(
                    "the data runs {} at cluster {next} (the next run starts at cluster {})",
                    if r.vcn > next {
                        "leave a gap"
                    } else {
                        "overlap"
                    },
                    r.vcn
                ));
            }
            next = r
                .vcn
                .checked_add(r.clusters)
                .ok_or("a data run is too long")?;
        }
        Ok(RunMap { runs, cluster })
    }

    /// For the caches: about how much memory this map holds.
    pub fn weight(&self) -> usize {
        self.runs.len() + 1
    }

    /// The runs covering clusters `vcn .. vcn + n`, clipped to that range,
    /// and the first cluster no run maps when the runs end early.
    fn pieces(&self, vcn: u64, n: u64) -> (Vec<Run>, Option<u64>) {
        let end = vcn.saturating_add(n);
        let first = self.runs.partition_point(|r| r.vcn + r.clusters <= vcn);
        let mut out = Vec::new();
        let mut at = vcn;
        for r in &self.runs[first..] {
            if at >= end {
                break;
            }
            let skip = at - r.vcn;
            let take = (r.clusters - skip).min(end - at);
            out.push(Run {
                vcn: at,
                clusters: take,
                // A hostile run far past the volume fails when read.
                at: r
                    .at
                    .map(|p| p.saturating_add(skip.saturating_mul(self.cluster))),
            });
            at += take;
        }
        (out, (at < end).then_some(at))
    }

    /// Reads an uncompressed attribute of `size` bytes: fills `buf` from
    /// `offset`, holes as zeroes; returns the bytes read (0 at the end).
    /// `what` names the file in errors.
    pub fn read_plain(
        &self,
        dev: &dyn ReadAt,
        size: u64,
        offset: u64,
        buf: &mut [u8],
        what: &str,
    ) -> io::Result<usize> {
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (size - offset).min(buf.len() as u64) as usize;
        let c = self.cluster;
        let first = offset / c;
        let last = (offset + want as u64 - 1) / c;
        let (pieces, unmapped) = self.pieces(first, last - first + 1);
        if let Some(v) = unmapped {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what}: no data run maps cluster {v}, inside the file's {size} bytes"),
            ));
        }
        let mut done = 0usize;
        for p in &pieces {
            let start = (p.vcn * c).max(offset);
            let end = ((p.vcn + p.clusters) * c).min(offset + want as u64);
            let dst = &mut buf[done..done + (end - start) as usize];
            match p.at {
                None => dst.fill(0),
                Some(at) => {
                    let from = at.saturating_add(start - p.vcn * c);
                    dev.read_exact_at(dst, from).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("{what}: cannot read its data at volume byte {from}: {e}"),
                        )
                    })?;
                }
            }
            done += dst.len();
        }
        Ok(done)
    }
}

/// Everything needed to read one compressed attribute.
#[derive(Debug)]
pub(crate) struct Layout {
    map: RunMap,
    unit_clusters: u64,
    /// The attribute's data size.
    pub size: u64,
}

/// What the data runs say a unit is.
enum Unit {
    Zero,
    Raw,
    Compressed,
}

impl Layout {
    /// Checks the unit size: `2^exponent` clusters, a multiple of 4 KiB.
    pub fn new(map: RunMap, exponent: u8, size: u64) -> Result<Layout, String> {
        let cluster = map.cluster;
        if exponent == 0 || exponent > 16 {
            return Err(format!(
                "the compressed attribute has a compression unit of 2^{exponent} clusters, which is not valid"
            ));
        }
        let unit_clusters = 1u64 << exponent;
        let unit = unit_clusters.saturating_mul(cluster);
        if unit > MAX_UNIT || !unit.is_multiple_of(lznt1::CHUNK as u64) {
            return Err(format!(
                "the compression unit is {unit} bytes ({unit_clusters} clusters of {cluster}); this reader takes multiples of 4 KiB up to {MAX_UNIT}"
            ));
        }
        Ok(Layout {
            map,
            unit_clusters,
            size,
        })
    }

    /// Bytes of output per unit.
    pub fn unit_bytes(&self) -> u64 {
        self.unit_clusters * self.map.cluster
    }

    /// For the cache: about how much memory this layout holds.
    pub fn weight(&self) -> usize {
        self.map.weight()
    }

    /// The file bytes of unit `k` (a whole unit, shorter at the end of the
    /// file). `what` names the file in errors.
    pub fn read_unit(&self, dev: &dyn ReadAt, k: u64, what: &str) -> io::Result<Vec<u8>> {
        let cluster = self.map.cluster;
        let ub = self.unit_bytes();
        let start = k * ub;
        let len = (self.size.saturating_sub(start)).min(ub) as usize;
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{what}: compressed data for bytes {start}..{} (compression unit {k}) is damaged: {why}",
                    start + len as u64
                ),
            )
        };
        let first = k * self.unit_clusters;
        let (pieces, unmapped) = self.map.pieces(first, self.unit_clusters);
        let kind = match pieces.first() {
            None => return Err(bad(format!("no data run maps its first cluster ({first})"))),
            Some(p) if p.at.is_none() => Unit::Zero,
            _ if pieces.iter().any(|p| p.at.is_none()) => Unit::Compressed,
            // Runs ending inside the unit: the tail of a file whose last
            // unit was written in part. Stored as is when the mapped
            // clusters hold all the data, else we cannot tell.
            _ => Unit::Raw,
        };
        match kind {
            Unit::Zero => Ok(vec![0; len]),
            Unit::Raw => {
                let mut out = vec![0u8; len];
                let mut o = 0usize;
                for p in &pieces {
                    if o >= len {
                        break;
                    }
                    let n = ((p.clusters * cluster) as usize).min(len - o);
                    let at = p.at.unwrap_or_default();
                    dev.read_exact_at(&mut out[o..o + n], at).map_err(|e| {
                        bad(format!("cannot read clusters at volume byte {at}: {e}"))
                    })?;
                    o += n;
                }
                if o < len {
                    return Err(bad(format!(
                        "the data runs end at cluster {} inside the unit, before the data does",
                        unmapped.unwrap_or_default()
                    )));
                }
                Ok(out)
            }
            Unit::Compressed => {
                // Holes (and clusters past the runs) read as zeroes, so a
                // stream that ends in them ends with a zero chunk header.
                let mut input = vec![0u8; ub as usize];
                for p in &pieces {
                    if let Some(at) = p.at {
                        let o = ((p.vcn - first) * cluster) as usize;
                        let n = (p.clusters * cluster) as usize;
                        dev.read_exact_at(&mut input[o..o + n], at).map_err(|e| {
                            bad(format!("cannot read clusters at volume byte {at}: {e}"))
                        })?;
                    }
                }
                let mut out = vec![0u8; ub as usize];
                lznt1::decompress(&input, &mut out).map_err(|e| bad(e.to_string()))?;
                out.truncate(len);
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDisk;

    fn run(vcn: u64, clusters: u64, at: Option<u64>) -> Run {
        Run { vcn, clusters, at }
    }

    fn layout(runs: Vec<Run>, cluster: u64, exponent: u8, size: u64) -> Result<Layout, String> {
        Layout::new(RunMap::new(runs, cluster)?, exponent, size)
    }

    #[test]
    fn plain_reads_map_clusters_and_holes() {
        let vol: Vec<u8> = (0..16 * 512).map(|i| (i / 512) as u8 + 1).collect();
        let dev = MemDisk(vol);
        // clusters: 0-1 at volume cluster 5, 2-3 a hole, 4 at volume cluster 9
        let m = RunMap::new(
            vec![
                run(2, 2, None),
                run(0, 2, Some(5 * 512)),
                run(4, 1, Some(9 * 512)),
            ],
            512,
        )
        .unwrap();
        let size = 5 * 512 - 10;
        let mut want = vec![6u8; 512];
        want.extend([7u8; 512]);
        want.extend([0u8; 1024]);
        want.extend([10u8; 502]);
        for (off, len) in [
            (0, 3000),
            (1, 1),
            (511, 2),
            (1000, 1100),
            (2047, 3),
            (2540, 9),
        ] {
            let mut b = vec![0xEEu8; len];
            let n = m.read_plain(&dev, size, off, &mut b, "f").unwrap();
            let end = (off as usize + len).min(size as usize);
            assert_eq!(n, end - off as usize, "length at {off}");
            assert_eq!(&b[..n], &want[off as usize..end], "bytes at {off}");
        }
        assert_eq!(m.read_plain(&dev, size, size, &mut [0; 4], "f").unwrap(), 0);
        // runs that end before the file does
        let e = m
            .read_plain(&dev, 9000, 2600, &mut [0; 100], "NTFS file record 9")
            .unwrap_err();
        assert!(
            e.to_string().contains("record 9") && e.to_string().contains("cluster 5"),
            "{e}"
        );
    }

    #[test]
    fn runs_must_be_contiguous_and_units_sane() {
        let e = layout(vec![run(0, 2, Some(0)), run(3, 1, None)], 4096, 4, 1).unwrap_err();
        assert!(e.contains("gap at cluster 2"), "{e}");
        let e = layout(vec![run(0, 2, Some(0)), run(1, 1, None)], 4096, 4, 1).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        assert!(layout(vec![], 4096, 0, 1).is_err());
        assert!(layout(vec![], 65536, 8, 1).is_err());
        assert!(layout(vec![], 128, 4, 1).is_err());
    }

    #[test]
    fn units_zero_raw_compressed_and_damaged() {
        // 512-byte clusters, 8 per unit (4 KiB units, one chunk each).
        let c = 512u64;
        let mut vol = vec![0u8; 64 * c as usize];
        // unit 1: raw, clusters 8..16 of the volume
        for (i, b) in vol[8 * 512..16 * 512].iter_mut().enumerate() {
            *b = i as u8 ^ 0x5A;
        }
        // unit 2: compressed "ab" + reference (offset 2, length 10) at cluster 20
        let chunk = [0x04u8, 0xB0, 0b100, b'a', b'b', 0x07, 0x10];
        vol[20 * 512..20 * 512 + chunk.len()].copy_from_slice(&chunk);
        // unit 3: a chunk longer than the unit's stored bytes, at cluster 30
        vol[30 * 512..30 * 512 + 4].copy_from_slice(&[0xFF, 0xBF, 0x01, 0x00]);
        let dev = MemDisk(vol);
        let l = layout(
            vec![
                run(0, 8, None),
                run(8, 8, Some(8 * c)),
                run(16, 1, Some(20 * c)),
                run(17, 7, None),
                run(24, 1, Some(30 * c)),
                run(25, 7, None),
            ],
            c,
            3,
            4 * 4096 - 100,
        )
        .unwrap();
        assert_eq!(l.read_unit(&dev, 0, "f").unwrap(), vec![0; 4096]);
        let raw = l.read_unit(&dev, 1, "f").unwrap();
        assert!(raw.iter().enumerate().all(|(i, &b)| b == i as u8 ^ 0x5A));
        let u = l.read_unit(&dev, 2, "f").unwrap();
        assert_eq!(&u[..12], b"abababababab");
        assert!(u[12..].iter().all(|&b| b == 0));
        let e = l.read_unit(&dev, 3, "NTFS file record 77").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("record 77") && s.contains("12288..16284") && s.contains("truncated"),
            "{s}"
        );
        let e = l.read_unit(&dev, 4, "f").unwrap_err();
        assert!(e.to_string().contains("no data run"), "{e}");
    }

    #[test]
    fn a_raw_unit_cut_short_by_its_runs() {
        let dev = MemDisk(vec![7u8; 8192]);
        // 3 clusters mapped; the file needs all 4 of the unit.
        let l = layout(vec![run(0, 3, Some(0))], 512, 2, 2048).unwrap_err();
        assert!(l.contains("4 KiB"), "{l}");
        let l = layout(vec![run(0, 3, Some(0))], 1024, 2, 4000).unwrap();
        let e = l.read_unit(&dev, 0, "f").unwrap_err();
        assert!(e.to_string().contains("end at cluster 3"), "{e}");
        // the file ends within the mapped clusters: fine
        let l = layout(vec![run(0, 3, Some(0))], 1024, 2, 3000).unwrap();
        assert_eq!(l.read_unit(&dev, 0, "f").unwrap(), vec![7u8; 3000]);
    }
}
