//! `chainvault backup` when things go wrong: the client killed mid-transfer,
//! the daemon killed mid-transfer, and bad input (each with its exit code).

mod client_common;
mod common;

use std::time::Duration;

use client_common::*;
use common::*;

fn pgrep(pattern: &str) -> Vec<String> {
    let out = run(cmd("pgrep", &["-af", pattern]));
    text(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_string)
        .collect()
}

/// SIGKILL the client during an incremental: the daemon fails the backup
/// after its disk timeout, the chain head and change_id stay as they were,
/// the client's qemu-nbd dies with it, and the next run is still
/// incremental from the old checkpoint (it was never retired).
#[test]
fn client_killed_mid_transfer() {
    client_tools();
    need("pgrep", "procps");
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&tmp.path().join("data"), &["--disk-timeout", "3s"], &[]);
    let src = tmp.path().join("vda.qcow2");
    make_vm_disk(&src, 256 * MIB, 32, 3);
    let disk = vec![p(&src)];
    let full = backup(&d, "vmk", &disk, &["--rotate"]).ok("full");
    let cp1 = s(&full.disk(0)["change_id"]);
    let head_before = d.chain("vmk", 0)["head"].clone();

    // 8 MiB changed, read at 2 MiB/s: the transfer takes about 4 s.
    qemu_io_modify(&src, 7, 128, 0);
    let mut child = backup_spawn(&d, "vmk", &disk, &["--rotate", "--limit-rate", "2M"]);
    wait_until("the backup runs", Duration::from_secs(20), || {
        !d.list("vm_name=vmk&status=running").is_empty()
    });
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the client finished before it could be killed"
    );
    let running = d.list("vm_name=vmk&status=running");
    let id = s(&running[0]["backup_id"]);
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();

    wait_until(
        "the killed backup is failed",
        Duration::from_secs(20),
        || d.backup(&id)["status"] == "failed",
    );
    let b = d.backup(&id);
    assert!(
        s(&b["error"]).contains("timed out"),
        "failed by the disk timeout: {}",
        pretty(&b)
    );
    assert_eq!(
        d.chain("vmk", 0)["head"],
        head_before,
        "the chain head is unchanged"
    );
    assert_eq!(d.change_id("vmk", 0), cp1, "the change_id is unchanged");
    wait_until(
        "the client's qemu-nbd exits",
        Duration::from_secs(10),
        || pgrep(&format!("qemu-nbd.*{}", src.display())).is_empty(),
    );
    // The old checkpoint is still there; the run's new bitmap is left over.
    let left = bitmaps(&src);
    assert!(left.contains(&cp1), "{left:?}");
    assert_eq!(left.len(), 2, "{left:?}");

    // The next run is incremental from cp1 and points at the leftover.
    let next = backup(&d, "vmk", &disk, &["--rotate"]).ok("after the kill");
    assert_eq!(
        next.disk(0)["mode"],
        "incremental",
        "{}",
        pretty(&next.json)
    );
    assert_eq!(next.disk(0)["previous_change_id"], cp1.as_str());
    let notes = next.json["notes"].to_string();
    assert!(notes.contains("left behind"), "{notes}");
}

/// kill -9 the daemon during a transfer: the client exits 3 with a clear
/// message and removes the checkpoint it created.
#[test]
fn daemon_killed_mid_transfer() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let src = tmp.path().join("vda.qcow2");
    make_vm_disk(&src, 256 * MIB, 16, 4);
    let disk = vec![p(&src)];
    let child = backup_spawn(&d, "vmd", &disk, &["--rotate", "--limit-rate", "4M"]);
    wait_until("the backup runs", Duration::from_secs(20), || {
        !d.list("vm_name=vmd&status=running").is_empty()
    });
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    let r = wait_run(
        child,
        "client after the daemon died",
        Duration::from_secs(60),
    );
    assert_eq!(
        r.code,
        3,
        "exit code 3 (daemon gone): {}\n{}",
        pretty(&r.json),
        r.stderr
    );
    assert!(
        r.stderr.contains("went away") && r.stderr.contains("Retry"),
        "a clear message: {}",
        r.stderr
    );
    assert_eq!(r.json["status"], "failed");
    assert!(
        bitmaps(&src).is_empty(),
        "the unused checkpoint was removed: {:?}",
        bitmaps(&src)
    );
}

/// Bad input: each gets its exit code and a message naming the fix, and
/// nothing is started on the daemon.
#[test]
fn bad_input_and_exit_codes() {
    client_tools();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"));
    let src = tmp.path().join("vda.qcow2");
    make_vm_disk(&src, 64 * MIB, 4, 5);
    let disk = vec![p(&src)];

    let expect = |what: &str, r: Run, code: i32, needle: &str| {
        assert_eq!(r.code, code, "{what}: {}\n{}", pretty(&r.json), r.stderr);
        let e = r.json["error"].as_str().unwrap_or("");
        assert!(
            e.contains(needle),
            "{what}: error {e:?} should mention {needle:?}"
        );
        assert!(r.stderr.contains(needle), "{what}: stderr {:?}", r.stderr);
    };
    let missing = vec![p(&tmp.path().join("nope.raw"))];
    expect(
        "missing file",
        backup(&d, "vmb", &missing, &[]),
        2,
        "cannot open",
    );
    expect(
        "bitmap not on the source",
        backup(&d, "vmb", &disk, &["--bitmap", "cp9"]),
        2,
        "qemu-img bitmap --add",
    );
    expect(
        "bad bitmap name",
        backup(&d, "vmb", &disk, &["--bitmap", "a b"]),
        2,
        "not usable as a checkpoint",
    );
    expect(
        "rotate on NBD",
        backup(
            &d,
            "vmb",
            &["nbd+unix:///?socket=/nonexistent".into()],
            &["--rotate"],
        ),
        2,
        "QMP",
    );
    let odd = tmp.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    expect(
        "odd size",
        backup(&d, "vmb", &[p(&odd)], &[]),
        2,
        "multiple of 512",
    );
    assert!(d.list("vm_name=vmb").is_empty(), "nothing was started");

    // An NBD export without the bitmap to record.
    let nbd = QemuNbd::start(&src, &tmp.path().join("s.sock"), &[]);
    expect(
        "NBD without the checkpoint",
        backup(&d, "vmb", &[nbd.uri()], &["--bitmap", "cp1"]),
        2,
        "block-dirty-bitmap-add",
    );
    drop(nbd);

    // Another backup of the VM is running: 4.
    let running = d.start_backup(&start_body(
        "vmb",
        "full",
        Some(json!([disk_spec(0, 64 * MIB)])),
    ));
    expect(
        "busy",
        backup(&d, "vmb", &disk, &["--rotate"]),
        4,
        "still running",
    );
    assert!(
        bitmaps(&src).is_empty(),
        "nothing was created on the source"
    );
    d.post_ok(
        &format!("/api/v1/backups/{}/fail", s(&running["backup_id"])),
        &json!({}),
    );

    // No daemon: 3.
    let out = run(cmd(
        BIN,
        &[
            "backup",
            "--json",
            "--server",
            "http://127.0.0.1:9",
            "--vm",
            "x",
            "--disk",
            &disk[0],
        ],
    ));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unreachable"));
}
