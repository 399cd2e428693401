//! Fixture disks built with fixtures/*.sh, opened through `volumes`, and
//! compared file by file with the trees they were built from.

mod common;

use common::*;

#[test]
fn ext4_on_the_whole_disk_matches_its_tree() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "2000"]);
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "64M",
        "none",
        &[format!("ext4:rest:{}", src.display())],
    );
    let vols = open(&img);
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "whole");
    let fs = fs_of(&vols, "whole");
    assert_eq!(fs.format(), "ext4");
    let c = compare(&**fs, &src, Profile::Ext4);
    assert!(
        c.files > 2000 && c.links == 6 && c.dirs >= 12,
        "{} files {} links {} dirs",
        c.files,
        c.links,
        c.dirs
    );
}
