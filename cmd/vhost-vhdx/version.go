package main

import (
	"runtime/debug"
	"strings"
)

// version is set by the Makefile from git describe:
// go build -ldflags "-X main.version=$(git describe --always --dirty)".
// Left empty, versionString falls back to the build information Go embeds.
var version = ""

// versionString is what "version" prints and what create writes as the
// image's creator: the -X version if the build set one, else the main
// module's version (a tagged "go install ...@v1.2.3" build), else the VCS
// revision Go stamps into a build from a checkout (with "-dirty" when the
// tree had uncommitted changes), else "devel" (go test, or a build outside
// any checkout).
func versionString() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	return versionFromBuildInfo(bi)
}

func versionFromBuildInfo(bi *debug.BuildInfo) string {
	var rev string
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	// A build from an untagged checkout gets a pseudo-version
	// (v0.0.0-DATE-REV[+dirty]); the bare revision says the same, shorter,
	// as git describe --always does. A tag (v1.2.3) is kept.
	if v := bi.Main.Version; v != "" && v != "(devel)" && (rev == "" || !strings.Contains(v, rev)) {
		return v
	}
	if rev == "" {
		return "devel"
	}
	if modified {
		rev += "-dirty"
	}
	return rev
}
