#!/usr/bin/env bash
# The main job on a VM the demo boots itself: attach to a running guest with nothing
# but its memory and QMP, and read its kernel without debug symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
VMS=.venv/bin/vmshield
NAME="demo-$$"
KERNEL="${DEMO_KERNEL:-6.1}"
trap '$VMS vm stop "$NAME" >/dev/null 2>&1 || true' EXIT

echo "== booting a lab VM ($KERNEL, TCG unless real hardware virtualization is present)"
$VMS vm start "$NAME" --kernel "$KERNEL"
echo "== the guest runs a workload of its own"
$VMS vm run "$NAME" -- 'vmstest sleep 300 >/dev/null & echo started pid $!'
echo "== vmshield kernel: version, KASLR slide, symbols and BTF read from guest memory"
$VMS kernel "$NAME"
echo "== a second attach uses the per-build symbol table library"
$VMS kernel "$NAME" --json | grep -E '"(cached|attach_seconds)"'
echo "== vmshield symbols: LSM hooks vmshield can monitor"
$VMS symbols "$NAME" '^security_(file_open|bprm_check|socket_connect)$'
echo "== vmshield ps: tasks walked from init_task (no guest agent, no login)"
$VMS ps "$NAME"
echo "== the guest's own ps, for comparison"
$VMS vm run "$NAME" -- 'ps -o pid,ppid,user,comm | grep -v "\[" | head -20'
echo "== vmshield modules"
$VMS modules "$NAME"
