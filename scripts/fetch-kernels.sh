#!/usr/bin/env bash
# Fetch the Debian cloud kernels vmshield is tested on (5.10, 6.1, 6.12, 7.3) into the cache.
#
# Why a private apt root: we only want a few vmlinuz files, not to add suites to the
# host's apt configuration or install kernels on the host. apt-get download + dpkg -x
# takes the image with no postinst run. Idempotent: a kernel already in the cache is not
# fetched again.
#
# Environment:
#   VMSHIELD_CACHE     where kernels/ goes (default ~/.cache/vmshield)
#   VMSHIELD_APT_ROOT  the private apt root: lists and downloaded .debs (default
#                      $VMSHIELD_CACHE/apt). The empty-cache test points this at the warm
#                      cache so it re-extracts everything without downloading again.
#   VMSHIELD_KERNELS   the families to fetch (default: all of FAMILIES below)
set -euo pipefail

CACHE="${VMSHIELD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmshield}"
KDIR="$CACHE/kernels"
APTROOT="${VMSHIELD_APT_ROOT:-$CACHE/apt}"
DEBS="$APTROOT/debs"
# version family -> Debian suite whose linux-image-cloud-amd64 carries it
declare -A SUITE=([5.10]=bullseye [6.1]=bookworm [6.12]=trixie [7.3]=trixie-backports)
FAMILIES=(5.10 6.1 6.12 7.3)
read -r -a WANT <<< "${VMSHIELD_KERNELS:-${FAMILIES[*]}}"

# One small, dependency-free module of each kernel goes into the guest initramfs, so the
# lab can load a real, Debian-signed module (module.load tests, vmshield modules, and the
# template of the generated tamper module).
MODULE=crc-itu-t

# Copy LEN bytes at OFFSET of FILE to stdout. dd reads the file itself, so nothing
# upstream is killed by SIGPIPE when the consumer stops early (`tail | head` under
# pipefail exited 141 here once: the 6.12 image on a fresh machine).
slice() {
  dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=1M status=none
}

# The decompressed ELF (vmlinux) next to each image, made here with the shell tools
# alone: the tests hold vmshield's own bzImage extractor against it.
extract_reference() {
  local img="$1" out="$2" setup_sects pm off len magic start
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
  [ "$setup_sects" -eq 0 ] && setup_sects=4
  pm=$(( (setup_sects + 1) * 512 ))
  off=$(od -An -tu4 -j $((0x248)) -N4 "$img" | tr -d ' ')
  len=$(od -An -tu4 -j $((0x24c)) -N4 "$img" | tr -d ' ')
  start=$((pm + off))
  magic=$(od -An -tx1 -j "$start" -N4 "$img" | tr -d ' ')
  rm -f "$out.part"
  # lz4 and gzip streams carry the 4-byte decompressed size after their end: the
  # decompressors complain about it but the output is whole; the ELF check decides.
  case "$magic" in
    02214c18) slice "$img" "$start" "$len" | lz4 -dc > "$out.part" 2>/dev/null || true ;;
    28b52ffd) slice "$img" "$start" "$((len - 4))" | zstd -dcq > "$out.part" ;;
    fd377a58) slice "$img" "$start" "$((len - 4))" | xz -dc > "$out.part" ;;
    1f8b08*) slice "$img" "$start" "$len" | gzip -dc > "$out.part" 2>/dev/null || true ;;
    *) echo "kernels: unknown compression $magic in $img" >&2; return 1 ;;
  esac
  [ "$(od -An -tx1 -N4 "$out.part" | tr -d ' ')" = 7f454c46 ] || {
    echo "kernels: extracting $img gave no ELF" >&2; return 1; }
  mv "$out.part" "$out"
}

complete() {  # a family whose image, module, release and reference ELF are all there
  local d="$KDIR/$1"
  [ -s "$d/vmlinuz" ] && [ -s "$d/modules/$MODULE.ko" ] && [ -s "$d/release" ]
}

need=()
for v in "${WANT[@]}"; do
  [ -n "${SUITE[$v]:-}" ] || { echo "kernels: unknown family $v (known: ${FAMILIES[*]})" >&2; exit 1; }
  complete "$v" || need+=("$v")
