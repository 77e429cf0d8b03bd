#!/usr/bin/env bash
# scripts/fuzz.sh [FUZZTIME [PACKAGES...]] — run every Fuzz target in the
# packages (default ./...) for FUZZTIME each (default 5s). Targets are discovered with `go test -list`,
# so a new Fuzz function is picked up without editing this script.
# Exits non-zero on the first target that fails; prints the tally at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fuzztime=${1:-5s}
shift || true
[ $# -gt 0 ] || set -- ./...
go=${GO:-go}

# `go test -list` prints a package's matching names and then its "ok <pkg>"
# line; packages without tests print "? <pkg> [no test files]".
listing=$("$go" test -list '^Fuzz' "$@")
targets=()
names=()
while IFS= read -r line; do
	case $line in
	Fuzz*) names+=("$line") ;;
	ok*)
		pkg=$(awk '{print $2}' <<<"$line")
		for n in "${names[@]}"; do targets+=("$pkg $n"); done
		names=()
		;;
	*) names=() ;;
	esac
done <<<"$listing"

if [ ${#targets[@]} -eq 0 ]; then
	echo "fuzz: no Fuzz targets found"
	exit 0
fi
# Go 1.26's fuzz coordinator can report "context deadline exceeded" when
# -fuzztime ends while a worker is busy (golang/go#75804, fixed in Go 1.27),
# most often on a loaded machine. That run found nothing: a real failure
# always writes its input ("Failing input written to testdata/fuzz/...").
# Such a run is counted as passed with a note; anything else fails.
ran=0
raced=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in "${targets[@]}"; do
	read -r pkg name <<<"$t"
	echo "fuzz: $pkg $name for $fuzztime"
	if "$go" test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg" 2>&1 | tee "$out"; then
		:
	elif grep -q 'context deadline exceeded' "$out" && ! grep -q 'Failing input written' "$out"; then
		echo "fuzz: $name: ended by Go's fuzztime shutdown race (golang/go#75804), no failing input; not a failure"
		raced=$((raced + 1))
	else
		echo "fuzz: $pkg $name FAILED"
		exit 1
	fi
	ran=$((ran + 1))
done
echo "fuzz: $ran targets passed ($raced ended by golang/go#75804)"
