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

/* ---- filters: the same answers the exit engine's fnmatch gives ------------------------
 *
 * The host compares text: a path or name decoded from bytes with Python's
 * errors="backslashreplace" (a valid UTF-8 sequence is one character, any other byte the
 * four characters \xNN), numbers in decimal, an address as Python prints it. The agent
 * walks the same characters (next_char) and matches them against a glob program the host
 * compiled from the pattern (tokens G_*: printable ASCII bytes stand for themselves,
 * G_LIT a code point, G_CLASS a list of code-point ranges, G_ALT starts another program
 * that is tried too). */

static const char hexdigits[] = "0123456789abcdef";

/* The character at *pos of s[0..n), or -1 at the end; *pos moves past it. *pos counts
 * bytes times 4, plus the character reached inside a \xNN escape. */
static s32 next_char(const u8 *s, u32 n, u32 *pos)
{
	u32 i = *pos >> 2, sub = *pos & 3;
	if (i >= n)
		return -1;
	u8 b = s[i];
	if (sub) { /* inside an escape: x, then two hex digits */
		*pos = sub == 3 ? (i + 1) << 2 : *pos + 1;
		return sub == 1 ? 'x' : hexdigits[sub == 2 ? b >> 4 : b & 15];
	}
	if (b < 0x80) {
		*pos = (i + 1) << 2;
		return b;
	}
	u32 len = 0, cp = 0, lo = 0x80, hi = 0xBF;
	if (b >= 0xC2 && b <= 0xDF) {
		len = 2, cp = b & 0x1F;
	} else if (b >= 0xE0 && b <= 0xEF) {
		len = 3, cp = b & 0x0F;
		lo = b == 0xE0 ? 0xA0 : 0x80; /* no overlong forms */
		hi = b == 0xED ? 0x9F : 0xBF; /* no surrogates */
	} else if (b >= 0xF0 && b <= 0xF4) {
		len = 4, cp = b & 0x07;
		lo = b == 0xF0 ? 0x90 : 0x80;
		hi = b == 0xF4 ? 0x8F : 0xBF; /* nothing above U+10FFFF */
	}
	if (len && i + len <= n) {
		u32 k = 1;
		for (; k < len; k++) {
			u8 c = s[i + k];
			if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF))
				break;
			cp = cp << 6 | (c & 0x3F);
		}
		if (k == len) {
			*pos = (i + len) << 2;
			return (s32)cp;
		}
	}
	*pos = (i << 2) | 1; /* not UTF-8: this byte is \xNN */
	return '\\';
}

static u32 cp24(const u8 *p)
{
	return p[0] | (u32)p[1] << 8 | (u32)p[2] << 16;
}

/* Whether token p matches character c; *next is the token after it. */
static int token_matches(const u8 *p, s32 c, const u8 **next)
{
	if (*p == VMS_G_ANY) {
		*next = p + 1;
		return 1;
	}
	if (*p == VMS_G_LIT) {
		*next = p + 4;
		return (u32)c == cp24(p + 1);
	}
	if (*p == VMS_G_CLASS) {
		u32 nr = p[1];
		int in = 0;
		for (u32 k = 0; k < nr; k++)
			if ((u32)c >= cp24(p + 2 + 6 * k) && (u32)c <= cp24(p + 5 + 6 * k))
				in = 1;
		*next = p + 2 + 6 * nr;
		return in;
	}
	*next = p + 1;
	return *p >= 0x20 && (s32)*p == c;
}

/* One glob program against s[0..n) (the text ends at n or at a NUL byte, as the host's
 * does): iterative, one backtrack point (every token but the star matches exactly one
 * character, so that is enough). With `partial`, s is only the root-most part of the
 * real text (a path cut to fit the record): the answer is whether some start of the
 * pattern matches s whole, i.e. whether s was consumed without a mismatch. Bounded by
 * construction: each turn consumes a character or moves the star's mark forward, so at
 * most (characters + 1) x (tokens + 1) turns, and both are bounded (a record, RULE_PROG).
 * ASCII against a literal is the usual case and is done inline. */
