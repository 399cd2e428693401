# Shared helpers for the chainvault benchmarks. Sourced by bench/*.sh; not run
# on its own. Everything here assumes `set -euo pipefail` in the caller.
#
# Conventions:
#   - All scratch files live in one directory on tmpfs ($BENCH_WORK), removed
#     by the EXIT trap together with every server we started.
#   - Servers are started in the foreground of a background job, so $! is the
#     server's own PID (no daemonising), which lets us read its VmHWM and stop
#     it with SIGTERM (a clean, flushing shutdown for all three servers).

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# need TOOL DEBIAN_PACKAGE: fail with the package to install if TOOL is missing.
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install it with: apt-get install -y $2"
}

# need_nbd_engine: fio built with the nbd ioengine (Debian's fio has it).
fio_has_nbd() {
    fio --enghelp=nbd 2>/dev/null | grep -q uri
}

# Size strings like 1G, 512M, 2GiB -> bytes.
to_bytes() {
    local s=${1%iB}; s=${s%B}
    numfmt --from=iec "$s" 2>/dev/null || die "cannot parse size '$1' (use e.g. 512M, 1G)"
}

# --- the chainvault binary -------------------------------------------------
# CHAINVAULT=/path/to/binary wins. Otherwise build the release binary with
# cargo (respecting CARGO_TARGET_DIR, relative to the repository) and use it.
find_chainvault() {
    if [[ -n ${CHAINVAULT:-} ]]; then
        [[ -x $CHAINVAULT ]] || die "CHAINVAULT=$CHAINVAULT is not an executable file"
        echo "$CHAINVAULT"; return
    fi
    local tdir=${CARGO_TARGET_DIR:-target}
    [[ $tdir = /* ]] || tdir=$REPO_DIR/$tdir
    if command -v cargo >/dev/null 2>&1; then
        log "building chainvault (cargo build --release -p chainvault, target dir $tdir)"
        (cd "$REPO_DIR" && CARGO_TARGET_DIR=$tdir cargo build --release -q -p chainvault) >&2 \
            || die "cargo build failed"
    fi
    [[ -x $tdir/release/chainvault ]] \
        || die "no $tdir/release/chainvault; install Rust (cargo) or set CHAINVAULT=/path/to/chainvault"
    echo "$tdir/release/chainvault"
}

# --- scratch directory on tmpfs ---------------------------------------------
# BENCH_TMP overrides; default /dev/shm, else $TMPDIR (warned about if it is
# not tmpfs: the numbers would then include the disk). Sets BENCH_WORK; call
# it directly, not in $(...), so the EXIT trap sees it.
make_workdir() {
    local base=${BENCH_TMP:-}
    if [[ -z $base ]]; then
        if [[ -d /dev/shm && -w /dev/shm ]]; then base=/dev/shm; else base=${TMPDIR:-/tmp}; fi
    fi
    local fstype; fstype=$(stat -f -c %T "$base")
    [[ $fstype = tmpfs ]] || log "warning: $base is $fstype, not tmpfs; results include storage speed"
    BENCH_WORK=$(mktemp -d "$base/cv-bench.XXXXXX")
}

# free_space_check DIR BYTES: refuse to start if DIR cannot hold BYTES.
free_space_check() {
    local avail; avail=$(( $(stat -f -c '%a * %S' "$1") ))
    (( avail > $2 )) || die "$1 has $((avail >> 20)) MiB free, need about $(($2 >> 20)) MiB (set BENCH_TMP or use a smaller --size)"
}

# --- servers ----------------------------------------------------------------
SERVER_PIDS=()
SERVER_PID=""

# start_server NAME SOCKET CMD...: run CMD in the background (stdout/stderr to
# $BENCH_WORK/NAME.{out,err}) and wait until SOCKET answers an NBD handshake.
start_server() {
    local name=$1 sock=$2; shift 2
    rm -f "$sock"
    "$@" >"$BENCH_WORK/$name.out" 2>"$BENCH_WORK/$name.err" &
    SERVER_PID=$!
    SERVER_PIDS+=("$SERVER_PID")
    local i
    for ((i = 0; i < 600; i++)); do
        if [[ -S $sock ]] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            cat "$BENCH_WORK/$name.err" >&2 || true
            die "$name exited before serving ($*)"
        fi
        sleep 0.05
    done
    die "$name did not start serving on $sock within 30 s"
}

# serve_chainvault CV DIR: start `CV serve` on repository DIR (API on a free
# loopback port, NBD on the unix socket DIR.sock), output in DIR.out/DIR.err,
# and wait for its ready line, polling every 5 ms (scale.sh times the start).
# Sets API and SERVE_PID; stop it with stop_server "$SERVE_PID".
serve_chainvault() {
    rm -f "$2.out"
    "$1" serve --data "$2" --listen 127.0.0.1:0 --nbd-socket "$2.sock" >"$2.out" 2>"$2.err" &
    SERVE_PID=$!
    SERVER_PIDS+=("$SERVE_PID")
    API=""
    local i
    for ((i = 0; i < 6000; i++)); do
        API=$(sed -nE 's/^ready api=([^ ]+) .*/\1/p' "$2.out" 2>/dev/null || true)
        [[ -n $API ]] && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || { cat "$2.err" >&2; die "chainvault serve exited"; }
        sleep 0.005
    done
    die "no ready line from chainvault serve on $2"
}

# backup_chain CV WORK BYTES PERMILLE: a BYTES qcow2 of random data,
# WORK/src.qcow2, backed up four times with `CV backup --rotate` into a daemon
# on WORK/repo (VM m, disk 0): a full, then three incrementals, each after
# qemu-io rewrote PERMILLE/1000 of its 64 KiB blocks with patterns (seeded).
# The daemon is left running (API, SERVE_PID). Needs $PY.
backup_chain() {
    local cv=$1 work=$2 bytes=$3 permille=$4 i
    log "source: $(numfmt --to=iec "$bytes") qcow2 of random data; 3 incrementals of $permille/1000 of its 64 KiB blocks each"
    head -c "$bytes" /dev/urandom >"$work/src.raw"
    qemu-img convert -q -f raw -O qcow2 "$work/src.raw" "$work/src.qcow2"
    rm -f "$work/src.raw"
    serve_chainvault "$cv" "$work/repo"
    "$cv" backup --server "$API" --vm m --disk "$work/src.qcow2" --rotate --no-progress >/dev/null
    for i in 1 2 3; do
        "$PY" - "$((bytes / 65536))" "$permille" "$i" >"$work/writes.qemu-io" <<'PY'
import random, sys
n, permille, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for b in rng.sample(range(n), max(1, n * permille // 1000)):
    print(f"write -P {rng.randrange(1, 256)} {b * 65536} 64k")
PY
        qemu-io -f qcow2 "$work/src.qcow2" <"$work/writes.qemu-io" >/dev/null
        "$cv" backup --server "$API" --vm m --disk "$work/src.qcow2" --rotate --no-progress >/dev/null
    done
}

# timed RESULTS WORK WHO CMD...: run CMD (stdout discarded) and append
# "WORK<TAB>WHO<TAB>milliseconds" to RESULTS.
timed_to() {
    local out=$1 t0 t1; shift
    t0=$(now_ns); "${@:3}" >/dev/null; t1=$(now_ns)
    echo -e "$1\t$2\t$(( (t1 - t0) / 1000000 ))" >>"$out"
}

# peak_rss_kib PID: VmHWM (peak resident set) in KiB.
peak_rss_kib() {
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# stop_server PID: SIGTERM and wait (all three servers flush and exit cleanly).
stop_server() {
    local pid=$1 rc=0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || rc=$?
    local keep=() p
    for p in "${SERVER_PIDS[@]}"; do [[ $p = "$pid" ]] || keep+=("$p"); done
    SERVER_PIDS=("${keep[@]+"${keep[@]}"}")
    # 143 = terminated by SIGTERM, which qemu-nbd/nbdkit may report.
    if ((rc != 0 && rc != 143)); then
        log "warning: server $pid exited with status $rc"
    fi
}

cleanup() {
    local p
    for p in "${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}"; do
        wait "$p" 2>/dev/null || true
    done
    if [[ -n ${BENCH_WORK:-} && -d $BENCH_WORK ]]; then
        if [[ -n ${BENCH_KEEP:-} ]]; then
            log "kept scratch directory $BENCH_WORK (BENCH_KEEP set)"
        else
            rm -rf "$BENCH_WORK"
        fi
    fi
}

# now_ns: wall clock in nanoseconds.
now_ns() { date +%s%N; }

# allocated_bytes FILE: bytes the file really occupies (st_blocks * 512).
allocated_bytes() { echo $(( $(stat -c %b "$1") * 512 )); }

# uri_for SOCKET
uri_for() { echo "nbd+unix:///?socket=$1"; }

# machine_note: one line describing the machine and its load right now.
machine_note() {
    echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC')"
}

# cpu_seconds PID: user+system CPU time the process (all its threads) has used.
# Less sensitive to other load on the machine than wall-clock throughput.
cpu_seconds() {
    local tck; tck=$(getconf CLK_TCK)
    awk -v t="$tck" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / t }' "/proc/$1/stat" 2>/dev/null || echo 0
}
