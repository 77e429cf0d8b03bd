# vhost-vhdx — build, test and try out the daemon.
#
#   make build   bin/vhost-vhdx
#   make test    everything CI runs: installs the QEMU test assets, go vet,
#                gofmt check, go test -race, a short fuzz smoke, the QEMU tests
#   make run     serve ./disk.vhdx on /tmp/vhdx.sock and print the QEMU command
#   make guest   boot a small Linux guest with a shell against make run
#   make fuzz    every Fuzz target for FUZZTIME (default 60s) each
#   make bench   vhost-vhdx serve against qemu-storage-daemon; writes
#                docs/benchmarks/README.md (a few minutes; not part of test)
#   make install bin/vhost-vhdx, the vhost-user backend JSON and the systemd
#                units under PREFIX (default /usr/local), DESTDIR for staging
#   make clean   remove build and test outputs (make distclean: also .cache/)

SHELL := /bin/bash

# A fresh machine has Go in /usr/local/go/bin but not always on PATH.
ifeq ($(shell command -v go 2>/dev/null),)
export PATH := /usr/local/go/bin:$(PATH)
endif

GO ?= go
BIN := bin/vhost-vhdx
# What version and the creator string of new images say; without git (a
# source archive) the binary falls back to Go's build information.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null)
SOCKET ?= /tmp/vhdx.sock
IMAGE ?= disk.vhdx
SIZE ?= 10G
FUZZTIME ?= 60s
FUZZ_SMOKE_TIME ?= 5s
# QEMU tests: which backend serves the guests (vhost-vhdx or qsd, i.e.
# qemu-storage-daemon, which checks the harness itself).
QEMU_BACKEND ?= vhost-vhdx
QEMU_TEST_TIMEOUT ?= 30m
# go test's default of 10 minutes per package is too short for vhdx under
# -race on a loaded 2-core machine (its oracle, chain and crash tests).
UNIT_TEST_TIMEOUT ?= 30m

.PHONY: install uninstall all build test vet fmt-check unsafe-check unit fuzz-smoke qemu-assets test-qemu test-qemu-qsd run guest fuzz bench clean distclean

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/vhost-vhdx

# The order puts the cheap checks first; the QEMU tests need bin/vhost-vhdx.
test: qemu-assets vet fmt-check unsafe-check unit fuzz-smoke build test-qemu

vet:
	$(GO) vet ./...

