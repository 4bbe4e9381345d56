/*
 * vmshield agent: the code of the in-guest security space.
 *
 * The hypervisor writes this code into memory it obtained from the guest kernel's own
 * allocator and patches each monitoring point's ftrace NOP into `call vms_gate`. The
 * gate saves the caller's registers and calls vms_agent(), which records who did what
 * into this CPU's ring and decides whether the hooked function may run.
 *
 * Rules for this file (it runs inside an arbitrary kernel, with IRQs off):
 *  - freestanding: no libc, no kernel headers; everything it knows about the guest
 *    (struct offsets, per-cpu offsets, kernel helper addresses) comes from the config
 *    page and from relocations the loader resolves through kallsyms and BTF;
 *  - only direct calls (IBT kernels seal the ENDBR of functions never called
 *    indirectly), no jump tables, no writable data of its own;
 *  - memory it does not own is read through the kernel's *_nofault helpers, so a
 *    hostile or racing guest gives a fault status, never an oops;
 *  - every loop is bounded.
 */
#include "layout.h"

#define NULL ((void *)0)
#define barrier() __asm__ __volatile__("" ::: "memory")

/* Kernel helpers, resolved by the loader to their kallsyms addresses (direct calls). */
extern long copy_from_kernel_nofault(void *dst, const void *src, unsigned long size);
extern long strncpy_from_kernel_nofault(char *dst, const void *src, long count);
extern long strncpy_from_user_nofault(char *dst, const void *src, long count);
extern char *d_path(const void *path, char *buf, int buflen);
extern char *d_absolute_path(const void *path, char *buf, int buflen);
extern u64 ktime_get_mono_fast_ns(void);

/* The config page; the loader resolves this symbol to its address. */
extern const struct vms_config vms_config;

/*
 * The switch gate. Entered by `call` from a patched site (at function entry, before the
 * prologue), so the argument registers are live and the function body expects every
 * register unchanged. Frame passed to the agent (u64 slots):
 *   0 rbp, 1 r11, 2 r10, 3 r9, 4 r8, 5 rdi, 6 rsi, 7 rdx, 8 rcx, 9 rax, 10 rflags,
 *   11 return address (site + 5), 12 the hooked function's own return address.
 * Deny: restore everything, drop our return address and return -EPERM straight to the
 * hooked function's caller, as if the function had failed.
 */
__asm__(
	".text\n"
	".globl vms_gate\n"
	"vms_gate:\n"
	"	pushfq\n"
	"	cli\n"
	"	push %rax\n push %rcx\n push %rdx\n push %rsi\n push %rdi\n"
	"	push %r8\n push %r9\n push %r10\n push %r11\n"
	"	push %rbp\n"
	"	mov %rsp, %rbp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call vms_agent\n"
	"	mov %rbp, %rsp\n"
	"	pop %rbp\n"
	"	test %eax, %eax\n"
	"	jnz 1f\n"
	"	pop %r11\n pop %r10\n pop %r9\n pop %r8\n pop %rdi\n"
	"	pop %rsi\n pop %rdx\n pop %rcx\n pop %rax\n"
	"	popfq\n"
	"	ret\n"
	"	int3\n"
	"1:	pop %r11\n pop %r10\n pop %r9\n pop %r8\n pop %rdi\n"
	"	pop %rsi\n pop %rdx\n pop %rcx\n"
	"	lea 8(%rsp), %rsp\n"      /* saved rax */
	"	popfq\n"
	"	lea 8(%rsp), %rsp\n"      /* our return address: skip the function */
	"	mov $-1, %rax\n"          /* -EPERM */
	"	ret\n"
	"	int3\n");

enum { FR_R9 = 3, FR_R8 = 4, FR_RDI = 5, FR_RSI = 6, FR_RDX = 7, FR_RCX = 8, FR_RET = 11 };

