#!/usr/bin/env bash
# File-level restore benchmark (chainvault mount).
#
# Builds a 2 GiB ext4 guest disk (GPT, fixtures/mkdisk.sh) holding a 1 GiB
# file of random data and a small file, backs it up through a real daemon,
# then, interleaved over --runs runs, each in a fresh mount (cold FUSE cache):
#   (a) first byte: from starting `chainvault mount --data` to having read
#       the first byte of the small guest file (target <= 200 ms);
#   (b) sequential read (dd bs=1M) of the 1 GiB guest file, and of the first
#       1 GiB of the point's disk.raw (target: guest >= 0.5x disk.raw);
#   (c) sequential read of the whole 2 GiB disk.raw, and of the same image
#       through nbdfuse over qemu-nbd -r (Debian: libnbd-bin, qemu-utils).
# Prints medians, min/max and the ratios.
#
# usage: bench/restore.sh [--runs 5]
# env:   CHAINVAULT (binary), BENCH_TMP (scratch dir, default /dev/shm),
#        BENCH_KEEP (keep the scratch dir). Needs root (FUSE, loop mount).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=5
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
(( $(id -u) == 0 )) || die "run as root (FUSE mounts, and mkdisk's loop mount)"

need nbdcopy libnbd-bin
need nbdfuse libnbd-bin
need qemu-nbd qemu-utils
need fusermount3 fuse3
need mkfs.ext4 e2fsprogs
need sgdisk gdisk
need curl curl
need python3 python3
cv=$(find_chainvault)

MOUNTS=()
unmount_all() {
    local m
    for m in "${MOUNTS[@]+"${MOUNTS[@]}"}"; do fusermount3 -u -z "$m" 2>/dev/null || true; done
}
trap 'unmount_all; cleanup' EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((4 << 30))
results=$work/results.tsv
: >"$results"
log "chainvault: $cv"
log "machine: $(machine_note)"

# --- the guest disk and its backup -------------------------------------------
mkdir -p "$work/tree"
head -c 1G /dev/urandom >"$work/tree/big.bin"
echo "first byte" >"$work/tree/first.txt"
log "building a 2 GiB ext4 guest disk"
"$REPO_DIR/fixtures/mkdisk.sh" "$work/disk.img" 2G gpt "ext4-kernel:rest:$work/tree:root" >&2
rm -f "$work/tree/big.bin"

"$cv" serve --data "$work/data" --listen 127.0.0.1:0 --nbd-socket "$work/nbd.sock" \
    >"$work/serve.out" 2>"$work/serve.err" &
spid=$!
SERVER_PIDS+=("$spid")
for _ in $(seq 100); do grep -q '^ready' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/^ready api=\([^ ]*\).*/\1/p' "$work/serve.out")
[[ -n $api ]] || die "chainvault serve did not start: $(tail -5 "$work/serve.err")"
start=$(curl -sf -XPOST "$api/api/v1/backups" -H 'content-type: application/json' \
    -d "{\"vm_name\":\"bench\",\"backup_type\":\"full\",\"disks\":[{\"disk_id\":0,\"capacity_bytes\":$((2 << 30))}]}")
bid=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["backup_id"])' "$start")
uri=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["disks"][0]["nbd_uri"])' "$start")
log "backing up the disk ($bid)"
nbdcopy "$work/disk.img" "$uri"
curl -sf -XPOST "$api/api/v1/backups/$bid/complete" -H 'content-type: application/json' \
    -d '{"disk_id":0,"change_id":"bench-1"}' >/dev/null
