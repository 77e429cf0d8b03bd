package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"strings"

	"github.com/google/uuid"

	"github.com/vhost-vhdx/vhost-vhdx/vhdx"
)

const createUsage = `Usage: vhost-vhdx create --size SIZE [OPTIONS] IMAGE
       vhost-vhdx create --parent PARENT [OPTIONS] CHILD

Create a new VHDX image. IMAGE must not exist.

With --parent, create a differencing image (a Hyper-V checkpoint, AVHDX)
over PARENT: CHILD reads what PARENT reads until written; writes go to
CHILD only. Size, block size, sector sizes and disk ID default to the
parent's (a different size or sector size is refused). The parent locator
holds the path relative to CHILD's directory (what Hyper-V, libvhdi and
7-Zip follow) and the absolute path; writing to PARENT afterwards breaks
the link (its DataWriteGuid changes).

Options:
  --size SIZE             virtual disk size (required without --parent),
                          e.g. 10G; a multiple of the logical sector size
  --parent PARENT         make a differencing child of PARENT
` + createOptionsUsage

const createOptionsUsage = `  --type dynamic|fixed    dynamic allocates blocks on first write (default);
                          fixed allocates the whole disk up front and keeps it
  --preallocation off|falloc|full
                          off: space on first write; falloc: every block
                          mapped and its space reserved (fallocate), the
                          default for fixed; full: also written with zeros.
                          A preallocated dynamic image still gives space
                          back on discard; a fixed one never does
  --block-size SIZE       payload block size, a power of two from 1M to 256M
                          (default: 8M up to 1 GiB, 16M below 100 GiB, else 32M)
  --log-size SIZE         metadata log size, a multiple of 1M (default 1M)
  --logical-sector 512|4096   sector size the guest sees (default 512)
  --physical-sector 512|4096  physical sector size reported (default 4096)
  --disk-id UUID          the disk's page 83 identifier (default: random)
`

// createFlags are the image layout options shared by create and convert.
type createFlags struct {
	typ            string
	prealloc       string
	blockSize      sizeFlag
	logSize        sizeFlag
	logicalSector  uint
	physicalSector uint
	diskID         string
}

func addCreateFlags(fs *flag.FlagSet) *createFlags {
	c := &createFlags{}
	fs.StringVar(&c.typ, "type", "dynamic", "")
	fs.StringVar(&c.prealloc, "preallocation", "", "")
	fs.Var(&c.blockSize, "block-size", "")
	fs.Var(&c.logSize, "log-size", "")
	fs.UintVar(&c.logicalSector, "logical-sector", 0, "")
	fs.UintVar(&c.physicalSector, "physical-sector", 0, "")
	fs.StringVar(&c.diskID, "disk-id", "", "")
	return c
}

// isCreateFlag tells convert which flags only make sense for a VHDX target.
func isCreateFlag(name string) bool {
	switch name {
	case "type", "preallocation", "block-size", "log-size", "logical-sector", "physical-sector", "disk-id":
		return true
	}
	return false
}

// options validates what the command line can check (so that a typo is a
// usage error, exit status 2) and leaves layout rules to vhdx.
func (c *createFlags) options(cmd string) (vhdx.CreateOptions, error) {
	o := vhdx.CreateOptions{Creator: prog + " " + versionString()}
	switch c.typ {
	case "dynamic":
		o.Type = vhdx.Dynamic
	case "fixed":
		o.Type = vhdx.Fixed
	default:
		return o, usagef(cmd, "--type %q: want dynamic or fixed", c.typ)
	}
	if c.prealloc != "" {
		p, err := vhdx.ParsePreallocation(c.prealloc)
		if err != nil {
			return o, usagef(cmd, "--preallocation %q: want off, falloc or full", c.prealloc)
		}
		o.Preallocation = p
	}
	if c.blockSize.set {
		if c.blockSize.v > 1<<32-1 {
			return o, usagef(cmd, "--block-size %d: too large", c.blockSize.v)
		}
		o.BlockSize = uint32(c.blockSize.v)
	}
	if c.logSize.set {
		if c.logSize.v > 1<<32-1 {
			return o, usagef(cmd, "--log-size %d: too large", c.logSize.v)
		}
		o.LogSize = uint32(c.logSize.v)
	}
	for _, s := range []struct {
		name string
		v    uint
		dst  *uint32
	}{{"logical-sector", c.logicalSector, &o.LogicalSectorSize}, {"physical-sector", c.physicalSector, &o.PhysicalSectorSize}} {
		switch s.v {
		case 0, 512, 4096:
			*s.dst = uint32(s.v)
		default:
			return o, usagef(cmd, "--%s %d: want 512 or 4096", s.name, s.v)
		}
	}
	if c.diskID != "" {
		id, err := uuid.Parse(c.diskID)
		if err != nil {
			return o, usagef(cmd, "--disk-id %q: not a UUID", c.diskID)
		}
		o.DiskID = id
	}
	return o, nil
}

func runCreate(args []string, stdout, _ io.Writer) error {
	fs := newFlagSet("create")
	var size sizeFlag
	fs.Var(&size, "size", "")
	var parent string
	fs.StringVar(&parent, "parent", "", "")
	cf := addCreateFlags(fs)
	pos, err := parseArgs(fs, args, createUsage, stdout, 1, 1)
	if err != nil {
		return err
	}
	if !size.set && parent == "" {
		return usagef("create", "--size is required")
	}
	o, err := cf.options("create")
	if err != nil {
		return err
	}
	if parent != "" && cf.typ == "fixed" {
		return usagef("create", "--parent: a differencing image cannot be --type fixed")
	}
	if parent != "" && cf.prealloc != "" && cf.prealloc != "off" {
		return usagef("create", "--parent: a differencing image cannot be preallocated")
	}
	o.Size = size.v
	o.ParentPath = parent
	return createImage(pos[0], o)
}

// createImage wraps vhdx.Create with a message naming the path once.
func createImage(path string, o vhdx.CreateOptions) error {
	if err := vhdx.Create(path, o); err != nil {
		return fmt.Errorf("create %s: %s", path, cause(err, path))
	}
	return nil
}

// cause picks the part of an error worth one line after our own
// "OP PATH: ": for a file system error the bare reason ("file exists"),
// otherwise the error without the path or "OP PATH: " prefix vhdx puts
// first, so the path is named once.
func cause(err error, path string) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	msg := err.Error()
	if i := strings.Index(msg, path+": "); i >= 0 && !strings.Contains(msg[:i], ":") {
		msg = msg[i+len(path)+2:]
	}
	return msg
}
