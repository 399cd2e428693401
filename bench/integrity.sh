#!/usr/bin/env bash
# What block digests cost (issue 13), measured in one run on the same data:
#   completion: a --size qcow2 of random data backed up in full, then
#     --runs incrementals that each rewrite --changed-permille of its 64 KiB
#     blocks (`chainvault backup --rotate`). For each, the client's whole
#     wall time (transfer, flush, completion) and the time the daemon spent
#     computing the layer's block digests and the point's digest (its log
#     line "block digests computed ... ms=N"), which is the difference
#     digests make to the completion. Medians, and the ratio to the
#     transfer time.
#   deep verify: `chainvault verify --deep` of the resulting chain (every
#     stored block read once) against `nbdcopy` of the newest point from
#     `qemu-nbd -r` to `null:`, as read rates (MiB/s), rounds interleaved.
#
# usage: bench/integrity.sh [--size 2G] [--changed-permille 20] [--runs 5]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=2G permille=20 runs=5
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --changed-permille) permille=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
bytes=$(to_bytes "$size")
((bytes % 65536 == 0 && bytes >= (64 << 20))) || die "--size must be a multiple of 64K and at least 64M"

need qemu-img qemu-utils
need qemu-io qemu-utils
need qemu-nbd qemu-utils
need nbdcopy libnbd-bin
PY=/usr/bin/python3
[[ -x $PY ]] || die "python3 is missing; install it with: apt-get install -y python3"
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((bytes * 3 + (512 << 20)))
log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"

head -c "$bytes" /dev/urandom >"$work/src.raw"
qemu-img convert -q -f raw -O qcow2 "$work/src.raw" "$work/src.qcow2"
rm -f "$work/src.raw"
RUST_LOG=chainvault=info serve_chainvault "$cv" "$work/repo"

digest_ms() { sed -nE 's/.*block digests computed.* ms=([0-9]+).*/\1/p' "$work/repo.err" | tail -n 1; }
backup_once() { # backup_once: prints "wall_ms digest_ms"
    local t0 t1
    t0=$(now_ns)
    "$cv" backup --server "$API" --vm m --disk "$work/src.qcow2" --rotate --no-progress >/dev/null
    t1=$(now_ns)
    echo "$(( (t1 - t0) / 1000000 )) $(digest_ms)"
}

read -r w dg < <(backup_once)
log "full: ${w} ms in all, of which block digests ${dg} ms"
echo "full $w $dg" >"$work/completions"
for ((r = 1; r <= runs; r++)); do
    "$PY" - "$((bytes / 65536))" "$permille" "$r" >"$work/writes.qemu-io" <<'PY'
import random, sys
n, permille, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for b in rng.sample(range(n), max(1, n * permille // 1000)):
    print(f"write -P {rng.randrange(1, 256)} {b * 65536} 64k")
PY
    qemu-io -f qcow2 "$work/src.qcow2" <"$work/writes.qemu-io" >/dev/null
    read -r w dg < <(backup_once)
    log "incremental $r: ${w} ms in all, of which block digests ${dg} ms"
    echo "inc $w $dg" >>"$work/completions"
done

top=$(ls "$work/repo/vms/m/disk0/"*.qcow2 | sort | tail -n 1)
start_server qemu-nbd-src "$work/src.sock" qemu-nbd -r -f qcow2 -t -e 8 --cache=none "--socket=$work/src.sock" "$top"
src_uri="nbd+unix:///?socket=$work/src.sock"
: >"$work/reads"
for ((r = 0; r <= runs; r++)); do
    ((r == 0)) && log "warm-up read round (not counted)" || log "read round $r of $runs"
    for who in verify nbdcopy; do
        ((r % 2 == 0)) && who=$([[ $who == verify ]] && echo nbdcopy || echo verify)
        t0=$(now_ns)
        if [[ $who == verify ]]; then
            "$cv" verify --deep --json --server "$API" >"$work/verify.json"
            t1=$(now_ns)
            got=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_read"])' "$work/verify.json")
        else
            nbdcopy "$src_uri" null:
            t1=$(now_ns)
            got=$bytes
        fi
        ((r > 0)) && echo "$who $got $(( (t1 - t0) / 1000000 ))" >>"$work/reads"
    done
done
log "machine at the end: $(machine_note)"
"$PY" - "$work/completions" "$work/reads" <<'PY'
import statistics, sys
inc = [tuple(map(int, l.split()[1:])) for l in open(sys.argv[1]) if l.startswith("inc ")]
full = [tuple(map(int, l.split()[1:])) for l in open(sys.argv[1]) if l.startswith("full ")][0]
print(f"full: {full[0]} ms in all, block digests {full[1]} ms ({100 * full[1] / full[0]:.1f}%)")
w = statistics.median(x[0] for x in inc); d = statistics.median(x[1] for x in inc)
print(f"incrementals ({len(inc)}): median {w:.0f} ms in all, block digests {d:.0f} ms: "
      f"{100 * d / w:.1f}% of the transfer (per run: {' '.join(f'{a}/{b}' for a, b in inc)})")
rates = {}
for l in open(sys.argv[2]):
    who, b, ms = l.split(); rates.setdefault(who, []).append(int(b) / (1 << 20) / (int(ms) / 1000))
v, n = statistics.median(rates["verify"]), statistics.median(rates["nbdcopy"])
print(f"read rate: verify --deep {v:.0f} MiB/s, nbdcopy of the newest point to null: {n:.0f} MiB/s: "
      f"ratio {v / n:.2f}x (per run verify {' '.join(f'{x:.0f}' for x in rates['verify'])}; "
      f"nbdcopy {' '.join(f'{x:.0f}' for x in rates['nbdcopy'])})")
PY
