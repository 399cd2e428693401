#!/usr/bin/env bash
# What TLS costs: nbdcopy a file of random data into a backup export of
# `chainvault serve`, and read the point back from a restore export (to
# null:), with and without TLS; the same into and out of a fresh qcow2
# served by qemu-nbd, with and without `--tls-creds` (tls-creds-x509). All
# over TCP on loopback, with the same certificates (scripts/make-test-certs.sh)
# and the same data, servers interleaved run by run. Prints median MiB/s, the
# TLS/plain ratio of each server, and chainvault's TLS ratio against
# qemu-nbd's TLS.
#
# usage: bench/tls.sh [--size 1G] [--runs 5] [--conns 1]
# env:   CHAINVAULT=/path/to/chainvault (else built with cargo), BENCH_TMP=dir
#        (default /dev/shm), BENCH_KEEP=1 keeps the scratch dir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=1G runs=5 conns=1
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

need nbdcopy libnbd-bin
need nbdinfo libnbd-bin
need qemu-nbd qemu-utils
need qemu-img qemu-utils
need curl curl
need openssl openssl
need python3 python3
cv=$(find_chainvault)

trap cleanup EXIT
trap 'exit 130' INT TERM
make_workdir
work=$BENCH_WORK
free_space_check "$work" $((bytes * 4 + (256 << 20)))
results=$work/results.tsv
: >"$results"
pki=$work/pki
bash "$REPO_DIR/scripts/make-test-certs.sh" "$pki" >/dev/null

log "chainvault: $cv"
log "scratch: $work; machine: $(machine_note)"
head -c "$bytes" /dev/urandom >"$work/src.raw"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Two daemons, plain and TLS, for all runs.
declare -A API NBDS CURL
start_daemon() {
    local name=$1; shift
    local dir=$work/$name port; port=$(free_port)
    "$cv" serve --data "$dir" --listen 127.0.0.1:0 --nbd-listen "127.0.0.1:$port" "$@" >"$dir.out" 2>"$dir.err" &
    SERVER_PIDS+=("$!")
    local i api=""
    for ((i = 0; i < 3000; i++)); do
        api=$(sed -nE 's/^ready api=([^ ]+) .*/\1/p' "$dir.out" 2>/dev/null || true)
        [[ -n $api ]] && break
        sleep 0.01
    done
    [[ -n $api ]] || { cat "$dir.err" >&2; die "no ready line from chainvault serve ($name)"; }
    API[$name]=$api
}
start_daemon cv-plain
start_daemon cv-tls --tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem"
CURL[cv-plain]="curl -sf"
CURL[cv-tls]="curl -sf --cacert $pki/ca-cert.pem"

libnbd() { # URI -> libnbd's form (TLS: the certificate directory)
    case $1 in
        nbds://*) if [[ $1 == *\?* ]]; then echo "$1&tls-certificates=$pki"; else echo "$1?tls-certificates=$pki"; fi ;;
        *) echo "$1" ;;
    esac
}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

mibps() { python3 -c "print(f'{$bytes / 1048576 / (($2 - $1) / 1e9):.1f}')"; }

