//! Letter case of FAT names on FAT12, FAT16 and FAT32 (mkfs.fat + mcopy):
//! a long name is shown exactly as stored, also where it differs from its
//! 8.3 name only by case (`Docs` for `DOCS`); an 8.3 name with only the
//! lower-case flags (`readme.txt`, `ABC.txt`) is lowered part by part.
//! The test first reads the directory slots themselves, so that it fails
//! if the fixture stops holding the cases it claims to cover.

mod common;

use common::*;

/// The 32-byte directory slots of `vol` whose 8.3 name is `name83`, each
/// with whether a long-name slot (attribute 0x0F) comes right before it and
/// its case byte (offset 12). Slots are 32-byte aligned in every cluster.
fn short_slots(vol: &chainvault_guestfs::Disk, name83: &[u8; 11]) -> Vec<(bool, u8)> {
    let mut bytes = vec![0u8; vol.size() as usize];
    vol.read_exact_at(&mut bytes, 0).unwrap();
    bytes
        .chunks_exact(32)
        .enumerate()
        .filter(|(_, s)| &s[..11] == name83 && s[11] & 0x0F != 0x0F && s[11] & 0x08 == 0)
        .map(|(i, s)| {
            let lfn_before = i > 0 && bytes[(i - 1) * 32 + 11] == 0x0F;
            (lfn_before, s[12])
        })
        .collect()
}

#[test]
fn long_names_keep_their_case_on_fat12_fat16_and_fat32() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, &["--many", "0"]);
    let img = t.path().join("d.img");
    let s = src.display();
    mkdisk(
        &img,
        "80M",
        "mbr",
        &[
            format!("fat12:12M:{s}"),
            format!("fat16:20M:{s}"),
            format!("fat:rest:{s}"),
        ],
    );
    let vols = open(&img);
    for (name, format) in [("p1", "fat12"), ("p2", "fat16"), ("p3", "fat32")] {
        let v = vols.iter().find(|v| v.name == name).unwrap();
        let fs = fs_of(&vols, name);
        assert_eq!(fs.format(), format);

        // What the fixture holds: long names beside 8.3 names that differ
        // only by case, and 8.3 names with lower-case flags and no long name.
        for (n83, lfn, flags, what) in [
            (b"DOCS       ", true, 0x00, "Docs"),
            (b"MAKEFILE   ", true, 0x00, "Makefile"),
            (b"NOTES   TXT", true, 0x00, "Notes.Txt"),
            (b"README  TXT", false, 0x18, "readme.txt"),
            (b"ABC     TXT", false, 0x10, "ABC.txt"),
            (b"ABC2    TXT", false, 0x08, "abc2.TXT"),
            (b"UPPER   TXT", false, 0x00, "UPPER.TXT"),
        ] {
            let slots = short_slots(&v.dev, n83);
            assert_eq!(slots.len(), 1, "{format}: one slot for {what}: {slots:?}");
            let (has_lfn, case) = slots[0];
            assert_eq!(has_lfn, lfn, "{format}: {what}: long-name slot before it");
            if !lfn {
                assert_eq!(case & 0x18, flags, "{format}: {what}: case flags");
            }
        }

        // What the reader shows: the names exactly as the source has them.
        let docs = fs
            .lookup(fs.root(), b"Docs")
            .unwrap()
            .unwrap_or_else(|| panic!("{format}: no 'Docs' in the root"));
        let mut got: Vec<String> = fs
            .read_dir(docs)
            .unwrap()
            .iter()
            .map(|e| String::from_utf8(e.name.clone()).unwrap())
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "ABC.txt",
                "Makefile",
                "Notes.Txt",
                "Read Me First.txt",
                "UPPER.TXT",
                "abc2.TXT",
                "readme.txt"
            ],
            "{format}: names in Docs"
        );
        let f = fs.lookup(docs, b"Read Me First.txt").unwrap().unwrap();
        let a = fs.attr(f).unwrap();
        assert_eq!(read_all(&**fs, f, a.size), b"read me\n");
        // And the whole tree, as for every other FAT test.
        compare(&**fs, &src, Profile::Fat);
    }
}
