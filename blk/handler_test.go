package blk

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"syscall"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
	"golang.org/x/sys/unix"
)

const testDiskSize = 64 << 10 // 128 sectors of 512 bytes, 16 of 4096

type handleCase struct {
	name        string
	logical     uint32 // 0: 512
	trim        bool   // disk has Discard/WriteZeroes
	opts        Options
	diskErr     error
	readable    [][]byte
	writable    []int // lengths of the device-writable buffers
	wantStatus  uint8
	wantWritten uint32
	wantErr     error // errors.Is target for Handler.Err, nil: no error expected
	check       func(t *testing.T, d *memDisk, td *trimDisk, w [][]byte)
}

// inData is the writable bytes before the status byte.
func inData(w [][]byte) []byte {
	b := cat(w...)
	return b[:len(b)-1]
}

func wantDisk(off, n int) func(t *testing.T, d *memDisk, _ *trimDisk, w [][]byte) {
	return func(t *testing.T, d *memDisk, _ *trimDisk, w [][]byte) {
		t.Helper()
		got := inData(w)
		if !bytes.Equal(got[:n], d.data[off:off+n]) {
			t.Errorf("IN data differs from disk bytes %d..%d", off, off+n)
		}
	}
}

func wantWritten(off int, data []byte) func(t *testing.T, d *memDisk, _ *trimDisk, _ [][]byte) {
	return func(t *testing.T, d *memDisk, _ *trimDisk, _ [][]byte) {
		t.Helper()
		if !bytes.Equal(d.data[off:off+len(data)], data) {
			t.Errorf("disk bytes %d..%d do not hold the OUT data", off, off+len(data))
		}
	}
}

func wantUntouched(t *testing.T, d *memDisk, _ *trimDisk, _ [][]byte) {
	t.Helper()
	if !bytes.Equal(d.data, newMemDisk(len(d.data), d.logical).data) {
		t.Error("disk was modified")
	}
}

func wantID(id string) func(t *testing.T, _ *memDisk, _ *trimDisk, w [][]byte) {
	return func(t *testing.T, _ *memDisk, _ *trimDisk, w [][]byte) {
		t.Helper()
		if got := inData(w); string(got[:len(id)]) != id {
			t.Errorf("GET_ID data = %q, want prefix %q", got, id)
		}
	}
}

func wantCalls(calls ...string) func(t *testing.T, _ *memDisk, td *trimDisk, _ [][]byte) {
	return func(t *testing.T, _ *memDisk, td *trimDisk, _ [][]byte) {
		t.Helper()
		if fmt.Sprint(td.calls) != fmt.Sprint(calls) {
			t.Errorf("disk calls = %q, want %q", td.calls, calls)
		}
	}
}

func wantCallCount(n int) func(t *testing.T, _ *memDisk, td *trimDisk, _ [][]byte) {
	return func(t *testing.T, _ *memDisk, td *trimDisk, _ [][]byte) {
		t.Helper()
		if len(td.calls) != n {
			t.Errorf("%d disk calls, want %d", len(td.calls), n)
		}
	}
}

func runHandleCases(t *testing.T, cases []handleCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			logical := tc.logical
			if logical == 0 {
				logical = 512
			}
			d := newMemDisk(testDiskSize, logical)
			d.ioErr = tc.diskErr
			var disk Disk = d
			td := &trimDisk{memDisk: d}
			if tc.trim {
				disk = td
			}
			w := make([][]byte, len(tc.writable))
			for i, n := range tc.writable {
				w[i] = bytes.Repeat([]byte{0xEE}, n)
			}
			h := NewHandler(disk, tc.opts)
			written := h.Handle(tc.readable, w)
			if written != tc.wantWritten {
				t.Errorf("written = %d, want %d (err %v)", written, tc.wantWritten, h.Err())
			}
			if tc.wantErr != nil && !errors.Is(h.Err(), tc.wantErr) {
				t.Errorf("Err() = %v, want %v", h.Err(), tc.wantErr)
			}
			if tc.wantErr == nil && tc.wantStatus == StatusOK && h.Err() != nil {
				t.Errorf("Err() = %v, want nil", h.Err())
			}
			if written > 0 {
				all := cat(w...)
				if got := all[len(all)-1]; got != tc.wantStatus {
					t.Errorf("status = %d, want %d (err %v)", got, tc.wantStatus, h.Err())
				}
			}
			if d.violations != 0 {
				t.Errorf("handler passed %d unchecked accesses to the disk", d.violations)
			}
			if tc.check != nil {
				tc.check(t, d, td, w)
			}
		})
	}
}

