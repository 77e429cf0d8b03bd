package vhdx

import (
	"os"
	"path/filepath"
	"testing"
)

// newImageWithRawTwin creates the image o describes as ours.vhdx in a temp
// dir, opened read-write, and beside it want.raw, a sparse raw file of the
// same size: the model that other readers' view of the image is compared
// with. The raw file is closed when the test ends.
func newImageWithRawTwin(t *testing.T, o CreateOptions) (im *Image, img string, raw *os.File, rawPath string) {
	t.Helper()
	dir := t.TempDir()
	img = filepath.Join(dir, "ours.vhdx")
	if err := Create(img, o); err != nil {
		t.Fatal(err)
	}
	rawPath = filepath.Join(dir, "want.raw")
	raw, err := os.Create(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	if err := raw.Truncate(int64(o.Size)); err != nil {
		t.Fatal(err)
	}
	if im, err = Open(img, OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	return im, img, raw, rawPath
}

// writeToBoth writes ws to the image and to its raw twin, then closes the
// image so that other readers see it whole.
func writeToBoth(t *testing.T, im *Image, raw *os.File, ws []write) {
	t.Helper()
	for _, w := range ws {
		if _, err := im.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
		if _, err := raw.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}
