# Helpers for guest test scripts; the harness sources this file first.
# Each check prints what it did so the console log tells the story.

fail() {
	echo "FAIL: $*"
	exit 1
}

# wait_dev DEV waits up to 30 s for a block device node to appear.
wait_dev() {
	i=0
	while [ ! -b "$1" ]; do
		i=$((i + 1))
		[ "$i" -gt 300 ] && fail "$1 did not appear"
		sleep 0.1
	done
	echo "device $1 is present"
}

# expect_eq WHAT GOT WANT
expect_eq() {
	if [ "$2" != "$3" ]; then
		fail "$1: got '$2', want '$3'"
	fi
	echo "ok: $1 = $2"
}

# expect_fail DESCRIPTION CMD...: the command must exit non-zero.
expect_fail() {
	d=$1
	shift
	if "$@"; then
		fail "$d: succeeded, want failure"
	fi
	echo "ok: $d failed as expected"
}

# irqs QUEUE prints how many interrupts the virtio-blk request queue QUEUE
# (0, 1, ...) has raised, summed over all CPUs; -1 if there is no such queue.
irqs() {
	awk -v q="-req.$1" '
		$NF ~ /^virtio[0-9]+-req\.[0-9]+$/ && substr($NF, length($NF) - length(q) + 1) == q {
			for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i
			found = 1
		}
		END { print found ? s + 0 : -1 }' /proc/interrupts
}

# open_host opens /dev/ttyS1 (the harness's vmOpts.control port) on fd 9
# for wait_host, once, before the host can send anything: the serial driver
# drops a line that arrives while no process has the port open, and the host
# sends as soon as it sees the marker printed just before a wait_host (a
# wait_host that opened the port itself lost CHECKPOINTED that way once, in
# TestKilledDuringMerge..., on a loaded machine). The harness calls it first
# in every script of a guest with a control port.
open_host() {
	exec 9</dev/ttyS1
}

# wait_host WORD blocks until the host sends the line WORD on /dev/ttyS1.
wait_host() {
	echo "waiting for the host to send $1"
	while read -r line <&9; do
		[ "$line" = "$1" ] && { echo "host sent $1"; return 0; }
	done
	fail "/dev/ttyS1 closed before the host sent $1"
}