static int glob_one(const u8 *p, const u8 *s, u32 n, int partial)
{
	const u8 *star = NULL, *next;
	u32 pos = 0, mark = 0;
	for (;;) {
		u32 i = pos >> 2, after;
		s32 c;
		if (i >= n || (!(pos & 3) && !s[i]))
			break;
		if (!(pos & 3) && s[i] < 0x80) {
			c = s[i];
			after = pos + 4;
		} else {
			after = pos;
			c = next_char(s, n, &after);
		}
		u8 t = *p;
		if (t >= 0x20 && t == c) { /* a printable ASCII literal (tags are below 0x20) */
			p++;
			pos = after;
		} else if (t == VMS_G_STAR) {
			star = ++p;
			mark = pos;
		} else if (t < 0x20 && t != VMS_G_END && t != VMS_G_ALT && token_matches(p, c, &next)) {
			p = next;
			pos = after;
		} else if (star) {
			p = star;
			next_char(s, n, &mark); /* the star takes one more character */
			pos = mark;
		} else {
			return 0;
		}
	}
	if (partial)
		return 1;
	while (*p == VMS_G_STAR)
		p++;
	return *p == VMS_G_END || *p == VMS_G_ALT;
}

/* A program and its alternatives (G_ALT): any of them matching is a match. The
 * alternatives exist only for cut paths: fnmatch tries every start of the pattern's
 * text, and a start that cuts a [class] reads its '[' as a plain character. */
