#!/usr/bin/env bash
# Merge cost: chainvault removing points of a chain (crash-safe, journalled)
# against QEMU's own tools doing the same consolidation on copies of the same
# chain (not crash-safe), in the same run:
#   base:   `chainvault backups delete P0` (the 2 GiB full; its child P1 is
#           committed into it) vs `qemu-img commit -d P1` (P1 into P0);
#   middle: `chainvault backups delete P2` vs `qemu-img rebase` (safe mode)
#           of P3 from P2 onto P1.
# The chain is a full of random data and three incrementals that each rewrite
# --changed-permille of its 64 KiB blocks, made by `chainvault backup
# --rotate` of a qcow2 written with qemu-io between backups. Each round starts
# from a fresh copy of the repository (the daemon is restarted on it); the
# copies are outside the timed region. chainvault's time is the whole CLI
# call: HTTP, journal, catalog, copy, fsync, leak check, rename/rebase.
# Rounds are interleaved; medians and ratios (peer time / chainvault time:
# above 1 means chainvault is faster) are printed, with the machine's load.
#
# usage: bench/merge.sh [--size 2G] [--changed-permille 20] [--runs 3]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=2G permille=20 runs=3
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --changed-permille) permille=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
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
need numfmt coreutils
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

serve() { serve_chainvault "$cv" "$1"; }

# --- the chain ---------------------------------------------------------------
backup_chain "$cv" "$work" "$bytes" "$permille"
stop_server "$SERVE_PID"
mapfile -t pts < <(ls "$work/repo/vms/m/disk0/" | sed -n 's/\.qcow2$//p' | sort)
((${#pts[@]} == 4)) || die "expected 4 points, found ${#pts[@]}: ${pts[*]}"
ddir=$work/repo/vms/m/disk0
for p in "${pts[@]}"; do
    log "point $p: $(numfmt --to=iec "$(allocated_bytes "$ddir/$p.qcow2")") on disk"
done
# The bytes each point reads, for checking every result.
for i in 0 1 3; do
    qemu-img convert -q -O raw "$ddir/${pts[$i]}.qcow2" "$work/want$i.raw"
done

fresh_repo() { rm -rf "$work/r"; cp -a --sparse=always "$work/repo" "$work/r"; sync; }
fresh_peer() { rm -rf "$work/p"; mkdir -p "$work/p"; cp --sparse=always "$ddir"/*.qcow2 "$work/p/"; sync; }
timed() { timed_to "$results" "$@"; }
same() { qemu-img compare -q "$1" "$2" || die "$3: the result does not read as the original point"; }

for ((r = 1; r <= runs; r++)); do
    log "round $r of $runs"
    # chainvault: remove the base, then a middle point, on a fresh repository.
    fresh_repo
    serve "$work/r"
    rd=$work/r/vms/m/disk0
    timed base chainvault "$cv" backups delete "${pts[0]}" --server "$API"
    same "$rd/${pts[1]}.qcow2" "$work/want1.raw" "chainvault base removal"
    timed middle chainvault "$cv" backups delete "${pts[2]}" --server "$API"
    same "$rd/${pts[3]}.qcow2" "$work/want3.raw" "chainvault middle removal"
    stop_server "$SERVE_PID"
    for f in "$rd"/*.qcow2; do qemu-img check -q "$f" || die "qemu-img check $f after chainvault's merges"; done
    # qemu-img on a copy of the same files.
    fresh_peer
    timed base qemu-img qemu-img commit -q -d "$work/p/${pts[1]}.qcow2"
    same "$work/p/${pts[0]}.qcow2" "$work/want1.raw" "qemu-img commit"
    fresh_peer
    timed middle qemu-img qemu-img rebase -q -f qcow2 -F qcow2 -b "${pts[1]}.qcow2" "$work/p/${pts[3]}.qcow2"
    same "$work/p/${pts[3]}.qcow2" "$work/want3.raw" "qemu-img rebase"
done

log "machine at the end: $(machine_note)"
"$PY" - "$results" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    work, who, ms = line.split("\t")
    t.setdefault((work, who), []).append(int(ms) / 1000)
print(f"{'work':<8} {'who':<12} {'median s':>9}   runs")
for (work, who), v in sorted(t.items()):
    print(f"{work:<8} {who:<12} {statistics.median(v):9.3f}   {' '.join(f'{x:.3f}' for x in v)}")
for work, peer, what in [("base", "qemu-img", "qemu-img commit"), ("middle", "qemu-img", "qemu-img rebase (safe)")]:
    a, b = statistics.median(t[(work, "chainvault")]), statistics.median(t[(work, peer)])
    print(f"{work}: chainvault {a:.3f} s, {what} {b:.3f} s: ratio {b / a:.2f}x (above 1: chainvault faster)")
PY
