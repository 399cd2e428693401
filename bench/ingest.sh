#!/usr/bin/env bash
# Ingest benchmark: nbdcopy a file of random data into a fresh image served by
#   chainvault export (qcow2, 64 KiB clusters; and 128 KiB + extended L2),
#   qemu-nbd -f qcow2 -t (qemu-nbd's defaults: cache=writeback, aio=threads),
#   nbdkit file plugin over a fresh raw file (the "just write the bytes" limit),
# at 1 and 4 connections, interleaving the servers run by run. Times include
# nbdcopy's final flush (--flush). Prints median MiB/s, ratios measured in the
# same run, and each server's peak RSS (VmHWM just before it is stopped).
#
# usage: bench/ingest.sh [--size 2G] [--runs 5] [--conns "1 4"]
# env:   CHAINVAULT=/path/to/chainvault (else built with cargo), BENCH_TMP=dir
#        (default /dev/shm), BENCH_KEEP=1 keeps the scratch dir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=2G runs=5 conns="1 4"
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --conns) conns=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $runs =~ ^[0-9]+$ ]] && ((runs >= 1)) || die "--runs wants a positive number"
bytes=$(to_bytes "$size")
((bytes % 1048576 == 0)) || die "--size must be a whole number of MiB"

need nbdcopy libnbd-bin
need nbdinfo libnbd-bin
need nbdkit nbdkit
need qemu-nbd qemu-utils
need qemu-img qemu-utils
need python3 python3
need numfmt coreutils
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
# source + one destination at a time (+ qcow2 metadata)
free_space_check "$work" $((bytes * 2 + (256 << 20)))
results=$work/results.tsv
: >"$results"

log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"
log "making $size of random data"
head -c "$bytes" /dev/urandom >"$work/src.raw"

variants=(chainvault chainvault-128k-xl2 qemu-nbd nbdkit-raw)
declare -A verified=()

# one_run VARIANT CONNS RUN
one_run() {
    local v=$1 c=$2 r=$3 sock=$work/$1.sock dst cmd
    case $v in
        chainvault)
            dst=$work/dst.qcow2
            "$cv" image create "$dst" --size "$bytes" >/dev/null
            cmd=("$cv" export "$dst" --socket "$sock") ;;
        chainvault-128k-xl2)
            dst=$work/dst.qcow2
            "$cv" image create "$dst" --size "$bytes" --cluster-size 128K --extended-l2 >/dev/null
            cmd=("$cv" export "$dst" --socket "$sock") ;;
        qemu-nbd)
            dst=$work/dst.qcow2
            qemu-img create -q -f qcow2 "$dst" "$bytes"
            cmd=(qemu-nbd -f qcow2 -t --socket="$sock" "$dst") ;;
        nbdkit-raw)
            dst=$work/dst.raw
            truncate -s "$bytes" "$dst"
            cmd=(nbdkit -f -U "$sock" file "file=$dst") ;;
    esac
    start_server "$v" "$sock" "${cmd[@]}"
    local pid=$SERVER_PID t0 t1
    t0=$(now_ns)
    # -T C as well: nbdcopy otherwise caps connections at the number of cores.
    nbdcopy --flush -C "$c" -T "$c" "$work/src.raw" "$(uri_for "$sock")"
    t1=$(now_ns)
    local rss cpu; rss=$(peak_rss_kib "$pid"); cpu=$(cpu_seconds "$pid")
    stop_server "$pid"
    # Verify each chainvault variant once, outside the timing.
    if [[ $v = chainvault* && -z ${verified[$v]:-} ]]; then
        qemu-img compare -q -f qcow2 -F raw "$dst" "$work/src.raw" \
            || die "$v: qemu-img compare says the image differs from the source"
        qemu-img check -q "$dst" || die "$v: qemu-img check reports problems"
        verified[$v]=1
        log "$v: qemu-img compare: identical; qemu-img check: clean"
    fi
    rm -f "$dst"
    local mibps
    mibps=$(python3 -c "print(f'{$bytes / 1048576 / (($t1 - $t0) / 1e9):.1f}')")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$c" "$r" "$mibps" "$rss" "$cpu" >>"$results"
    log "run $r, -C $c, $v: $mibps MiB/s, server CPU ${cpu}s, peak RSS $((rss / 1024)) MiB"
}

for ((r = 1; r <= runs; r++)); do
    for c in $conns; do
        # Rotate the order each run so no server always goes first (or last).
        n=${#variants[@]}
        for ((i = 0; i < n; i++)); do
            one_run "${variants[$(((i + r) % n))]}" "$c" "$r"
        done
    done
done

echo
echo "ingest: $size of random data, nbdcopy --flush -C N -T N, $runs runs each, interleaved"
echo "machine: $(machine_note)"
python3 - "$results" "$bytes" <<'EOF'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
gib = int(sys.argv[2]) / 2**30
data, rss, cpu = {}, {}, {}
for v, c, r, mib, k, cs in rows:
    data.setdefault((v, int(c)), []).append(float(mib))
    cpu.setdefault((v, int(c)), []).append(float(cs) / gib)
    rss[v] = max(rss.get(v, 0), int(k))
conns = sorted({c for _, c in data})
variants = ["chainvault", "chainvault-128k-xl2", "qemu-nbd", "nbdkit-raw"]
print()
print(f"{'server':<22}{'conns':>6}{'median MiB/s':>14}{'min':>9}{'max':>9}{'vs qemu-nbd':>13}{'vs nbdkit':>11}{'server CPU s/GiB':>18}")
for c in conns:
    q = st.median(data[("qemu-nbd", c)])
    n = st.median(data[("nbdkit-raw", c)])
    for v in variants:
        xs = data[(v, c)]
        m = st.median(xs)
        print(f"{v:<22}{c:>6}{m:>14.0f}{min(xs):>9.0f}{max(xs):>9.0f}{m / q:>12.2f}x{m / n:>10.2f}x"
              f"{st.median(cpu[(v, c)]):>18.2f}")
print()
print(f"{'server':<22}{'peak RSS (VmHWM, max over runs)':>34}")
for v in variants:
    print(f"{v:<22}{rss[v] / 1024:>30.1f} MiB")
print()
print("targets: chainvault >= 1.0x qemu-nbd (issue), >= 0.95x nbdkit raw at 1 and 4 connections (ARCHITECTURE),")
print("         peak RSS <= 64 MiB. Ratios within +-10% of 1 are noise on this machine.")
print("server CPU s/GiB: user+system time of the server process per GiB copied (median); less")
print("  sensitive to other load than MiB/s. The copy's wall time also includes nbdcopy and the kernel.")
print("note: qemu-nbd advertises multi-conn only for read-only exports, so nbdcopy uses 1 connection with it at -C 4.")
for c in conns:
    m = st.median(data[("chainvault", c)])
    q = st.median(data[("qemu-nbd", c)]); n = st.median(data[("nbdkit-raw", c)])
    ok = lambda b: "met" if b else "MISSED"
    print(f"-C {c}: vs qemu-nbd {m/q:.2f}x ({ok(m >= q)}), vs nbdkit {m/n:.2f}x ({ok(m >= 0.95 * n)}), "
          f"RSS {rss['chainvault']/1024:.0f} MiB ({ok(rss['chainvault'] <= 65536)})")
EOF
