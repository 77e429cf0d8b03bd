#!/usr/bin/env bash
# scripts/bench.sh — `make bench`: vhost-vhdx serve against
# qemu-storage-daemon on identical copies of one VHDX, driven by
# `vhost-vhdx bench` (no guest), and docs/benchmarks/README.md from the
# results.
#
# Method: one 1 GiB dynamic VHDX is made with qemu-img and filled with
# random data (so every block is allocated), then copied once per back-end.
# Both back-ends run at the same time, each on its own copy, with 2 queues;
# every workload is run RUNS times as ours, qsd, ours, qsd, ... so slow
# drift of the machine hits both alike, and the report takes medians. The
# allocating-write workload gets a fresh empty image (1 MiB blocks) and a
# freshly started back-end per run. dd of the image file is the baseline
# for sequential reads.
#
# Environment: RUNS (default 5), RUNTIME (default 4s), SWEEP_RUNTIME
# (default 2s), BENCH_DIR (images and results; default .cache/bench),
# OUT (default docs/benchmarks), MERGE_FILL_MB and MERGE_RATE
# (scripts/bench_merge.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"

RUNS=${RUNS:-5}
RUNTIME=${RUNTIME:-4s}
SWEEP_RUNTIME=${SWEEP_RUNTIME:-2s}
BENCH_DIR=${BENCH_DIR:-.cache/bench}
OUT=${OUT:-docs/benchmarks}
SIZE_MB=1024
BIN=bin/vhost-vhdx

log() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

for t in qemu-img qemu-storage-daemon dd; do
	command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install qemu-utils qemu-system-common)"
done

log "building $BIN"
go build -o "$BIN" ./cmd/vhost-vhdx

mkdir -p "$BENCH_DIR" "$OUT"
SOCKDIR=$(mktemp -d /tmp/vhdx-bench.XXXXXX)
RESULTS="$BENCH_DIR/results.jsonl"
: >"$RESULTS"

PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	rm -rf "$SOCKDIR"
}
trap cleanup EXIT

# wait_socket PATH PID: until the back-end listens (or dies).
wait_socket() {
	local i
	for i in $(seq 200); do
		[ -S "$1" ] && return 0
		kill -0 "$2" 2>/dev/null || die "back-end for $1 exited; see $BENCH_DIR/*.log"
		sleep 0.05
	done
	die "no socket at $1 after 10s"
}

# start_ours IMAGE SOCKET LOG: sets STARTED_PID.
start_ours() {
	rm -f "$2"
	"$BIN" serve --socket "$2" --num-queues 2 --log-level warn "$1" 2>>"$3" &
	STARTED_PID=$!
	PIDS+=("$STARTED_PID")
	wait_socket "$2" "$STARTED_PID"
}

start_qsd() {
	rm -f "$2"
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=f,filename=$1,cache.direct=off" \
		--blockdev driver=vhdx,node-name=d,file=f \
		--export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$2,writable=on,num-queues=2" \
		2>>"$3" &
	STARTED_PID=$!
	PIDS+=("$STARTED_PID")
	wait_socket "$2" "$STARTED_PID"
}

stop_pid() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

# record BACKEND WORKLOAD RUN BENCH-ARGS...: one bench run, one JSON line.
record() {
	local be=$1 wl=$2 run=$3
	shift 3
	local res
	res=$("$BIN" bench --json "$@") || die "bench $be $wl run $run failed: $*"
	printf '{"backend":"%s","workload":"%s","run":%d,"result":%s}\n' "$be" "$wl" "$run" "$res" >>"$RESULTS"
	awk -v be="$be" -v wl="$wl" -v run="$run" '{
		n = split("iops mib_per_s p50_us backend_cpu_us_per_io", k, " ")
		for (i = 1; i <= n; i++) if (match($0, "\"" k[i] "\":-?[0-9.e+]+")) v[i] = substr($0, RSTART + length(k[i]) + 3, RLENGTH - length(k[i]) - 3)
		printf "  %-5s %-24s run %d: %8.0f IOPS %8.1f MiB/s  p50 %7.1f us  back-end %6.2f us/IO\n", be, wl, run, v[1], v[2], v[3], v[4]
	}' <<<"$res" >&2
}