# unsafe lives only in *_unsafe.go files (tests excepted), so every use can
# be found with one glob and reviewed. The pattern matches import lines
# (import "unsafe", a "unsafe" line of an import block, with or without a
# name), not the word in a string or comment (rebase --unsafe).
unsafe-check:
	@out=$$(grep -lE '^[[:space:]]*(import[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*[[:space:]]+)?"unsafe"[[:space:]]*$$' $$(find . -name '*.go' -not -name '*_unsafe.go' -not -name '*_test.go' -not -path './.git/*' -not -path './.cache/*')); \
	if [ -n "$$out" ]; then echo "package unsafe imported outside *_unsafe.go:"; echo "$$out"; exit 1; fi

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.git/*' -not -path './.cache/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

# qemu-assets has installed qemu-img, qemu-io, cpio, libvhdi and 7-Zip: a
# test that needs one of them fails here instead of skipping
# (VHOST_VHDX_REQUIRE_TOOLS). The QEMU tests run in test-qemu, after the build.
unit: qemu-assets
	VHOST_VHDX_QEMU_TESTS= VHOST_VHDX_REQUIRE_TOOLS=1 $(GO) test -race -count=1 -timeout $(UNIT_TEST_TIMEOUT) ./...

# fuzz_selftest.sh checks fuzz.sh's verdicts (pass, Go's shutdown race,
# a real failure) with a stand-in for go.
fuzz-smoke:
	scripts/fuzz_selftest.sh
	GO=$(GO) scripts/fuzz.sh $(FUZZ_SMOKE_TIME)

# Installs qemu, busybox, kmod, e2fsprogs ... when missing (apt-get) and
# builds the guest kernel and initramfs into .cache/qemu-assets.
qemu-assets:
	bash tests/qemu/setup.sh

# Real guests against bin/vhost-vhdx, and vhostuser's firmware test (QEMU's
# SeaBIOS reads a boot sector through the ring; it needs no guest kernel).
test-qemu: qemu-assets
	VHOST_VHDX_QEMU_TESTS=1 VHOST_VHDX_TEST_BACKEND=$(QEMU_BACKEND) \
		$(GO) test -race -count=1 -timeout $(QEMU_TEST_TIMEOUT) -v ./tests/qemu/
	VHOST_VHDX_QEMU_TESTS=1 $(GO) test -race -count=1 -v -run '^TestQEMU' ./vhostuser/

# The same guests against qemu-storage-daemon: proves the harness, not our code.
test-qemu-qsd:
	$(MAKE) test-qemu QEMU_BACKEND=qsd

# The QEMU options that attach a guest to the daemon: guest RAM shared
# through memfd (its size must match -m), the socket, the device.
GUEST_MEM ?= 512M
ASSETS ?= .cache/qemu-assets
QEMU_ATTACH = -object memory-backend-memfd,id=mem,size=$(GUEST_MEM),share=on -numa node,memdev=mem \
	-chardev socket,id=c0,path=$(SOCKET) -device vhost-user-blk-pci,chardev=c0
# TCG works everywhere and boots this small guest in seconds; ACCEL=kvm on a
# host with working KVM.
ACCEL ?= tcg
QEMU_GUEST = qemu-system-x86_64 -accel $(ACCEL) -m $(GUEST_MEM) $(QEMU_ATTACH) \
	-kernel $(ASSETS)/vmlinuz -initrd $(ASSETS)/initramfs.cpio.gz \
	-append "console=ttyS0 quiet no_timer_check vhostvhdx.shell" -nographic -no-reboot

run: build
	@test -e $(IMAGE) || $(BIN) create --size $(SIZE) $(IMAGE)
	@echo "Serving $(IMAGE) on $(SOCKET). In another terminal, attach a guest."
	@echo
	@echo "A small ready-made Linux guest with a shell (the disk is /dev/vda):"
	@echo "  make guest"
	@echo "which installs QEMU and a Debian kernel if needed, then runs:"
	@echo '  $(QEMU_GUEST)'
	@echo
	@echo "Or your own guest: add these options to its QEMU command line (-m must be $(GUEST_MEM)):"
	@echo '  $(QEMU_ATTACH)'
	@echo
	@# exec: make's SIGTERM reaches the daemon. --stop-with-parent: GNU make
	@# keeps a SIGINT sent to make alone and waits for the recipe; the daemon
	@# sees make stop catching it and stops (cmd/vhost-vhdx/serve_parent.go).
	exec $(BIN) serve --stop-with-parent --socket $(SOCKET) $(IMAGE)

# Boots the test kernel and initramfs with an interactive shell against a
# running `make run` (or any vhost-user-blk backend on $(SOCKET)).
guest: qemu-assets
	@test -S $(SOCKET) || { echo "no backend listening on $(SOCKET): start 'make run' first"; exit 1; }
	$(QEMU_GUEST)

fuzz:
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME)

# Load generator runs against both back-ends: see scripts/bench.sh for
# RUNS, RUNTIME, SWEEP_RUNTIME, BENCH_DIR and OUT.
# qemu-assets installs qemu-storage-daemon and qemu-img (the comparison and
# the image tools) on a fresh machine.
bench: qemu-assets
	scripts/bench.sh

# Install layout (GNU conventions; DESTDIR stages into a tree for packaging).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
DOCDIR ?= $(DATADIR)/doc/vhost-vhdx
SYSCONFDIR ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
# The vhost-user backend description QEMU's docs/interop/vhost-user.json
# defines, looked up by management software in share/qemu/vhost-user/.
VHOSTUSERDIR ?= $(DATADIR)/qemu/vhost-user
INSTALL ?= install
SUBST = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
	-e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@SYSUSERSDIR@|$(SYSUSERSDIR)|g'

install: build
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(VHOSTUSERDIR) $(DESTDIR)$(SYSTEMDUNITDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/vhost-vhdx
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/vhost-vhdx
	$(SUBST) dist/qemu/50-vhost-vhdx.json >$(DESTDIR)$(VHOSTUSERDIR)/50-vhost-vhdx.json
	$(SUBST) dist/systemd/vhost-vhdx@.service >'$(DESTDIR)$(SYSTEMDUNITDIR)/vhost-vhdx@.service'
	$(SUBST) dist/systemd/vhost-vhdx@.socket >'$(DESTDIR)$(SYSTEMDUNITDIR)/vhost-vhdx@.socket'
	chmod 0644 $(DESTDIR)$(VHOSTUSERDIR)/50-vhost-vhdx.json '$(DESTDIR)$(SYSTEMDUNITDIR)'/vhost-vhdx@.*
	$(INSTALL) -m 0644 dist/sysusers.d/vhost-vhdx.conf $(DESTDIR)$(SYSUSERSDIR)/vhost-vhdx.conf
	$(INSTALL) -m 0644 dist/vhost-vhdx.conf.example $(DESTDIR)$(SYSCONFDIR)/vhost-vhdx/NAME.conf.example
	$(INSTALL) -m 0644 README.md LICENSE $(DESTDIR)$(DOCDIR)/
	@echo
	@echo "Installed. To run disk NAME as a service (see README.md, 'Running as a service'):"
	@echo "  systemd-sysusers && systemctl daemon-reload"
	@echo "  cp $(SYSCONFDIR)/vhost-vhdx/NAME.conf.example $(SYSCONFDIR)/vhost-vhdx/NAME.conf   # set IMAGE"
	@echo "  systemctl enable --now vhost-vhdx@NAME.socket"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vhost-vhdx $(DESTDIR)$(VHOSTUSERDIR)/50-vhost-vhdx.json \
		'$(DESTDIR)$(SYSTEMDUNITDIR)/vhost-vhdx@.service' '$(DESTDIR)$(SYSTEMDUNITDIR)/vhost-vhdx@.socket' \
		$(DESTDIR)$(SYSUSERSDIR)/vhost-vhdx.conf $(DESTDIR)$(SYSCONFDIR)/vhost-vhdx/NAME.conf.example
	rm -rf $(DESTDIR)$(DOCDIR)

clean:
	rm -rf bin/ *.test *.out *.prof
	$(GO) clean -testcache

distclean: clean
	rm -rf .cache/
