package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const convertUsage = `Usage: vhost-vhdx convert -O raw|vhdx [-f raw|vhdx] [CREATE OPTIONS] SRC DST

Copy the virtual disk in SRC into a new file DST (which must not exist).
Zero ranges are skipped: a raw DST keeps them as holes, a VHDX DST leaves
their blocks unallocated. The source format is detected from the "vhdxfile"
signature unless -f is given. A raw source is padded with zeros to the
logical sector size of a VHDX target. Progress is shown on stderr when it is
a terminal.

Options:
  -O raw|vhdx     output format (required)
  -f raw|vhdx     input format (default: detect)

Create options (VHDX output only; sector sizes default to the source's when
it is a VHDX image):
` + createOptionsUsage

// convertChunk is the unit of copying and of zero detection. It divides
// every legal VHDX block size (1 MiB..256 MiB), so an all-zero block is
// made of skipped chunks and stays unallocated.
const convertChunk = 1 << 20

func runConvert(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("convert")
	outFmt := fs.String("O", "", "")
	inFmt := fs.String("f", "", "")
	cf := addCreateFlags(fs)
	pos, err := parseArgs(fs, args, convertUsage, stdout, 2, 2)
	if err != nil {
		return err
	}
	switch *outFmt {
	case "raw", "vhdx":
	case "":
		return usagef("convert", "-O raw|vhdx is required")
	default:
		return usagef("convert", "-O %q: want raw or vhdx", *outFmt)
	}
	switch *inFmt {
	case "", "raw", "vhdx":
	default:
		return usagef("convert", "-f %q: want raw or vhdx", *inFmt)
	}
	var vhdxOnly []string
	fs.Visit(func(f *flag.Flag) {
		if isCreateFlag(f.Name) {
			vhdxOnly = append(vhdxOnly, "--"+f.Name)
		}
	})
	if *outFmt == "raw" && len(vhdxOnly) > 0 {
		return usagef("convert", "%s only apply to -O vhdx", vhdxOnly)
	}
	opts, err := cf.options("convert")
	if err != nil {
		return err
	}

	srcPath, dstPath := pos[0], pos[1]
	src, err := openSource(srcPath, *inFmt)
	if err != nil {
		return fmt.Errorf("convert %s: %s", srcPath, cause(err, srcPath))
	}
	defer src.close()

	var dst *sink
	if *outFmt == "raw" {
		dst, err = createRawSink(dstPath, src.size)
	} else {
		if opts.LogicalSectorSize == 0 {
			opts.LogicalSectorSize = src.logical
		}
		if opts.PhysicalSectorSize == 0 {
			opts.PhysicalSectorSize = src.physical
		}
		logical := int64(opts.LogicalSectorSize)
		if logical == 0 {
			logical = 512
		}
		// Round a raw source up to whole logical sectors; the tail
		// reads as zeros.
		size := (src.size + logical - 1) / logical * logical
		if size == 0 {
			return fmt.Errorf("convert %s: source is empty", srcPath)
		}
		opts.Size = uint64(size)
		dst, err = createVHDXSink(dstPath, opts)
	}
	if err != nil {
		return fmt.Errorf("convert %s: %s", dstPath, cause(err, dstPath))
	}
	p := newProgress(stderr, src.size)
	err = copyData(src, dst, p)
	p.finish(err == nil)
	if cerr := dst.close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dstPath) // ours: created with O_EXCL above
		return fmt.Errorf("convert %s to %s: %s", srcPath, dstPath, cause(err, dstPath))
	}
	return nil
}

// span is a byte range [start, end) of the virtual disk.
type span struct{ start, end int64 }

// source is a virtual disk to copy from. Bytes outside data read as zeros.
type source struct {
	r                 io.ReaderAt
	size              int64
	data              []span // sorted, non-overlapping
	logical, physical uint32 // 0 for raw
	close             func() error
}

// vhdxSignature starts every VHDX file (MS-VHDX §2.2.1).
const vhdxSignature = "vhdxfile"

