package vhdx

// The parent locator metadata item of a differencing image (MS-VHDX
// §2.6.2.6): a 20-byte header, a table of 12-byte key/value entries, and
// UTF-16LE strings the entries point to. Every number in it is file data and
// is validated here, once, before anything uses it.

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"github.com/google/uuid"
)

// Parent locator layout (§2.6.2.6.1, §2.6.2.6.2).
const (
	plOffType        = 0
	plOffReserved    = 16
	plOffCount       = 18
	plHeaderSize     = 20
	plEntrySize      = 12
	pleOffKeyOffset  = 0
	pleOffValOffset  = 4
	pleOffKeyLength  = 8
	pleOffValLength  = 10
	maxLocatorEntry  = 256 // Hyper-V writes 3 to 5; a bound keeps the duplicate check cheap
	maxLocatorString = 1<<16 - 2
)

// VHDX parent locator keys (§2.6.2.6.3).
const (
	keyParentLinkage  = "parent_linkage"
	keyParentLinkage2 = "parent_linkage2"
	keyRelativePath   = "relative_path"
	keyVolumePath     = "volume_path"
	keyAbsolutePath   = "absolute_win32_path"
)

// locatorEntry is one key/value pair, decoded from UTF-16.
type locatorEntry struct {
	key, value string
}

// parentLocator is a decoded VHDX parent locator. entries keeps the file's
// order and every key, known or not, so a rewrite preserves what it does not
// change.
type parentLocator struct {
	entries  []locatorEntry
	linkage  uuid.UUID // parent_linkage
	linkage2 uuid.UUID // parent_linkage2; uuid.Nil when absent
}

func (pl *parentLocator) get(key string) (string, bool) {
	for _, e := range pl.entries {
		if e.key == key {
			return e.value, true
		}
	}
	return "", false
}

// set replaces the value of key, or appends the pair; an empty value
// removes the key.
func (pl *parentLocator) set(key, value string) {
	for i, e := range pl.entries {
		if e.key == key {
			if value == "" {
				pl.entries = append(pl.entries[:i], pl.entries[i+1:]...)
			} else {
				pl.entries[i].value = value
			}
			return
		}
	}
	if value != "" {
		pl.entries = append(pl.entries, locatorEntry{key, value})
	}
}

// formatLinkage is the §2.6.2.6.3 form of a GUID: lowercase, in braces.
func formatLinkage(u uuid.UUID) string { return "{" + u.String() + "}" }

// parseLinkage accepts the braced form (any case), and the bare form.
func parseLinkage(s string) (uuid.UUID, error) {
	if len(s) == 38 && s[0] == '{' && s[37] == '}' {
		s = s[1:37]
	}
	if len(s) != 36 {
		return uuid.Nil, fmt.Errorf("%q is not a {GUID}", s)
	}
	return uuid.Parse(s)
}

