#!/usr/bin/env bash
# Chain-depth benchmark: sequential read of the top of a chain of depth 1 and
# of depth 100 (depth = overlays above the base; the base holds --base-size of
# random data, every overlay writes a few scattered 64 KiB clusters with
# qemu-io), with `nbdcopy URI /dev/null`, served by
#   chainvault export --read-only, and
#   qemu-nbd -r -t -f qcow2 (qemu-nbd defaults otherwise).
# Both depths share the base and the first overlay. Runs are interleaved.
# Prints median MiB/s and, per server, the ratio depth100 / depth1, and the
# ratio chainvault / qemu-nbd at each depth.
#
# usage: bench/chain-depth.sh [--base-size 256M] [--depth 100] [--runs 5] [--conns "1 4"]
# env:   CHAINVAULT, BENCH_TMP, BENCH_KEEP as for ingest.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

base_size=256M depth=100 runs=5 conns="1 4"
while (($#)); do
    case $1 in
        --base-size) base_size=$2; shift 2 ;;
        --depth) depth=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --conns) conns=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $depth =~ ^[0-9]+$ ]] && ((depth >= 2)) || die "--depth wants a number >= 2"
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
bytes=$(to_bytes "$base_size")
((bytes % 65536 == 0 && bytes >= (8 << 20))) || die "--base-size must be a multiple of 64K and at least 8M"

need nbdcopy libnbd-bin
need nbdinfo libnbd-bin
need qemu-nbd qemu-utils
need qemu-img qemu-utils
need qemu-io qemu-utils
need python3 python3
need numfmt coreutils
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((bytes * 2 + (256 << 20)))
results=$work/results.tsv
: >"$results"

log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"
log "making the chain: base ($base_size of random data) + $depth overlays"
head -c "$bytes" /dev/urandom >"$work/base.raw"
qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$work/base.qcow2"
rm -f "$work/base.raw"
clusters=$((bytes / 65536))
prev=base.qcow2
RANDOM=42
for ((d = 1; d <= depth; d++)); do
    # Relative backing names: the chain stays inside $work (chainvault's gate).
    (cd "$work" && qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "ov$d.qcow2")
    cmds=()
    for ((k = 0; k < 4; k++)); do
        c=$(((RANDOM * 32768 + RANDOM) % clusters))
        cmds+=(-c "write -q -P $((d % 255 + 1)) $((c * 65536)) 64k")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$work/ov$d.qcow2" >/dev/null
    prev=ov$d.qcow2
done
tops=(1 "$depth")
variants=(chainvault qemu-nbd)
declare -A verified=()

# one_run VARIANT DEPTH CONNS RUN
one_run() {
    local v=$1 d=$2 c=$3 r=$4 sock=$work/$1.sock top=$work/ov$2.qcow2 cmd
    case $v in
        chainvault) cmd=("$cv" export "$top" --read-only --socket "$sock") ;;
        qemu-nbd) cmd=(qemu-nbd -r -t -f qcow2 --socket="$sock" "$top") ;;
    esac
    start_server "$v" "$sock" "${cmd[@]}"
    local pid=$SERVER_PID t0 t1 rss
    t0=$(now_ns)
    nbdcopy -C "$c" -T "$c" "$(uri_for "$sock")" /dev/null
    t1=$(now_ns)
    rss=$(peak_rss_kib "$pid")
    local cpu; cpu=$(cpu_seconds "$pid")
    if [[ $v = chainvault && -z ${verified[$d]:-} ]]; then
        # Outside the timing: what chainvault serves equals what qemu reads.
        qemu-img compare -q -f raw -F qcow2 "$(uri_for "$sock")" "$top" \
            || die "chainvault serves different data from qemu-img for depth $d"
        verified[$d]=1
        log "depth $d: chainvault's export and qemu-img agree (qemu-img compare)"
    fi
    stop_server "$pid"
    local mibps
    mibps=$(python3 -c "print(f'{$bytes / 1048576 / (($t1 - $t0) / 1e9):.1f}')")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$d" "$c" "$r" "$mibps" "$rss" "$cpu" >>"$results"
    log "run $r, depth $d, -C $c, $v: $mibps MiB/s, server CPU ${cpu}s, peak RSS $((rss >> 10)) MiB"
}

for ((r = 1; r <= runs; r++)); do
    for c in $conns; do
        # server x depth combinations, rotated per run.
        combos=()
        for d in "${tops[@]}"; do for v in "${variants[@]}"; do combos+=("$v:$d"); done; done
        n=${#combos[@]}
        for ((i = 0; i < n; i++)); do
            x=${combos[$(((i + r) % n))]}
            one_run "${x%%:*}" "${x##*:}" "$c" "$r"
        done
    done
done

echo
echo "chain-depth: sequential read (nbdcopy -C N -T N URI /dev/null) of the top of a chain,"
echo "base $base_size of data, depth 1 vs $depth overlays of 4 scattered 64 KiB clusters each, $runs runs, interleaved"
echo "machine: $(machine_note)"
python3 - "$results" "$depth" "$bytes" <<'EOF'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
deep = int(sys.argv[2])
gib = int(sys.argv[3]) / 2**30
data, rss, cpu = {}, {}, {}
for v, d, c, r, mib, k, cs in rows:
    data.setdefault((v, int(d), int(c)), []).append(float(mib))
    cpu.setdefault((v, int(d), int(c)), []).append(float(cs) / gib)
    rss[(v, int(d))] = max(rss.get((v, int(d)), 0), int(k))
print()
print(f"{'server':<12}{'conns':>6}{'depth':>7}{'median MiB/s':>14}{'min':>8}{'max':>8}{'vs qemu-nbd':>13}{'deep/1':>9}{'CPU s/GiB':>11}{'peak RSS MiB':>14}")
for c in sorted({c for _, _, c in data}):
    for v in ["chainvault", "qemu-nbd"]:
        one = st.median(data[(v, 1, c)])
        for d in (1, deep):
            xs = data[(v, d, c)]
            m = st.median(xs)
            q = st.median(data[("qemu-nbd", d, c)])
            dd = f"{m / one:.2f}x" if d == deep else ""
            print(f"{v:<12}{c:>6}{d:>7}{m:>14.0f}{min(xs):>8.0f}{max(xs):>8.0f}{m / q:>12.2f}x{dd:>9}{st.median(cpu[(v, d, c)]):>11.2f}{rss[(v, d)] / 1024:>14.1f}")
print()
print(f"targets (ARCHITECTURE): depth {deep} >= 0.8x depth 1 for chainvault; chainvault at depth 1 >= qemu-nbd.")
print("CPU s/GiB: server user+system time per GiB read (median), taken before the verification read;")
print("  less sensitive to other load than MiB/s. Ratios within +-10% of 1 are noise on this machine.")
EOF
