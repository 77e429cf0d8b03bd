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
# workloads that allocate get a fresh copy of their image and a freshly
# started back-end per run. dd of the image file is the baseline for
# sequential reads. The method section of the generated README says the
# rest (the chain, the open-time rows).
#
# Rows: each workload records JSON lines under a name; the report
# (cmd/vhost-vhdx/bench_report.go, benchRows) says which names and
# back-ends it compares. To add a row, call one of the row helpers below
# (workload, fresh_row, or record directly) from scripts/bench.d/NAME.sh,
# which this script sources after its own rows with every helper and
# image variable defined, and add a benchRow in Go.
#
# Environment: RUNS (default 5), RUNTIME (default 3s), SWEEP_RUNTIME
# (default 2s), BENCH_DIR (images and results; default .cache/bench),
# OUT (default docs/benchmarks), MERGE_FILL_MB and MERGE_RATE
# (scripts/bench_merge.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"

RUNS=${RUNS:-5}
RUNTIME=${RUNTIME:-3s}
SWEEP_RUNTIME=${SWEEP_RUNTIME:-2s}
BENCH_DIR=${BENCH_DIR:-.cache/bench}
OUT=${OUT:-docs/benchmarks}
SIZE_MB=1024
FRESH_GB=64       # the fresh image of the allocating rows
MIXED_MB=256      # allocated at the start of the reads-while-allocating image
CHAIN_LAYERS=3    # differencing layers over the base: a 4-layer chain
CHAIN_WRITES=4096 # 64K random writes into each layer (a quarter of the disk)
BIN=bin/vhost-vhdx

log() { printf 'bench.sh [%4ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { log "$*"; exit 1; }

for t in qemu-img qemu-io qemu-storage-daemon dd; do
	command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install qemu-utils qemu-system-common)"
done

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
# cpu_times: all CPU time and the time stolen by the hypervisor (ticks,
# the "cpu" line of /proc/stat). A busy neighbour on the host shows as
# steal, and slows both back-ends in ways a load average does not show.
cpu_times() { awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9 }' /proc/stat; }
read -r CPU0 STEAL0 < <(cpu_times)
# steal_pct CPU STEAL: the percentage of the CPU time since that reading of
# cpu_times the hypervisor took. Each run's record carries it: a row whose
# runs met a busy neighbour shows it in the report.
steal_pct() {
	local c s
	read -r c s < <(cpu_times)
	awk -v c=$((c - $1)) -v s=$((s - $2)) 'BEGIN { printf "%.1f", (c > 0 ? 100 * s / c : 0) }'
}
# What is measured is the tree as it is now, before this script writes its
# own outputs (which would otherwise always count as uncommitted changes).
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (with uncommitted changes)" || true)
START=$(date +%s)
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

# start_ours IMAGE SOCKET LOG [SERVE-OPTIONS]: sets STARTED_PID.
start_ours() {
	rm -f "$2"
	"$BIN" serve --socket "$2" --num-queues 2 --log-level warn "${@:4}" "$1" 2>>"$3" &
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
# BENCH-ARGS may start with the subcommand pwrite (the bare-write ceiling).
record() {
	local be=$1 wl=$2 run=$3
	shift 3
	local res
	# Write back what earlier runs left dirty, so that no run (above all
	# one that flushes) pays for another's writes.
	sync
	local c0 s0 steal
	read -r c0 s0 < <(cpu_times)
	# A subcommand (bench pwrite) comes before --json.
	local sub=()
	if [ "$1" = pwrite ]; then
		sub=(pwrite)
		shift
	fi
	res=$("$BIN" bench "${sub[@]}" --json "$@") || die "bench $be $wl run $run failed: $*"
	steal=$(steal_pct "$c0" "$s0")
	printf '{"backend":"%s","workload":"%s","run":%d,"steal_pct":%s,"result":%s}\n' "$be" "$wl" "$run" "$steal" "$res" >>"$RESULTS"
	awk -v be="$be" -v wl="$wl" -v run="$run" -v steal="$steal" '{
		n = split("iops mib_per_s p50_us p99_us backend_cpu_us_per_io", k, " ")
		for (i = 1; i <= n; i++) if (match($0, "\"" k[i] "\":-?[0-9.e+]+")) v[i] = substr($0, RSTART + length(k[i]) + 3, RLENGTH - length(k[i]) - 3)
		printf "  %-10s %-33s run %d: %8.0f IOPS %8.1f MiB/s  p50 %7.1f us  p99 %8.1f us  back-end %6.2f us/IO  steal %4.1f %%\n", be, wl, run, v[1], v[2], v[3], v[4], v[5], steal
	}' <<<"$res" >&2
}

