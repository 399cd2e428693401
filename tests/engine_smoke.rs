//! The engine driven directly (no HTTP): start, write over NBD with our client,
//! complete, incremental, and the invariants on the way.

use chainvault::engine::{Engine, EngineConfig};
use chainvault::model::*;
use chainvault_nbd::Client;

fn start_req(vm: &str, t: BackupType, disks: Option<Vec<DiskSpec>>) -> StartRequest {
    StartRequest {
        vm_name: vm.into(),
        backup_type: t,
        repository_id: None,
        tags: vec![],
        disks,
    }
}

fn spec(id: u32, cap: u64) -> DiskSpec {
    DiskSpec {
        disk_id: id,
        disk_key: Some(format!("disk-{}", 2000 + id)),
        capacity_bytes: Some(cap),
        mode: None,
        compare_with_parent: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_two_disks() {
    let d = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: d.path().join("data"),
        nbd_socket: Some(d.path().join("nbd.sock")),
        nbd_listen: None,
        ..Default::default()
    };
    let e = Engine::open(cfg.clone()).await.unwrap();
    let r = e
        .start_backup(start_req(
            "vm1",
            BackupType::Full,
            Some(vec![spec(0, 8 << 20), spec(1, 4 << 20)]),
        ))
        .await
        .unwrap();
    assert_eq!(r.disks.len(), 2);
    for t in &r.disks {
        assert_eq!(t.mode, BackupType::Full);
        let c = Client::connect(&t.nbd_uri).await.unwrap();
        c.write(0, &vec![t.disk_id as u8 + 1; 1 << 20], false)
            .await
            .unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    }
    // A second backup of the same VM while this one runs: conflict.
    let err = e
        .start_backup(start_req("vm1", BackupType::Full, None))
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), 409);
    for (i, cid) in ["cbt-a/1", "cbt-b/1"].iter().enumerate() {
        let c = e
            .complete_disk(
                &r.backup_id,
                CompleteRequest {
                    change_id: Some(cid.to_string()),
                    disk_id: Some(i as u32),
                    bytes_transferred: Some(1 << 20),
                    digest: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(c.change_id, *cid);
    }
    assert_eq!(
        e.get_backup(&r.backup_id).unwrap().backup.status,
        Status::Completed
    );
    // A completed backup has nothing to fail; its points are untouched.
    assert_eq!(
        e.fail_backup(&r.backup_id, "late")
            .await
            .unwrap_err()
            .status_code(),
        409
    );
    assert_eq!(e.previous_change_id("vm1", 0).unwrap().change_id, "cbt-a/1");
    assert_eq!(e.previous_change_id("vm1", 1).unwrap().change_id, "cbt-b/1");
    // Repeat: same answer; conflicting: 409.
    let again = e
        .complete_disk(
            &r.backup_id,
            CompleteRequest {
                change_id: Some("cbt-a/1".into()),
                disk_id: Some(0),
                bytes_transferred: None,
                digest: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(again.change_id, "cbt-a/1");
    let err = e
        .complete_disk(
            &r.backup_id,
            CompleteRequest {
                change_id: Some("other".into()),
                disk_id: Some(0),
                bytes_transferred: None,
                digest: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), 409);

    // Incremental; disk 1 reset.
    let mut s1 = spec(1, 4 << 20);
    s1.mode = Some(BackupType::Full);
    let r2 = e
        .start_backup(start_req(
            "vm1",
            BackupType::Incremental,
            Some(vec![spec(0, 8 << 20), s1]),
        ))
        .await
        .unwrap();
    assert_eq!(r2.disks[0].mode, BackupType::Incremental);
    assert_eq!(r2.disks[0].previous_change_id, "cbt-a/1");
    assert_eq!(r2.disks[1].mode, BackupType::Full);
    let c = Client::connect(&r2.disks[0].nbd_uri).await.unwrap();
    let before = c.read(0, 4096).await.unwrap();
    assert!(
        before.iter().all(|&b| b == 1),
        "overlay reads through to the full"
    );
    c.write(4096, &[9u8; 4096], false).await.unwrap();
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    for (i, cid) in ["cbt-a/2", "cbt-b/new"].iter().enumerate() {
        e.complete_disk(
            &r2.backup_id,
            CompleteRequest {
                change_id: Some(cid.to_string()),
                disk_id: Some(i as u32),
                bytes_transferred: None,
                digest: None,
            },
        )
        .await
        .unwrap();
    }
    let chain0 = e.chain("vm1", 0).unwrap();
    assert_eq!(chain0.points.len(), 2);
    assert_eq!(
        chain0.points[1].parent_backup_id.as_deref(),
        Some(r.backup_id.as_str())
    );
    let chain1 = e.chain("vm1", 1).unwrap();
    assert_ne!(chain1.points[0].chain_id, chain1.points[1].chain_id);
    let v = e.verify(None).unwrap();
    assert!(v.is_clean(), "{:?}", v.problems);

    // Deleting the newest backup moves the heads back.
    e.delete_backup(&r2.backup_id).await.unwrap();
    assert_eq!(e.previous_change_id("vm1", 0).unwrap().change_id, "cbt-a/1");
    assert_eq!(e.previous_change_id("vm1", 1).unwrap().change_id, "cbt-b/1");
    assert!(e.verify(None).unwrap().is_clean());

    // Restore export of the first point.
    let rv = e
        .open_restore(RestoreRequest {
            backup_id: r.backup_id.clone(),
            disk_id: 0,
            writable: false,
        })
        .await
        .unwrap();
    let c = Client::connect(&rv.nbd_uri).await.unwrap();
    assert!(c.read(0, 8192).await.unwrap().iter().all(|&b| b == 1));
    c.disconnect().await.unwrap();
    e.close_restore(&rv.restore_id, None).await.unwrap();

    // A running backup interrupted by shutdown leaves nothing behind.
    let r3 = e
        .start_backup(start_req("vm1", BackupType::Incremental, None))
        .await
        .unwrap();
    e.shutdown().await;
    drop(e);
    let e = Engine::open(EngineConfig {
        nbd_socket: Some(d.path().join("nbd2.sock")),
        ..cfg
    })
    .await
    .unwrap();
    let b3 = e.get_backup(&r3.backup_id).unwrap();
    assert_eq!(b3.backup.status, Status::Interrupted);
    for disk in &b3.disks {
        assert!(!e.data_dir().join(&disk.image).exists());
    }
    assert!(e.verify(None).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_disk_fails_the_backup_and_closes_every_export() {
    let d = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: d.path().join("data"),
        nbd_socket: Some(d.path().join("nbd.sock")),
        nbd_listen: None,
        ..Default::default()
    };
    let e = Engine::open(cfg).await.unwrap();
    let r = e
        .start_backup(start_req(
            "vm2",
            BackupType::Full,
            Some(vec![spec(0, 4 << 20), spec(1, 4 << 20)]),
        ))
        .await
        .unwrap();
    // Damage disk 0's image behind the engine's back: its check will fail.
    let b = e.get_backup(&r.backup_id).unwrap();
    let img0 = e.data_dir().join(&b.disks[0].image);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img0).unwrap();
        let h = chainvault_qcow::chain::read_header(&img0).unwrap();
        // A refcount table entry pointing at an unaligned block: a corruption.
        f.write_all_at(&0x10200u64.to_be_bytes(), h.refcount_table_offset)
            .unwrap();
    }
    let err = e
        .complete_disk(
            &r.backup_id,
            CompleteRequest {
                change_id: Some("x/1".into()),
                disk_id: Some(0),
                bytes_transferred: None,
                digest: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), 500, "{err}");
    let b = e.get_backup(&r.backup_id).unwrap();
    assert_eq!(b.backup.status, Status::Failed);
    for disk in &b.disks {
        assert_eq!(disk.status, Status::Failed, "disk {}", disk.disk_id);
        assert!(!e.data_dir().join(&disk.image).exists());
    }
    // Disk 1's export is gone, and no change_id was recorded.
    assert!(Client::connect(&r.disks[1].nbd_uri).await.is_err());
    assert_eq!(e.previous_change_id("vm2", 0).unwrap().change_id, "");
    assert_eq!(e.metrics().active_exports, 0);
    // Failing it again is harmless; failing a completed backup is a conflict.
    e.fail_backup(&r.backup_id, "again").await.unwrap();
}