// parseParentLocator decodes and validates a parent locator item b, found at
// file offset itemOff (for error messages).
func parseParentLocator(b []byte, itemOff uint64) (*parentLocator, error) {
	const what = "parent locator metadata item"
	bad := func(format string, args ...any) (*parentLocator, error) {
		return nil, errAt(ErrCorrupt, itemOff, what, format, args...)
	}
	if len(b) < plHeaderSize {
		return bad("length %d is shorter than the %d-byte header", len(b), plHeaderSize)
	}
	le := binary.LittleEndian
	if typ := guidFromDisk(b[plOffType:]); typ != ParentLocatorVHDX {
		return nil, errAt(ErrUnsupported, itemOff, what, "locator type %v is not the VHDX type %v", typ, ParentLocatorVHDX)
	}
	count := uint64(le.Uint16(b[plOffCount:]))
	if count == 0 {
		return bad("no key/value entries (parent_linkage is required)")
	}
	if count > maxLocatorEntry {
		return bad("%d key/value entries exceed %d", count, maxLocatorEntry)
	}
	tableEnd := plHeaderSize + count*plEntrySize
	if tableEnd > uint64(len(b)) {
		return bad("%d entries end at %d, past the item's %d bytes", count, tableEnd, len(b))
	}
	pl := &parentLocator{entries: make([]locatorEntry, 0, count)}
	str := func(i uint64, name string, off uint64, n uint64) (string, error) {
		switch {
		case off == 0 || n == 0:
			return "", fmt.Errorf("entry %d: %s offset %d / length %d: both must be non-zero", i, name, off, n)
		case n%2 != 0:
			return "", fmt.Errorf("entry %d: %s length %d is odd (UTF-16)", i, name, n)
		case off < tableEnd:
			return "", fmt.Errorf("entry %d: %s at %d lies inside the header and entry table (ending at %d)", i, name, off, tableEnd)
		case off+n > uint64(len(b)):
			return "", fmt.Errorf("entry %d: %s [%d, %d) extends past the item's %d bytes", i, name, off, off+n, len(b))
		}
		u := make([]uint16, n/2)
		for k := range u {
			u[k] = le.Uint16(b[off+2*uint64(k):])
		}
		for k := 0; k < len(u); k++ {
			switch c := u[k]; {
			case c == 0:
				return "", fmt.Errorf("entry %d: %s holds a NUL character", i, name)
			case utf16.IsSurrogate(rune(c)):
				if c >= 0xDC00 || k+1 == len(u) || u[k+1] < 0xDC00 || u[k+1] > 0xDFFF {
					return "", fmt.Errorf("entry %d: %s is not valid UTF-16 (unpaired surrogate at %d)", i, name, 2*k)
				}
				k++
			}
		}
		return string(utf16.Decode(u)), nil
	}
	for i := uint64(0); i < count; i++ {
		e := b[plHeaderSize+i*plEntrySize:]
		key, err := str(i, "key", uint64(le.Uint32(e[pleOffKeyOffset:])), uint64(le.Uint16(e[pleOffKeyLength:])))
		if err != nil {
			return bad("%v", err)
		}
		val, err := str(i, "value", uint64(le.Uint32(e[pleOffValOffset:])), uint64(le.Uint16(e[pleOffValLength:])))
		if err != nil {
			return bad("%v", err)
		}
		if _, dup := pl.get(key); dup {
			return bad("entry %d: key %q appears more than once", i, key)
		}
		pl.entries = append(pl.entries, locatorEntry{key, val})
	}
	v, ok := pl.get(keyParentLinkage)
	if !ok {
		return bad("no %s entry", keyParentLinkage)
	}
	var err error
	if pl.linkage, err = parseLinkage(v); err != nil {
		return bad("%s: %v", keyParentLinkage, err)
	}
	if v, ok := pl.get(keyParentLinkage2); ok {
		if pl.linkage2, err = parseLinkage(v); err != nil {
			return bad("%s: %v", keyParentLinkage2, err)
		}
	}
	_, r := pl.get(keyRelativePath)
	_, vp := pl.get(keyVolumePath)
	_, a := pl.get(keyAbsolutePath)
	if !r && !vp && !a {
		return bad("none of %s, %s, %s is present", keyRelativePath, keyVolumePath, keyAbsolutePath)
	}
	return pl, nil
}

// encode returns the item: header, entry table, then each key and value in
// entry order. It fails when a string does not fit a 16-bit length or the
// item would exceed the 1 MiB metadata item limit.
func (pl *parentLocator) encode() ([]byte, error) {
	if len(pl.entries) == 0 || len(pl.entries) > maxLocatorEntry {
		return nil, fmt.Errorf("parent locator: %d entries, want 1 to %d: %w", len(pl.entries), maxLocatorEntry, ErrInvalidArgument)
	}
	le := binary.LittleEndian
	tableEnd := plHeaderSize + len(pl.entries)*plEntrySize
	b := make([]byte, tableEnd, tableEnd+64*len(pl.entries))
	guidToDisk(b[plOffType:], ParentLocatorVHDX)
	le.PutUint16(b[plOffCount:], uint16(len(pl.entries)))
	put := func(s string) (uint32, uint16, error) {
		if s == "" || strings.ContainsRune(s, 0) {
			return 0, 0, fmt.Errorf("parent locator: string %q is empty or holds NUL: %w", s, ErrInvalidArgument)
		}
		u := utf16.Encode([]rune(s))
		if len(u)*2 > maxLocatorString {
			return 0, 0, fmt.Errorf("parent locator: string of %d UTF-16 units is too long: %w", len(u), ErrInvalidArgument)
		}
		off := uint32(len(b))
		for _, c := range u {
			b = le.AppendUint16(b, c)
		}
		return off, uint16(len(u) * 2), nil
	}
	for i, e := range pl.entries {
		ko, kl, err := put(e.key)
		if err != nil {
			return nil, err
		}
		vo, vl, err := put(e.value)
		if err != nil {
			return nil, err
		}
		ent := b[plHeaderSize+i*plEntrySize:]
		le.PutUint32(ent[pleOffKeyOffset:], ko)
		le.PutUint32(ent[pleOffValOffset:], vo)
		le.PutUint16(ent[pleOffKeyLength:], kl)
		le.PutUint16(ent[pleOffValLength:], vl)
	}
	if len(b) > maxMetadataItemLen {
		return nil, fmt.Errorf("parent locator: %d bytes exceed a metadata item: %w", len(b), ErrInvalidArgument)
	}
	return b, nil
}

