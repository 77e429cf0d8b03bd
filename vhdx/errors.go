package vhdx

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the package returns wraps exactly one of these
// (test with errors.Is) plus context naming the structure, the rule broken and
// the file offset involved.
var (
	// ErrNotVHDX: the file does not start with the "vhdxfile" identifier.
	ErrNotVHDX = errors.New("vhdx: not a VHDX file")
	// ErrCorrupt: a structure violates MS-VHDX (checksum, signature, overlap,
	// a BAT entry outside the file, ...).
	ErrCorrupt = errors.New("vhdx: image is corrupt")
	// ErrUnsupported: valid per the spec but beyond this implementation
	// (an unknown required region or metadata item, a parent we cannot open).
	ErrUnsupported = errors.New("vhdx: unsupported image feature")
	// ErrDirtyLog: a read-only open found a log that must be replayed.
	ErrDirtyLog = errors.New("vhdx: image has a log that must be replayed")
	// ErrReadOnly: a write or flush on an image opened read-only.
	ErrReadOnly = errors.New("vhdx: image is opened read-only")
	// ErrInUse: another process holds the image open for writing.
	ErrInUse = errors.New("vhdx: image is in use")
	// ErrOutOfRange: I/O beyond the virtual disk size.
	ErrOutOfRange = errors.New("vhdx: access beyond the end of the virtual disk")
	// ErrUnaligned: offset or length not a multiple of the logical sector size.
	ErrUnaligned = errors.New("vhdx: offset or length not aligned to the logical sector size")
	// ErrInvalidArgument: a bad create option or API argument.
	ErrInvalidArgument = errors.New("vhdx: invalid argument")
	// ErrClosed: use of an image after Close.
	ErrClosed = errors.New("vhdx: image is closed")
	// ErrNoSpace: the host file system (or the user's quota) has no room
	// for a block, a bitmap or a write into a hole; the error also wraps the
	// errno (syscall.ENOSPC or EDQUOT). Nothing acknowledged was lost and
	// the request can be retried once space is freed (nospace.go).
	ErrNoSpace = errors.New("vhdx: host file system is full")
)

// Chain errors: a differencing image whose parent cannot be used. Each wraps
// ErrChain too (errors.Is(err, ErrChain) matches them all) and the message
// names the child, the locator paths tried and the GUIDs involved.
var (
	// ErrChain: the backing chain of a differencing image is broken.
	ErrChain = errors.New("vhdx: broken differencing chain")
	// ErrParentNotFound: no locator path names an existing file.
	ErrParentNotFound = fmt.Errorf("parent not found: %w", ErrChain)
	// ErrParentLinkage: the parent's DataWriteGuid matches neither
	// parent_linkage nor parent_linkage2 (it changed after the child was made).
	ErrParentLinkage = fmt.Errorf("parent linkage mismatch: %w", ErrChain)
	// ErrParentGeometry: the parent's virtual size or logical sector size
	// differs from the child's.
	ErrParentGeometry = fmt.Errorf("parent geometry mismatch: %w", ErrChain)
	// ErrChainLoop: a file appears twice in the chain.
	ErrChainLoop = fmt.Errorf("chain loop: %w", ErrChain)
	// ErrChainTooDeep: more than MaxChainDepth parents.
	ErrChainTooDeep = fmt.Errorf("chain too deep: %w", ErrChain)
)

// MaxChainDepth bounds the number of parents below an image.
const MaxChainDepth = 256

// maxChainDepth is MaxChainDepth; tests lower it.
var maxChainDepth = MaxChainDepth
