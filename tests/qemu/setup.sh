#!/usr/bin/env bash
# tests/qemu/setup.sh — prepare everything the QEMU integration tests need.
#
#   1. installs the Debian packages the tests run (qemu-system-x86, qemu-utils,
#      busybox-static, cpio, kmod, e2fsprogs, ..., gcc for go test -race, and
#      the external VHDX readers the tests compare against: python3-libvhdi
#      and 7zip) when any is missing;
#   2. downloads Debian's cloud kernel (the real linux-image-*-cloud-amd64
#      behind the linux-image-cloud-amd64 metapackage) and extracts it;
#   3. builds a busybox initramfs whose /init loads the virtio modules, runs
#      the per-test /test.sh that the Go harness appends as a second cpio
#      archive, prints a result marker on the serial console and powers off.
#
# Everything is cached in $VHOST_VHDX_ASSETS (default: <repo>/.cache/qemu-assets).
# A second run with nothing changed only checks the packages and exits.
# Pass --force to rebuild the assets, --refresh to also re-resolve the kernel.
#
# Outputs (read by tests/qemu/harness_test.go):
#   $ASSETS/vmlinuz            guest kernel
#   $ASSETS/initramfs.cpio.gz  base initramfs (busybox, modules, mke2fs/e2fsck)
#   $ASSETS/manifest           what they were built from
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
assets=${VHOST_VHDX_ASSETS:-$root/.cache/qemu-assets}
force=0
refresh=0
for arg in "$@"; do
	case $arg in
	--force) force=1 ;;
	--refresh) force=1 refresh=1 ;;
	-h | --help)
		sed -n '2,20p' "$0"
		exit 0
		;;
	*)
		echo "setup.sh: unknown argument $arg" >&2
		exit 2
		;;
	esac
done

log() { echo "qemu-setup: $*" >&2; }
die() {
	echo "qemu-setup: error: $*" >&2
	exit 1
}

# Modules the guest needs, by name; their dependencies are resolved with
# modprobe --show-depends against the extracted kernel. Names that are
# built into the kernel are skipped.
guest_modules=(virtio_pci virtio_blk ext4 crc32c_generic)

# Host tools copied (with their shared libraries) into the initramfs.
guest_host_tools=(/usr/sbin/mke2fs /usr/sbin/e2fsck)

# gcc and libc6-dev are not for the guest: `go test -race` (make test) needs cgo.
# python3-libvhdi (libvhdi's pyvhdi, for /usr/bin/python3) and 7zip (7zz) are
# not for the guest either: they are oracles, VHDX readers this project did not
# write, that the Go tests compare our reads and writes against.
packages=(qemu-system-x86 qemu-utils busybox-static cpio kmod e2fsprogs gzip xz-utils zstd apt gcc libc6-dev python3-libvhdi 7zip)

