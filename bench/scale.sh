#!/usr/bin/env bash
# Catalog scale: a repository of --vms VMs with --points points each (default
# 200 x 50 = 10,000 points), made with `chainvault import` of small qemu-img
# chains (1 MiB disks, one 64 KiB write per overlay) with timestamps one day
# apart. Then, over --runs rounds, it times:
#   start:  `chainvault serve` until its ready line (catalog open, recovery);
#   api:    `GET /api/v1/backups` (every backup with its disks) with curl;
#   list:   `chainvault backups list --json` against it (the same, plus the
#           CLI's process start, parsing and printing);
#   prune:  `chainvault prune --dry-run --json --keep-last 3 --keep-daily 7
#            --keep-weekly 4 --keep-monthly 6` of all VMs;
# and prints medians against the targets of the issue (2 s, 200 ms, 2 s).
# There is no peer for these: they are the catalog's own costs.
#
# usage: bench/scale.sh [--vms 200] [--points 50] [--runs 5]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vms=200 points=50 runs=5
while (($#)); do
    case $1 in
        --vms) vms=$2; shift 2 ;;
        --points) points=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
for v in "$vms" "$points" "$runs"; do
    [[ $v =~ ^[0-9]+$ ]] && ((v >= 1)) || die "--vms, --points and --runs want positive numbers"
done
need qemu-img qemu-utils
need qemu-io qemu-utils
need curl curl
PY=/usr/bin/python3
[[ -x $PY ]] || die "python3 is missing; install it with: apt-get install -y python3"
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
results=$work/results.tsv
: >"$results"
log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"

# serve DIR: serve_chainvault, and START_MS (ms from spawn to the ready line).
serve() {
    local t0; t0=$(now_ns)
    serve_chainvault "$cv" "$1"
    START_MS=$(( ($(now_ns) - t0) / 1000000 ))
}

# One chain of $points images, shared by every VM (import copies them).
log "making a chain of $points qcow2 images"
src=$work/src
mkdir -p "$src"
qemu-img create -q -f qcow2 "$src/p0.qcow2" 1M
qemu-io -f qcow2 -c "write -P 1 0 64k" "$src/p0.qcow2" >/dev/null
for ((i = 1; i < points; i++)); do
    qemu-img create -q -f qcow2 -b "p$((i - 1)).qcow2" -F qcow2 "$src/p$i.qcow2"
    qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $(( (i % 16) * 65536 )) 64k" "$src/p$i.qcow2" >/dev/null
done
images=()
for ((i = 0; i < points; i++)); do images+=("$src/p$i.qcow2"); done
# One timestamp per point, a day apart, ending yesterday.
mapfile -t stamps < <("$PY" - "$points" <<'PY'
import datetime, sys
n = int(sys.argv[1])
end = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(days=1)
for i in range(n):
    print((end - datetime.timedelta(days=n - 1 - i)).strftime('%Y-%m-%dT%H:%M:%SZ'))
PY
)
created=()
for s in "${stamps[@]}"; do created+=(--created-at "$s"); done

repo=$work/repo
serve "$repo"
log "importing $vms VMs x $points points"
t0=$(now_ns)
for ((v = 0; v < vms; v++)); do
    "$cv" import --server "$API" --vm "vm$v" --disk 0 "${created[@]}" "${images[@]}" >/dev/null
    (( (v + 1) % 20 == 0 )) && log "  $((v + 1)) VMs imported"
done
log "import: $(( ($(now_ns) - t0) / 1000000 )) ms for $((vms * points)) points"
stop_server "$SERVE_PID"

for ((r = 1; r <= runs; r++)); do
    log "round $r of $runs"
    serve "$repo"
    echo -e "start\t$START_MS" >>"$results"
    curl -fsS -o "$work/api.json" -w '%{time_total}\n' "$API/api/v1/backups" \
        | awk '{ printf "api\t%d\n", $1 * 1000 }' >>"$results"
    t0=$(now_ns)
    "$cv" backups list --server "$API" --json >"$work/list.json"
    echo -e "list\t$(( ($(now_ns) - t0) / 1000000 ))" >>"$results"
    n=$("$PY" -c 'import json,sys; v=json.load(open(sys.argv[1])); print(len(v if isinstance(v, list) else v["backups"]))' "$work/list.json")
    ((n == vms * points)) || die "backups list gave $n backups, expected $((vms * points))"
    t0=$(now_ns)
    "$cv" prune --dry-run --json --server "$API" --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 6 >"$work/prune.json"
    echo -e "prune\t$(( ($(now_ns) - t0) / 1000000 ))" >>"$results"
    "$PY" - "$work/prune.json" "$vms" <<'PY' || die "the dry run did not cover every VM"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["dry_run"] and len(r["vms"]) == int(sys.argv[2]) and r["removed"] > 0, (len(r["vms"]), r["removed"])
PY
    stop_server "$SERVE_PID"
done

log "machine at the end: $(machine_note)"
"$PY" - "$results" "$vms" "$points" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    k, ms = line.split("\t")
    t.setdefault(k, []).append(int(ms))
target = {"start": 2000, "api": 200, "list": 200, "prune": 2000}
what = {"start": "serve: spawn to ready line", "api": "GET /api/v1/backups (all)", "list": "backups list --json (all)", "prune": "prune --dry-run, all VMs"}
print(f"{int(sys.argv[2]) * int(sys.argv[3])} points across {sys.argv[2]} VMs")
print(f"{'step':<28} {'median ms':>10} {'target ms':>10} {'runs':>5}  within")
for k in ["start", "api", "list", "prune"]:
    m = statistics.median(t[k])
    print(f"{what[k]:<28} {m:>10.0f} {target[k]:>10} {len(t[k]):>5}  {'yes' if m <= target[k] else 'NO'}")
PY
