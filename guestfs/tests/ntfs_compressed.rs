//! NTFS compressed files (LZNT1): the files under `compressed/` of the
//! fixture tree, which mkdisk.sh stores compressed through ntfs-3g, read
//! back byte for byte as the source has them and as ntfs-3g's own ntfscat
//! gives them, at any offset; damaged compressed data is an error that
//! names the file record and the bytes, never a panic or wrong bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chainvault_guestfs::{GuestFs, NodeId};
use common::*;

/// A file's runlist as ntfs-3g reads it: (vcn, lcn or a hole, clusters).
type Runlist = Vec<(u64, Option<u64>, u64)>;

const FILES: [&str; 5] = [
    "text.txt",
    "random.bin",
    "mixed.bin",
    "holes.bin",
    "big.txt",
];

struct Fixture {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    img: PathBuf,
}

fn need(tool: &str) {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    assert!(
        found,
        "'{tool}' is missing: install the Debian package ntfs-3g (scripts/install-test-deps.sh)"
    );
}

fn fixture() -> Fixture {
    need("ntfscat");
    need("ntfsinfo");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src, &["--many", "10"]);
    let img = tmp.path().join("d.img");
    mkdisk(
        &img,
        "64M",
        "none",
        &[format!("ntfs:rest:{}", src.display())],
    );
    Fixture {
        _tmp: tmp,
        src,
        img,
    }
}

fn tool_output(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What ntfs-3g (ntfsinfo -v) says of a file's $DATA: the compression unit
/// and the runlist as (vcn, lcn or hole, clusters).
fn ntfsinfo(img: &Path, path: &str) -> (Option<u32>, Runlist) {
    let out = tool_output(
        Command::new("ntfsinfo")
            .arg("-v")
            .arg("-F")
            .arg(path)
            .arg(img),
    );
    let text = String::from_utf8_lossy(&out);
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let mut unit = None;
    let mut runs = Vec::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if line.contains("Compression unit:") {
            unit = t.get(2).and_then(|v| v.parse().ok());
        }
        if t.len() == 3 && t[0].starts_with("0x") && t[2].starts_with("0x") {
            let lcn = if t[1] == "<HOLE>" { None } else { hex(t[1]) };
            runs.push((hex(t[0]).unwrap(), lcn, hex(t[2]).unwrap()));
        }
    }
    (unit, runs)
}

fn cluster_size(img: &Path) -> u64 {
    let out = tool_output(Command::new("ntfsinfo").arg("-m").arg(img));
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Cluster Size: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("ntfsinfo -m names the cluster size")
}

fn node_of(fs: &dyn GuestFs, name: &str) -> NodeId {
    let dir = fs.lookup(fs.root(), b"compressed").unwrap().unwrap();
    fs.lookup(dir, name.as_bytes()).unwrap().unwrap()
}

/// Reads `len` bytes at `off` (fewer at the end), looping on short reads.
fn read_at(fs: &dyn GuestFs, node: NodeId, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = fs.read(node, off + done as u64, &mut v[done..]).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    v.truncate(done);
    v
}

