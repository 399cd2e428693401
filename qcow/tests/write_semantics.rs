//! Promises of the writer that are about layout, not content: sequential
//! writes are contiguous in the file, aligned write-zeroes and discards never
//! allocate data clusters, and discard in an overlay never exposes backing data.

use chainvault_qcow::create::create;
use chainvault_qcow::{
    BackingFormat, BackingSpec, Chain, ChainOptions, CreateOptions, ExtentKind, Image, OpenOptions,
};

fn rw(p: &std::path::Path) -> Image {
    Image::open(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn sequential_writes_are_contiguous_in_the_file() {
    let d = tempfile::tempdir().unwrap();
    for (cs, ext) in [(65536u64, false), (131072, true), (4096, false)] {
        let p = d.path().join(format!("seq{cs}.qcow2"));
        create(
            &p,
            &CreateOptions {
                size: 64 << 20,
                cluster_size: cs,
                extended_l2: ext,
                ..Default::default()
            },
        )
        .unwrap();
        let img = rw(&p);
        let chunk = vec![0xabu8; 256 << 10];
        for i in 0..64u64 {
            img.write_at(&chunk, i * chunk.len() as u64).unwrap();
        }
        img.flush().unwrap();
        let map = img.block_status(0, 16 << 20).unwrap();
        // One L2 table covers the range for 64K+ clusters: the data is one
        // extent, contiguous in the file. With 4K clusters an L2 table maps
        // only 2 MiB and a refcount block 8 MiB, so new tables land between
        // runs of data: no run is shorter than one 256 KiB write.
        let data: Vec<_> = map.iter().filter(|e| e.kind == ExtentKind::Data).collect();
        if cs >= 65536 {
            assert_eq!(data.len(), 1, "{cs}: {map:?}");
        } else {
            assert!(
                data.len() <= 12 && data.iter().all(|e| e.length >= 256 << 10),
                "{cs}: {map:?}"
            );
        }
    }
}

#[test]
fn aligned_zeroes_and_discards_allocate_no_data_clusters() {
    let d = tempfile::tempdir().unwrap();
    for ext in [false, true] {
        let base = d.path().join(format!("b{ext}.qcow2"));
        create(
            &base,
            &CreateOptions {
                size: 32 << 20,
                cluster_size: 65536,
                extended_l2: ext,
                ..Default::default()
            },
        )
        .unwrap();
        {
            let b = rw(&base);
            b.write_at(&vec![7u8; 32 << 20], 0).unwrap();
            b.flush().unwrap();
        }
        let top = d.path().join(format!("t{ext}.qcow2"));
        create(
            &top,
            &CreateOptions {
                size: 32 << 20,
                cluster_size: 65536,
                extended_l2: ext,
                backing: Some(BackingSpec {
                    name: format!("b{ext}.qcow2"),
                    format: BackingFormat::Qcow2,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let len_before = std::fs::metadata(&top).unwrap().len();
        let chain = Chain::open(
            &top,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let img = chain.top_image().unwrap().clone();
        img.write_zeroes(0, 8 << 20, true).unwrap();
        img.write_zeroes(8 << 20, 8 << 20, false).unwrap();
        img.discard(16 << 20, 8 << 20).unwrap();
        img.flush().unwrap();
        // Only one L2 table was added: no data clusters.
        let grown = std::fs::metadata(&top).unwrap().len() - len_before;
        assert!(
            grown <= 65536,
            "ext {ext}: the overlay grew by {grown} bytes"
        );
        // Everything zeroed or discarded reads as zeros, never as the backing's 7s.
        let mut buf = vec![1u8; 24 << 20];
        chain.read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "ext {ext}: backing data shows through"
        );
        let mut rest = vec![0u8; 8 << 20];
        chain.read_at(&mut rest, 24 << 20).unwrap();
        assert!(rest.iter().all(|&b| b == 7));
    }
}