static inline u64 gs_u64(s64 off)
{
	u64 v;
	__asm__ __volatile__("movq %%gs:(%1), %0" : "=r"(v) : "r"(off));
	return v;
}

static inline u32 gs_u32(s64 off)
{
	u32 v;
	__asm__ __volatile__("movl %%gs:(%1), %0" : "=r"(v) : "r"(off));
	return v;
}

static int rd64(u64 addr, u64 *out)
{
	return copy_from_kernel_nofault(out, (const void *)addr, 8) == 0;
}

static int rd32(u64 addr, u32 *out)
{
	return copy_from_kernel_nofault(out, (const void *)addr, 4) == 0;
}

static void copy(void *dst, const void *src, unsigned long n)
{
	u8 *d = dst;
	const u8 *s = src;
	for (unsigned long i = 0; i < n; i++)
		d[i] = s[i];
}

static void zero(void *dst, unsigned long n)
{
	u8 *d = dst;
	for (unsigned long i = 0; i < n; i++)
		d[i] = 0;
}

static unsigned long slen(const char *s, unsigned long max)
{
	unsigned long n = 0;
	while (n < max && s[n])
		n++;
	return n;
}

/* fnmatch-style glob with `*` and `?` (the host refuses other syntax for in-guest
 * rules); iterative with one backtrack point. Both strings are NUL-terminated within
 * bounded buffers, and the step count is bounded too. With `partial`, `s` is only the
 * start of the real string (a path cut to fit the record): the answer is whether some
 * continuation of `s` could match, i.e. whether `s` was consumed without a mismatch
 * (whatever is left of the pattern can always match something). */
static int glob(const char *p, const char *s, int partial)
{
	const char *star = NULL, *mark = NULL;
	for (unsigned long steps = 0; *s; steps++) {
		if (steps > 65536)
			return 0;
		if (*p == '?' || (*p && *p != '*' && *p == *s)) {
			p++, s++;
		} else if (*p == '*') {
			star = p++;
			mark = s;
		} else if (star) {
			p = star + 1;
			s = ++mark;
		} else {
			return 0;
		}
	}
	if (partial)
		return 1;
	while (*p == '*')
		p++;
	return !*p;
}

/* Read user memory of another address space (the new program during exec) by walking
 * its page tables through the kernel's direct map. Returns bytes read (stops at the
 * first unmapped page). */
static long mm_read(u64 pgd, u64 uva, u8 *dst, long n)
{
	const struct vms_config *c = &vms_config;
	long done = 0;
	for (int pages = 0; pages < 64 && done < n; pages++) {
		u64 table = pgd, e = 0, pa = 0;
		int shift = c->la57 ? 48 : 39;
		int ok = 0;
		for (int lvl = 0; lvl < 5; lvl++, shift -= 9) {
			if (!rd64(table + ((uva >> shift) & 511) * 8, &e) || !(e & 1))
				break;
			if (shift == 12 || (shift <= 30 && (e & 0x80))) {
				u64 mask = (1ULL << shift) - 1;
				pa = ((e & 0x000ffffffffff000ULL) & ~mask) | (uva & mask);
				ok = 1;
				break;
			}
			table = c->page_offset_base + (e & 0x000ffffffffff000ULL);
		}
		if (!ok)
			break;
		long chunk = 4096 - (long)(uva & 4095);
		if (chunk > n - done)
			chunk = n - done;
		if (copy_from_kernel_nofault(dst + done, (const void *)(c->page_offset_base + pa),
					     (unsigned long)chunk))
			break;
		done += chunk;
		uva += (u64)chunk;
	}
	return done;
}

static u64 base_value(u8 base, const u64 *frame, u64 current)
{
	static const u8 slot[6] = { FR_RDI, FR_RSI, FR_RDX, FR_RCX, FR_R8, FR_R9 };
	if (base < 6)
		return frame[slot[base]];
	if (base == VMS_B_CURRENT)
		return current;
	return 0;
}