#[test]
fn compressed_files_match_the_source_and_ntfs_3g() {
    let fx = fixture();
    let vols = open(&fx.img);
    let fs = fs_of(&vols, "whole").clone();
    const UNIT: u64 = 16 * 4096;
    for name in FILES {
        let path = format!("/compressed/{name}");
        let want = std::fs::read(fx.src.join("compressed").join(name)).unwrap();
        // The file really is compressed, with stored-compressed units
        // (allocated clusters then a hole inside one unit).
        let (unit, runs) = ntfsinfo(&fx.img, &path);
        assert_eq!(unit, Some(4), "{name}: ntfs-3g stored it compressed");
        assert!(
            runs.iter()
                .any(|&(vcn, lcn, n)| lcn.is_none() && vcn % 16 != 0 && (vcn + n) % 16 == 0),
            "{name}: has a compressed unit: {runs:x?}"
        );
        // ntfs-3g reads what the source holds; so must we.
        let peer = tool_output(Command::new("ntfscat").arg(&fx.img).arg(&path));
        assert!(peer == want, "{name}: ntfscat differs from the source");
        let node = node_of(&*fs, name);
        let size = want.len() as u64;
        assert_eq!(fs.attr(node).unwrap().size, size, "{name}: size");
        let got = read_all(&*fs, node, size);
        assert!(got == want, "{name}: contents differ from the source");
        // Odd offsets and lengths: around unit, chunk and cluster edges,
        // across several units, at the very end, past the end.
        let mut probes = vec![(0, 1), (1, 4095), (4095, 2), (size - 1, 1), (size - 3, 10)];
        for k in 1..=size / UNIT {
            let e = k * UNIT;
            probes.extend([
                (e - 1, 2),
                (e - 4097, 4099),
                (e + 4095, 3),
                (e - 7, UNIT + 14),
            ]);
        }
        probes.extend([(size / 3 + 1, 3 * UNIT + 5), (12345, 54321)]);
        for (off, len) in probes {
            let len = len as usize;
            if off >= size {
                continue;
            }
            let g = read_at(&*fs, node, off, len);
            let end = (off as usize + len).min(want.len());
            assert_eq!(
                g.len(),
                end - off as usize,
                "{name}: length of read at {off}"
            );
            assert!(
                g == want[off as usize..end],
                "{name}: {len} bytes at {off} differ"
            );
        }
        let mut past = [0u8; 9];
        assert_eq!(fs.read(node, size, &mut past).unwrap(), 0, "{name}: at EOF");
        assert_eq!(fs.read(node, size + 99, &mut past).unwrap(), 0);
        // Backwards in small odd pieces: every unit is fetched out of order.
        let mut end = size;
        while end > 0 {
            let off = end.saturating_sub(7777);
            let g = read_at(&*fs, node, off, (end - off) as usize);
            assert!(
                g == want[off as usize..end as usize],
                "{name}: backwards at {off}"
            );
            end = off;
        }
    }
    // Readers of different compressed files at once share the unit cache.
    let fs: Arc<dyn GuestFs> = fs;
    let threads: Vec<_> = FILES
        .iter()
        .map(|name| {
            let fs = fs.clone();
            let node = node_of(&*fs, name);
            let want = std::fs::read(fx.src.join("compressed").join(name)).unwrap();
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    let mut off = round * 1001;
                    while off < want.len() as u64 {
                        let g = read_at(&*fs, node, off, 5003);
                        let end = (off as usize + 5003).min(want.len());
                        assert!(g == want[off as usize..end], "parallel read at {off}");
                        off += 5003 * 3;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a parallel reader failed");
    }
}

#[test]
fn damaged_compressed_units_are_errors_naming_the_record_and_bytes() {
    use std::os::unix::fs::FileExt;
    let fx = fixture();
    let cluster = cluster_size(&fx.img);
    let (_, runs) = ntfsinfo(&fx.img, "/compressed/text.txt");
    // text.txt compresses to a few clusters per 64 KiB unit: the first
    // cluster of units 0 and 2.
    let lcn_of = |vcn: u64| {
        runs.iter()
            .find(|&&(v, l, n)| l.is_some() && v <= vcn && vcn < v + n)
            .map(|&(v, l, _)| l.unwrap() + vcn - v)
            .unwrap_or_else(|| panic!("no cluster at vcn {vcn}: {runs:x?}"))
    };
    let (u0, u2) = (lcn_of(0), lcn_of(32));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.img)
        .unwrap();
    // Unit 0: a chunk header without the LZNT1 signature.
    f.write_all_at(&[0x10, 0x80], u0 * cluster).unwrap();
    // Unit 2: a compressed chunk whose first token is a back-reference.
    f.write_all_at(&[0x02, 0xB0, 0x01, 0x00, 0x10], u2 * cluster)
        .unwrap();
    drop(f);
    let want = std::fs::read(fx.src.join("compressed/text.txt")).unwrap();
    let vols = open(&fx.img);
    let fs = fs_of(&vols, "whole");
    let node = node_of(&**fs, "text.txt");
    let mut buf = vec![0u8; 100];
    let e = fs.read(node, 10, &mut buf).unwrap_err();
    let s = e.to_string();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{s}");
    assert!(
        s.contains(&format!("record {node}"))
            && s.contains("bytes 0..65536")
            && s.contains("signature"),
        "{s}"
    );
    let e = fs
        .read(node, 2 * 65536 + 5, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("record {node}"))
            && e.contains("bytes 131072..196608")
            && e.contains("before any byte"),
        "{e}"
    );
    // A read into a damaged unit fails as a whole: a short count would
    // pass for the end of the file.
    assert!(fs.read(node, 65536, &mut vec![0u8; 65536]).is_ok());
    assert!(fs.read(node, 65536 + 10, &mut vec![0u8; 65536]).is_err());
    // The healthy units around them still read right, and again.
    for off in [65536u64, 3 * 65536 + 7] {
        for _ in 0..2 {
            let g = read_at(&**fs, node, off, 30000);
            let end = (off as usize + 30000).min(want.len());
            assert!(g == want[off as usize..end], "healthy unit at {off}");
        }
    }
}

