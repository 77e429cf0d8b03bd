# scripts/bench.d/cold.sh — sourced by scripts/bench.sh (see "Rows" there).
#
# randread-4k-qd32-cold: 4K random reads of an image whose data is not in
# the page cache, the case a guest meets on a disk larger than the host's
# free memory. Every other read row runs on cached images. Each run evicts
# its back-end's copy from the page cache (dd iflag=nocache count=0 asks
# the kernel to drop the whole file: POSIX_FADV_DONTNEED) and starts a fresh
# back-end, so neither inherits the other's or an earlier run's cache.

COLD_GB=${COLD_GB:-4}
COLD_BASE="$BENCH_DIR/cold-base.vhdx"
random_vhdx "$COLD_BASE" $((COLD_GB << 10))
for be in ours qsd; do
	[ -s "$BENCH_DIR/cold-$be.vhdx" ] || cp --sparse=always "$COLD_BASE" "$BENCH_DIR/cold-$be.vhdx"
done

# evict FILE: drop FILE's pages from the page cache.
evict() {
	sync "$1"
	dd if="$1" iflag=nocache count=0 status=none
}

cold_args=(--rw randread --bs 4K --iodepth 32 --runtime "$RUNTIME")
log "randread-4k-qd32-cold: ${COLD_GB} GiB image, evicted before each run; ${cold_args[*]}"
for run in $(seq "$RUNS"); do
	for be in ours qsd; do
		img="$BENCH_DIR/cold-$be.vhdx"
		evict "$img"
		if [ $be = ours ]; then
			start_ours "$img" "$SOCK_OURS" "$BENCH_DIR/ours.log" --read-only
		else
			start_qsd "$img" "$SOCK_QSD" "$BENCH_DIR/qsd.log"
		fi
		pid=$STARTED_PID
		record $be randread-4k-qd32-cold "$run" --socket "$SOCKDIR/$be.sock" --pid "$pid" "${cold_args[@]}"
		stop_pid "$pid"
	done
done
