package vhdx

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf16"

	"github.com/google/uuid"
)

var testLinkage = uuid.MustParse("83ed0ec3-24c8-49a6-a959-5e4bf1288bfb")

// rawLocator builds a locator item by hand, with the strings placed where
// the test says, so that broken offsets and lengths can be expressed.
type rawEntry struct {
	keyOff, valOff uint32
	keyLen, valLen uint16
}

func rawLocator(typ uuid.UUID, entries []rawEntry, tail []byte) []byte {
	b := make([]byte, plHeaderSize+len(entries)*plEntrySize)
	guidToDisk(b, typ)
	binary.LittleEndian.PutUint16(b[plOffCount:], uint16(len(entries)))
	for i, e := range entries {
		ent := b[plHeaderSize+i*plEntrySize:]
		binary.LittleEndian.PutUint32(ent[pleOffKeyOffset:], e.keyOff)
		binary.LittleEndian.PutUint32(ent[pleOffValOffset:], e.valOff)
		binary.LittleEndian.PutUint16(ent[pleOffKeyLength:], e.keyLen)
		binary.LittleEndian.PutUint16(ent[pleOffValLength:], e.valLen)
	}
	return append(b, tail...)
}

func u16(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

func TestParentLocatorRoundTripsHyperVKeys(t *testing.T) {
	pl := &parentLocator{entries: []locatorEntry{
		{keyParentLinkage, "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"},
		{keyParentLinkage2, "{00000000-1111-2222-3333-444444444444}"},
		{keyRelativePath, `..\..\path2\sub3\parent.vhdx`},
		{keyVolumePath, `\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\path2\sub3\parent.vhdx`},
		{keyAbsolutePath, `\\?\d:\path2\sub3\parent.vhdx`},
		{"vendor_key", "é€𝄞"},
	}}
	b, err := pl.encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseParentLocator(b, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.entries, pl.entries) {
		t.Fatalf("entries:\n got %q\nwant %q", got.entries, pl.entries)
	}
	if got.linkage != testLinkage || got.linkage2 != uuid.MustParse("00000000-1111-2222-3333-444444444444") {
		t.Fatalf("linkages %v %v", got.linkage, got.linkage2)
	}
}

// TestParentLocatorRefusesEachBrokenRule: every offset, length and count
// rule of §2.6.2.6 is checked, each refusal naming the rule.
func TestParentLocatorRefusesEachBrokenRule(t *testing.T) {
	key, val := u16(keyParentLinkage), u16(formatLinkage(testLinkage))
	rel := u16(keyRelativePath)
	good := func(n int) (uint32, uint32) {
		tableEnd := uint32(plHeaderSize + n*plEntrySize)
		return tableEnd, tableEnd + uint32(len(key))
	}
	k1, v1 := good(1)
	tests := []struct {
		name     string
		item     []byte
		sentinel error
		want     string
	}{
		{"Short", make([]byte, 19), ErrCorrupt, "shorter than the 20-byte header"},
		{"UnknownType", rawLocator(uuid.New(), nil, nil), ErrUnsupported, "is not the VHDX type"},
		{"NoEntries", rawLocator(ParentLocatorVHDX, nil, nil), ErrCorrupt, "no key/value entries"},
		{"TooManyEntries", rawLocator(ParentLocatorVHDX, make([]rawEntry, maxLocatorEntry+1), nil), ErrCorrupt, "entries exceed 256"},
		{"TablePastItem", func() []byte {
			b := rawLocator(ParentLocatorVHDX, nil, nil)
			binary.LittleEndian.PutUint16(b[plOffCount:], 3)
			return b
		}(), ErrCorrupt, "past the item's 20 bytes"},
		{"ZeroKeyOffset", rawLocator(ParentLocatorVHDX, []rawEntry{{0, v1, uint16(len(key)), uint16(len(val))}}, append(key, val...)), ErrCorrupt, "both must be non-zero"},
		{"ZeroValueLength", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)), 0}}, append(key, val...)), ErrCorrupt, "value offset"},
		{"OddLength", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)) - 1, uint16(len(val))}}, append(key, val...)), ErrCorrupt, "is odd"},
		{"KeyInsideTable", rawLocator(ParentLocatorVHDX, []rawEntry{{4, v1, uint16(len(key)), uint16(len(val))}}, append(key, val...)), ErrCorrupt, "inside the header and entry table"},
		{"ValuePastItem", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)), uint16(len(val)) + 2}}, append(key, val...)), ErrCorrupt, "extends past the item"},
		{"OffsetOverflow", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, 0xFFFFFFFF, uint16(len(key)), 0xFFFE}}, append(key, val...)), ErrCorrupt, "extends past the item"},
		{"NULInKey", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)), uint16(len(val))}}, append(append([]byte{0, 0}, key[2:]...), val...)), ErrCorrupt, "holds a NUL character"},
		{"UnpairedSurrogate", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)), 2}}, append(key, 0x00, 0xD8)), ErrCorrupt, "unpaired surrogate"},
		{"DuplicateKey", rawLocator(ParentLocatorVHDX, []rawEntry{
			{k1 + plEntrySize, v1 + plEntrySize, uint16(len(key)), uint16(len(val))},
			{k1 + plEntrySize, v1 + plEntrySize, uint16(len(key)), uint16(len(val))},
		}, append(key, val...)), ErrCorrupt, `key "parent_linkage" appears more than once`},
		{"NoLinkage", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, k1 + uint32(len(rel)), uint16(len(rel)), uint16(len(rel))}}, append(rel, rel...)), ErrCorrupt, "no parent_linkage entry"},
		{"LinkageNotGUID", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, k1, uint16(len(key)), uint16(len(key))}}, key), ErrCorrupt, "is not a {GUID}"},
		{"NoPath", rawLocator(ParentLocatorVHDX, []rawEntry{{k1, v1, uint16(len(key)), uint16(len(val))}}, append(key, val...)), ErrCorrupt, "none of relative_path"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseParentLocator(tc.item, 0x12345)
			if !errors.Is(err, tc.sentinel) {
				t.Fatalf("error %v does not wrap %v", err, tc.sentinel)
			}
			if !strings.Contains(err.Error(), "parent locator metadata item at offset 0x12345") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name the item and %q", err, tc.want)
			}
		})
	}
}