# --- images -----------------------------------------------------------------
# random_vhdx PATH MIB: unless PATH exists, a dynamic VHDX of MIB MiB filled
# with random data (every block allocated), made by qemu-img.
random_vhdx() {
	[ -s "$1" ] && return 0
	log "making a $2 MiB dynamic VHDX filled with random data (every block allocated): $1"
	head -c $(($2 << 20)) /dev/urandom >"$1.raw"
	qemu-img convert -f raw -O vhdx -o subformat=dynamic "$1.raw" "$1.tmp"
	rm -f "$1.raw"
	mv "$1.tmp" "$1"
}
BASE="$BENCH_DIR/base.vhdx"
random_vhdx "$BASE" "$SIZE_MB"
qemu-img check -q "$BASE" || die "$BASE fails qemu-img check"

# FRESH: empty, large enough that no run of the allocating rows writes a
# block twice (FRESH_GB 1 MiB blocks); sparse, so copies are cheap.
FRESH="$BENCH_DIR/fresh.vhdx"
rm -f "$FRESH"
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M "$FRESH" ${FRESH_GB}G
fresh_blocks=$((FRESH_GB * 1024))
# MIXED: FRESH with its first MIXED_MB written (allocated, cached data for
# the reads of the reads-while-allocating row; the rest is fresh).
MIXED="$BENCH_DIR/mixed.vhdx"
rm -f "$MIXED"
cp --sparse=always "$FRESH" "$MIXED"
qemu-io -f vhdx -c "write -P 0xa5 0 ${MIXED_MB}M" "$MIXED" >/dev/null || die "qemu-io could not fill $MIXED"

IMG_OURS="$BENCH_DIR/ours.vhdx"
IMG_QSD="$BENCH_DIR/qsd.vhdx"
cp --sparse=always "$BASE" "$IMG_OURS"
cp --sparse=always "$BASE" "$IMG_QSD"
# CEILING: a third copy, made the same way, for the bare pwrite loop of the
# allocated randwrite row (bench pwrite overwrites it: not a VHDX after).
CEILING="$BENCH_DIR/pwrite-ceiling.raw"
cp --sparse=always "$BASE" "$CEILING"
cat "$IMG_OURS" "$IMG_QSD" "$CEILING" >/dev/null # into the page cache

SOCK_OURS="$SOCKDIR/ours.sock"
SOCK_QSD="$SOCKDIR/qsd.sock"
SOCK_FLAT="$SOCKDIR/flat.sock"
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

# --- rows on the running back-ends (allocated image) ------------------------

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
# randwrite-4k-qd32 has a third record per run: one thread doing nothing
# but 4K pwrites at random offsets of a copy made as the back-ends' images
# were, right after each pair so that it sees the same machine load. How
# fast a 4K overwrite of a cached file is depends on how the page cache came
# to hold it (docs/benchmarks/profile.md), so this is the row's ceiling.
log "randwrite-4k-qd32, with a bare pwrite loop on a copy of the image after each pair"
for run in $(seq "$RUNS"); do
	record ours randwrite-4k-qd32 "$run" $(ours_args) --rw randwrite --bs 4K --iodepth 32 --runtime "$RUNTIME"
	record qsd randwrite-4k-qd32 "$run" $(qsd_args) --rw randwrite --bs 4K --iodepth 32 --runtime "$RUNTIME"
	record pwrite randwrite-4k-qd32 "$run" pwrite --bs 4K --runtime "$RUNTIME" --seed "$run" "$CEILING"
done
workload randrw70-4k-qd32-flush16 --rw randrw --rwmix 70 --flush-every 16 --bs 4K --iodepth 32 --runtime "$RUNTIME"
# dd_run RUN: the "≥ 90 % of dd" baseline, 1 MiB reads of the image file
# (page cache), run right after each pair of 1 MiB read runs so that it
# sees the same machine load.
dd_run() {
	local mibps
	mibps=$(LC_ALL=C dd if="$IMG_OURS" of=/dev/null bs=1M 2>&1 |
		awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i+1); print $1 / s / 1048576 }')
	printf '{"backend":"dd","workload":"read-1m-qd8-2q","run":%d,"mib_per_s":%s}\n' "$1" "$mibps" >>"$RESULTS"
	printf '  dd         read-1m-qd8-2q                    run %d: %8.1f MiB/s\n' "$1" "$mibps" >&2
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

# --- rows that allocate: a fresh copy and back-end per run -------------------