// newParentLocator builds the locator a new child (or a rebase) writes:
// parent_linkage, relative_path from the child's directory and
// absolute_win32_path.
//
// Paths on Linux have no Win32 form. relative_path is what Hyper-V, libvhdi
// and 7-Zip follow first and is exact: the relative path with "\" as the
// separator. absolute_win32_path gets the absolute Linux path with each "/"
// turned into "\" (for /srv/vm/base.vhdx: \srv\vm\base.vhdx), without the
// "\\?\" prefix the spec asks for, because no drive or share can be named;
// resolveParent turns it back. A Windows tool finds the parent through
// relative_path.
func newParentLocator(childPath, parentPath string, linkage uuid.UUID) (*parentLocator, error) {
	absChild, err := filepath.Abs(childPath)
	if err != nil {
		return nil, fmt.Errorf("parent locator: %w", err)
	}
	absParent, err := filepath.Abs(parentPath)
	if err != nil {
		return nil, fmt.Errorf("parent locator: %w", err)
	}
	rel, err := filepath.Rel(filepath.Dir(absChild), absParent)
	if err != nil {
		return nil, fmt.Errorf("parent locator: relative path from %s to %s: %v: %w", absChild, absParent, err, ErrInvalidArgument)
	}
	if strings.Contains(rel, `\`) || strings.Contains(absParent, `\`) {
		return nil, fmt.Errorf("parent locator: path %q holds a backslash, which a Win32 path cannot carry: %w", absParent, ErrInvalidArgument)
	}
	if !strings.HasPrefix(rel, "..") {
		rel = "./" + rel
	}
	return &parentLocator{
		entries: []locatorEntry{
			{keyParentLinkage, formatLinkage(linkage)},
			{keyRelativePath, strings.ReplaceAll(rel, "/", `\`)},
			{keyAbsolutePath, strings.ReplaceAll(absParent, "/", `\`)},
		},
		linkage: linkage,
	}, nil
}

// parentCandidates lists the paths to try for the parent, in the order of
// §2.6.2.6.3: relative_path against the child's directory, then
// absolute_win32_path as given with "\" turned into "/" (and, for a
// "\\?\"-prefixed value naming no drive, the rest of it). volume_path names a
// Windows volume GUID, which cannot be resolved here; it is reported, not
// tried.
func (pl *parentLocator) parentCandidates(childPath string) []string {
	var out []string
	add := func(p string) {
		for _, q := range out {
			if q == p {
				return
			}
		}
		out = append(out, p)
	}
	if rel, ok := pl.get(keyRelativePath); ok {
		r := strings.ReplaceAll(rel, `\`, "/")
		if !filepath.IsAbs(r) {
			r = filepath.Join(filepath.Dir(childPath), r)
		}
		add(filepath.Clean(r))
	}
	if abs, ok := pl.get(keyAbsolutePath); ok {
		add(strings.ReplaceAll(abs, `\`, "/"))
		if rest, ok := strings.CutPrefix(abs, `\\?\`); ok && strings.HasPrefix(rest, `\`) {
			add(strings.ReplaceAll(rest, `\`, "/"))
		}
	}
	return out
}

// resolveParent returns the first candidate that exists, and every path
// tried (for the error when none does).
func (pl *parentLocator) resolveParent(childPath string) (string, []string) {
	cands := pl.parentCandidates(childPath)
	for _, c := range cands {
		if fi, err := os.Stat(c); err == nil && fi.Mode().IsRegular() {
			return c, cands
		}
	}
	return "", cands
}