/// Files fragmented enough that their $DATA runs spill into a second MFT
/// record through an attribute list: a compressed one (a run of data and
/// a hole per unit, 129 units) and a plain sparse one (4 KiB of data every
/// 8 KiB). The `ntfs` crate alone reads these from their second piece.
#[test]
fn files_split_by_an_attribute_list() {
    need("ntfsinfo");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("compressed")).unwrap();
    let mut x = 1u64;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let vocab: [&[u8]; 5] = [b"alpha ", b"bravo ", b"charlie ", b"delta ", b"echo "];
    let mut text = Vec::with_capacity(8 << 20);
    while text.len() < (8 << 20) + 333 {
        text.extend_from_slice(vocab[next() as usize % 5]);
    }
    text.truncate((8 << 20) + 333);
    std::fs::write(src.join("compressed/frag.txt"), &text).unwrap();
    // 400 pieces of 4 KiB, 8 KiB apart, with holes between them.
    let sparse_len = 400 * 8192 - 4096 + 77;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("frag-sparse.bin")).unwrap();
        f.set_len(sparse_len).unwrap();
        for i in 0..400u64 {
            let piece: Vec<u8> = (0..4096).map(|_| next() as u8 | 1).collect();
            f.write_all_at(&piece, i * 8192).unwrap();
        }
    }
    let sparse = std::fs::read(src.join("frag-sparse.bin")).unwrap();
    let img = tmp.path().join("d.img");
    mkdisk(
        &img,
        "64M",
        "none",
        &[format!("ntfs:rest:{}", src.display())],
    );
    let vols = open(&img);
    let fs = fs_of(&vols, "whole");
    for (path, want) in [
        ("/compressed/frag.txt", &text),
        ("/frag-sparse.bin", &sparse),
    ] {
        let info = tool_output(Command::new("ntfsinfo").args(["-v", "-F", path]).arg(&img));
        let info = String::from_utf8_lossy(&info);
        assert!(
            info.contains("$ATTRIBUTE_LIST")
                && info.matches("Dumping attribute $DATA").count() >= 2,
            "{path}: ntfs-3g split $DATA over records:\n{info}"
        );
        let mut node = fs.root();
        for part in path[1..].split('/') {
            node = fs.lookup(node, part.as_bytes()).unwrap().unwrap();
        }
        assert_eq!(
            fs.attr(node).unwrap().size,
            want.len() as u64,
            "{path}: size"
        );
        let got = read_all(&**fs, node, want.len() as u64);
        assert!(&got == want, "{path}: contents differ");
        let n = want.len();
        for (off, len) in [(n - 70000, 99999), (n / 2 + 4095, 8194), (4095, 2)] {
            let g = read_at(&**fs, node, off as u64, len);
            assert!(
                g == want[off..(off + len).min(n)],
                "{path}: {len} bytes at {off}"
            );
        }
    }
}
