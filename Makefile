# vhost-vhdx — build, test and try out the daemon.
#
#   make build   bin/vhost-vhdx
#   make test    everything CI runs: installs the QEMU test assets, go vet,
#                gofmt check, go test -race, a short fuzz smoke, the QEMU tests
#   make run     serve ./disk.vhdx on /tmp/vhdx.sock and print the QEMU command
#   make fuzz    every Fuzz target for FUZZTIME (default 60s) each
#   make bench   vhost-vhdx serve against qemu-storage-daemon; writes
#                docs/benchmarks/README.md (a few minutes; not part of test)
#   make clean   remove build and test outputs (make distclean: also .cache/)

SHELL := /bin/bash

# A fresh machine has Go in /usr/local/go/bin but not always on PATH.
ifeq ($(shell command -v go 2>/dev/null),)
export PATH := /usr/local/go/bin:$(PATH)
endif

GO ?= go
BIN := bin/vhost-vhdx
SOCKET ?= /tmp/vhdx.sock
IMAGE ?= disk.vhdx
SIZE ?= 10G
FUZZTIME ?= 60s
FUZZ_SMOKE_TIME ?= 5s
# QEMU tests: which backend serves the guests (vhost-vhdx or qsd, i.e.
# qemu-storage-daemon, which checks the harness itself).
QEMU_BACKEND ?= vhost-vhdx
QEMU_TEST_TIMEOUT ?= 30m

.PHONY: all build test vet fmt-check unit fuzz-smoke qemu-assets test-qemu test-qemu-qsd run fuzz bench clean distclean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/vhost-vhdx

# The order puts the cheap checks first; the QEMU tests need bin/vhost-vhdx.
test: qemu-assets vet fmt-check unit fuzz-smoke build test-qemu

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.git/*' -not -path './.cache/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

unit:
	VHOST_VHDX_QEMU_TESTS= $(GO) test -race -count=1 ./...

fuzz-smoke:
	GO=$(GO) scripts/fuzz.sh $(FUZZ_SMOKE_TIME)

# Installs qemu, busybox, kmod, e2fsprogs ... when missing (apt-get) and
# builds the guest kernel and initramfs into .cache/qemu-assets.
qemu-assets:
	bash tests/qemu/setup.sh

test-qemu: qemu-assets
	VHOST_VHDX_QEMU_TESTS=1 VHOST_VHDX_TEST_BACKEND=$(QEMU_BACKEND) \
		$(GO) test -race -count=1 -timeout $(QEMU_TEST_TIMEOUT) -v ./tests/qemu/

# The same guests against qemu-storage-daemon: proves the harness, not our code.
test-qemu-qsd:
	$(MAKE) test-qemu QEMU_BACKEND=qsd

run: build
	@test -e $(IMAGE) || $(BIN) create --size $(SIZE) $(IMAGE)
	@echo "Serving $(IMAGE) on $(SOCKET). Attach a guest with, for example:"
	@echo
	@echo "  qemu-system-x86_64 -machine accel=kvm:tcg -m 1G \\"
	@echo "    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\"
	@echo "    -chardev socket,id=c0,path=$(SOCKET) -device vhost-user-blk-pci,chardev=c0 \\"
	@echo "    ... your usual boot disk, kernel or installer options ..."
	@echo
	exec $(BIN) serve --socket $(SOCKET) $(IMAGE)

fuzz:
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME)

# Load generator runs against both back-ends: see scripts/bench.sh for
# RUNS, RUNTIME, SWEEP_RUNTIME, BENCH_DIR and OUT.
bench:
	scripts/bench.sh

clean:
	rm -rf bin/ *.test *.out *.prof
	$(GO) clean -testcache

distclean: clean
	rm -rf .cache/