# --- images -----------------------------------------------------------------
BASE="$BENCH_DIR/base.vhdx"
FRESH="$BENCH_DIR/fresh.vhdx"
if [ ! -s "$BASE" ]; then
	log "making a ${SIZE_MB} MiB dynamic VHDX filled with random data (every block allocated)"
	head -c $((SIZE_MB << 20)) /dev/urandom >"$BENCH_DIR/random.raw"
	qemu-img convert -f raw -O vhdx -o subformat=dynamic "$BENCH_DIR/random.raw" "$BASE.tmp"
	rm -f "$BENCH_DIR/random.raw"
	mv "$BASE.tmp" "$BASE"
fi
qemu-img check -q "$BASE" || die "$BASE fails qemu-img check"
rm -f "$FRESH"
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M "$FRESH" ${SIZE_MB}M
IMG_OURS="$BENCH_DIR/ours.vhdx"
IMG_QSD="$BENCH_DIR/qsd.vhdx"
cp --sparse=always "$BASE" "$IMG_OURS"
cp --sparse=always "$BASE" "$IMG_QSD"
cat "$IMG_OURS" "$IMG_QSD" >/dev/null # into the page cache

SOCK_OURS="$SOCKDIR/ours.sock"
SOCK_QSD="$SOCKDIR/qsd.sock"
start_ours "$IMG_OURS" "$SOCK_OURS" "$BENCH_DIR/ours.log"
PID_OURS=$STARTED_PID
start_qsd "$IMG_QSD" "$SOCK_QSD" "$BENCH_DIR/qsd.log"
PID_QSD=$STARTED_PID

# both BACKEND-INDEPENDENT-ARGS...: socket and pid per back-end.
ours_args() { echo --socket "$SOCK_OURS" --pid "$PID_OURS"; }
qsd_args() { echo --socket "$SOCK_QSD" --pid "$PID_QSD"; }

log "warm-up (not recorded)"
for be in ours qsd; do
	"$BIN" bench $(${be}_args) --rw randread --bs 4K --iodepth 32 --runtime 1s >/dev/null
done

# workload NAME BENCH-ARGS...: RUNS alternating runs on the running back-ends.
workload() {
	local wl=$1 run
	shift
	log "$wl: $*"
	for run in $(seq "$RUNS"); do
		record ours "$wl" "$run" $(ours_args) "$@"
		record qsd "$wl" "$run" $(qsd_args) "$@"
	done
}

workload randread-4k-qd1 --rw randread --bs 4K --iodepth 1 --runtime "$RUNTIME"
workload randread-4k-qd32 --rw randread --bs 4K --iodepth 32 --runtime "$RUNTIME"
workload randwrite-4k-qd32 --rw randwrite --bs 4K --iodepth 32 --runtime "$RUNTIME"
# dd_run RUN: the "≥ 90 % of dd" baseline, 1 MiB reads of the image file
# (page cache), run right after each pair of 1 MiB read runs so that it
# sees the same machine load.
dd_run() {
	local mibps
	mibps=$(LC_ALL=C dd if="$IMG_OURS" of=/dev/null bs=1M 2>&1 |
		awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i+1); print $1 / s / 1048576 }')
	printf '{"backend":"dd","workload":"read-1m-qd8-2q","run":%d,"mib_per_s":%s}\n' "$1" "$mibps" >>"$RESULTS"
	printf '  dd    read-1m-qd8-2q           run %d: %8.1f MiB/s\n' "$1" "$mibps" >&2
}

log "read-1m-qd8-2q, with dd of the image file after each pair"
for run in $(seq "$RUNS"); do
	record ours read-1m-qd8-2q "$run" $(ours_args) --rw read --bs 1M --iodepth 8 --queues 2 --runtime "$RUNTIME"
	record qsd read-1m-qd8-2q "$run" $(qsd_args) --rw read --bs 1M --iodepth 8 --queues 2 --runtime "$RUNTIME"
	dd_run "$run"
done
workload write-1m-qd8-2q --rw write --bs 1M --iodepth 8 --queues 2 --runtime "$RUNTIME"

log "randread-4k-sweep: QD 1..32"
for run in $(seq "$RUNS"); do
	for qd in 1 2 4 8 16 32; do
		record ours randread-4k-sweep "$run" $(ours_args) --rw randread --bs 4K --iodepth "$qd" --runtime "$SWEEP_RUNTIME"
		record qsd randread-4k-sweep "$run" $(qsd_args) --rw randread --bs 4K --iodepth "$qd" --runtime "$SWEEP_RUNTIME"
	done
done

stop_pid "$PID_OURS"
stop_pid "$PID_QSD"

