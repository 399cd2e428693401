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

#[test]
fn gpt_with_ext4_fat32_and_ntfs_partitions_and_labels() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "300"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "128M",
        "gpt",
        &[
            format!("ext4:30M:{s}:root"),
            format!("fat:40M:{s}:EFI boot"),
            format!("ntfs:rest:{s}:Données"),
        ],
    );
    let vols = open(&img);
    let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["p1-root", "p2-EFI_boot", "p3-Données"]);
    assert_eq!(vols[0].dev.size(), 30 << 20);
    assert_eq!(fs_of(&vols, "p1-root").format(), "ext4");
    assert_eq!(fs_of(&vols, "p2-EFI_boot").format(), "fat32");
    assert_eq!(fs_of(&vols, "p3-Données").format(), "ntfs");
    compare(&**fs_of(&vols, "p1-root"), &src, Profile::Ext4);
    let c = compare(&**fs_of(&vols, "p2-EFI_boot"), &src, Profile::Fat);
    assert!(c.files > 300 && c.links == 0);
    let c = compare(&**fs_of(&vols, "p3-Données"), &src, Profile::Ntfs);
    assert!(
        c.files > 300 && c.links == 6,
        "{} files {} links",
        c.files,
        c.links
    );
}

#[test]
fn gpt_falls_back_to_the_backup_header() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "10"]);
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "40M",
        "gpt",
        &[format!("ext4:rest:{}:only", src.display())],
    );
    // Damage the primary header (LBA 1): its CRC no longer matches.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", 512 + 100).unwrap();
    drop(f);
    let vols = open(&img);
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "p1-only");
    compare(&**fs_of(&vols, "p1-only"), &src, Profile::Ext4);
}

#[test]
fn mbr_with_logical_partitions_fat16_ext2_fat12_raw_ntfs() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "100"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "100M",
        "mbr-ext",
        &[
            format!("fat16:20M:{s}"),
            format!("ext2:20M:{s}"),
            format!("fat12:12M:{s}"),
            "raw:5M:-".to_string(),
            format!("ntfs:rest:{s}"),
        ],
    );
    let vols = open(&img);
    let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["p1", "p5", "p6", "p7", "p8"]);
    assert_eq!(fs_of(&vols, "p1").format(), "fat16");
    assert_eq!(fs_of(&vols, "p5").format(), "ext2");
    assert_eq!(fs_of(&vols, "p6").format(), "fat12");
    assert_eq!(fs_of(&vols, "p8").format(), "ntfs");
    let err = vols[3]
        .fs
        .as_ref()
        .err()
        .expect("raw volume has no filesystem");
    assert!(err.contains("all zero"), "{err}");
    assert_eq!(vols[3].dev.size(), 5 << 20);
    compare(&**fs_of(&vols, "p1"), &src, Profile::Fat);
    compare(&**fs_of(&vols, "p5"), &src, Profile::Ext2);
    compare(&**fs_of(&vols, "p6"), &src, Profile::Fat);
    compare(&**fs_of(&vols, "p8"), &src, Profile::Ntfs);
}

#[test]
fn fat32_on_the_whole_disk() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "50"]);
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "40M",
        "none",
        &[format!("fat:rest:{}", src.display())],
    );
    let vols = open(&img);
    assert_eq!(vols.len(), 1);
    let fs = fs_of(&vols, "whole");
    assert_eq!(fs.format(), "fat32");
    compare(&**fs, &src, Profile::Fat);
}

#[test]
fn a_damaged_volume_says_why_and_the_others_still_open() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "10"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "90M",
        "gpt",
        &[
            format!("ext4:30M:{s}:good"),
            format!("ext4:30M:{s}:bad"),
            format!("fat16:rest:{s}"),
        ],
    );
    // Zero the superblock of partition 2 (it starts at 31 MiB).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1024], (31 << 20) + 1024).unwrap();
    drop(f);
    let vols = open(&img);
    let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["p1-good", "p2-bad", "p3"]);
    let err = vols[1].fs.as_ref().err().expect("zeroed superblock");
    assert!(
        err.contains("backup ext2/3/4 superblock") && err.contains("e2fsck -b"),
        "{err}"
    );
    assert_eq!(vols[1].dev.size(), 30 << 20);
    compare(&**fs_of(&vols, "p1-good"), &src, Profile::Ext4);
    compare(&**fs_of(&vols, "p3"), &src, Profile::Fat);
}

#[test]
fn a_disk_with_nothing_on_it_is_one_whole_volume_with_a_reason() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let vols = open(&img);
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].name, "whole");
    assert_eq!(vols[0].dev.size(), 8 << 20);
    let err = vols[0].fs.as_ref().err().unwrap();
    assert!(err.contains("all zero"), "{err}");
    // A disk too small for anything.
    std::fs::write(&img, b"tiny").unwrap();
    let vols = open(&img);
    assert!(vols[0].fs.as_ref().err().unwrap().contains("too small"));
}

/// Fifos, sockets and device nodes keep their type and device number (what
/// `stat` of the source shows), with no data.
#[test]
fn ext4_special_files_keep_their_type_and_device_number() {
    use chainvault_guestfs::Kind;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mk = |args: &[&str]| {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .current_dir(&src)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "{args:?} failed (coreutils; needs root for mknod)"
        );
    };
    mk(&["mkfifo", "pipe"]);
    mk(&["mknod", "null", "c", "1", "3"]);
    // A device number that needs the new (32-bit) encoding.
    mk(&["mknod", "big", "b", "259", "300"]);
    let sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let img = t.path().join("d.img");
    mkdisk(
        &img,
        "16M",
        "none",
        &[format!("ext4:rest:{}", src.display())],
    );
    drop(sock);
    let vols = open(&img);
    let fs = fs_of(&vols, "whole");
    let mut seen = 0;
    for e in fs.read_dir(fs.root()).unwrap().iter() {
        let name = String::from_utf8(e.name.clone()).unwrap();
        if name == "lost+found" {
            continue;
        }
        let meta = std::fs::symlink_metadata(src.join(&name)).unwrap();
        let ft = meta.file_type();
        let want = if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else {
            continue;
        };
        let a = fs.attr(e.node).unwrap();
        assert_eq!((e.kind, a.kind), (want, want), "{name}");
        assert_eq!(a.rdev as u64, meta.rdev(), "{name}: device number");
        assert_eq!(a.size, 0, "{name}");
        seen += 1;
    }
    assert_eq!(seen, 4, "pipe, null, big and sock must all be listed");
}
