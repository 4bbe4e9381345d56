"""Tasks of the guest kernel, walked from ``init_task`` (``struct task_struct *``).

Layouts come from the kernel's own BTF through :meth:`Kernel.member_offset`; nothing is
hard-coded. The task list lives in guest memory and may be forged or torn (the guest
runs while we read): walks are bounded and cycle-safe, and a task that cannot be read is
reported as such instead of ending the walk silently. ``tasks`` goes on past a task
whose fields cannot be read (it is listed with ``error`` set), and a task list broken
part-way gives the tasks before the break plus an entry saying where it broke.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmshield.errors import SymbolError, VmshieldError
from vmshield.guest.kernel import Kernel
from vmshield.guest.lists import list_entries, walk_entries

MAX_TASKS = 1 << 16
TASK_COMM_LEN = 16
WORKER_DESC_LEN = 24
PF_WQ_WORKER = 0x20
PF_KTHREAD = 0x00200000


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
    comm: str  # task->comm
    name: str  # as /proc/PID/comm shows it (workqueue workers carry their work)
    kernel_thread: bool
    error: str = ""  # set when the task (or the list at it) could not be read

    @classmethod
    def unreadable(cls, address: int, error: str) -> TaskInfo:
        return cls(address, -1, -1, -1, -1, -1, -1, "", "?", False, error)


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
        self.off_flags = k.member_offset("task_struct", "flags")
        self.current_offset = current_task_offset(k)  # resolved once, used per event
        self._worker: tuple[int, int, int, int, int] | None = None
        self._full_name: int | bool | None = False

    def _worker_offsets(self) -> tuple[int, int, int, int, int]:
        """(kthread pointer field in task, kthread.data, worker.desc, worker.current_work,
        worker.pool). The kthread pointer is ``worker_private`` from 5.17 on, before
        that ``set_child_tid`` doubled as it."""
        if self._worker is None:
            k = self.k
            try:
                kt = k.member_offset("task_struct", "worker_private")
            except SymbolError:
                kt = k.member_offset("task_struct", "set_child_tid")
            self._worker = (
                kt,
                k.member_offset("kthread", "data"),
                k.member_offset("worker", "desc"),
                k.member_offset("worker", "current_work"),
                k.member_offset("worker", "pool"),
            )
        return self._worker

    def _full_name_offset(self) -> int | None:
        """``kthread.full_name`` (6.1+: kernel threads with names over 15 characters)."""
        if self._full_name is False:
            try:
                self._full_name = self.k.member_offset("kthread", "full_name")
            except SymbolError:
                self._full_name = None
        return self._full_name

    def _rescuer_name(self, worker: int) -> str | None:
        try:
            wq = self.k.u64(worker + self.k.member_offset("worker", "rescue_wq"))
            off = self.k.member_offset("workqueue_struct", "name")
        except SymbolError:
            return None
        return "kworker/R-" + self.k.cstring(wq + off, 24) if wq else None

    def proc_name(self, task: int, comm: str) -> str:
        """The name /proc shows, like the kernel's proc_task_name(): a workqueue worker's
        comm gets ``-desc`` (idle) or ``+desc`` (busy) of the work it last ran; another
        kernel thread shows its full name where the kernel keeps one."""
        flags = self.k.u32(task + self.off_flags)
        if not flags & (PF_WQ_WORKER | PF_KTHREAD):
            return comm
        kt_off, data_off, desc_off, cur_off, pool_off = self._worker_offsets()
        kthread = self.k.u64(task + kt_off)
        if not kthread:
            return comm
        if not flags & PF_WQ_WORKER:
            off = self._full_name_offset()
            ptr = self.k.u64(kthread + off) if off is not None else 0
            return self.k.cstring(ptr, 64) if ptr else comm
        worker = self.k.u64(kthread + data_off)
        if not worker:
            return comm
        if comm.startswith("kworker/R-"):
            # 6.9+ names rescuers "kworker/R-" + the full workqueue name.
            comm = self._rescuer_name(worker) or comm
        if not self.k.u64(worker + pool_off):
            return comm
        raw = self.k.read(worker + desc_off, WORKER_DESC_LEN)
        desc = raw.split(b"\0", 1)[0].decode("utf-8", errors="backslashreplace")
        if not desc:
            return comm
        busy = self.k.u64(worker + cur_off) != 0
        return f"{comm}{'+' if busy else '-'}{desc}"[:63]

    def comm(self, task: int) -> str:
        raw = self.k.read(task + self.off_comm, TASK_COMM_LEN)
        end = raw.find(b"\0")
        return (raw if end < 0 else raw[:end]).decode("utf-8", errors="backslashreplace")

    def info(self, task: int) -> TaskInfo:
        k = self.k
        comm = self.comm(task)
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
            comm=comm,
            name=self._name_or_comm(task, comm),
            kernel_thread=k.u64(task + self.off_mm) == 0,
        )

    def _name_or_comm(self, task: int, comm: str) -> str:
        """The /proc name, or the plain comm when the structures behind it (kthread,
        worker) cannot be read: a display detail must not lose the task."""
        try:
            return self.proc_name(task, comm)
        except VmshieldError:
            return comm

    def walk(self) -> list[int]:
        """Addresses of every task on ``init_task.tasks`` (init_task itself excluded)."""
        head = self.k.symbols.address("init_task") + self.off_tasks
        return list_entries(self.k, head, self.off_tasks, MAX_TASKS, "task")


def tasks(k: Kernel) -> list[TaskInfo]:
    """Every process of the guest, in task-list order (``ps`` without pid 0).

    A task that cannot be read is listed with ``error`` set and the walk goes on; a list
    that breaks part-way ends with an entry (address 0) saying where."""
    r = TaskReader(k)
    head = k.symbols.address("init_task") + r.off_tasks
    found, broken = walk_entries(k, head, r.off_tasks, MAX_TASKS, "task")
    out = []
    for t in found:
        try:
            out.append(r.info(t))
        except VmshieldError as e:
            out.append(TaskInfo.unreadable(t, str(e)))
    if broken:
        out.append(TaskInfo.unreadable(0, broken))
    return out


def percpu_va(base: int, var: int) -> int:
    """Where a per-cpu variable is for the CPU whose per-cpu offset (GS base) is
    ``base``: ``base + var`` with 64-bit wrap-around, as the CPU computes it. Until 6.14
    x86-64 per-cpu symbols were small offsets from a zero-based area; from 6.15 (7.3
    here) they are their link addresses in the image and ``__per_cpu_offset[cpu]`` is
    the CPU's area minus ``__per_cpu_start``, so the plain sum exceeds 64 bits."""
    return (base + var) & 0xFFFF_FFFF_FFFF_FFFF


def current_task(k: Kernel, cpu: int = 0) -> int:
    """``current`` on a vCPU (``struct task_struct *``), from the per-cpu area.

    5.10/6.1/7.3 keep it in the per-cpu variable ``current_task``; 6.12 in ``pcpu_hot``.
    The per-cpu base of each CPU is ``__per_cpu_offset[cpu]``.
    """
    base = k.u64(k.symbols.address("__per_cpu_offset") + 8 * cpu)
    return k.u64(percpu_va(base, current_task_offset(k)))


def current_task_offset(k: Kernel) -> int:
    """Offset of ``current`` in a CPU's per-cpu area: the per-cpu variable
    ``current_task`` (5.10/6.1, and again from 6.15: 7.3) or ``pcpu_hot.current_task``
    (6.12)."""
    if "current_task" in k.symbols:
        return k.symbols.address("current_task")
    try:
        return k.symbols.address("pcpu_hot") + k.member_offset("pcpu_hot", "current_task")
    except SymbolError as e:
        raise VmshieldError(f"cannot find current task on this kernel: {e}") from e