# one_run VARIANT RUN: ingest then read back; appends "variant<TAB>op<TAB>MiB/s".
one_run() {
    local v=$1 r=$2 t0 t1 uri
    case $v in
        cv-plain|cv-tls)
            local c=${CURL[$v]} api=${API[$v]} start id
            start=$($c -X POST "$api/api/v1/backups" -H 'content-type: application/json' \
                -d "{\"vm_name\":\"bench-$r\",\"backup_type\":\"full\",\"disks\":[{\"disk_id\":0,\"disk_key\":\"k\",\"capacity_bytes\":$bytes}]}")
            id=$(json "['backup_id']" <<<"$start")
            uri=$(libnbd "$(json "['disks'][0]['nbd_uri']" <<<"$start")")
            t0=$(now_ns); nbdcopy --flush -C "$conns" -T "$conns" "$work/src.raw" "$uri"; t1=$(now_ns)
            echo -e "$v\tingest\t$(mibps "$t0" "$t1")" >>"$results"
            $c -X POST "$api/api/v1/backups/$id/complete" -H 'content-type: application/json' \
                -d "{\"disk_id\":0,\"change_id\":\"c$r\"}" >/dev/null
            local rs rid
            rs=$($c -X POST "$api/api/v1/restores" -H 'content-type: application/json' \
                -d "{\"backup_id\":\"$id\",\"disk_id\":0}")
            rid=$(json "['restore_id']" <<<"$rs")
            uri=$(libnbd "$(json "['nbd_uri']" <<<"$rs")")
            t0=$(now_ns); nbdcopy -C "$conns" -T "$conns" "$uri" null:; t1=$(now_ns)
            echo -e "$v\tread\t$(mibps "$t0" "$t1")" >>"$results"
            $c -X DELETE "$api/api/v1/restores/$rid" >/dev/null
            $c -X DELETE "$api/api/v1/backups/$id" >/dev/null || true
            ;;
        qemu-nbd-plain|qemu-nbd-tls)
            local dst=$work/q.qcow2 port tls=() scheme=nbd
            qemu-img create -q -f qcow2 "$dst" "$bytes"
            if [[ $v = qemu-nbd-tls ]]; then
                tls=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$pki" --tls-creds tls0)
                scheme=nbds
            fi
            port=$(free_port)
            qemu-nbd -f qcow2 -t --bind 127.0.0.1 --port "$port" "${tls[@]}" "$dst" 2>"$work/q.err" &
            local pid=$!; SERVER_PIDS+=("$pid")
            uri=$(libnbd "$scheme://127.0.0.1:$port/")
            local i; for ((i = 0; i < 300; i++)); do nbdinfo --size "$uri" >/dev/null 2>&1 && break; sleep 0.05; done
            t0=$(now_ns); nbdcopy --flush -C "$conns" -T "$conns" "$work/src.raw" "$uri"; t1=$(now_ns)
            echo -e "$v\tingest\t$(mibps "$t0" "$t1")" >>"$results"
            t0=$(now_ns); nbdcopy -C "$conns" -T "$conns" "$uri" null:; t1=$(now_ns)
            echo -e "$v\tread\t$(mibps "$t0" "$t1")" >>"$results"
            stop_server "$pid"
            rm -f "$dst"
            ;;
    esac
    log "run $r, $v: $(tail -2 "$results" | cut -f2,3 | tr '\t\n' ' ')"
}

variants=(cv-plain cv-tls qemu-nbd-plain qemu-nbd-tls)
for ((r = 1; r <= runs; r++)); do
    n=${#variants[@]}
    for ((i = 0; i < n; i++)); do one_run "${variants[$(((i + r) % n))]}" "$r"; done
done

echo
echo "TLS cost: $size of random data, nbdcopy -C $conns over TCP loopback, $runs runs each, interleaved"
echo "machine: $(machine_note)"
python3 - "$results" <<'EOF'
import sys, statistics as st
d = {}
for l in open(sys.argv[1]):
    v, op, x = l.split("\t")
    d.setdefault((v, op), []).append(float(x))
m = {k: st.median(x) for k, x in d.items()}
print(f"\n{'server':<16}{'op':<8}{'median MiB/s':>14}{'min':>9}{'max':>9}")
for v in ["cv-plain", "cv-tls", "qemu-nbd-plain", "qemu-nbd-tls"]:
    for op in ["ingest", "read"]:
        xs = d[(v, op)]
        print(f"{v:<16}{op:<8}{m[(v, op)]:>14.0f}{min(xs):>9.0f}{max(xs):>9.0f}")
print()
for op in ["ingest", "read"]:
    print(f"{op}: chainvault TLS/plain {m[('cv-tls', op)] / m[('cv-plain', op)]:.2f}x, "
          f"qemu-nbd TLS/plain {m[('qemu-nbd-tls', op)] / m[('qemu-nbd-plain', op)]:.2f}x, "
          f"chainvault TLS vs qemu-nbd TLS {m[('cv-tls', op)] / m[('qemu-nbd-tls', op)]:.2f}x")
EOF