func openSource(path, format string) (*source, error) {
	if format == "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		sig := make([]byte, len(vhdxSignature))
		_, err = io.ReadFull(f, sig)
		f.Close()
		format = "raw"
		if err == nil && string(sig) == vhdxSignature {
			format = "vhdx"
		}
	}
	if format == "vhdx" {
		// A shared lock: a server writing the image makes this fail
		// rather than copy a moving target.
		im, err := vhdx.Open(path, vhdx.OpenOptions{ReadOnly: true})
		if err != nil {
			return nil, err
		}
		exts, err := im.Extents()
		if err != nil {
			im.Close()
			return nil, err
		}
		s := &source{r: im, size: im.Size(), logical: im.LogicalSectorSize(), physical: im.PhysicalSectorSize(), close: im.Close}
		for _, e := range exts {
			if e.Data {
				s.data = append(s.data, span{e.Offset, e.Offset + e.Length})
			}
		}
		return s, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("not a regular file")
	}
	return &source{r: f, size: st.Size(), data: rawDataRanges(f, st.Size()), close: f.Close}, nil
}

// rawDataRanges asks the file system where the data is (lseek SEEK_DATA /
// SEEK_HOLE), so holes of a sparse raw file are never read. Without support
// the whole file is one range; zero detection still skips zero chunks.
func rawDataRanges(f *os.File, size int64) []span {
	fd := int(f.Fd())
	var out []span
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole after off
		}
		if err != nil {
			return []span{{0, size}}
		}
		if d >= size {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil || h > size {
			h = size
		}
		if h <= d {
			return []span{{0, size}}
		}
		out = append(out, span{d, h})
		off = h
	}
	return out
}

// sink is a new file to copy into.
type sink struct {
	w     io.WriterAt
	size  int64
	align int64 // writes are padded with zeros to this length
	close func() error
}

func createRawSink(path string, size int64) (*sink, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	// Truncate leaves the whole file a hole; only data chunks get written.
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return &sink{w: f, size: size, align: 1, close: func() error {
		err := f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}}, nil
}

func createVHDXSink(path string, o vhdx.CreateOptions) (*sink, error) {
	if err := vhdx.Create(path, o); err != nil {
		return nil, err
	}
	im, err := vhdx.Open(path, vhdx.OpenOptions{})
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return &sink{w: im, size: im.Size(), align: int64(im.LogicalSectorSize()), close: im.Close}, nil
}

// copyData copies every non-zero chunk of src's data ranges into dst.
func copyData(src *source, dst *sink, p *progress) error {
	buf := make([]byte, convertChunk)
	zero := make([]byte, convertChunk)
	next := int64(0) // first chunk offset not yet copied
	for _, sp := range src.data {
		start := max(sp.start/convertChunk*convertChunk, next)
		for off := start; off < sp.end && off < src.size; off += convertChunk {
			n := min(convertChunk, src.size-off)
			got, err := src.r.ReadAt(buf[:n], off)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read at %#x: %w", off, err)
			}
			// A raw file shrinking under us reads short: zeros.
			clear(buf[got:])
			w := (n + dst.align - 1) / dst.align * dst.align
			w = min(w, dst.size-off, convertChunk)
			if !bytes.Equal(buf[:w], zero[:w]) {
				if _, err := dst.w.WriteAt(buf[:w], off); err != nil {
					return fmt.Errorf("write at %#x: %w", off, err)
				}
			}
			next = off + convertChunk
			p.update(off + n)
		}
	}
	return nil
}

// progress draws "converting: 42% (1.2 GiB / 3 GiB)" on a terminal, at most
// five times a second; nothing when stderr is not a terminal.
type progress struct {
	verb  string // "converting", "committing"
	w     io.Writer
	total int64
	last  time.Time
	shown bool
}

func newProgress(w io.Writer, total int64) *progress {
	return newProgressFor(w, "converting", total)
}

func newProgressFor(w io.Writer, verb string, total int64) *progress {
	if !isTerminal(w) {
		return &progress{}
	}
	return &progress{verb: verb, w: w, total: total}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func (p *progress) update(done int64) {
	if p.w == nil || p.total <= 0 {
		return
	}
	now := time.Now()
	if now.Sub(p.last) < 200*time.Millisecond {
		return
	}
	p.last = now
	p.shown = true
	fmt.Fprintf(p.w, "\r%s: %3d%% (%s / %s)\x1b[K", p.verb, done*100/p.total, formatSize(uint64(done)), formatSize(uint64(p.total)))
}

func (p *progress) finish(ok bool) {
	if p.w == nil || !p.shown {
		return
	}
	if ok {
		fmt.Fprintf(p.w, "\r%s: 100%% (%s)\x1b[K\n", p.verb, formatSize(uint64(p.total)))
		return
	}
	fmt.Fprint(p.w, "\n")
}
