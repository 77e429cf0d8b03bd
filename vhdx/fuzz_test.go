package vhdx

import (
	"bytes"
	"compress/bzip2"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"
)

// sampleHead returns the first n bytes of a shared sample, or nil.
func sampleHead(name string, n int64) []byte {
	p := samplePath(name)
	if p == "" {
		return nil
	}
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(bzip2.NewReader(f), n))
	return b
}

// A VHDX file is at least 4 MiB (header section, log, metadata, BAT), too
// big for the fuzzing engine to mutate quickly. Fuzz inputs therefore
// describe a sparse file: a little-endian uint32 size in 4 KiB units (capped
// at fuzzMaxFile, enough for the seeds), then records of uint16 sector index, uint16 length and
// that many bytes placed at sector*4 KiB. Every input byte still lands in
// the file; only runs of zeros are implied.
const fuzzMaxFile = 8 * mib

func encodeSparse(img []byte) []byte {
	out := binary.LittleEndian.AppendUint32(nil, uint32((len(img)+4095)/4096))
	for sec := 0; sec*4096 < len(img); sec++ {
		b := img[sec*4096 : min(len(img), (sec+1)*4096)]
		b = bytes.TrimRight(b, "\x00")
		if len(b) == 0 {
			continue
		}
		out = binary.LittleEndian.AppendUint16(out, uint16(sec))
		out = binary.LittleEndian.AppendUint16(out, uint16(len(b)))
		out = append(out, b...)
	}
	return out
}

func decodeSparse(in []byte) []byte {
	if len(in) < 4 {
		return in
	}
	size := min(uint64(binary.LittleEndian.Uint32(in))*4096, fuzzMaxFile)
	img := make([]byte, size)
	in = in[4:]
	for len(in) >= 4 {
		off := uint64(binary.LittleEndian.Uint16(in)) * 4096
		n := int(binary.LittleEndian.Uint16(in[2:]))
		in = in[4:]
		n = min(n, len(in))
		if off < size {
			copy(img[off:], in[:n])
		}
		in = in[n:]
	}
	return img
}

func TestSparseFuzzEncodingRoundTrips(t *testing.T) {
	img := make([]byte, 5*mib)
	copy(img[3*mib+100:], "x")
	copy(img[0:], pattern(3, 9000))
	if got := decodeSparse(encodeSparse(img)); !bytes.Equal(got, img) {
		t.Fatal("decodeSparse(encodeSparse(img)) != img")
	}
}

// FuzzOpen feeds arbitrary (sparse-encoded) files to OpenStorage, read-only
// and read-write. Whatever opens must serve reads, a write and Extents
// without panicking; the storage refuses to grow past 16 MiB, so nothing can
// allocate a size taken from the input.
func FuzzOpen(f *testing.F) {
	for _, seed := range [][]byte{
		sampleHead("iotest-dynamic-1G.vhdx", 5*mib),
		sampleHead("iotest-dirtylog-10G-4M.vhdx", 4*mib),
	} {
		if len(seed) > 4*mib+4096 {
			// Keep the first payload block's size but not its 1 MiB of
			// data, which only slows the mutator down.
			clear(seed[4*mib+4096:])
		}
		if seed != nil {
			f.Add(encodeSparse(seed))
		}
	}
	fresh := newMemStorage(nil)
	if err := CreateStorage(fresh, CreateOptions{Size: 64 * mib, BlockSize: mib}); err != nil {
		f.Fatal(err)
	}
	if im, err := OpenStorage(fresh, OpenOptions{}); err == nil {
		im.WriteAt(bytes.Repeat([]byte{0xA5}, 4096), mib-2048)
		im.Close()
	}
	f.Add(encodeSparse(fresh.bytes()))

	// A child over a fixed parent, with PARTIALLY_PRESENT and FULLY_PRESENT
	// blocks and a sector bitmap. Inputs that say HasParent are opened over
	// that parent, so the mutator reaches the locator, the bitmap entries
	// and reads through the chain.
	mc := newMemChain(f, CreateOptions{Size: 64 * mib, BlockSize: mib}, []imageWrite{{0, bytes.Repeat([]byte{0x5A}, 2*mib)}})
	cs := newMemStorage(bytes.Clone(mc.child))
	if child, err := mc.openChild(f, cs, false); err == nil {
		child.WriteAt(bytes.Repeat([]byte{0xC3}, 1024), mib-512)
		child.WriteAt(bytes.Repeat([]byte{0x3C}, mib), 3*mib)
		child.Close()
		f.Add(encodeSparse(cs.bytes()))
	}

	f.Fuzz(func(t *testing.T, in []byte) {
		data := decodeSparse(in)
		for _, ro := range []bool{true, false} {
			s := &memStorage{data: bytes.Clone(data), limit: 2 * fuzzMaxFile}
			im, err := OpenStorage(s, OpenOptions{ReadOnly: ro})
			if errors.Is(err, ErrParentNotFound) {
				s = &memStorage{data: bytes.Clone(data), limit: 2 * fuzzMaxFile}
				im, err = mc.openChild(t, s, ro)
			}
			if err != nil {
				// A file refused as invalid is left exactly as it was,
				// read-write open included (the replay is validated in
				// memory before it is written).
				refused := errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNotVHDX) || errors.Is(err, ErrUnsupported)
				if refused && !bytes.Equal(s.data, data) {
					t.Fatalf("open (read-only %v) refused the image (%v) but modified it", ro, err)
				}
				continue
			}
			lss := int64(im.LogicalSectorSize())
			buf := make([]byte, 2*lss)
			for _, off := range []int64{0, im.Size()/2/lss*lss - lss, im.Size() - 2*lss} {
				if off >= 0 {
					im.ReadAt(buf, off)
				}
			}
			if _, err := im.Extents(); err != nil {
				t.Fatalf("Extents on an open image: %v", err)
			}
			_ = im.Info()
			if !ro {
				im.WriteAt(buf[:lss], 0)
			}
			im.Close()
		}
	})
}