/* A path too long even for the scratch area (deeper than PATH_MAX, reached through a
 * relative open): its root-most part is unknown. Deliver ".../NAME" (the last
 * component), marked truncated; a path rule treats it as a possible match (fail
 * closed), see vms_agent(). */
static long path_tail(const struct vms_fetch *f, u64 path, const u64 *frame, u64 current,
		      u8 *dst, long len, u8 *status)
{
	u64 dentry, name;
	const struct vms_config *c = &vms_config;
	if (f->base2 != VMS_B_NONE)
		dentry = base_value(f->base2, frame, current);
	else if (!rd64(path + (s64)c->path_dentry, &dentry))
		return 0;
	if (len < 8 || !rd64(dentry + (s64)c->dentry_name, &name))
		return 0;
	copy(dst, ".../", 4);
	long r = strncpy_from_kernel_nofault((char *)dst + 4, (const void *)name, len - 4);
	if (r <= 0)
		return 0;
	dst[len - 1] = 0;
	*status = VMS_S_TRUNC;
	return (long)slen((char *)dst, (unsigned long)len) + 1;
}

/* Capture one item into dst (at most f->len bytes). Sets *status; returns length. */
static long fetch(const struct vms_fetch *f, const u64 *frame, u64 current, u8 *dst,
		  long room, u8 *status, char *scratch)
{
	long len = f->len < room ? f->len : room;
	u64 addr = base_value(f->base, frame, current);
	*status = VMS_S_FAULT;
	if (len <= 0)
		return 0;
	if (f->kind == VMS_F_ARGV) {
		u64 mm, p, pgd;
		u32 argc;
		if (!rd64(addr + f->off[0], &mm) || !rd64(addr + f->off[1], &p) ||
		    !rd32(addr + f->off[2], &argc) || !rd64(mm + f->off[3], &pgd))
			return 0;
		if (!argc) { /* no argv at all: not even argv[0] */
			*status = VMS_S_OK;
			return 0;
		}
		long got = mm_read(pgd, p, dst, len);
		/* stop after argc strings */
		u32 seen = 0;
		for (long i = 0; i < got; i++) {
			if (!dst[i] && ++seen >= argc) {
				*status = VMS_S_OK;
				return i + 1;
			}
		}
		*status = got == len ? VMS_S_TRUNC : VMS_S_FAULT;
		return got;
	}
	for (int i = 0; i < f->nderef && i < 4; i++)
		if (!rd64(addr + (s64)f->off[i], &addr))
			return 0;
	addr += (s64)f->off[f->nderef < 4 ? f->nderef : 3];
	switch (f->kind) {
	case VMS_F_KMEM:
		if (copy_from_kernel_nofault(dst, (const void *)addr, (unsigned long)len))
			return 0;
		*status = VMS_S_OK;
		return len;
	case VMS_F_KSTR:
	case VMS_F_USTR: {
		long r = f->kind == VMS_F_KSTR ?
				 strncpy_from_kernel_nofault((char *)dst, (const void *)addr, len) :
				 strncpy_from_user_nofault((char *)dst, (const void *)addr, len);
		if (r <= 0)
			return 0;
		dst[len - 1] = 0;
		*status = r >= len ? VMS_S_TRUNC : VMS_S_OK;
		return (long)slen((char *)dst, (unsigned long)len) + 1;
	}
	case VMS_F_DPATH: {
		/* The whole path is built in this CPU's scratch area (PATH_MAX bytes, IRQs are
		 * off: nobody else uses it), relative to the global root as the exit engine
		 * reports paths (d_path would be relative to a chroot; pseudo files such as
		 * pipes only have d_path). The record keeps the root-most part: a prefix rule
		 * (a directory and a star) still sees where a long or deep path is. */
		const long cap = VMS_PATH_SCRATCH;
		int trunc = 0;
		char *p = d_absolute_path((const void *)addr, scratch, (int)cap);
		if ((unsigned long)p >= (unsigned long)-4095L)
			p = d_path((const void *)addr, scratch, (int)cap);
		if ((unsigned long)p == (unsigned long)-36L) /* -ENAMETOOLONG */
			return path_tail(f, addr, frame, current, dst, len, status);
		if ((unsigned long)p >= (unsigned long)-4095L || p < scratch || p >= scratch + cap)
			return 0;
		long n = (long)slen(p, (unsigned long)(scratch + cap - p));
		copy(scratch, p, (unsigned long)n); /* built from the end: move to the front */
		if (f->base2 != VMS_B_NONE) { /* dir path + "/" + dentry name */
			u64 name;
			if (n > 0 && scratch[n - 1] == '/')
				n--;
			if (!rd64(base_value(f->base2, frame, current) + (s64)f->off2, &name))
				return 0;
			if (n + 2 >= cap) {
				trunc = 1; /* no room for the name: the directory is the prefix */
			} else {
				scratch[n++] = '/';
				long r = strncpy_from_kernel_nofault(scratch + n, (const void *)name,
								     cap - n);
				if (r <= 0)
					return 0;
				scratch[cap - 1] = 0;
				if (r >= cap - n)
					trunc = 1;
				n += (long)slen(scratch + n, (unsigned long)(cap - n - 1));
			}
		}
		if (n > len - 1) {
			n = len - 1;
			trunc = 1;
		}
		copy(dst, scratch, (unsigned long)n);
		dst[n] = 0;
		*status = trunc ? VMS_S_TRUNC : VMS_S_OK;
		return n + 1;
	}
	}
	return 0;
}