# fresh_row NAME IMAGE BENCH-ARGS...: RUNS alternating runs, each on a new
# sparse copy of IMAGE served by a freshly started back-end; the copies of
# the last run must pass qemu-img check (leaks allowed: status 3).
fresh_row() {
	local wl=$1 src=$2 run be img pid
	shift 2
	log "$wl: $(basename "$src"), $*"
	for run in $(seq "$RUNS"); do
		for be in ours qsd; do
			img="$BENCH_DIR/fresh-$be.vhdx"
			rm -f "$img"
			cp --sparse=always "$src" "$img"
			if [ $be = ours ]; then
				start_ours "$img" "$SOCK_OURS" "$BENCH_DIR/ours.log"
			else
				start_qsd "$img" "$SOCK_QSD" "$BENCH_DIR/qsd.log"
			fi
			pid=$STARTED_PID
			record $be "$wl" "$run" --socket "$SOCKDIR/$be.sock" --pid "$pid" "$@"
			stop_pid "$pid"
		done
	done
	for be in ours qsd; do
		qemu-img check -q "$BENCH_DIR/fresh-$be.vhdx" || [ $? = 3 ] || die "fresh-$be.vhdx fails qemu-img check after $wl"
	done
}

# 4K writes, one at the start of each 1 MiB block in random order, so every
# write allocates (at most one pass over the fresh blocks).
alloc_args=(--rw randwrite --bs 4K --iodepth 32 --stride 1M --randommap --ios "$fresh_blocks" --runtime "$RUNTIME")
fresh_row randwrite-4k-qd32-fresh "$FRESH" "${alloc_args[@]}"
fresh_row randwrite-4k-qd32-fresh-flush32 "$FRESH" "${alloc_args[@]}" --flush-every 32
# 70/30 random 4K over the whole fresh disk: nearly every write allocates
# a block; most reads find unallocated blocks.
fresh_row randrw70-4k-qd32-flush16-fresh "$FRESH" --rw randrw --rwmix 70 --flush-every 16 --bs 4K --iodepth 32 --runtime "$RUNTIME"
# Cached reads of the allocated first MIXED_MB on queue 0 while queue 1
# allocates fresh blocks after it, each write a new block.
fresh_row randread-4k-qd32-while-allocating "$MIXED" --rw randread --bs 4K --iodepth 32 --range "${MIXED_MB}M" --runtime "$RUNTIME" \
	--bg-rw randwrite --bg-iodepth 32 --bg-offset "${MIXED_MB}M" --bg-stride 1M --bg-randommap --bg-ios $((fresh_blocks - MIXED_MB))

# --- reads through a differencing chain --------------------------------------
# qemu-storage-daemon cannot open VHDX differencing images: ours reads the
# chain and a flat copy of it; qsd reads the flat copy.
CHAIN="$BENCH_DIR/chain"
rm -rf "$CHAIN"
mkdir -p "$CHAIN"
cp --sparse=always "$BASE" "$CHAIN/layer0.vhdx"
log "making a ${CHAIN_LAYERS}-layer chain over base.vhdx"
for i in $(seq "$CHAIN_LAYERS"); do
	"$BIN" create --parent "$CHAIN/layer$((i - 1)).vhdx" "$CHAIN/layer$i.vhdx" >/dev/null
	start_ours "$CHAIN/layer$i.vhdx" "$SOCK_OURS" "$BENCH_DIR/ours.log"
	"$BIN" bench --socket "$SOCK_OURS" --rw randwrite --bs 64K --iodepth 16 --ios "$CHAIN_WRITES" --seed "$i" >/dev/null ||
		die "could not write layer $i"
	stop_pid "$STARTED_PID"
