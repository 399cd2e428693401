//! Measure guest-file reads against raw disk reads on a disk image.
//!
//!   cargo run --release -p chainvault-guestfs --example guestread -- DISK.img VOLUME /path/in/guest [CHUNK_KIB]
//!
//! Prints the time to list the volumes and read the first byte of the file,
//! then the sequential read speed of the file and of the same number of raw
//! disk bytes, and their ratio. A diagnostic for bench/ scripts, not a test.

use std::sync::Arc;
use std::time::Instant;

use chainvault_guestfs::{Disk, FileDisk};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: guestread DISK.img VOLUME /path/in/guest [CHUNK_KIB]");
        std::process::exit(2);
    }
    let chunk = a
        .get(4)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(128)
        * 1024;
    let t0 = Instant::now();
    let disk: Disk = Arc::new(FileDisk::open(&a[1]).unwrap_or_else(|e| panic!("{e}")));
    let vols = chainvault_guestfs::volumes(disk.clone());
    let v = vols.iter().find(|v| v.name == a[2]).unwrap_or_else(|| {
        panic!(
            "no volume {}; have {:?}",
            a[2],
            vols.iter().map(|v| &v.name).collect::<Vec<_>>()
        )
    });
    let fs = v.fs.as_ref().unwrap_or_else(|e| panic!("{}: {e}", v.name));
    let mut node = fs.root();
    for part in a[3].split('/').filter(|p| !p.is_empty()) {
        node = fs
            .lookup(node, part.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{part}: not found"));
    }
    let size = fs.attr(node).unwrap().size;
    let mut b = vec![0u8; chunk];
    fs.read(node, 0, &mut b[..1]).unwrap();
    println!(
        "open + first byte: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = fs.read(node, off, &mut b).unwrap();
        off += n as u64;
    }
    let guest = size as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let t = Instant::now();
    let raw_len = size.min(disk.size());
    let mut off = 0;
    while off < raw_len {
        let n = (raw_len - off).min(chunk as u64) as usize;
        disk.read_exact_at(&mut b[..n], off).unwrap();
        off += n as u64;
    }
    let raw = raw_len as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    println!(
        "file {size} bytes: {guest:.0} MiB/s; raw disk: {raw:.0} MiB/s; ratio {:.2}",
        guest / raw
    );
}
