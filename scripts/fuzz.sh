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
ran=0
for t in "${targets[@]}"; do
	read -r pkg name <<<"$t"
	echo "fuzz: $pkg $name for $fuzztime"
	"$go" test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg"
	ran=$((ran + 1))
done
echo "fuzz: $ran targets passed"