func TestNewParentLocatorWritesWindowsRelativePaths(t *testing.T) {
	tests := []struct{ child, parent, rel string }{
		{"/vm/child.avhdx", "/vm/base.vhdx", `.\base.vhdx`},
		{"/vm/snap/child.avhdx", "/vm/base.vhdx", `..\base.vhdx`},
		{"/vm/a/child.avhdx", "/vm/b/c/base.vhdx", `..\b\c\base.vhdx`},
	}
	for _, tc := range tests {
		pl, err := newParentLocator(tc.child, tc.parent, testLinkage)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := pl.get(keyRelativePath); got != tc.rel {
			t.Errorf("%s -> %s: relative_path %q, want %q", tc.child, tc.parent, got, tc.rel)
		}
		if got, _ := pl.get(keyAbsolutePath); got != strings.ReplaceAll(tc.parent, "/", `\`) {
			t.Errorf("absolute_win32_path %q", got)
		}
		if got, _ := pl.get(keyParentLinkage); got != "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}" {
			t.Errorf("parent_linkage %q", got)
		}
		if cands := pl.parentCandidates(tc.child); len(cands) == 0 || cands[0] != tc.parent {
			t.Errorf("candidates %q do not start with %s", cands, tc.parent)
		}
	}
}

// TestParentIsFoundByRelativeThenAbsolutePath: relative_path wins when it
// exists; a stale one falls back to absolute_win32_path, including the
// "\\?\" form; nothing found lists every path tried.
func TestParentIsFoundByRelativeThenAbsolutePath(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"base.vhdx", "other.vhdx"} {
		if err := os.WriteFile(filepath.Join(dir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	child := filepath.Join(dir, "sub", "child.avhdx")
	abs := strings.ReplaceAll(filepath.Join(dir, "other.vhdx"), "/", `\`)
	tests := []struct {
		rel, abs, want string
	}{
		{`..\base.vhdx`, abs, filepath.Join(dir, "base.vhdx")},
		{`.\gone.vhdx`, abs, filepath.Join(dir, "other.vhdx")},
		{`.\gone.vhdx`, `\\?\` + abs, filepath.Join(dir, "other.vhdx")},
		{`.\gone.vhdx`, `\\?\d:\nowhere\base.vhdx`, ""},
	}
	for _, tc := range tests {
		pl := &parentLocator{entries: []locatorEntry{{keyRelativePath, tc.rel}, {keyAbsolutePath, tc.abs}}}
		got, tried := pl.resolveParent(child)
		if got != tc.want {
			t.Errorf("rel %q abs %q: found %q, want %q (tried %q)", tc.rel, tc.abs, got, tc.want, tried)
		}
		if len(tried) < 2 {
			t.Errorf("tried %q: want both paths", tried)
		}
	}
}

// FuzzParentLocator: parsing never panics, and whatever parses re-encodes to
// an item that parses to the same entries.
func FuzzParentLocator(f *testing.F) {
	pl, _ := newParentLocator("/a/child.avhdx", "/a/b/base.vhdx", testLinkage)
	b, _ := pl.encode()
	f.Add(b)
	pl.set(keyParentLinkage2, formatLinkage(uuid.New()))
	pl.set("x", "𝄞")
	b, _ = pl.encode()
	f.Add(b)
	f.Add(rawLocator(ParentLocatorVHDX, []rawEntry{{32, 40, 8, 8}}, make([]byte, 40)))
	f.Fuzz(func(t *testing.T, in []byte) {
		pl, err := parseParentLocator(in, 0)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error %v wraps neither ErrCorrupt nor ErrUnsupported", err)
			}
			return
		}
		out, err := pl.encode()
		if err != nil {
			t.Fatalf("encode of a parsed locator: %v", err)
		}
		again, err := parseParentLocator(out, 0)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if !reflect.DeepEqual(again, pl) {
			t.Fatalf("round trip changed the locator:\n%+v\n%+v", pl, again)
		}
	})
}