# Allocating writes: a fresh image and back-end per run; 4K writes, one at
# the start of each 1 MiB block in random order, so every write allocates.
blocks=$((SIZE_MB))
log "randwrite-4k-qd32-fresh: $blocks allocating writes per run"
for run in $(seq "$RUNS"); do
	for be in ours qsd; do
		img="$BENCH_DIR/fresh-$be.vhdx"
		cp "$FRESH" "$img"
		if [ $be = ours ]; then
			start_ours "$img" "$SOCK_OURS" "$BENCH_DIR/ours.log"
		else
			start_qsd "$img" "$SOCK_QSD" "$BENCH_DIR/qsd.log"
		fi
		pid=$STARTED_PID
		record $be randwrite-4k-qd32-fresh "$run" --socket "$SOCKDIR/$be.sock" --pid "$pid" \
			--rw randwrite --bs 4K --iodepth 32 --stride 1M --randommap --ios "$blocks"
		stop_pid "$pid"
	done
done
for be in ours qsd; do
	qemu-img check -q "$BENCH_DIR/fresh-$be.vhdx" || die "fresh-$be.vhdx fails qemu-img check after the run"
done

# What a running live merge costs the guest (merge-idle, merge-running).
. scripts/bench_merge.sh
merge_bench

# --- report -----------------------------------------------------------------
cp "$RESULTS" "$OUT/results.jsonl"
tables=$("$BIN" bench report --svg "$OUT/iops-vs-qd.svg" "$RESULTS")

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
mem=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
qsdv=$(qemu-storage-daemon --version | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (with uncommitted changes)" || true)
fs=$(df -T "$BENCH_DIR" | awk 'NR == 2 { print $2 }')

cat >"$OUT/README.md" <<EOF
# Benchmarks: vhost-vhdx serve against qemu-storage-daemon

Generated by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d). Do not edit by hand:
re-run \`make bench\`. Profiling notes and proposed server changes are in
[profile.md](profile.md). Raw results: [results.jsonl](results.jsonl).

## Machine

- CPU: $cpu, $(nproc) cores; memory $mem; kernel $(uname -r); images on $fs
- vhost-vhdx $commit$dirty, $(go version | cut -d' ' -f3-)
- $qsdv

## Method

- The load generator is \`vhost-vhdx bench\`: a vhost-user-blk front-end with no guest
  (memfd guest memory, split rings, kick/call eventfds, EVENT_IDX when offered). Each queue
  has its own OS thread that keeps \`--iodepth\` requests in flight, publishes all free slots
  with one avail-index store and reaps completions in batches. It sleeps on the call eventfd
  (no busy-polling), as a guest waiting for an interrupt would.
- One ${SIZE_MB} MiB dynamic VHDX is created by \`qemu-img convert -O vhdx -o subformat=dynamic\`
  from random data, so every block is allocated, and copied once per back-end; both copies are
  in the page cache.
- vhost-vhdx: \`vhost-vhdx serve --num-queues 2 IMG\`. qemu-storage-daemon:
  \`--blockdev driver=file,node-name=f,filename=IMG,cache.direct=off --blockdev driver=vhdx,node-name=d,file=f
  --export type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=SOCK,writable=on,num-queues=2\`.
- Each workload runs $RUNS times per back-end, alternating vhost-vhdx and qemu-storage-daemon
  (A B A B …) so machine drift hits both alike; timed workloads run $RUNTIME each
  ($SWEEP_RUNTIME for the queue-depth sweep). The tables show medians.
- Allocating writes: a fresh empty 1 GiB dynamic VHDX with 1 MiB blocks and a freshly started
  back-end per run; ${blocks} 4K writes at the start of each block in random order
  (\`--stride 1M --randommap\`), so every write allocates a block.
- The dd baseline (1 MiB reads of the image file with \`dd\`, page cache) runs right after each
  pair of 1 MiB read runs, so it sees the same machine load.
- Back-end CPU time per I/O is utime+stime from /proc/PID/stat (10 ms resolution) over the
  measured run, divided by the requests completed.
- The machine has $(nproc) cores shared by the bench and the back-end: at high queue depth the
  two compete for CPU, which is part of what is measured.

## Results

$tables

![4K random read IOPS against queue depth](iops-vs-qd.svg)
EOF
log "wrote $OUT/README.md, $OUT/iops-vs-qd.svg and $OUT/results.jsonl"