as_root() {
	if [ "$(id -u)" = 0 ]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

apt_updated=0
apt_update() {
	if [ "$apt_updated" = 0 ]; then
		log "apt-get update"
		as_root apt-get update -qq
		apt_updated=1
	fi
}

install_packages() {
	local missing=() p
	for p in "${packages[@]}"; do
		if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
			missing+=("$p")
		fi
	done
	if [ ${#missing[@]} -eq 0 ]; then
		return
	fi
	apt_update
	log "installing ${missing[*]}"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The manifest records the inputs; when it matches, the assets are current.
setup_hash=$(cat "$0" "$here/guest/init" "$here/guest/testlib.sh" | sha256sum | cut -c1-16)
tool_versions() {
	dpkg-query -W -f='${Package}=${Version}\n' busybox-static e2fsprogs libc6 | tr '\n' ' '
}

assets_current() {
	[ -s "$assets/vmlinuz" ] && [ -s "$assets/initramfs.cpio.gz" ] && [ -s "$assets/manifest" ] || return 1
	grep -qx "setup=$setup_hash" "$assets/manifest" || return 1
	grep -qx "tools=$(tool_versions)" "$assets/manifest" || return 1
}

# resolve_kernel prints the real image package behind linux-image-cloud-amd64.
resolve_kernel() {
	local pkg
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
	if [ -z "$pkg" ]; then
		apt_update
		pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
			awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
	fi
	[ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 with apt-cache"
	echo "$pkg"
}

fetch_kernel() {
	local pkg=$1 dl=$assets/dl deb try
	mkdir -p "$dl"
	for try in 1 2; do
		deb=$(ls "$dl/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
		[ -n "$deb" ] && break
		[ "$try" = 2 ] && apt_update
		log "downloading $pkg"
		# apt-get download writes into the current directory. Run as root it
		# warns that the _apt sandbox user cannot write there; that is harmless.
		(cd "$dl" && as_root apt-get download -qq "$pkg") 2>&1 | grep -v 'unsandboxed' >&2 || true
	done
	[ -n "$deb" ] || die "apt-get download $pkg failed"
	rm -rf "$assets/kernel"
	mkdir -p "$assets/kernel"
	dpkg-deb -x "$deb" "$assets/kernel"
	echo "$deb"
}

# copy_with_libs copies an ELF binary and every shared library it needs
# (as ldd reports them, plus the dynamic loader) into the staging root.
copy_with_libs() {
	local bin=$1 dest=$2 lib
	mkdir -p "$dest$(dirname "$bin")"
	cp -L "$bin" "$dest$bin"
	for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'); do
		mkdir -p "$dest$(dirname "$lib")"
		cp -L "$lib" "$dest$lib"
	done
}

build_initramfs() {
	local kroot=$1 kver=$2 stage=$assets/initramfs.d m line path name out
	rm -rf "$stage"
	mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules,usr/bin,usr/sbin}

	# busybox and its applets.
	[ -x /bin/busybox ] || die "/bin/busybox missing (busybox-static)"
	if ldd /bin/busybox >/dev/null 2>&1; then
		die "/bin/busybox is dynamically linked; install busybox-static"
	fi
	cp /bin/busybox "$stage/bin/busybox"
	for m in $(/bin/busybox --list); do
		case " busybox mke2fs mkfs.ext2 e2fsck " in
		*" $m "*) continue ;; # the real e2fsprogs tools are copied below
		esac
		ln -sf busybox "$stage/bin/$m"
	done

	# Kernel modules in load order, decompressed on the host because busybox
	# insmod cannot read .ko.xz/.ko.zst/.ko.gz.
	depmod -b "$kroot" "$kver"
	: >"$stage/etc/modules.load"
	for m in "${guest_modules[@]}"; do
		while read -r line; do
			case $line in
			builtin\ *) continue ;;
			insmod\ *) path=$(echo "$line" | awk '{print $2}') ;;
			*) die "unexpected modprobe output for $m: $line" ;;
			esac
			name=$(basename "$path")
			name=${name%%.ko*}
			grep -qx "$name" "$stage/etc/modules.load" && continue
			out=$stage/lib/modules/$name.ko
			case $path in
			*.ko) cp "$path" "$out" ;;
			*.ko.xz) xz -dc "$path" >"$out" ;;
			*.ko.zst) zstd -qdc "$path" >"$out" ;;
			*.ko.gz) gzip -dc "$path" >"$out" ;;
			*) die "unknown module format: $path" ;;
			esac
			echo "$name" >>"$stage/etc/modules.load"
		done < <(modprobe -d "$kroot" -S "$kver" --show-depends "$m" ||
			die "modprobe --show-depends $m failed")
	done
	log "modules: $(tr '\n' ' ' <"$stage/etc/modules.load")"

	# mke2fs and e2fsck: busybox's mke2fs only makes ext2.
	for m in "${guest_host_tools[@]}"; do
		[ -x "$m" ] || die "$m missing (e2fsprogs)"
		copy_with_libs "$m" "$stage"
	done
	ln -sf mke2fs "$stage/usr/sbin/mkfs.ext4"
	cp /etc/mke2fs.conf "$stage/etc/mke2fs.conf"

	cp "$here/guest/init" "$stage/init"
	cp "$here/guest/testlib.sh" "$stage/etc/testlib.sh"
	chmod 0755 "$stage/init"

	(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
		cpio --null --create --format=newc --reproducible --quiet) |
		gzip -9n >"$assets/initramfs.cpio.gz.tmp"
	mv "$assets/initramfs.cpio.gz.tmp" "$assets/initramfs.cpio.gz"
	rm -rf "$stage"
}

main() {
	install_packages
	mkdir -p "$assets"
	if [ "$force" = 0 ] && assets_current; then
		log "assets in $assets are current"
		return
	fi

	local pkg deb kver kroot
	pkg=
	if [ "$refresh" = 0 ] && [ -s "$assets/manifest" ]; then
		pkg=$(sed -n 's/^kernel_package=//p' "$assets/manifest")
	fi
	[ -n "$pkg" ] || pkg=$(resolve_kernel)
	deb=$(fetch_kernel "$pkg")
	kroot=$assets/kernel
	kver=$(ls "$kroot/lib/modules" | head -n1)
	[ -n "$kver" ] || die "no modules in $deb"
	cp "$kroot/boot/vmlinuz-$kver" "$assets/vmlinuz"
	build_initramfs "$kroot" "$kver"
	rm -rf "$kroot"

	{
		echo "setup=$setup_hash"
		echo "tools=$(tool_versions)"
		echo "kernel_package=$pkg"
		echo "kernel_deb=$(basename "$deb")"
		echo "kernel_version=$kver"
	} >"$assets/manifest"
	log "built $assets (kernel $kver)"
}

main
