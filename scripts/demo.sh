#!/usr/bin/env bash
# The main job, on a VM the demo boots itself: vmshield finds the guest kernel in raw
# memory (no debug symbols, no agent, no login), arms isolation objects, and a
# suspicious scenario runs in the guest while its behaviour streams out live.
set -euo pipefail
cd "$(dirname "$0")/.."
VMS=.venv/bin/vmshield
NAME="demo-$$"
KERNEL="${DEMO_KERNEL:-6.1}"
MON_PID=""
cleanup() {
  [ -n "$MON_PID" ] && kill "$MON_PID" 2>/dev/null && wait "$MON_PID" 2>/dev/null || true
  $VMS vm stop "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== booting a lab VM (Debian $KERNEL cloud kernel; TCG unless the CPU has vmx/svm)"
$VMS vm start "$NAME" --kernel "$KERNEL"
echo
echo "== the kernel, read from guest memory"
$VMS kernel "$NAME"
echo
$VMS vm run "$NAME" -- 'echo "api-key-123" > /etc/secret-keys'
echo "== arming isolation objects"
$VMS monitor "$NAME" \
  -o process.exec \
  -o 'file.open,path=/etc/shadow' \
  -o 'file.open,path=/etc/secret*,action=deny' \
  -o net.connect \
  -o cred.change \
  -o process.exit,comm=vmstest* &
MON_PID=$!
sleep 8
echo
echo "== the suspicious scenario runs in the guest"
$VMS vm run "$NAME" -- 'head -c 20 /etc/shadow >/dev/null'                     # read /etc/shadow
$VMS vm run "$NAME" -- 'vmstest connect 4444'                                  # loopback connect
$VMS vm run "$NAME" -- 'vmstest as 1000 exec /bin/vmstest-suid id'             # setuid escalation
$VMS vm run "$NAME" -- 'vmstest open /etc/secret-keys' || true                 # denied: errno=1
sleep 2
kill -INT "$MON_PID"; wait "$MON_PID" || true; MON_PID=""
echo
echo "== the guest is healthy after detach"
$VMS vm run "$NAME" -- 'vmstest open /etc/secret-keys'
$VMS ps "$NAME" | head -5
