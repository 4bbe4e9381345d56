"""Tasks of the guest kernel, walked from ``init_task`` (``struct task_struct *``).

Layouts come from the kernel's own BTF through :meth:`Kernel.member_offset`; nothing is
hard-coded. The task list lives in guest memory and may be forged or torn (the guest
runs while we read): walks are bounded and cycle-safe, and a task that cannot be read is
reported as such instead of ending the walk silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmshield.errors import GuestFormatError, SymbolError, VmshieldError
from vmshield.guest.kernel import Kernel

MAX_TASKS = 1 << 16
TASK_COMM_LEN = 16


@dataclass(frozen=True)
class TaskInfo:
    """One process (thread-group leader) as ``ps`` lists it."""

    address: int  # struct task_struct *
    pid: int
    tgid: int
    ppid: int
    uid: int
    euid: int
    gid: int
    comm: str
    kernel_thread: bool


class TaskReader:
    """Reads ``struct task_struct`` fields with offsets resolved once per kernel."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.off_tasks = k.member_offset("task_struct", "tasks")
        self.off_pid = k.member_offset("task_struct", "pid")
        self.off_tgid = k.member_offset("task_struct", "tgid")
        self.off_parent = k.member_offset("task_struct", "real_parent")
        self.off_cred = k.member_offset("task_struct", "cred")
        self.off_comm = k.member_offset("task_struct", "comm")
        self.off_mm = k.member_offset("task_struct", "mm")
        self.off_uid = k.member_offset("cred", "uid")
        self.off_euid = k.member_offset("cred", "euid")
        self.off_gid = k.member_offset("cred", "gid")

    def comm(self, task: int) -> str:
        raw = self.k.read(task + self.off_comm, TASK_COMM_LEN)
        end = raw.find(b"\0")
        return (raw if end < 0 else raw[:end]).decode("utf-8", errors="backslashreplace")

    def info(self, task: int) -> TaskInfo:
        k = self.k
        parent = k.u64(task + self.off_parent)
        cred = k.u64(task + self.off_cred)
        return TaskInfo(
            address=task,
            pid=k.s32(task + self.off_pid),
            tgid=k.s32(task + self.off_tgid),
            ppid=k.s32(parent + self.off_tgid) if parent else 0,
            uid=k.u32(cred + self.off_uid),
            euid=k.u32(cred + self.off_euid),
            gid=k.u32(cred + self.off_gid),
            comm=self.comm(task),
            kernel_thread=k.u64(task + self.off_mm) == 0,
        )

    def walk(self) -> list[int]:
        """Addresses of every task on ``init_task.tasks`` (init_task itself excluded)."""
        k = self.k
        head = k.symbols.address("init_task") + self.off_tasks
        seen = {head}
        out = []
        cur = k.u64(head)
        while cur != head:
            if cur in seen:
                raise GuestFormatError(f"task list loops back to {cur:#x}")
            if len(out) >= MAX_TASKS:
                raise GuestFormatError(f"task list is longer than {MAX_TASKS}")
            seen.add(cur)
            out.append(cur - self.off_tasks)
            cur = k.u64(cur)
        return out


def tasks(k: Kernel) -> list[TaskInfo]:
    """Every process of the guest, in task-list order (``ps`` without pid 0)."""
    r = TaskReader(k)
    return [r.info(t) for t in r.walk()]


def current_task(k: Kernel, cpu: int = 0) -> int:
    """``current`` on a vCPU (``struct task_struct *``), from the per-cpu area.

    5.10/6.1 keep it in the per-cpu variable ``current_task``; 6.12 in ``pcpu_hot``.
    The per-cpu base of each CPU is ``__per_cpu_offset[cpu]``.
    """
    base = k.u64(k.symbols.address("__per_cpu_offset") + 8 * cpu)
    if "current_task" in k.symbols:
        var = k.symbols.address("current_task")
    else:
        try:
            var = k.symbols.address("pcpu_hot") + k.member_offset("pcpu_hot", "current_task")
        except SymbolError as e:
            raise VmshieldError(f"cannot find current task on this kernel: {e}") from e
    return k.u64(base + var)