stop_server "$spid"
image=$(ls "$work"/data/vms/bench/disk0/*.qcow2)
rm -f "$work/disk.img"

mnt=$work/mnt
mkdir -p "$mnt" "$work/nbdfuse"
MOUNTS+=("$mnt" "$work/nbdfuse")

# mount_cv: start `chainvault mount` in the background; sets MPID.
mount_cv() {
    "$cv" mount "$mnt" --data "$work/data" >"$work/mount.out" 2>>"$work/mount.err" &
    MPID=$!
}
umount_cv() {
    kill -INT "$MPID" 2>/dev/null || true
    wait "$MPID" 2>/dev/null || log "warning: chainvault mount exited with status $?"
}
wait_mounted() {
    for _ in $(seq 300); do grep -q '^mounted' "$work/mount.out" 2>/dev/null && return; sleep 0.01; done
    die "chainvault mount did not mount: $(tail -5 "$work/mount.err")"
}
# dd_mibps FILE BYTES: sequential read with 1 MiB blocks; prints MiB/s.
dd_mibps() {
    local t0 t1
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=1M count=$(($2 >> 20)) status=none
    t1=$(now_ns)
    python3 -c "print(f'{$2 / 1048576 / (($t1 - $t0) / 1e9):.1f}')"
}

for run in $(seq "$runs"); do
    log "run $run/$runs"
    # (a) first byte, measured by one process from exec of mount to the read.
    t=$(python3 - "$cv" "$mnt" "$work/data" <<'PY'
import os, subprocess, sys, time
cv, mnt, data = sys.argv[1:4]
f = os.path.join(mnt, "bench/disk0/latest/p1-root/first.txt")
t0 = time.monotonic()
p = subprocess.Popen([cv, "mount", mnt, "--data", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        with open(f, "rb") as fh:
            if fh.read(1) == b"f":
                break
    except OSError:
        pass
    if time.monotonic() - t0 > 30:
        p.terminate(); sys.exit("no first byte within 30 s")
    time.sleep(0.0005)
ms = (time.monotonic() - t0) * 1000
p.send_signal(2); p.wait(timeout=30)
print(f"{ms:.1f}")
PY
)
    printf 'first_byte_ms\t%s\n' "$t" >>"$results"

    # (b) the 1 GiB guest file, then the first 1 GiB of disk.raw (fresh mounts).
    mount_cv; wait_mounted
    printf 'guest_file\t%s\n' "$(dd_mibps "$mnt/bench/disk0/latest/p1-root/big.bin" $((1 << 30)))" >>"$results"
    umount_cv
    mount_cv; wait_mounted
    printf 'disk_raw_1g\t%s\n' "$(dd_mibps "$mnt/bench/disk0/latest/disk.raw" $((1 << 30)))" >>"$results"
    # (c) the whole disk.raw ...
    umount_cv
    mount_cv; wait_mounted
    printf 'disk_raw_2g\t%s\n' "$(dd_mibps "$mnt/bench/disk0/latest/disk.raw" $((2 << 30)))" >>"$results"
    umount_cv
    # ... and the same image through qemu-nbd + nbdfuse.
    rm -f "$work/q.sock"
    qemu-nbd -r -t -f qcow2 --socket "$work/q.sock" "$image" 2>>"$work/qemu-nbd.err" &
    qpid=$!
    SERVER_PIDS+=("$qpid")
    for _ in $(seq 300); do [[ -S $work/q.sock ]] && break; sleep 0.01; done
    nbdfuse -r "$work/nbdfuse" --unix "$work/q.sock" 2>>"$work/nbdfuse.err" &
    fpid=$!
    for _ in $(seq 300); do [[ -f $work/nbdfuse/nbd ]] && break; sleep 0.01; done
    printf 'nbdfuse_2g\t%s\n' "$(dd_mibps "$work/nbdfuse/nbd" $((2 << 30)))" >>"$results"
    fusermount3 -u "$work/nbdfuse"
    wait "$fpid" 2>/dev/null || true
    stop_server "$qpid"
done

python3 - "$results" <<'PY'
import statistics as st, sys
d = {}
for line in open(sys.argv[1]):
    k, v = line.split("\t")
    d.setdefault(k, []).append(float(v))
m = {k: st.median(v) for k, v in d.items()}
def row(k, label, unit):
    v = d[k]
    print(f"{label:<46}{m[k]:>10.1f} {unit:<6}{min(v):>9.1f}{max(v):>9.1f}")
print(f"{'measure (median of ' + str(len(d['first_byte_ms'])) + ' runs)':<46}{'median':>10} {'':<6}{'min':>9}{'max':>9}")
row("first_byte_ms", "(a) mount start -> first byte of a guest file", "ms")
row("guest_file", "(b) 1 GiB guest file, dd bs=1M", "MiB/s")
row("disk_raw_1g", "(b) first 1 GiB of disk.raw, dd bs=1M", "MiB/s")
row("disk_raw_2g", "(c) whole disk.raw (2 GiB), dd bs=1M", "MiB/s")
row("nbdfuse_2g", "(c) nbdfuse over qemu-nbd, same image", "MiB/s")
print()
print(f"(a) first byte {m['first_byte_ms']:.0f} ms (target <= 200 ms)")
print(f"(b) guest file / disk.raw = {m['guest_file'] / m['disk_raw_1g']:.2f}x (target >= 0.5x)")
print(f"(c) disk.raw / nbdfuse+qemu-nbd = {m['disk_raw_2g'] / m['nbdfuse_2g']:.2f}x")
PY
