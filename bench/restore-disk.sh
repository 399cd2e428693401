#!/usr/bin/env bash
# Whole-disk restore: `chainvault restore` of the newest point of a chain (a
# --size full of random data and three incrementals that each rewrite
# --changed-permille of its 64 KiB blocks, made by `chainvault backup
# --rotate`) against the same copy done by hand: `nbdcopy` from a
# `qemu-nbd -r` export of the same chain, in the same run, to
#   file: a new sparse raw file;
#   nbd:  a `qemu-nbd` export of a fresh sparse raw file (-t -e 8).
# The servers are started outside the timed region; chainvault's time is the
# whole CLI call (API, its restore export, block status, copy, fsync or
# NBD flush). Every result is compared with the point (cmp) outside the
# timing. A warm-up round is not counted; later rounds are interleaved and
# alternate which tool goes first; medians and ratios (peer time / chainvault
# time: above 1 means chainvault is faster) are printed, with the load.
#
# usage: bench/restore-disk.sh [--size 2G] [--changed-permille 20] [--runs 5]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=2G permille=20 runs=5
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --changed-permille) permille=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
[[ $permille =~ ^[0-9]+$ ]] && ((permille >= 1 && permille <= 1000)) || die "--changed-permille wants 1..1000"
bytes=$(to_bytes "$size")
((bytes % 65536 == 0 && bytes >= (64 << 20))) || die "--size must be a multiple of 64K and at least 64M"

need qemu-img qemu-utils
need qemu-io qemu-utils
need qemu-nbd qemu-utils
need nbdcopy libnbd-bin
need nbdinfo libnbd-bin
PY=/usr/bin/python3
[[ -x $PY ]] || die "python3 is missing; install it with: apt-get install -y python3"
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((bytes * 5 + (512 << 20)))
results=$work/results.tsv
: >"$results"
log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"


backup_chain "$cv" "$work" "$bytes" "$permille"
top=$(ls "$work/repo/vms/m/disk0/"*.qcow2 | sort | tail -n 1)
qemu-img convert -q -O raw "$top" "$work/want.raw"
log "newest point: $top ($(numfmt --to=iec "$(allocated_bytes "$top")") own, chain of 4)"

# The peer's source: qemu-nbd -r of the same chain, started once.
start_server qemu-nbd-src "$work/src.sock" qemu-nbd -r -f qcow2 -t -e 8 --cache=none "--socket=$work/src.sock" "$top"
src_uri="nbd+unix:///?socket=$work/src.sock"

timed() { timed_to "$results" "$@"; }
same() { cmp -s "$1" "$work/want.raw" || die "$2: the restored disk differs from the point"; }
fresh_file() { rm -f "$1"; truncate -s "$bytes" "$1"; }
target_server() { # target_server FILE: a qemu-nbd export of FILE; sets TGT_URI and TGT_PID
    start_server qemu-nbd-dst "$work/dst.sock" qemu-nbd -f raw -t -e 8 --cache=none "--socket=$work/dst.sock" "$1"
    TGT_PID=$SERVER_PID
    TGT_URI="nbd+unix:///?socket=$work/dst.sock"
}

# One step of a round: restore_step WORK WHO, timed into $results.
restore_step() {
    case $1/$2 in
        file/chainvault)
            rm -f "$work/out.raw"; sync
            timed file chainvault "$cv" restore --server "$API" --vm m --to "$work/out.raw" --no-progress
            same "$work/out.raw" "chainvault restore to a file" ;;
        file/nbdcopy)
            rm -f "$work/out.raw"; sync
            timed file nbdcopy nbdcopy "$src_uri" "$work/out.raw"
            same "$work/out.raw" "nbdcopy to a file" ;;
        nbd/chainvault)
            fresh_file "$work/dst.raw"; target_server "$work/dst.raw"
            timed nbd chainvault "$cv" restore --server "$API" --vm m --to "$TGT_URI" --no-progress
            stop_server "$TGT_PID"; same "$work/dst.raw" "chainvault restore to qemu-nbd" ;;
        nbd/nbdcopy)
            fresh_file "$work/dst.raw"; target_server "$work/dst.raw"
            timed nbd nbdcopy nbdcopy --flush "$src_uri" "$TGT_URI"
            stop_server "$TGT_PID"; same "$work/dst.raw" "nbdcopy to qemu-nbd" ;;
    esac
}

# Round 0 warms up and is not counted: on a virtual machine the first write
# of fresh guest memory (a new tmpfs file) faults on the host too, and cost
# whichever tool ran first 6-8 s instead of 2. Later rounds alternate which
# tool goes first, so neither always meets a cold cache or a busy writeback.
for ((r = 0; r <= runs; r++)); do
    if ((r == 0)); then log "warm-up round (not counted)"; else log "round $r of $runs"; fi
    if ((r % 2)); then order=(chainvault nbdcopy); else order=(nbdcopy chainvault); fi
    for target in file nbd; do
        for who in "${order[@]}"; do restore_step "$target" "$who"; done
    done
    ((r == 0)) && : >"$results"
done

log "machine at the end: $(machine_note)"
"$PY" - "$results" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    work, who, ms = line.split("\t")
    t.setdefault((work, who), []).append(int(ms) / 1000)
print(f"{'target':<8} {'who':<12} {'median s':>9}   runs")
for (work, who), v in sorted(t.items()):
    print(f"{work:<8} {who:<12} {statistics.median(v):9.3f}   {' '.join(f'{x:.3f}' for x in v)}")
for work in ["file", "nbd"]:
    a, b = statistics.median(t[(work, "chainvault")]), statistics.median(t[(work, "nbdcopy")])
    print(f"{work}: chainvault restore {a:.3f} s, nbdcopy from qemu-nbd -r {b:.3f} s: ratio {b / a:.2f}x (above 1: chainvault faster)")
PY