done
TOP="$CHAIN/layer$CHAIN_LAYERS.vhdx"
"$BIN" convert -O vhdx "$TOP" "$CHAIN/flat-ours.vhdx" >/dev/null
qemu-img check -q "$CHAIN/flat-ours.vhdx" || die "the flattened chain fails qemu-img check"
cp --sparse=always "$CHAIN/flat-ours.vhdx" "$CHAIN/flat-qsd.vhdx"
cat "$CHAIN"/*.vhdx >/dev/null
start_ours "$TOP" "$SOCK_OURS" "$BENCH_DIR/ours.log" --read-only
PID_CHAIN=$STARTED_PID
start_ours "$CHAIN/flat-ours.vhdx" "$SOCK_FLAT" "$BENCH_DIR/ours.log" --read-only
PID_FLAT=$STARTED_PID
start_qsd "$CHAIN/flat-qsd.vhdx" "$SOCK_QSD" "$BENCH_DIR/qsd.log"
PID_QSD=$STARTED_PID
chain_args=(--rw randread --bs 4K --iodepth 32 --runtime "$RUNTIME")
log "randread-4k-qd32-chain4: ${chain_args[*]}"
for be in ours-chain ours-flat qsd; do # warm-up, not recorded
	case $be in
	ours-chain) sock=$SOCK_OURS ;; ours-flat) sock=$SOCK_FLAT ;; qsd) sock=$SOCK_QSD ;;
	esac
	"$BIN" bench --socket "$sock" --rw randread --bs 4K --iodepth 32 --runtime 1s >/dev/null
done
for run in $(seq "$RUNS"); do
	record ours-chain randread-4k-qd32-chain4 "$run" --socket "$SOCK_OURS" --pid "$PID_CHAIN" "${chain_args[@]}"
	record ours-flat randread-4k-qd32-chain4 "$run" --socket "$SOCK_FLAT" --pid "$PID_FLAT" "${chain_args[@]}"
	record qsd randread-4k-qd32-chain4 "$run" --socket "$SOCK_QSD" --pid "$PID_QSD" "${chain_args[@]}"
done
stop_pid "$PID_CHAIN"
stop_pid "$PID_FLAT"
stop_pid "$PID_QSD"

# --- open time of a huge image ------------------------------------------------
HUGE="$BENCH_DIR/huge-16t.vhdx"
rm -f "$HUGE"
qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M "$HUGE" 16T

# exec_record BACKEND WORKLOAD RUN COMMAND...: wall time and max RSS of one
# command; a check may report leaked space (status 3) and still count.
exec_record() {
	local be=$1 wl=$2 run=$3 res
	shift 3
	res=$("$BIN" bench exec --json --ok-exit 0,3 -- "$@") || die "$be $wl run $run failed: $*"
	printf '{"backend":"%s","workload":"%s","run":%d,"exec":%s}\n' "$be" "$wl" "$run" "$res" >>"$RESULTS"
	awk -v be="$be" -v wl="$wl" -v run="$run" '{
		match($0, /"seconds":[0-9.e+-]+/); s = substr($0, RSTART + 10, RLENGTH - 10)
		match($0, /"max_rss_kib":[0-9]+/); r = substr($0, RSTART + 14, RLENGTH - 14)
		printf "  %-10s %-33s run %d: %8.3f s  max RSS %7.1f MiB\n", be, wl, run, s, r / 1024
	}' <<<"$res" >&2
}

log "info-16t and check-16t: $(basename "$HUGE") (16 TiB, 1 MiB blocks)"
"$BIN" info "$HUGE" >/dev/null && qemu-img info "$HUGE" >/dev/null # warm-up: the BAT into the page cache
for run in $(seq "$RUNS"); do
	exec_record ours info-16t "$run" "$BIN" info "$HUGE"
	exec_record qemu-img info-16t "$run" qemu-img info "$HUGE"
done
for run in $(seq "$RUNS"); do
	exec_record ours check-16t "$run" "$BIN" check "$HUGE"
	exec_record qemu-img check-16t "$run" qemu-img check "$HUGE"
done

# --- rows added by other files -----------------------------------------------
for ext in scripts/bench.d/*.sh; do
	[ -e "$ext" ] || continue
	log "rows from $ext"
	# shellcheck source=/dev/null
	. "$ext"
done

# What a running live merge costs the guest (merge-idle, merge-running).
. scripts/bench_merge.sh
merge_bench

# --- report -----------------------------------------------------------------
cp "$RESULTS" "$OUT/results.jsonl"
tables=$("$BIN" bench report --svg "$OUT/iops-vs-qd.svg" --rows-svg "$OUT/issue12-rows.svg" "$RESULTS")

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
mem=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
qsdv=$(qemu-storage-daemon --version | head -1)
fs=$(df -T "$BENCH_DIR" | awk 'NR == 2 { print $2 }')
steal=$(steal_pct "$CPU0" "$STEAL0")

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
  ($SWEEP_RUNTIME for the queue-depth sweep), each after a \`sync\` so that no run pays for
  the writeback of another's writes. The tables show medians; "vs" names the
  back-end a row is compared with ("other" in the column heads).
- FLUSH every N (\`--flush-every N\`): each queue sends a FLUSH after every N data requests
  (reads and writes), in flight beside the others (it does not wait for the requests before
  it, as a guest's flush covers what has completed). IOPS count data requests only.
- Allocating writes (fresh image): each run gets a fresh sparse copy of an empty ${FRESH_GB} GiB
  dynamic VHDX with 1 MiB blocks (\`qemu-img create\`) and a freshly started back-end; 4K writes
  at the start of each block in random order (\`--stride 1M --randommap\`), so every write
  allocates a block, for $RUNTIME (or ${fresh_blocks} writes). The same with a FLUSH every 32 writes.
- randrw 70/30 with a FLUSH every 16: on the allocated image (back-ends running), and on a
  fresh ${FRESH_GB} GiB image per run (4K random over the whole disk: nearly every write
  allocates, most reads find unallocated blocks). The fresh one is the hard case and carries
  issue 12's target.
- Reads while allocating: a fresh copy per run of a ${FRESH_GB} GiB image whose first ${MIXED_MB} MiB
  are allocated (\`qemu-io write\`, so cached after the copy). Queue 0: 4K randread QD32 over
  those ${MIXED_MB} MiB; at the same time queue 1: 4K randwrite QD32, each write into a new 1 MiB
  block after them. The run ends at $RUNTIME or when either stream is done; the read row is
  queue 0, the row below it queue 1. p99 is the read latency's.
- Cold reads: a ${COLD_GB} GiB dynamic VHDX of random data (scripts/bench.d/cold.sh), one copy
  per back-end. Before each run the copy is dropped from the page cache (\`dd iflag=nocache
  count=0\`, POSIX_FADV_DONTNEED) and a fresh back-end is started (vhost-vhdx \`--read-only\`);
  4K randread QD32 over the whole disk for $RUNTIME, so nearly every read goes to the disk.
- Differencing chain: qemu-storage-daemon cannot open VHDX differencing images, so the chain
  row compares vhost-vhdx reading a $((CHAIN_LAYERS + 1))-layer chain (the random-filled base and ${CHAIN_LAYERS}
  layers made by \`vhost-vhdx create --parent\`, each given ${CHAIN_WRITES} random 64K writes by
  \`vhost-vhdx bench\`, so data and sector bitmaps are spread over every layer) with
  vhost-vhdx and qemu-storage-daemon reading a flat copy of the same disk
  (\`vhost-vhdx convert\` of the chain). Both vhost-vhdx run \`--read-only\`; the three
  back-ends run at once and alternate (chain, flat ours, flat qsd).
- Open time: a fresh 16 TiB dynamic VHDX with 1 MiB blocks (\`qemu-img create\`, BAT about
  128 MiB). \`vhost-vhdx info\` against \`qemu-img info\` and \`vhost-vhdx check\` against
  \`qemu-img check\`, alternating, after one unrecorded run of each (the file is in the page
  cache). Wall time from start to exit and the child's maximum RSS (ru_maxrss from wait4), by
  \`vhost-vhdx bench exec\`.
- The dd baseline (1 MiB reads of the image file with \`dd\`, page cache) runs right after each
  pair of 1 MiB read runs, so it sees the same machine load.
- The pwrite ceiling of the allocated 4K randwrite row: \`vhost-vhdx bench pwrite\`, one thread
  doing nothing but 4 KiB \`pwrite\`s at random offsets of a third \`cp\` copy of the image
  (cached), right after each pair of that row's runs. A buffered write holds the file's inode
  lock on ext4, so no back-end overwrites one file faster from one queue; the row
  "the ceiling … vs qsd" is thus the highest ratio any back-end could reach on this machine
  that run (docs/benchmarks/profile.md, "Allocated 4K randwrite").
- Back-end CPU time per I/O is utime+stime from /proc/PID/stat (10 ms resolution) over the
  measured run, divided by the requests completed (of both streams when there are two).
- The machine has $(nproc) cores shared by the bench and the back-end: at high queue depth the
  two compete for CPU, which is part of what is measured.
- Load average when the run started: $LOAD0; when it ended: $(cut -d' ' -f1-3 /proc/loadavg);
  the whole run took $((($(date +%s) - START) / 60)) min. The hypervisor took ${steal} % of the
  VM's CPU time during the run (steal in /proc/stat): the share the VM's vCPUs were
  ready to run and another guest of the host ran instead. It slows both back-ends; ratios
  from runs with much steal move more than usual. Steal comes in bursts: the spread list
  below gives, per row, the most any one of its runs lost.

## Results

$tables

![4K random read IOPS against queue depth](iops-vs-qd.svg)

![Issue 12 rows: vhost-vhdx against qemu-storage-daemon, qemu-img or the flat image](issue12-rows.svg)
EOF
log "wrote $OUT/README.md, $OUT/iops-vs-qd.svg, $OUT/issue12-rows.svg and $OUT/results.jsonl"