/* The kernel half of the running task's page directory must be the kernel's own: it is
 * copied from init_top_pgt into every directory at fork and never differs after (the
 * per-mm LDT slot aside). An entry changed in one task's copy would let kernel code that
 * runs in that task see other pages than the host checks. Compared here, in the task's
 * own context, where its directory cannot have been freed yet; the host reports any
 * increase of pgd_bad. */
static void check_pgd(struct vms_cpusample *s)
{
	const struct vms_config *c = &vms_config;
	u64 mine = c->page_offset_base + (s->cr3 & 0x000ffffffffff000ULL);
	u64 want[8], have[8];
	if (!c->kernel_pgd || c->pgd_lo < 256 || c->pgd_lo > 511)
		return;
	for (u32 i = (u32)c->pgd_lo & ~7u; i < 512; i += 8) {
		if (copy_from_kernel_nofault(want, (const void *)(c->kernel_pgd + i * 8), 64) ||
		    copy_from_kernel_nofault(have, (const void *)(mine + i * 8), 64))
			return;
		for (u32 j = 0; j < 8; j++) {
			if (i + j < (u32)c->pgd_lo || i + j == (u32)c->pgd_ldt)
				continue;
			if ((want[j] ^ have[j]) & ~0x60ULL) { /* accessed/dirty aside */
				s->pgd_index = i + j;
				s->pgd_found = have[j];
				s->pgd_bad++;
				return;
			}
		}
	}
}

static void sample_cpu(struct vms_ringheader *ring, u64 now)
{
	const struct vms_config *c = &vms_config;
	struct vms_cpusample *s = &ring->sample;
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) dt;
	u32 lo, hi;
	if (s->count && now - s->ns < c->sample_interval_ns)
		return;
	__asm__ __volatile__("mov %%cr0, %0" : "=r"(s->cr0));
	__asm__ __volatile__("mov %%cr4, %0" : "=r"(s->cr4));
	__asm__ __volatile__("mov %%cr3, %0" : "=r"(s->cr3));
	check_pgd(s);
