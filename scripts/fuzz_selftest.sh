#!/usr/bin/env bash
# scripts/fuzz_selftest.sh — checks scripts/fuzz.sh's verdicts with a stand-in
# for go (GO=...), one case per outcome go test -fuzz can have:
#   pass           exit 0                        -> passes, no FAIL line
#   race           golang/go#75804's output       -> passes, no FAIL line, a note
#   race-corpus    the race, but the seed corpus  -> fails, FAIL lines shown
#                  fails when replayed
#   crash          a failing input written        -> fails, FAIL lines shown
# make test runs it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/go" <<'FAKE'
#!/usr/bin/env bash
# Stand-in for go: $FAKE_CASE chooses what "go test -fuzz" does.
case " $* " in
*" -list "*)
	echo FuzzThing
	echo "ok  	example.com/p	0.01s"
	;;
*" -fuzz "*)
	echo "fuzz: elapsed: 0s, gathering baseline coverage: 0/3 completed"
	case $FAKE_CASE in
	pass)
		echo PASS
		echo "ok  	example.com/p	5.0s"
		;;
	race | race-corpus)
		printf -- '--- FAIL: FuzzThing (5.02s)\n    context deadline exceeded\nFAIL\nexit status 1\nFAIL\texample.com/p\t5.1s\n'
		exit 1
		;;
	crash)
		printf -- '--- FAIL: FuzzThing (1.00s)\n    fuzz_test.go:9: boom\n\n    Failing input written to testdata/fuzz/FuzzThing/abc\nFAIL\nexit status 1\nFAIL\texample.com/p\t1.1s\n'
		exit 1
		;;
	esac
	;;
*" -run "*)
	# Replaying the seed corpus.
	if [ "$FAKE_CASE" = race-corpus ]; then
		printf -- '--- FAIL: FuzzThing (0.00s)\n    --- FAIL: FuzzThing/seed#0\nFAIL\n'
		exit 1
	fi
	echo "ok  	example.com/p	0.01s"
	;;
esac
FAKE
chmod +x "$work/go"

failures=0
check() {
	local case=$1 want_status=$2 want_fail_lines=$3 want_text=$4 status=0
	FAKE_CASE=$case GO="$work/go" "$here/fuzz.sh" 1s example.com/p >"$work/out" 2>&1 || status=$?
	local fails
	fails=$(grep -cE '^(--- FAIL|FAIL)' "$work/out" || true)
	local ok=1
	{ [ "$want_status" = 0 ] && [ "$status" -ne 0 ]; } && ok=0
	{ [ "$want_status" != 0 ] && [ "$status" -eq 0 ]; } && ok=0
	{ [ "$want_fail_lines" = none ] && [ "$fails" -ne 0 ]; } && ok=0
	{ [ "$want_fail_lines" = some ] && [ "$fails" -eq 0 ]; } && ok=0
	grep -q -- "$want_text" "$work/out" || ok=0
	if [ $ok = 1 ]; then
		echo "fuzz.sh selftest: $case: ok"
	else
		echo "fuzz.sh selftest: $case: exit $status, $fails FAIL line(s), want exit ${want_status}, FAIL lines: $want_fail_lines, text \"$want_text\"; output:"
		sed 's/^/    /' "$work/out"
		failures=$((failures + 1))
	fi
}
check pass 0 none "1 targets passed (0 ended"
check race 0 none "golang/go#75804), no failing input, seed corpus passes"
check race-corpus 1 some "FuzzThing FAILED"
check crash 1 some "Failing input written"
if [ $failures -ne 0 ]; then
	echo "fuzz.sh selftest: $failures case(s) failed"
	exit 1
fi