done
if [ ${#need[@]} -eq 0 ]; then
  for v in "${WANT[@]}"; do
    [ -s "$KDIR/$v/vmlinux" ] || extract_reference "$KDIR/$v/vmlinuz" "$KDIR/$v/vmlinux"
  done
  echo "kernels: all cached in $KDIR"
  exit 0
fi

mkdir -p "$APTROOT/lists/partial" "$APTROOT/cache/archives/partial" "$DEBS" "$KDIR"
: > "$APTROOT/sources.list"
for s in bullseye bookworm trixie trixie-backports; do
  echo "deb http://deb.debian.org/debian $s main" >> "$APTROOT/sources.list"
done
APT=(-o "Dir::Etc::SourceList=$APTROOT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
     -o "Dir::State::Lists=$APTROOT/lists" -o "Dir::Cache=$APTROOT/cache"
     -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
# Lists younger than a day are reused (the empty-cache test runs after a warm setup).
if [ -z "$(find "$APTROOT/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]; then
  apt-get "${APT[@]}" -q update >/dev/null
fi

# The .deb of PKG (exact version VER) in $DEBS, downloaded once.
fetch_deb() {
  local pkg="$1" ver="$2" file
  file=$(apt-cache "${APT[@]}" show "$pkg=$ver" | awk '/^Filename:/ {print $2; exit}')
  [ -n "$file" ] || { echo "kernels: apt knows no $pkg=$ver" >&2; return 1; }
  file="$DEBS/$(basename "$file")"
  if [ ! -s "$file" ]; then
    (cd "$DEBS" && apt-get "${APT[@]}" -q download "$pkg=$ver" >/dev/null)
  fi
  [ -s "$file" ] || { echo "kernels: download of $pkg=$ver gave no $file" >&2; return 1; }
  echo "$file"
}

# The versioned dependency of PKG=VER whose name starts with PREFIX, with its version.
dep_of() {
  apt-cache "${APT[@]}" show "$1=$2" | awk -v p="$3" '
    /^Depends:/ { n = split(substr($0, 10), d, ","); for (i = 1; i <= n; i++) {
      split(d[i], w, " "); if (index(w[1], p) == 1) { print w[1]; exit } } }'
}

newest_in_suite() {  # the version of PKG that SUITE carries
  apt-cache "${APT[@]}" madison "$1" | awk -v s=" $2/" '$0 ~ s {print $3; exit}'
}

for v in "${need[@]}"; do
  suite="${SUITE[$v]}"
  # The cloud metapackage of that suite depends on exactly one versioned image package.
  meta_ver=$(newest_in_suite linux-image-cloud-amd64 "$suite")
  [ -n "$meta_ver" ] || { echo "kernels: no linux-image-cloud-amd64 in $suite" >&2; exit 1; }
  pkg=$(dep_of linux-image-cloud-amd64 "$meta_ver" linux-image-)
  [ -n "$pkg" ] || { echo "kernels: cannot resolve the image package of $suite" >&2; exit 1; }
  pkg_ver=$(newest_in_suite "$pkg" "$suite")
  case "$pkg" in
    linux-image-"$v".*) ;;
    *) echo "kernels: $suite now carries $pkg, not a $v kernel" >&2; exit 1 ;;
  esac
  debs=("$(fetch_deb "$pkg" "$pkg_ver")")
  # From 7.x on the image package is a transition package: the kernel is in
  # linux-binary-VERSION-FLAVOUR, its modules in linux-modules-..., its config in
  # linux-base-...
  bin=""
  for part in linux-binary- linux-modules- linux-base-; do
    dep=$(dep_of "$pkg" "$pkg_ver" "$part")
    [ -n "$dep" ] || continue
    [ "$part" = linux-binary- ] && bin="$dep"
    debs+=("$(fetch_deb "$dep" "$(newest_in_suite "$dep" "$suite")")")
  done
  tmp=$(mktemp -d)
  for deb in "${debs[@]}"; do dpkg -x "$deb" "$tmp/x"; done
  # find -print -quit, never `find | head -1`: head leaving early kills find (SIGPIPE).
  image=$(find "$tmp/x" -maxdepth 5 \( -path '*/boot/vmlinuz-*' -o -path '*/lib/modules/*/vmlinuz' \) \
          -type f -print -quit)
  [ -n "$image" ] || { echo "kernels: $pkg has no kernel image" >&2; exit 1; }
  mod=$(find "$tmp/x" -name "$MODULE.ko*" -print -quit)
  [ -n "$mod" ] || { echo "kernels: $pkg has no $MODULE module" >&2; exit 1; }
  rm -rf "${KDIR:?}/$v"
  mkdir -p "$KDIR/$v/modules"
  case "$mod" in
    *.xz) xz -dc "$mod" > "$KDIR/$v/modules/$MODULE.ko" ;;
    *.zst) zstd -dcq "$mod" > "$KDIR/$v/modules/$MODULE.ko" ;;
    *) cp "$mod" "$KDIR/$v/modules/$MODULE.ko" ;;
  esac
  # .../lib/modules/RELEASE/kernel/...: the release is the folder under modules/.
  release=${mod#*/lib/modules/}
  echo "${release%%/*}" > "$KDIR/$v/release"
  config=$(find "$tmp/x" \( -path '*/boot/config-*' -o -path '*/lib/modules/*/config' \) -type f -print -quit)
  [ -z "$config" ] || cp "$config" "$KDIR/$v/config"
  echo "${bin:-$pkg}" > "$KDIR/$v/package"
  extract_reference "$image" "$KDIR/$v/vmlinux"
  cp "$image" "$KDIR/$v/vmlinuz.part"
  mv "$KDIR/$v/vmlinuz.part" "$KDIR/$v/vmlinuz"
  rm -rf "$tmp"
  echo "kernels: $v <- ${bin:-$pkg} ($(cat "$KDIR/$v/release"))"
done