func TestHandleTransfersDataForAnyBufferLayout(t *testing.T) {
	out := pattern(1024, 3)
	runHandleCases(t, []handleCase{
		{
			name:       "IN with data and status in separate buffers",
			readable:   [][]byte{hdr(TypeIn, 2)},
			writable:   []int{1024, 1},
			wantStatus: StatusOK, wantWritten: 1025,
			check: wantDisk(1024, 1024),
		},
		{
			name:       "IN with the status sharing the last data buffer",
			readable:   [][]byte{hdr(TypeIn, 2)},
			writable:   []int{512, 513},
			wantStatus: StatusOK, wantWritten: 1025,
			check: wantDisk(1024, 1024),
		},
		{
			name:       "IN with empty buffers interleaved and a trailing empty buffer",
			readable:   [][]byte{{}, hdr(TypeIn, 0), {}},
			writable:   []int{0, 300, 0, 212, 1, 0},
			wantStatus: StatusOK, wantWritten: 513,
			check: wantDisk(0, 512),
		},
		{
			name:       "IN with the header split across three buffers",
			readable:   split(hdr(TypeIn, 4), 1, 9),
			writable:   []int{513},
			wantStatus: StatusOK, wantWritten: 513,
			check: wantDisk(2048, 512),
		},
		{
			name:       "IN of the last sector of the disk",
			readable:   [][]byte{hdr(TypeIn, testDiskSize/512-1)},
			writable:   []int{512, 1},
			wantStatus: StatusOK, wantWritten: 513,
			check: wantDisk(testDiskSize-512, 512),
		},
		{
			name:       "IN of zero bytes at the end of the disk",
			readable:   [][]byte{hdr(TypeIn, testDiskSize/512)},
			writable:   []int{1},
			wantStatus: StatusOK, wantWritten: 1,
		},
		{
			name:       "OUT with header and data in one buffer (QEMU qtest layout)",
			readable:   [][]byte{cat(hdr(TypeOut, 8), out[:512])},
			writable:   []int{1},
			wantStatus: StatusOK, wantWritten: 1,
			check: wantWritten(4096, out[:512]),
		},
		{
			name:       "OUT with data split mid-header and mid-sector",
			readable:   split(cat(hdr(TypeOut, 1), out), 10, 100, 700),
			writable:   []int{1},
			wantStatus: StatusOK, wantWritten: 1,
			check: wantWritten(512, out),
		},
		{
			name:       "IN on a 4096-byte-sector disk at an aligned sector",
			logical:    4096,
			readable:   [][]byte{hdr(TypeIn, 8)},
			writable:   []int{4096, 1},
			wantStatus: StatusOK, wantWritten: 4097,
			check: wantDisk(4096, 4096),
		},
		{
			name:       "OUT on a 4096-byte-sector disk at an aligned sector",
			logical:    4096,
			readable:   [][]byte{hdr(TypeOut, 16), pattern(4096, 9)},
			writable:   []int{1},
			wantStatus: StatusOK, wantWritten: 1,
			check: wantWritten(8192, pattern(4096, 9)),
		},
	})
}

