#!/usr/bin/env bash
# Fetch the Debian cloud kernels vmshield is tested on (5.10, 6.1, 6.12) into the cache.
#
# Why a private apt root: we only want three vmlinuz files, not to add suites to the
# host's apt configuration or install kernels on the host. apt-get download + dpkg -x
# takes boot/vmlinuz-* with no postinst run. Idempotent: a kernel already in the cache
# is not fetched again.
set -euo pipefail

CACHE="${VMSHIELD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmshield}"
KDIR="$CACHE/kernels"
APTROOT="$CACHE/apt"
# version family -> Debian suite carrying it
declare -A SUITE=([5.10]=bullseye [6.1]=bookworm [6.12]=trixie)

# The decompressed ELF (vmlinux) next to each image, made here with the shell tools
# alone: the tests hold vmshield's own bzImage extractor against it.
extract_reference() {
  local img="$1" out="$2" setup_sects pm off len magic
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
  [ "$setup_sects" -eq 0 ] && setup_sects=4
  pm=$(( (setup_sects + 1) * 512 ))
  off=$(od -An -tu4 -j $((0x248)) -N4 "$img" | tr -d ' ')
  len=$(od -An -tu4 -j $((0x24c)) -N4 "$img" | tr -d ' ')
  magic=$(od -An -tx1 -j $((pm + off)) -N4 "$img" | tr -d ' ')
  local cat=(tail -c +$((pm + off + 1)) "$img")
  case "$magic" in
    02214c18) "${cat[@]}" | head -c "$len" | lz4 -dc > "$out.part" 2>/dev/null || true ;;
    28b52ffd) "${cat[@]}" | head -c "$((len - 4))" | zstd -dc > "$out.part" ;;
    fd377a58) "${cat[@]}" | head -c "$((len - 4))" | xz -dc > "$out.part" ;;
    1f8b08*) "${cat[@]}" | head -c "$len" | gzip -dc > "$out.part" 2>/dev/null || true ;;
    *) echo "kernels: unknown compression $magic in $img" >&2; return 1 ;;
  esac
  [ "$(head -c 4 "$out.part" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || {
    echo "kernels: extracting $img gave no ELF" >&2; return 1; }
  mv "$out.part" "$out"
}

# One small, dependency-free module of each kernel goes into the guest initramfs, so the
# lab can load a real, Debian-signed module (module.load tests, vmshield modules).
MODULE=crc-itu-t

need=()
for v in 5.10 6.1 6.12; do
  { [ -s "$KDIR/$v/vmlinuz" ] && [ -s "$KDIR/$v/modules/$MODULE.ko" ]; } || need+=("$v")
done
if [ ${#need[@]} -eq 0 ]; then
  for v in 5.10 6.1 6.12; do
    [ -s "$KDIR/$v/vmlinux" ] || extract_reference "$KDIR/$v/vmlinuz" "$KDIR/$v/vmlinux"
  done
  echo "kernels: all cached in $KDIR"
  exit 0
fi

mkdir -p "$APTROOT/lists/partial" "$APTROOT/cache/archives/partial" "$KDIR"
: > "$APTROOT/sources.list"
for s in bullseye bookworm trixie; do
  echo "deb http://deb.debian.org/debian $s main" >> "$APTROOT/sources.list"
done
APT=(-o "Dir::Etc::SourceList=$APTROOT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
     -o "Dir::State::Lists=$APTROOT/lists" -o "Dir::Cache=$APTROOT/cache"
     -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" -q update >/dev/null

for v in "${need[@]}"; do
  suite="${SUITE[$v]}"
  # The cloud metapackage of that suite depends on exactly one versioned image package.
  meta_ver=$(apt-cache "${APT[@]}" madison linux-image-cloud-amd64 | awk -v s="$suite/" '$0 ~ s {print $3; exit}')
  [ -n "$meta_ver" ] || { echo "kernels: no linux-image-cloud-amd64 in $suite" >&2; exit 1; }
  pkg=$(apt-cache "${APT[@]}" depends "linux-image-cloud-amd64=$meta_ver" \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "kernels: cannot resolve the image package of $suite" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get "${APT[@]}" -q download "$pkg" >/dev/null)
  dpkg -x "$tmp"/*.deb "$tmp/x"
  mkdir -p "$KDIR/$v"
  mod=$(find "$tmp/x" -name "$MODULE.ko*" | head -1)
  [ -n "$mod" ] || { echo "kernels: $pkg has no $MODULE module" >&2; exit 1; }
  mkdir -p "$KDIR/$v/modules"
  case "$mod" in
    *.xz) xz -dc "$mod" > "$KDIR/$v/modules/$MODULE.ko" ;;
    *.zst) zstd -dc "$mod" > "$KDIR/$v/modules/$MODULE.ko" ;;
    *) cp "$mod" "$KDIR/$v/modules/$MODULE.ko" ;;
  esac
  basename "$(dirname "$(dirname "$(dirname "$mod")")")" > "$KDIR/$v/release"
  cp "$tmp"/x/boot/vmlinuz-* "$KDIR/$v/vmlinuz.part"
  cp "$tmp"/x/boot/config-* "$KDIR/$v/config" 2>/dev/null || true
  echo "$pkg" > "$KDIR/$v/package"
  mv "$KDIR/$v/vmlinuz.part" "$KDIR/$v/vmlinuz"
  extract_reference "$KDIR/$v/vmlinuz" "$KDIR/$v/vmlinux"
  rm -rf "$tmp"
  echo "kernels: $v <- $pkg"
done
