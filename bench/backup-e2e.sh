#!/usr/bin/env bash
# End-to-end backup benchmark: `chainvault backup` of a qcow2 VM disk into a
# running `chainvault serve`, full and incremental (from a QEMU dirty
# bitmap), against the same copies done by the peers in the same run:
#   full:        nbdcopy --flush from `qemu-nbd -r` of the source into
#                `qemu-nbd` of a fresh qcow2 (nbdcopy reads base:allocation,
#                so both copy the same extents);
#   incremental: a python3-libnbd copier (4 threads, one connection each)
#                of exactly the extents `qemu:dirty-bitmap:cp1` marks, from
#                `qemu-nbd -r -B cp1` into `qemu-nbd` of a fresh overlay of
#                the full, then a flush (nbdcopy cannot copy only some
#                extents).
# chainvault's time is the whole client run: API calls, its own qemu-nbd,
# block status, copy, flush, and the daemon's completion (fsync + image
# check). Runs are interleaved; medians and ratios are printed.
#
# usage: bench/backup-e2e.sh [--size 2G] [--changed-permille 20] [--runs 5]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=2G permille=20 runs=5
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --changed-permille) permille=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
[[ $permille =~ ^[0-9]+$ ]] && ((permille >= 1 && permille <= 1000)) || die "--changed-permille wants 1..1000"
bytes=$(to_bytes "$size")
((bytes % 65536 == 0 && bytes >= (64 << 20))) || die "--size must be a multiple of 64K and at least 64M"

need nbdcopy libnbd-bin
need nbdinfo libnbd-bin
need qemu-nbd qemu-utils
need qemu-img qemu-utils
need qemu-io qemu-utils
need numfmt coreutils
PY=/usr/bin/python3
"$PY" -c 'import nbd' 2>/dev/null || die "$PY cannot import nbd; install it with: apt-get install -y python3-libnbd"
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((bytes * 4 + (512 << 20)))
results=$work/results.tsv
: >"$results"

log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"
log "source: $size qcow2 of random data with bitmap cp1, then $permille/1000 of its 64 KiB blocks rewritten"
head -c "$bytes" /dev/urandom >"$work/src.raw"
qemu-img convert -q -f raw -O qcow2 "$work/src.raw" "$work/src.qcow2"
rm -f "$work/src.raw"
qemu-img bitmap --add "$work/src.qcow2" cp1
blocks=$((bytes / 65536))
nchg=$((blocks * permille / 1000))
"$PY" - "$work/src.qcow2" "$blocks" "$nchg" >"$work/changes.qemuio" <<'EOF'
import random, sys
_, path, blocks, n = sys.argv; blocks, n = int(blocks), int(n)
random.seed(7)
for b in sorted(random.sample(range(blocks), n)):
    print(f"write -P {1 + b % 254} {b * 65536} 65536")
EOF
qemu-io -f qcow2 "$work/src.qcow2" <"$work/changes.qemuio" >/dev/null
qemu-img bitmap --add "$work/src.qcow2" cp2

# The daemon, on tmpfs.
"$cv" serve --data "$work/repo" --listen 127.0.0.1:0 --nbd-socket "$work/cv-nbd.sock" \
    >"$work/chainvault-serve.out" 2>"$work/chainvault-serve.err" &
SERVER_PIDS+=("$!")
api=""
for ((i = 0; i < 200; i++)); do
    api=$(sed -nE 's/^ready api=([^ ]+) .*/\1/p' "$work/chainvault-serve.out")
    [[ -n $api ]] && break
    sleep 0.05
done
[[ -n $api ]] || die "no ready line from chainvault serve"

# Source export for the peers (-e 8: several copier connections).
start_server qemu-nbd-src "$work/src.sock" \
    qemu-nbd -r -t -e 8 -f qcow2 -B cp1 -k "$work/src.sock" -x '' "$work/src.qcow2"
src_pid=$SERVER_PID
src_uri=$(uri_for "$work/src.sock")
dirty=$(nbdinfo --map=qemu:dirty-bitmap:cp1 --json "$src_uri" |
    "$PY" -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["type"] & 1))')
log "the bitmap cp1 marks $((dirty >> 20)) MiB dirty"

# One completed full of VM "inc" for the incremental runs. Each incremental
# reads cp1 and records cp1 again (a differential), so every run is the same.
"$cv" backup --server "$api" --vm inc --disk "$work/src.qcow2" --bitmap cp1 --no-progress >/dev/null \
    || die "the first full of VM inc failed"
# The peers' base for the incremental: a full copy, kept.
qemu-img create -q -f qcow2 "$work/peer-base.qcow2" "$bytes"
start_server qemu-nbd-base "$work/base.sock" qemu-nbd -t -f qcow2 -k "$work/base.sock" -x '' "$work/peer-base.qcow2"
nbdcopy --flush "$src_uri" "$(uri_for "$work/base.sock")"
stop_server "$SERVER_PID"

