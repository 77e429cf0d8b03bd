# scripts/bench_merge.sh — sourced by scripts/bench.sh: what a running
# live merge costs the guest. Per run: a copy of the random base, served
# by vhost-vhdx with a control socket; a checkpoint; MERGE_FILL_MB 1M
# writes into it (what the merge will copy); then the same 4K randrw QD8
# workload over those MERGE_FILL_MB twice: idle (no merge) and while `ctl
# merge --rate MERGE_RATE` copies the checkpoint into the base (the rate
# makes the merge outlast the run; the guest's writes land in the blocks
# being copied, which are then copied again). The merge is then waited
# for and must end "done".
#
# Uses bench.sh's BIN, BENCH_DIR, SOCKDIR, RUNS, RUNTIME, BASE, PIDS,
# wait_socket, stop_pid, record, log, die.

MERGE_FILL_MB=${MERGE_FILL_MB:-256}
MERGE_RATE=${MERGE_RATE:-32M}

merge_bench() {
	local run img top sock ctl pid i
	sock="$SOCKDIR/merge.sock"
	ctl="$SOCKDIR/merge.ctl"
	log "merge: randrw-4k-qd8 idle and during a merge (fill ${MERGE_FILL_MB} MiB, --rate $MERGE_RATE)"
	for run in $(seq "$RUNS"); do
		img="$BENCH_DIR/merge-base.vhdx"
		top="$BENCH_DIR/merge-top.vhdx"
		rm -f "$img" "$top" "$sock" "$ctl"
		cp --sparse=always "$BASE" "$img"
		"$BIN" serve --socket "$sock" --control-socket "$ctl" --num-queues 2 --log-level warn "$img" 2>>"$BENCH_DIR/merge.log" &
		pid=$!
		PIDS+=("$pid")
		wait_socket "$sock" "$pid"
		"$BIN" ctl "$ctl" checkpoint "$(realpath "$BENCH_DIR")/merge-top.vhdx" >/dev/null || die "merge bench: checkpoint failed"
		"$BIN" bench --socket "$sock" --rw write --bs 1M --iodepth 8 --range "${MERGE_FILL_MB}M" --ios "$MERGE_FILL_MB" >/dev/null ||
			die "merge bench: filling the checkpoint failed"
		record ours merge-idle "$run" --socket "$sock" --pid "$pid" --rw randrw --bs 4K --iodepth 8 --range "${MERGE_FILL_MB}M" --runtime "$RUNTIME"
		"$BIN" ctl "$ctl" merge --rate "$MERGE_RATE" >/dev/null || die "merge bench: merge failed to start"
		record ours merge-running "$run" --socket "$sock" --pid "$pid" --rw randrw --bs 4K --iodepth 8 --range "${MERGE_FILL_MB}M" --runtime "$RUNTIME"
		for i in $(seq 600); do
			"$BIN" ctl "$ctl" status --json | grep -q '"running": false' && break
			sleep 0.5
		done
		"$BIN" ctl "$ctl" status --json | grep -q '"state": "done"' || die "merge bench: the merge did not end done; see $BENCH_DIR/merge.log"
		stop_pid "$pid"
		qemu-img check -q "$img" || die "merge-base.vhdx fails qemu-img check after the merge"
	done
}
