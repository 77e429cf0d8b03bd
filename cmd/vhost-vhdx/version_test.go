package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

func TestVersionComesFromTheBuildInformation(t *testing.T) {
	rev := "0123456789abcdef0123456789abcdef01234567"
	vcs := func(modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	for _, tc := range []struct {
		name     string
		main     string
		settings []debug.BuildSetting
		want     string
	}{
		{"go test or a build outside a checkout", "(devel)", nil, "devel"},
		{"no module version at all", "", nil, "devel"},
		{"go install of a tag", "v1.2.3", nil, "v1.2.3"},
		{"a tagged clean checkout", "v1.2.3", vcs("false"), "v1.2.3"},
		{"an untagged clean checkout (pseudo-version)", "v0.0.0-20261201204700-0123456789ab", vcs("false"), "0123456789ab"},
		{"an untagged checkout with changes", "v0.0.0-20261201204700-0123456789ab+dirty", vcs("true"), "0123456789ab-dirty"},
		{"a checkout without a module version", "(devel)", vcs("true"), "0123456789ab-dirty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/vhost-vhdx/vhost-vhdx", Version: tc.main}, Settings: tc.settings}
			if got := versionFromBuildInfo(bi); got != tc.want {
				t.Errorf("version = %q, want %q", got, tc.want)
			}
		})
	}
}

// The Makefile's -X flag (from git describe) sets what version prints, and
// create writes the same string as the image's creator. (Without it, a
// build from a git clone names its revision through the build information,
// checked above; Go does not stamp builds from a git worktree, and GOFLAGS
// may turn stamping off, so the Makefile always passes -X.)
func TestBuiltBinaryReportsItsVersionAndWritesItAsCreator(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vhost-vhdx")
	const v = "v9.8.7-3-gabcdef0-dirty"
	build := exec.Command("go", "build", "-o", bin, "-ldflags", "-X main.version="+v, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "vhost-vhdx "+v {
		t.Errorf("version prints %q, want %q", got, "vhost-vhdx "+v)
	}
	img := filepath.Join(dir, "new.vhdx")
	if out, err := exec.Command(bin, "create", "--size", "8M", img).CombinedOutput(); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	code, stdout, stderr := runCLI(t, "info", "--json", img)
	if code != 0 {
		t.Fatalf("info: %s", stderr)
	}
	var info struct {
		Creator string `json:"creator"`
	}
	if err := json.Unmarshal([]byte(stdout), &info); err != nil {
		t.Fatal(err)
	}
	if info.Creator != "vhost-vhdx "+v {
		t.Errorf("creator %q, want %q", info.Creator, "vhost-vhdx "+v)
	}
}