cat >"$work/copy_dirty.py" <<'EOF'
# Copy the extents qemu:dirty-bitmap:cp1 marks from SRC to DST with 4
# threads, one libnbd connection pair each, requests of up to 2 MiB; flush.
import sys, threading, nbd
src_uri, dst_uri = sys.argv[1], sys.argv[2]
ctx = "qemu:dirty-bitmap:cp1"
h = nbd.NBD(); h.add_meta_context(ctx); h.connect_uri(src_uri)
size = h.get_size(); ext = []; pos = 0
def cb(meta, off, entries, err):
    if meta == ctx:
        for i in range(0, len(entries), 2):
            ext.append((off, entries[i], entries[i + 1])); off += entries[i]
    return 0
while pos < size:
    h.block_status(min(size - pos, 1 << 30), pos, cb)
    pos = ext[-1][0] + ext[-1][1]
h.shutdown()
work = []
for off, ln, fl in ext:
    if fl & 1:
        end = min(off + ln, size)
        while off < end:
            n = min(end - off, 2 << 20); work.append((off, n)); off += n
def worker(items):
    s = nbd.NBD(); s.connect_uri(src_uri); d = nbd.NBD(); d.connect_uri(dst_uri)
    for off, n in items:
        d.pwrite(s.pread(n, off), off)
    d.flush(); d.shutdown(); s.shutdown()
ts = [threading.Thread(target=worker, args=(work[i::4],)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
EOF

secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

for ((r = 1; r <= runs; r++)); do
    # chainvault full (a new VM each run: a fresh chain)
    t0=$(now_ns)
    "$cv" backup --server "$api" --vm "full$r" --disk "$work/src.qcow2" --bitmap cp1 --no-progress >"$work/cv-full.out" \
        || { cat "$work/cv-full.out" >&2; die "chainvault full failed"; }
    t=$(secs "$t0" "$(now_ns)"); echo -e "full\tchainvault\t$t" >>"$results"; log "run $r full chainvault ${t}s"
    rm -rf "$work/repo/vms/full$r"

    # nbdcopy full into a fresh qemu-nbd qcow2
    qemu-img create -q -f qcow2 "$work/peer-full.qcow2" "$bytes"
    start_server qemu-nbd-dst "$work/dst.sock" qemu-nbd -t -e 8 -f qcow2 -k "$work/dst.sock" -x '' "$work/peer-full.qcow2"
    t0=$(now_ns)
    nbdcopy --flush "$src_uri" "$(uri_for "$work/dst.sock")"
    t=$(secs "$t0" "$(now_ns)"); echo -e "full\tnbdcopy+qemu-nbd\t$t" >>"$results"; log "run $r full nbdcopy ${t}s"
    stop_server "$SERVER_PID"; rm -f "$work/peer-full.qcow2"

    # chainvault incremental (cp1 -> cp1)
    t0=$(now_ns)
    "$cv" backup --server "$api" --vm inc --disk "$work/src.qcow2" --bitmap cp1 --no-progress --json >"$work/cv-inc.json" \
        || { cat "$work/cv-inc.json" >&2; die "chainvault incremental failed"; }
    t=$(secs "$t0" "$(now_ns)"); echo -e "incremental\tchainvault\t$t" >>"$results"; log "run $r incremental chainvault ${t}s"
    grep -q '"mode": "incremental"' "$work/cv-inc.json" || die "the chainvault run was not incremental"

    # libnbd copier of the dirty extents into a fresh overlay
    qemu-img create -q -f qcow2 -b peer-base.qcow2 -F qcow2 "$work/peer-inc.qcow2"
    start_server qemu-nbd-dst "$work/dst.sock" qemu-nbd -t -e 8 -f qcow2 -k "$work/dst.sock" -x '' "$work/peer-inc.qcow2"
    t0=$(now_ns)
    "$PY" "$work/copy_dirty.py" "$src_uri" "$(uri_for "$work/dst.sock")"
    t=$(secs "$t0" "$(now_ns)"); echo -e "incremental\tlibnbd+qemu-nbd\t$t" >>"$results"; log "run $r incremental libnbd ${t}s"
    stop_server "$SERVER_PID"; rm -f "$work/peer-inc.qcow2"
done

inc_size=$(grep -o '"size_on_disk": [0-9]*' "$work/cv-inc.json" | head -1 | grep -o '[0-9]*$')
echo
echo "backup-e2e: $size disk, $((dirty >> 20)) MiB dirty, $runs runs; $(machine_note)"
"$PY" - "$results" "$bytes" "$dirty" "${inc_size:-0}" <<'EOF'
import sys, statistics, collections
path, size, dirty, inc_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = collections.defaultdict(list)
for line in open(path):
    work, who, s = line.split("\t"); t[(work, who)].append(float(s))
print(f"{'work':<12} {'who':<18} {'median s':>9} {'MiB/s':>9}   runs")
for (work, who), v in t.items():
    m = statistics.median(v)
    moved = size if work == "full" else dirty
    print(f"{work:<12} {who:<18} {m:>9.3f} {moved / m / 2**20:>9.1f}   {' '.join(f'{x:.3f}' for x in v)}")
for work, peer in (("full", "nbdcopy+qemu-nbd"), ("incremental", "libnbd+qemu-nbd")):
    a, b = statistics.median(t[(work, "chainvault")]), statistics.median(t[(work, peer)])
    print(f"{work}: chainvault time / {peer} time = {a / b:.2f}")
if inc_size:
    print(f"incremental image: {inc_size / 2**20:.1f} MiB for {dirty / 2**20:.1f} MiB dirty")
EOF
