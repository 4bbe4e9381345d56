#!/usr/bin/env bash
# Build the lab guest's initramfs: busybox (static), the init script, a few /etc files,
# and the project's own static C test programs. Output: build/initramfs.cpio.gz.
# Rebuilt by make only when an input changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build/initramfs.cpio.gz}"
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || BUSYBOX=/bin/busybox
if ! file -L "$BUSYBOX" | grep -q 'statically linked'; then
  echo "initramfs: $BUSYBOX is not static; install the Debian package busybox-static" >&2
  exit 1
fi
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,root,home/user,usr/bin,usr/sbin}
chmod 755 "$stage"
cp "$BUSYBOX" "$stage/bin/busybox"
cp "$root/lab/image/init" "$stage/init"
chmod 755 "$stage/init"
cp "$root/lab/image/etc_passwd" "$stage/etc/passwd"
cp "$root/lab/image/etc_group" "$stage/etc/group"
cp "$root/lab/image/etc_shadow" "$stage/etc/shadow"
chmod 600 "$stage/etc/shadow"
for src in "$root"/lab/image/progs/*.c; do
  name="$(basename "$src" .c)"
  gcc -static -O2 -Wall -Wextra -Werror -o "$stage/bin/$name" "$src"
  # The unstripped copy stays on the host: tests find user-space functions in it.
  mkdir -p "$(dirname "$out")/guest"
  cp "$stage/bin/$name" "$(dirname "$out")/guest/$name"
  strip "$stage/bin/$name"
done
# The lab kernels' own test module, each under /lib/modules/RELEASE (see fetch-kernels).
KDIR="${VMSHIELD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmshield}/kernels"
for rel in "$KDIR"/*/release; do
  [ -f "$rel" ] || continue
  d="$(dirname "$rel")"
  mkdir -p "$stage/lib/modules/$(cat "$rel")"
  cp "$d"/modules/*.ko "$stage/lib/modules/$(cat "$rel")/"
done
# A PIE build exporting its ufunc target (.dynsym): user-space points by symbol,
# with a load bias that changes every run.
gcc -static-pie -O2 -Wall -Wextra -Werror -Wl,--export-dynamic-symbol=vms_ufunc_target -o "$stage/bin/vmstest-pie" "$root/lab/image/progs/vmstest.c"
strip "$stage/bin/vmstest-pie"
# A setuid-root copy: the privilege-escalation path of the tests and the demo.
cp "$stage/bin/vmstest" "$stage/bin/vmstest-suid"
chmod 4755 "$stage/bin/vmstest-suid"
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --owner=0:0 --quiet) \
  | gzip -9n > "$out.part"
mv "$out.part" "$out"
echo "initramfs: $out ($(stat -c %s "$out") bytes)"
