#!/usr/bin/env bash
# Build a seed corpus for the image_open fuzz target from real images:
# chainvault's own and qemu-img's (compressed, extended L2, snapshots, bitmaps,
# every refcount width). Usage: qcow/fuzz/seed.sh [CORPUS_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus/image_open}"
mkdir -p "$out"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
qemu-img create -q -f qcow2 plain.qcow2 4M
qemu-io -c 'write -P 0x11 0 300k' -c 'write -z 1M 128k' -c 'discard 2M 64k' plain.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k ext.qcow2 4M
qemu-io -c 'write -P 0x22 4k 8k' ext.qcow2 >/dev/null
qemu-img convert -c -O qcow2 plain.qcow2 zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd plain.qcow2 zstd.qcow2
for b in 1 8 64; do qemu-img create -q -f qcow2 -o refcount_bits=$b,cluster_size=4k rc$b.qcow2 1M; done
qemu-img create -q -f qcow2 snap.qcow2 1M; qemu-img snapshot -c s1 snap.qcow2
qemu-img create -q -f qcow2 bm.qcow2 1M; qemu-img bitmap --add bm.qcow2 b0
qemu-img create -q -f qcow2 -b plain.qcow2 -F qcow2 over.qcow2
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 v2.qcow2 1M
for f in *.qcow2; do
  # Keep seeds small: the first 256 KiB carry the header and tables.
  head -c 262144 "$f" > "$out/$f"
done
echo "seeded $(ls "$out" | wc -l) files into $out"