#define RDMSR(msr, field)                                                           \
	do {                                                                        \
		__asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));      \
		s->field = ((u64)hi << 32) | lo;                                    \
	} while (0)
	if (c->msr_mask & VMS_M_EFER)
		RDMSR(0xC0000080, efer);
	if (c->msr_mask & VMS_M_STAR)
		RDMSR(0xC0000081, star);
	if (c->msr_mask & VMS_M_LSTAR)
		RDMSR(0xC0000082, lstar);
	if (c->msr_mask & VMS_M_SYSENTER)
		RDMSR(0x176, sysenter_eip);
	__asm__ __volatile__("sidt %0" : "=m"(dt));
	s->idt_base = dt.base;
	s->idt_limit = dt.limit;
	__asm__ __volatile__("sgdt %0" : "=m"(dt));
	s->gdt_base = dt.base;
	s->gdt_limit = dt.limit;
	s->ns = now;
	barrier();
	s->count++;
}

/* path_mode: 0 no path, 1 whole path, 2 root-most prefix (cut to fit), 3 unknown prefix
 * (".../NAME"). A path rule on a cut path matches if the path could match (fail closed):
 * a long or deep path must not walk around a deny rule on a directory. */
static int rules_match(const struct vms_rule *r, const struct vms_record *rec,
		       const char *path, int path_mode, u16 port, int have_port)
{
	if ((r->has & VMS_R_PID) && rec->pid != r->pid)
		return 0;
	if ((r->has & VMS_R_UID) && rec->uid != r->uid)
		return 0;
	if ((r->has & VMS_R_COMM) && !glob(r->comm, rec->comm, 0))
		return 0;
	if ((r->has & VMS_R_PATH) && path_mode != 3 &&
	    (!path || !glob(r->path, path, path_mode == 2)))
		return 0;
	if ((r->has & VMS_R_PORT) && (!have_port || port != r->port))
		return 0;
	return 1;
}

/* Queue SIGKILL for the thread group and flag the task: the same data write the kernel's
 * signal code makes; the task dies on its way back to user mode. */
static void kill_current(u64 current)
{
	const struct vms_config *c = &vms_config;
	u64 signal;
	if (!rd64(current + (s64)c->t_signal, &signal) || !signal)
		return;
	__asm__ __volatile__("lock orq %1, %0"
			     : "+m"(*(u64 *)(signal + (s64)c->sig_pending))
			     : "r"(1ULL << 8) /* SIGKILL - 1 */);
	__asm__ __volatile__("lock orq %1, %0"
			     : "+m"(*(u64 *)(current + (s64)c->t_tiflags))
			     : "r"(1ULL << (c->tif_sigpending & 63)));
}

