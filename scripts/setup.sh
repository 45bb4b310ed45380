#!/usr/bin/env bash
# Installs what dmfabric needs on a fresh Debian host of this kind, then
# builds it. Idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: installing packages needs root: run as root (sudo)" >&2
    exit 1
  fi
}

# Build: clang, libelf, m4, libpcap for libxdp/libbpf (xsk-rs), clang also for
# dmfabric's XDP program (dataplane/build.rs); binutils assembles the test
# guests; iproute2 for test hosts; util-linux for setpriv (privilege tests);
# qemu-system-x86 runs the guests' Multiboot builds; openssl makes the
# certificates of the TLS etcd test; iputils-ping pings over IPv6 on an
# interface the data plane serves (its XDP program passes what is not 0x88B5);
# prometheus (with promtool) and tmux run the metrics and `dmfabric top` tests.
packages=(clang libelf-dev m4 libpcap-dev pkg-config zlib1g-dev gcc make binutils iproute2 util-linux qemu-system-x86 protobuf-compiler libprotobuf-dev etcd-server openssl systemd iputils-ping prometheus tmux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# cargo-fuzz builds the fuzz targets (scripts/fuzz.sh; ./run test runs them briefly).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --version '^0.13' --locked --quiet
fi

echo "setup: building dmfabric (release)"
# A failed build stops here (an older binary left in target/ must not run;
# pipefail makes the pipeline fail with cargo).
if ! cargo build --release --locked -p dmfabric 2>&1 | { grep -vE '^\s*(Compiling|Downloaded|Downloading)' || true; }; then
  echo "setup: build failed" >&2
  exit 1
fi

# The Linux guest images (Debian's cloud kernel, a busybox initramfs):
# cached, so only the first run downloads.
echo "setup: Linux guest images in $(scripts/guest-images.sh)"
