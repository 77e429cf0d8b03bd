#!/usr/bin/python3
# scripts/libvhdi-read.py — read a VHDX virtual disk through libvhdi (Debian
# python3-libvhdi), an implementation this project did not write. The tests
# use it as an oracle: what we read must equal what libvhdi reads.
#
#   libvhdi-read.py [--parent PARENT]... IMAGE [OFFSET:LENGTH]...
#   libvhdi-read.py --size IMAGE
#
# Writes the requested ranges of IMAGE's virtual disk to stdout, one after
# the other (the whole disk when no range is given). --parent names the
# image's parent, then the parent's parent and so on, for a differencing
# chain: libvhdi does not follow parent locators itself, each layer is
# attached with set_parent(). --size prints the virtual size in bytes.
# Errors go to stderr with status 1.
import sys

import pyvhdi

CHUNK = 16 << 20


def usage():
    sys.stderr.write(
        "usage: libvhdi-read.py [--parent PARENT]... IMAGE [OFFSET:LENGTH]...\n"
        "       libvhdi-read.py --size IMAGE\n"
    )
    sys.exit(2)


def main(argv):
    parents, size_only, rest = [], False, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--parent":
            if i + 1 >= len(argv):
                usage()
            parents.append(argv[i + 1])
            i += 2
            continue
        if a == "--size":
            size_only = True
        else:
            rest.append(a)
        i += 1
    if not rest:
        usage()
    image, ranges = rest[0], rest[1:]

    # Open the chain from the top down, then attach each layer to the one
    # below it, base first (a layer needs its parent attached before reads).
    files = []
    for p in [image] + parents:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for i in range(len(files) - 2, -1, -1):
        files[i].set_parent(files[i + 1])
    top = files[0]
    size = top.get_media_size()
    if size_only:
        print(size)
        return 0

    spans = []
    for r in ranges:
        off, sep, length = r.partition(":")
        if not sep:
            usage()
        spans.append((int(off), int(length)))
    if not spans:
        spans = [(0, size)]

    out = sys.stdout.buffer
    for off, length in spans:
        if off < 0 or length < 0 or off + length > size:
            sys.stderr.write("range %d:%d outside the %d-byte disk\n" % (off, length, size))
            return 1
        end = off + length
        while off < end:
            n = min(CHUNK, end - off)
            b = top.read_buffer_at_offset(n, off)
            if len(b) != n:
                sys.stderr.write("short read at %d: %d of %d bytes\n" % (off, len(b), n))
                return 1
            out.write(b)
            off += n
    out.flush()
    for f in files:
        f.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (IOError, OSError) as e:
        sys.stderr.write("libvhdi: %s\n" % e)
        sys.exit(1)