/* Called by the gate with IRQs off. Returns 1 to deny (the function returns -EPERM). */
__attribute__((used)) long vms_agent(u64 *frame)
{
	const struct vms_config *c = &vms_config;
	u64 ret = frame[FR_RET];
	u32 cpu = gs_u32(c->pc_cpu);
	const struct vms_site *site = NULL;
	u32 idx = 0;

	if (c->magic != VMS_CONFIG_MAGIC || cpu >= c->ncpus)
		return 0;
	for (u32 i = 0; i < c->nsites && i < VMS_MAX_SITES; i++) {
		if (c->sites[i].ret == ret) {
			site = &c->sites[i];
			idx = i;
			break;
		}
	}
	struct vms_ringheader *ring = (struct vms_ringheader *)(c->rings + cpu * c->ring_stride);
	if (ring->inflight) { /* re-entered through a helper, or from an NMI */
		ring->nested++;
		return 0;
	}
	ring->inflight = 1;
	barrier();
	ring->hits++;
	long deny = 0;
	if (!site || !site->enabled)
		goto out;

	u64 now = ktime_get_mono_fast_ns();
	sample_cpu(ring, now);

	int full = ring->head - ring->tail >= c->nslots;
	u8 *slot = (u8 *)ring + sizeof(*ring) +
		   (full ? c->nslots : ring->head % c->nslots) * (u64)c->slot_size;
	struct vms_record *rec = (struct vms_record *)slot;
	u64 current = gs_u64(c->pc_current);
	u64 cred = 0, parent = 0;

	zero(rec, sizeof(*rec));
	rec->site = (u16)idx;
	rec->cpu = (u16)cpu;
	rec->ns = now;
	rec->task = current;
	rd32(current + c->t_pid, (u32 *)&rec->pid);
	rd32(current + c->t_tgid, (u32 *)&rec->tgid);
	if (rd64(current + c->t_parent, &parent) && parent)
		rd32(parent + c->t_tgid, (u32 *)&rec->ppid);
	if (rd64(current + c->t_cred, &cred) && cred) {
		rd32(cred + c->c_uid, &rec->uid);
		rd32(cred + c->c_euid, &rec->euid);
		rd32(cred + c->c_gid, &rec->gid);
	}
	copy_from_kernel_nofault(rec->comm, (const void *)(current + c->t_comm), VMS_COMM_LEN);
	static const u8 args[6] = { FR_RDI, FR_RSI, FR_RDX, FR_RCX, FR_R8, FR_R9 };
	for (int i = 0; i < 6; i++)
		rec->args[i] = frame[args[i]];

	/* captured items */
	u8 *data = slot + sizeof(*rec);
	long used = 0, room = (long)c->slot_size - (long)sizeof(*rec);
	const char *path = NULL;
	int path_mode = 0;
	char *scratch = (char *)ring + sizeof(*ring) + (c->nslots + 1) * (u64)c->slot_size;
	u16 port = 0;
	int have_port = 0;
	for (u32 i = 0; i < site->nfetch && i < VMS_MAX_FETCH; i++) {
		u8 status;
		u8 *item = data + used;
		if (room - used < 8)
			break;
		long n = fetch(&site->fetch[i], frame, current, item + 4, room - used - 4, &status,
			       scratch);
		*(u16 *)item = (u16)n;
		item[2] = site->fetch[i].kind;
		item[3] = status;
		if ((s32)i == site->path_item && n > 0 && status != VMS_S_FAULT) {
			path = (const char *)item + 4;
			path_mode = status == VMS_S_OK ? 1 : path[0] == '/' ? 2 : 3;
		}
		if ((s32)i == site->port_item && n >= 2 && status == VMS_S_OK) {
			u16 family = (u16)(item[4] | (item[5] << 8));
			if (site->port_mode == 0 && n >= 4 && (family == 2 || family == 10))
				port = (u16)((item[6] << 8) | item[7]), have_port = 1; /* big-endian */
			else if (site->port_mode == 1) /* sock_common.skc_num: host order */
				port = (u16)(item[4] | (item[5] << 8)), have_port = 1;
		}
		used += (4 + n + 7) & ~7L;
		rec->nitems++;
	}
	rec->used = (u16)used;

	for (u32 i = 0; i < site->nrules && i < VMS_MAX_RULES; i++) {
		const struct vms_rule *r = &site->rules[i];
		if (!rules_match(r, rec, path, path_mode, port, have_port))
			continue;
		rec->matched |= 1U << i;
		if (r->action == VMS_A_DENY)
			deny = 1;
		else if (r->action == VMS_A_KILL && !(rec->verdict & 2)) {
			kill_current(current);
			rec->verdict |= 2;
		}
	}
	if (deny)
		rec->verdict |= 1;
	ring->denied += (u64)deny;
	ring->killed += (rec->verdict >> 1) & 1;
	rec->size = (u32)(sizeof(*rec) + (u64)used);
	barrier();
	if (full) {
		ring->drops++;
	} else {
		rec->seq = (u32)ring->head + 1; /* position + 1: a zeroed slot is no record */
		barrier();
		ring->head++; /* publish: the host reads records below head */
	}
out:
	barrier();
	ring->inflight = 0;
	return deny;
}