func TestHandleRejectsBadRangesWithIOERRAndTouchesNothing(t *testing.T) {
	capacity := uint64(testDiskSize / 512)
	runHandleCases(t, []handleCase{
		{name: "IN starting at capacity", readable: [][]byte{hdr(TypeIn, capacity)}, writable: []int{513},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange},
		{name: "IN crossing the end of the disk", readable: [][]byte{hdr(TypeIn, capacity-1)}, writable: []int{1024, 1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange},
		{name: "OUT crossing the end of the disk", readable: [][]byte{hdr(TypeOut, capacity-1), make([]byte, 1024)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange, check: wantUntouched},
		{name: "IN at sector 2^64-1", readable: [][]byte{hdr(TypeIn, math.MaxUint64)}, writable: []int{513},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange},
		{name: "IN at a sector whose byte offset wraps 2^64", readable: [][]byte{hdr(TypeIn, 1<<55)}, writable: []int{513},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange},
		{name: "OUT at a sector whose byte offset wraps to 0", readable: [][]byte{hdr(TypeOut, 1<<55), make([]byte, 512)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange, check: wantUntouched},
		{name: "IN of a length that is not a multiple of 512", readable: [][]byte{hdr(TypeIn, 0)}, writable: []int{101},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest},
		{name: "OUT of a length that is not a multiple of 512", readable: [][]byte{hdr(TypeOut, 0), make([]byte, 600)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantUntouched},
		{name: "IN at a sector unaligned to 4096 on a 4096-byte-sector disk", logical: 4096,
			readable: [][]byte{hdr(TypeIn, 1)}, writable: []int{4097},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest},
		{name: "OUT of 512 bytes on a 4096-byte-sector disk", logical: 4096,
			readable: [][]byte{hdr(TypeOut, 8), make([]byte, 512)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantUntouched},
	})
}

func TestHandleRejectsMalformedRequests(t *testing.T) {
	runHandleCases(t, []handleCase{
		{name: "readable part shorter than the 16-byte header fails with IOERR",
			readable: [][]byte{hdr(TypeIn, 0)[:15]}, writable: []int{513},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest},
		{name: "no readable buffer at all fails with IOERR",
			writable:   []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest},
		{name: "no writable buffer cannot carry a status and writes nothing",
			readable:    [][]byte{hdr(TypeFlush, 0)},
			wantWritten: 0, wantErr: ErrBadRequest},
		{name: "only empty writable buffers cannot carry a status",
			readable: [][]byte{hdr(TypeIn, 0)}, writable: []int{0, 0},
			wantWritten: 0, wantErr: ErrBadRequest},
		{name: "IN request with its data in a device-readable buffer fails with IOERR",
			readable: [][]byte{hdr(TypeIn, 0), make([]byte, 512)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest},
		{name: "OUT request with device-writable data fails with IOERR",
			readable: [][]byte{hdr(TypeOut, 0), pattern(512, 1)}, writable: []int{512, 1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantUntouched},
		{name: "unknown request type is UNSUPP",
			readable: [][]byte{hdr(0x7fff, 0)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported},
		{name: "legacy SCSI command is UNSUPP",
			readable: [][]byte{hdr(2, 0)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported},
	})
}

func TestHandleReadOnlyDevice(t *testing.T) {
	ro := Options{ReadOnly: true}
	runHandleCases(t, []handleCase{
		{name: "OUT fails with IOERR and writes nothing", opts: ro,
			readable: [][]byte{hdr(TypeOut, 0), pattern(512, 5)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrReadOnly, check: wantUntouched},
		{name: "IN still works", opts: ro,
			readable: [][]byte{hdr(TypeIn, 0)}, writable: []int{512, 1},
			wantStatus: StatusOK, wantWritten: 513, check: wantDisk(0, 512)},
		{name: "FLUSH succeeds without touching the disk", opts: ro,
			readable: [][]byte{hdr(TypeFlush, 0)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1,
			check: func(t *testing.T, d *memDisk, _ *trimDisk, _ [][]byte) {
				if d.flushes != 0 {
					t.Errorf("flushes = %d, want 0", d.flushes)
				}
			}},
		{name: "WRITE_ZEROES fails with IOERR even when the disk could do it", opts: ro, trim: true,
			readable: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 1, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrReadOnly, check: wantCalls()},
	})
}

func TestHandleFlushAndDiskErrors(t *testing.T) {
	runHandleCases(t, []handleCase{
		{name: "FLUSH makes the disk durable",
			readable: [][]byte{hdr(TypeFlush, 0)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1,
			check: func(t *testing.T, d *memDisk, _ *trimDisk, _ [][]byte) {
				if d.flushes != 1 {
					t.Errorf("flushes = %d, want 1", d.flushes)
				}
			}},
		{name: "failed FLUSH is IOERR", diskErr: errDisk,
			readable: [][]byte{hdr(TypeFlush, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: errDisk},
		{name: "failed read is IOERR and reports only the status byte", diskErr: errDisk,
			readable: [][]byte{hdr(TypeIn, 0)}, writable: []int{513},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: errDisk},
		{name: "read hitting an unsupported image feature is UNSUPP", diskErr: vhdx.ErrUnsupported,
			readable: [][]byte{hdr(TypeIn, 0)}, writable: []int{513},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: vhdx.ErrUnsupported},
		{name: "write to a corrupt image is IOERR", diskErr: vhdx.ErrCorrupt,
			readable: [][]byte{hdr(TypeOut, 0), make([]byte, 512)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: vhdx.ErrCorrupt},
	})
}

func TestHandleGetID(t *testing.T) {
	serial := Options{Serial: "vhdx-serial"}
	runHandleCases(t, []handleCase{
		{name: "20-byte buffer gets the serial NUL padded", opts: serial,
			readable: [][]byte{hdr(TypeGetID, 0)}, writable: []int{20, 1},
			wantStatus: StatusOK, wantWritten: 21,
			check: wantID("vhdx-serial\x00\x00\x00\x00\x00\x00\x00\x00\x00")},
		{name: "short buffer gets a truncated serial", opts: serial,
			readable: [][]byte{hdr(TypeGetID, 0)}, writable: []int{4, 1},
			wantStatus: StatusOK, wantWritten: 5, check: wantID("vhdx")},
		{name: "buffer longer than 20 bytes gets exactly 20", opts: serial,
			readable: [][]byte{hdr(TypeGetID, 0)}, writable: []int{512, 1},
			wantStatus: StatusOK, wantWritten: 21,
			check: func(t *testing.T, _ *memDisk, _ *trimDisk, w [][]byte) {
				if got := inData(w)[20]; got != 0xEE {
					t.Errorf("byte 20 overwritten with %#x", got)
				}
			}},
		{name: "20-byte serial is not NUL terminated", opts: Options{Serial: "0123456789abcdefghijKLMN"},
			readable: [][]byte{hdr(TypeGetID, 0)}, writable: []int{7, 14},
			wantStatus: StatusOK, wantWritten: 21, check: wantID("0123456789abcdefghij")},
		{name: "no data buffer writes only the status",
			readable: [][]byte{hdr(TypeGetID, 0)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1},
	})
}

func TestHandleDiscardAndWriteZeroes(t *testing.T) {
	runHandleCases(t, []handleCase{
		{name: "DISCARD without a Discard method is UNSUPP",
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, 0)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported},
		{name: "WRITE_ZEROES without a WriteZeroes method is UNSUPP",
			readable: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 8, 0)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported},
		{name: "DISCARD reaches the disk in bytes", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(8, 16, 0)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCalls("discard 4096+8192")},
		{name: "DISCARD segment split across buffers", trim: true,
			readable: split(cat(hdr(TypeDiscard, 0), seg(8, 16, 0)), 20, 27), writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCalls("discard 4096+8192")},
		{name: "DISCARD with UNMAP is UNSUPP", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, 8, segFlagUnmap)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported, check: wantCalls()},
		{name: "WRITE_ZEROES passes UNMAP on", trim: true,
			readable: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 1, segFlagUnmap)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCalls("zeroes 0+512 unmap=true")},
		{name: "unknown segment flag is UNSUPP", trim: true,
			readable: [][]byte{hdr(TypeWriteZeroes, 0), seg(0, 1, 2)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported, check: wantCalls()},
		{name: "two segments reach the disk in order", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, 1, 0), seg(8, 1, 0)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCalls("discard 0+512", "discard 4096+512")},
		{name: "segments split anywhere across buffers", trim: true,
			readable: split(cat(hdr(TypeWriteZeroes, 0), seg(0, 1, 1), seg(8, 2, 0)), 17, 31, 33), writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCalls("zeroes 0+512 unmap=true", "zeroes 4096+1024 unmap=false")},
		{name: "256 segments are accepted", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), bytes.Repeat(seg(0, 1, 0), 256)}, writable: []int{1},
			wantStatus: StatusOK, wantWritten: 1, check: wantCallCount(256)},
		{name: "257 segments are UNSUPP (max_discard_seg is 256)", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), bytes.Repeat(seg(0, 1, 0), 257)}, writable: []int{1},
			wantStatus: StatusUnsupp, wantWritten: 1, wantErr: ErrUnsupported, check: wantCalls()},
		{name: "a bad second segment executes nothing", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, 1, 0), seg(testDiskSize/512, 1, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange, check: wantCalls()},
		{name: "no segment is IOERR", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantCalls()},
		{name: "a range over the advertised sectors is IOERR", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, maxTrimSectors+8, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantCalls()},
		{name: "truncated segment is IOERR", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(0, 1, 0)[:15]}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantCalls()},
		{name: "segment beyond the end of the disk is IOERR", trim: true,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(testDiskSize/512-1, 2, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrOutOfRange, check: wantCalls()},
		{name: "segment at sector 2^64-1 is IOERR", trim: true,
			readable: [][]byte{hdr(TypeWriteZeroes, 0), seg(math.MaxUint64, math.MaxUint32, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, check: wantCalls()},
		{name: "segment unaligned on a 4096-byte-sector disk is IOERR", trim: true, logical: 4096,
			readable: [][]byte{hdr(TypeDiscard, 0), seg(1, 8, 0)}, writable: []int{1},
			wantStatus: StatusIOErr, wantWritten: 1, wantErr: ErrBadRequest, check: wantCalls()},
	})
}

func TestStatusMapsErrorsToVirtioStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint8
	}{
		{nil, StatusOK},
		{ErrUnsupported, StatusUnsupp},
		{fmt.Errorf("ctx: %w", vhdx.ErrUnsupported), StatusUnsupp},
		{ErrOutOfRange, StatusIOErr},
		{ErrReadOnly, StatusIOErr},
		{ErrBadRequest, StatusIOErr},
		{vhdx.ErrCorrupt, StatusIOErr},
		{errDisk, StatusIOErr},
		// A full host disk is an I/O error to the guest (QEMU's
		// werror=report); only --on-enospc wait holds the request.
		{fmt.Errorf("ctx: %w: %w", vhdx.ErrNoSpace, syscall.ENOSPC), StatusIOErr},
		// Host I/O errors as vhdx returns them (package doc, "Host I/O
		// errors"): a failed pread/pwrite, a failed flush, a journal that
		// went offline.
		{fmt.Errorf("read payload at offset 0x100000: %w", &os.PathError{Op: "read", Path: "img", Err: unix.EIO}), StatusIOErr},
		{fmt.Errorf("flush: an earlier sync failed ...: %w", fmt.Errorf("fdatasync: %w", unix.EIO)), StatusIOErr},
		{fmt.Errorf("log: journal offline: %w", vhdx.ErrCorrupt), StatusIOErr},
	} {
		if got := Status(tc.err); got != tc.want {
			t.Errorf("Status(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestHandleDoesNotAllocateInSteadyState(t *testing.T) {
	d := newMemDisk(testDiskSize, 512)
	h := NewHandler(d, Options{Serial: "x"})
	inHdr, outReq := hdr(TypeIn, 8), split(cat(hdr(TypeOut, 8), pattern(4096, 1)), 8, 16, 2000)
	data := [][]byte{make([]byte, 1024), make([]byte, 3072), make([]byte, 1)}
	status := [][]byte{make([]byte, 1)}
	for _, tc := range []struct {
		name               string
		readable, writable [][]byte
	}{
		{"IN", [][]byte{inHdr}, data},
		{"OUT", outReq, status},
		{"FLUSH", [][]byte{hdr(TypeFlush, 0)}, status},
		{"GET_ID", [][]byte{hdr(TypeGetID, 0)}, data},
	} {
		h.Handle(tc.readable, tc.writable) // grow the scratch list once
		allocs := testing.AllocsPerRun(100, func() {
			if h.Handle(tc.readable, tc.writable) == 0 || h.Err() != nil {
				t.Fatalf("%s failed: %v", tc.name, h.Err())
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per Handle, want 0", tc.name, allocs)
		}
	}
}

func BenchmarkHandleRead4K(b *testing.B) {
	d := newMemDisk(1<<20, 512)
	h := NewHandler(d, Options{})
	readable := [][]byte{hdr(TypeIn, 64)}
	writable := [][]byte{make([]byte, 4096), make([]byte, 1)}
	b.ReportAllocs()
	b.SetBytes(4096)
	for b.Loop() {
		if h.Handle(readable, writable) != 4097 {
			b.Fatal(h.Err())
		}
	}
}
