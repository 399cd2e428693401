//! The big cases, built once: a 100k-entry directory (ext4 filled through
//! the kernel, so it is a hashed directory as in a real guest) and a
//! 1.5 GiB sparse file.

mod common;

use std::collections::HashSet;

use common::*;

#[test]
fn ext4_with_100k_entries_and_a_sparse_file_over_1_gib() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "100000", "--big"]);
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "400M",
        "gpt",
        &[format!("ext4-kernel:rest:{}:big", src.display())],
    );
    let vols = open(&img);
    let fs = fs_of(&vols, "p1-big");
    let root = fs.root();
    let many = fs.lookup(root, b"many").unwrap().expect("many/");
    let l = fs.read_dir(many).unwrap();
    assert_eq!(l.len(), 100_000);
    let names: HashSet<&[u8]> = l.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names.len(), 100_000);
    assert!(names.contains(b"f000000".as_slice()) && names.contains(b"f099999".as_slice()));
    // The same Arc'd listing comes back from the cache.
    let again = fs.read_dir(many).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&l, &again)
            || l.iter().zip(again.iter()).all(|(a, b)| a.name == b.name)
    );
    // Whole tree, including every one of the 100k entries and big.bin.
    let c = compare(&**fs, &src, Profile::Ext4);
    assert!(c.files > 100_000, "{} files", c.files);
    let big = fs.lookup(root, b"big.bin").unwrap().unwrap();
    let a = fs.attr(big).unwrap();
    assert_eq!(a.size, 3 << 29);
    assert!(a.blocks < 8192, "sparse: {} blocks", a.blocks);
}
