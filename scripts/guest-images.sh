#!/usr/bin/env bash
# Fetches and builds the Linux guest images: Debian's cloud kernel and an
# initramfs of busybox-static plus our init script. Cached and idempotent:
# a second run does nothing. The kernel version is pinned in
# guests/linux/VERSION and overridable:
#   DMFABRIC_LINUX_VERSION   kernel package version (linux-image-<it>-cloud-amd64)
#   DMFABRIC_GUEST_CACHE     (default /var/cache/dmfabric)
# Prints the directory holding vmlinuz and initramfs.cpio.gz.
set -euo pipefail
cd "$(dirname "$0")/.."

LINUX_VERSION=${DMFABRIC_LINUX_VERSION:-$(cat guests/linux/VERSION)}
CACHE=${DMFABRIC_GUEST_CACHE:-/var/cache/dmfabric}
out="$CACHE/linux-$LINUX_VERSION"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$out/initramfs.cpio.gz" -nt guests/linux/init ]; then
  echo "$out"
  exit 0
fi
for p in busybox-static cpio; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    [ "$(id -u)" -eq 0 ] || { echo "guest-images: installing $p needs root" >&2; exit 1; }
    echo "guest-images: installing $p" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
  fi
done
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -s "$out/vmlinuz" ]; then
  pkg="linux-image-$LINUX_VERSION-cloud-amd64"
  echo "guest-images: fetching $pkg" >&2
  (cd "$work" && apt-get download "$pkg" >&2) || {
    echo "guest-images: cannot download $pkg (apt-get update, or set DMFABRIC_LINUX_VERSION to a version apt-cache search linux-image shows)" >&2
    exit 1
  }
  dpkg -x "$work"/"$pkg"_*.deb "$work/kernel"
  cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi
# The initramfs: busybox with its applets, our init.
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp guests/linux/init "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9 > "$out/initramfs.cpio.gz.tmp")
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$LINUX_VERSION" > "$out/version"
echo "$out"