static int glob(const u8 *p, const u8 *s, u32 n, int partial)
{
	if (!partial)
		return glob_one(p, s, n, 0); /* alternatives are for cut paths only */
	for (int alt = 0; alt < VMS_RULE_PROG; alt++) {
		if (glob_one(p, s, n, 1))
			return 1;
		const u8 *end = p;
		/* skip to the next G_ALT or G_END, token by token */
		while (*end != VMS_G_END && *end != VMS_G_ALT) {
			const u8 *nx;
			token_matches(end, 0, &nx); /* G_STAR: one byte, like a plain character */
			end = nx;
		}
		if (*end != VMS_G_ALT)
			return 0;
		p = end + 1;
	}
	return 0;
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

/* The texts a rule's filters compare, built once per record (T_* index them). */
struct subjects {
	const u8 *s[VMS_T_COUNT];
	u32 n[VMS_T_COUNT];
	int path_mode; /* 0 whole, 2 the root-most part of a cut path, 3 only its end */
	char addr[48], port[8];
	char euid[12]; /* cred.change's new euid in decimal (u32: up to 10 digits) */
};

static u32 put_dec(char *dst, u64 v)
{
	char tmp[24];
	u32 n = 0, k = 0;
	do
		tmp[n++] = (char)('0' + v % 10);
	while ((v /= 10) && n < sizeof(tmp));
	while (n)
		dst[k++] = tmp[--n];
	return k;
}

static u32 put_dotted(char *dst, const u8 *a)
{
	u32 k = 0;
	for (int i = 0; i < 4; i++) {
		if (i)
			dst[k++] = '.';
		k += put_dec(dst + k, a[i]);
	}
	return k;
}

static u32 put_hex16(char *dst, u32 v)
{
	u32 k = 0;
	for (int sh = 12; sh >= 0; sh -= 4)
		if ((v >> sh) & 15 || k || !sh)
			dst[k++] = hexdigits[(v >> sh) & 15];
	return k;
}

/* An IPv6 address as Python's ipaddress prints it (RFC 5952: the first longest run of
 * two or more zero groups is "::"; optionally ::ffff:a.b.c.d for a mapped IPv4). */
static u32 put_ipv6(char *dst, const u8 *a, int v4mapped_dotted)
{
	u32 h[8], k = 0;
	int best = -1, best_len = 0, run = 0;
	for (int i = 0; i < 8; i++) {
		h[i] = (u32)a[2 * i] << 8 | a[2 * i + 1];
		run = h[i] ? 0 : run + 1;
		if (run > best_len)
			best_len = run, best = i - run + 1;
	}
	if (v4mapped_dotted && !h[0] && !h[1] && !h[2] && !h[3] && !h[4] && h[5] == 0xFFFF) {
		copy(dst, "::ffff:", 7);
		return 7 + put_dotted(dst + 7, a + 12);
	}
	if (best_len < 2)
		best = -1;
	for (int i = 0; i < 8; i++) {
		if (i == best) {
			dst[k++] = ':';
			if (i == 0)
				dst[k++] = ':';
			i += best_len - 1;
			continue;
		}
		k += put_hex16(dst + k, h[i]);
		if (i < 7)
			dst[k++] = ':';
	}
	return k;
}

static const u8 *item_at(const u8 *data, long used, u32 idx, long *len, u8 *status)
{
	long at = 0;
	for (u32 i = 0; at + 4 <= used; i++) {
		long n = *(const u16 *)(data + at);
		if (i == idx) {
			*len = at + 4 + n <= used ? n : 0;
			*status = data[at + 3];
			return data + at + 4;
		}
		at += (4 + n + 7) & ~7L;
	}
	*len = 0;
	*status = VMS_S_FAULT;
	return NULL;
}

static void set_text(struct subjects *x, int t, const char *s)
{
	x->s[t] = (const u8 *)s;
	x->n[t] = (u32)slen(s, 64);
}

/* Everything the filters of this site's rules may compare, from the captured items, as
 * the host's decoder of the same record would give it (an item it needs that faulted:
 * no fields at all, so a field compares as "None" and the path as ""). */
static void subjects(const struct vms_site *site, const struct vms_record *rec, const u8 *data,
		     long used, const u64 *frame, struct subjects *x)
{
	long n = 0, n2 = 0;
	u8 st = 0, st2 = 0;
	int fail = 0;
	x->path_mode = 0;
	x->euid[0] = 0; /* the aggregation key when the cred items faulted */
	x->s[VMS_T_COMM] = (const u8 *)rec->comm;
	x->n[VMS_T_COMM] = (u32)slen(rec->comm, VMS_COMM_LEN);
	for (u32 i = 0; i < VMS_MAX_FETCH; i++) {
		if (site->need_items >> i & 1) {
			item_at(data, used, i, &n, &st);
			if (st == VMS_S_FAULT || i >= rec->nitems)
				fail = 1;
		}
	}
	x->s[VMS_T_PATH] = (const u8 *)"";
	x->n[VMS_T_PATH] = 0;
	for (int t = VMS_T_ADDR; t < VMS_T_COUNT; t++)
		set_text(x, t, "None");
	if (fail)
		return;
	if (site->path_item >= 0) {
		const u8 *p = item_at(data, used, (u32)site->path_item, &n, &st);
		if (p && n > 0) {
			x->s[VMS_T_PATH] = p;
			x->n[VMS_T_PATH] = (u32)slen((const char *)p, (unsigned long)n);
			x->path_mode = st == VMS_S_OK ? 0 : p[0] == '/' ? 2 : 3;
		}
	}
	if (site->port_item >= 0 && site->port_mode == 0) { /* struct sockaddr */
		const u8 *a = item_at(data, used, (u32)site->port_item, &n, &st);
		long len = (long)(frame[FR_RDX] & 0xFFFF);
		len = len < 2 ? 2 : len > 28 ? 28 : len;
		len = len < n ? len : n;
		u32 family = len >= 2 ? a[0] | (u32)a[1] << 8 : len == 1 ? a[0] : 0;
		if ((family == 2 && len >= 8) || (family == 10 && len >= 24)) {
			x->port[put_dec(x->port, (u32)a[2] << 8 | a[3])] = 0;
			set_text(x, VMS_T_PORT, x->port);
			if (family == 2)
				x->addr[put_dotted(x->addr, a + 4)] = 0;
			else
				x->addr[put_ipv6(x->addr, a + 8, site->net_flags & VMS_N_V4MAPPED_DOTTED)] = 0;
			set_text(x, VMS_T_ADDR, x->addr);
		} else if (family == 1) { /* a unix socket's path: the bytes up to NUL */
			x->s[VMS_T_ADDR] = a + 2;
			x->n[VMS_T_ADDR] = (u32)slen((const char *)a + 2, (unsigned long)(len - 2));
		}
	} else if (site->port_item >= 0) { /* listen: skc_num, skc_family, skc_rcv_saddr */
		const u8 *port = item_at(data, used, (u32)site->port_item, &n, &st);
		const u8 *addr = item_at(data, used, (u32)site->port_item + 2, &n2, &st2);
		if (n >= 2 && n2 >= 4) {
			x->port[put_dec(x->port, port[0] | (u32)port[1] << 8)] = 0;
			set_text(x, VMS_T_PORT, x->port);
			x->addr[put_dotted(x->addr, addr)] = 0;
			set_text(x, VMS_T_ADDR, x->addr);
		}
	}
	if (site->cred_item >= 0) { /* new cred, then old cred: the same span of each */
		const u8 *nw = item_at(data, used, (u32)site->cred_item, &n, &st);
		const u8 *od = item_at(data, used, (u32)site->cred_item + 1, &n2, &st2);
		int changed = 0, ok = 1;
		u32 euid_new = 0, euid_old = 0;
		for (int f = 0; f < 6; f++) {
			long off = site->cred_off[f], w = f == 5 ? 8 : 4;
			if (off + w > n || off + w > n2) {
				ok = 0;
				break;
			}
			for (long k = 0; k < w; k++)
				changed |= nw[off + k] != od[off + k];
			if (f == 1) {
				euid_new = *(const u32 *)(nw + off);
				euid_old = *(const u32 *)(od + off);
			}
		}
		if (ok) {
			set_text(x, VMS_T_ESC, !euid_new && euid_old ? "True" : "False");
			set_text(x, VMS_T_CHG, changed ? "True" : "False");
			x->euid[put_dec(x->euid, euid_new)] = 0; /* the aggregation key */
		}
	}
}

/* The filters of one rule that need only who is running (pid, uid, comm): checked
 * before anything is captured, so a hit no request wants costs only this. */
static int rule_wants_process(const struct vms_rule *r, const struct vms_record *rec)
{
	if (r->has & VMS_R_NEVER)
		return 0;
	if ((r->has & VMS_R_PID) && rec->pid != r->pid)
		return 0;
	if ((r->has & VMS_R_UID) && rec->uid != r->uid)
		return 0;
	if ((r->has & VMS_R_COMM) &&
	    !glob_one(r->prog + r->at[VMS_T_COMM], (const u8 *)rec->comm, VMS_COMM_LEN, 0))
		return 0;
	return 1;
}

/* The rule's filters on what was captured. A path cut to fit the record matches if it
 * could match (fail closed: a long or deep path must not walk around a deny rule), as
 * the host's path_could_match() says; an unknown root-most part always could. */
static int rule_wants_data(const struct vms_rule *r, const struct subjects *x)
{
	if (!(r->has & ~(VMS_R_PID | VMS_R_UID | VMS_R_COMM)))
		return 1;
	for (int t = VMS_T_PATH; t < VMS_T_COUNT; t++) {
		if (!(r->has & (4 << t)))
			continue;
		int partial = t == VMS_T_PATH && x->path_mode;
		if (partial && x->path_mode == 3)
			continue;
		if (!glob(r->prog + r->at[t], x->s[t], x->n[t], partial))
			return 0;
	}
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

/* --aggregate: count this hit in the CPU's table instead of recording it. A slot is
 * (site, task, key): the key is the object's own text (path, address and port, new euid,
 * module name), kept as a 64-bit FNV-1a hash and its first AGG_KEY_LEN bytes. A free slot
 * (count 0) is claimed by filling it, then setting count. Returns 0 when the probed slots
 * are all taken by others (the hit is recorded). */
static int aggregate(struct vms_ringheader *ring, u32 idx, const struct vms_record *rec,
		     const u8 *ktext, u32 klen)
{
	const struct vms_config *c = &vms_config;
	struct vms_aggslot *t = (struct vms_aggslot *)((u8 *)ring + sizeof(*ring) + c->ring_size +
						       VMS_RECORD_MAX + VMS_PATH_SCRATCH);
	const u64 *comm = (const u64 *)rec->comm;
	u64 key = 0xcbf29ce484222325ULL;
	for (u32 i = 0; i < klen; i++)
		key = (key ^ ktext[i]) * 0x100000001b3ULL;
	u32 h = ((u32)rec->pid * 0x9E3779B1u) ^ (idx * 0x85EBCA6Bu) ^ (u32)key ^ (u32)(key >> 32);
	for (u32 i = 0; i < VMS_AGG_PROBE; i++) {
		struct vms_aggslot *s = &t[(h + i) & (VMS_AGG_SLOTS - 1)];
		if (!s->count) {
			s->site = (u16)idx;
			s->pid = rec->pid;
			s->tgid = rec->tgid;
			s->uid = rec->uid;
			s->key = key;
			s->klen = (u16)klen;
			copy(s->ktext, ktext, klen < VMS_AGG_KEY_LEN ? klen : VMS_AGG_KEY_LEN);
			copy(s->comm, rec->comm, VMS_COMM_LEN);
			barrier();
			s->count = 1;
			return 1;
		}
		const u64 *sc = (const u64 *)s->comm;
		if (s->site == idx && s->pid == rec->pid && s->tgid == rec->tgid && s->key == key &&
		    sc[0] == comm[0] && sc[1] == comm[1]) {
			s->count++;
			return 1;
		}
	}
	return 0;
}

/* The key text of a hit for --aggregate (Site.aggregate - 1 is its kind). */
static u32 agg_key(u32 kind, struct subjects *x, const u8 *data, long used, const u8 **out)
{
	long n = 0, k;
	u8 st;
	switch (kind) {
	case VMS_K_PATH:
		*out = x->s[VMS_T_PATH];
		return x->n[VMS_T_PATH];
	case VMS_K_NET: /* address:port ([address]:port for IPv6) in the addr buffer */
		if (x->s[VMS_T_ADDR] != (const u8 *)x->addr) {
			*out = x->s[VMS_T_ADDR];
			return x->n[VMS_T_ADDR];
		}
		k = (long)slen(x->addr, sizeof(x->addr));
		if (x->s[VMS_T_PORT] == (const u8 *)x->port) {
			int v6 = 0;
			for (long i = 0; i < k; i++)
				v6 |= x->addr[i] == ':';
			if (v6 && k + 10 < (long)sizeof(x->addr)) {
				for (long i = k; i > 0; i--)
					x->addr[i] = x->addr[i - 1];
				x->addr[0] = '[';
				x->addr[k + 1] = ']';
				k += 2;
			}
			u32 np = (u32)slen(x->port, sizeof(x->port));
			if (k + 1 + (long)np < (long)sizeof(x->addr)) {
				x->addr[k++] = ':';
				copy(x->addr + k, x->port, np);
				k += np;
			}
		}
		*out = (const u8 *)x->addr;
		return (u32)k;
	case VMS_K_EUID:
		*out = (const u8 *)x->euid;
		return (u32)slen(x->euid, sizeof(x->euid));
	case VMS_K_NAME:
		*out = item_at(data, used, 0, &n, &st);
		if (!*out || st == VMS_S_FAULT)
			return 0;
		return (u32)slen((const char *)*out, (unsigned long)n);
	}
	*out = (const u8 *)"";
	return 0;
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
	if (!site || !site->enabled) {
		ring->filtered++; /* every hit is a record, a drop or filtered: the host checks */
		goto out;
	}

	u64 now = ktime_get_mono_fast_ns();
	sample_cpu(ring, now);

	/* Reserve room for the site's largest record at head: contiguous, so when the ring's
	 * end is nearer a pad record fills up to it and the record starts at offset 0. A
	 * full ring (or a tail the guest forged past head) gives the scratch record: deny and
	 * kill are still decided, the record is dropped and counted. */
	u64 size = c->ring_size, head = ring->head;
	u64 need = site->max_size < VMS_RECORD_MAX ? site->max_size : VMS_RECORD_MAX;
	u64 off = head & (size - 1);
	u64 pad = size - off < need ? size - off : 0;
	u8 *base = (u8 *)ring + sizeof(*ring);
	int full = head - ring->tail + pad + need > size;
	u8 *slot = full ? base + size : base + (pad ? 0 : off);
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
	if (rd64(current + c->t_cred, &cred) && cred) {
		rd32(cred + c->c_uid, &rec->uid);
		rd32(cred + c->c_euid, &rec->euid);
		rd32(cred + c->c_gid, &rec->gid);
	}
	copy_from_kernel_nofault(rec->comm, (const void *)(current + c->t_comm), VMS_COMM_LEN);

	/* Filters on the process first: no rule wants this hit, nothing is captured. */
	u32 maybe = 0;
	for (u32 i = 0; i < site->nrules && i < VMS_MAX_RULES; i++)
		if (rule_wants_process(&site->rules[i], rec))
			maybe |= 1U << i;
	if (!maybe) {
		ring->filtered++;
		goto out;
	}
	if (rd64(current + c->t_parent, &parent) && parent)
		rd32(parent + c->t_tgid, (u32 *)&rec->ppid);
	static const u8 args[6] = { FR_RDI, FR_RSI, FR_RDX, FR_RCX, FR_R8, FR_R9 };
	u32 nargs = site->nargs < 6 ? site->nargs : 6;
	u64 *argv = (u64 *)(slot + sizeof(*rec));
	for (u32 i = 0; i < nargs; i++)
		argv[i] = frame[args[i]];
	rec->nargs = (u8)nargs;

	/* captured items, each as long as its content */
	u8 *data = slot + sizeof(*rec) + nargs * 8;
	long used = 0, room = (long)need - (long)sizeof(*rec) - (long)nargs * 8;
	char *scratch = (char *)base + size + VMS_RECORD_MAX;
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
		used += (4 + n + 7) & ~7L;
		rec->nitems++;
	}
	/* The texts to compare, only when some rule (or --aggregate) compares any. */
	struct subjects x;
	u32 data_rules = site->aggregate;
	for (u32 i = 0; i < site->nrules && i < VMS_MAX_RULES; i++)
		data_rules |= site->rules[i].has & ~(VMS_R_PID | VMS_R_UID | VMS_R_COMM);
	if (data_rules)
		subjects(site, rec, data, used, frame, &x);

	for (u32 i = 0; i < site->nrules && i < VMS_MAX_RULES; i++) {
		const struct vms_rule *r = &site->rules[i];
		if (!(maybe >> i & 1) || !rule_wants_data(r, &x))
			continue;
		rec->matched |= 1U << i;
		if (r->action == VMS_A_DENY)
			deny = 1;
		else if (r->action == VMS_A_KILL && !(rec->verdict & 2)) {
			kill_current(current);
			rec->verdict |= 2;
		}
	}
	if (!rec->matched) { /* wanted by no request after all: not published */
		ring->filtered++;
		goto out;
	}
	if (deny)
		rec->verdict |= 1;
	ring->denied += (u64)deny;
	ring->killed += (rec->verdict >> 1) & 1;
	const u8 *ktext = NULL;
	u32 klen = site->aggregate ? agg_key(site->aggregate - 1, &x, data, used, &ktext) : 0;
	if (site->aggregate && aggregate(ring, idx, rec, ktext, klen)) {
		ring->aggregated++; /* counted, not recorded: no ring space */
		goto out;
	}
	rec->size = (u32)(sizeof(*rec) + nargs * 8 + (u64)used);
	barrier();
	if (full) {
		ring->drops++;
	} else {
		if (pad) { /* the ring's end: a pad record up to it, published with ours */
			struct vms_record *p = (struct vms_record *)(base + off);
			p->size = (u32)pad | VMS_PAD_FLAG;
			p->seq = (u32)((head >> 3) + 1);
		}
		rec->seq = (u32)(((head + pad) >> 3) + 1); /* a zeroed ring holds no record */
		barrier();
		ring->records++;
		ring->head = head + pad + rec->size; /* publish: the host reads below head */
	}
out:
	barrier();
	ring->inflight = 0;
	return deny;
}
