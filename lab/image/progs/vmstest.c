/*
 * vmstest: the guest-side test program of vmshield.
 *
 * Each subcommand performs one behaviour that vmshield monitors and prints, on one
 * line of "key=value" pairs, the guest's own view of it (its pid, the path it opened,
 * the errno it got). Tests hold vmshield's events against these lines, so the guest
 * tells its own truth. Built statically by `make setup`; no libraries in the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/syscall.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/bpf.h>

/* Print the identity every line starts with: who did it. */
static void ident(const char *what)
{
	printf("vmstest %s pid=%d ppid=%d uid=%d euid=%d", what, getpid(), getppid(),
	       getuid(), geteuid());
}

static int do_open(const char *path)
{
	int fd = open(path, O_RDONLY);
	int err = fd < 0 ? errno : 0;
	ident("open");
	printf(" path=%s flags=%d fd=%d errno=%d\n", path, O_RDONLY, fd, err);
	if (fd >= 0)
		close(fd);
	return err ? 1 : 0;
}

/* 127.0.0.1:port: tests never aim traffic off the guest. */
static void loopback(struct sockaddr_in *sa, int port)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((unsigned short)port);
	sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
}

static int do_connect(int port)
{
	struct sockaddr_in sa;
	int s = socket(AF_INET, SOCK_STREAM, 0);
	int rc, err;

	loopback(&sa, port);
	rc = connect(s, (struct sockaddr *)&sa, sizeof(sa));
	err = rc < 0 ? errno : 0;
	ident("connect");
	printf(" addr=127.0.0.1 port=%d rc=%d errno=%d\n", port, rc, err);
	close(s);
	return 0;
}

static int do_bind(int port, int listen_too)
{
	struct sockaddr_in sa;
	int s = socket(AF_INET, SOCK_STREAM, 0);
	int rc, err;

	loopback(&sa, port);
	rc = bind(s, (struct sockaddr *)&sa, sizeof(sa));
	if (rc == 0 && listen_too)
		rc = listen(s, 7);
	err = rc < 0 ? errno : 0;
	ident(listen_too ? "listen" : "bind");
	printf(" addr=127.0.0.1 port=%d backlog=7 rc=%d errno=%d\n", port, rc, err);
	close(s);
	return err ? 1 : 0;
}

static int do_unlink(const char *path)
{
	int rc = unlink(path);
	ident("unlink");
	printf(" path=%s rc=%d errno=%d\n", path, rc, rc < 0 ? errno : 0);
	return rc < 0;
}

static int do_rename(const char *a, const char *b)
{
	int rc = rename(a, b);
	ident("rename");
	printf(" path=%s new_path=%s rc=%d errno=%d\n", a, b, rc, rc < 0 ? errno : 0);
	return rc < 0;
}

/* A path too long for a record and deeper than any fixed bound: under ROOT, DEPTH
 * directories named with LEN letters each, made by mkdir + chdir (a relative walk, so
 * the whole path may exceed PATH_MAX), then open("f") with O_CREAT in the deepest one.
 * Prints the full path's length and depth; a deny rule on ROOT's parent must still
 * apply to this open. The tree is left in place (`rm -rf` it). */
static int do_deep(const char *root, int depth, int len)
{
	char name[256];
	long total = (long)strlen(root);
	if (depth < 0 || len < 1 || len > 255)
		return 2;
	memset(name, 'd', (size_t)len);
	name[len] = 0;
	if ((mkdir(root, 0755) != 0 && errno != EEXIST) || chdir(root) != 0) {
		perror("vmstest deep");
		return 1;
	}
	for (int i = 0; i < depth; i++) {
		if ((mkdir(name, 0755) != 0 && errno != EEXIST) || chdir(name) != 0) {
			perror("vmstest deep");
			return 1;
		}
		total += 1 + len;
	}
	int fd = open("f", O_RDONLY | O_CREAT, 0644);
	int err = fd < 0 ? errno : 0;
	ident("deep");
	printf(" path_len=%ld depth=%d fd=%d errno=%d\n", total + 2, depth + 1, fd, err);
	if (fd >= 0)
		close(fd);
	return err ? 1 : 0;
}

/* Fork a child that exits at once with a known code; print both pids. */
static int do_fork(int code)
{
	int status = 0;
	pid_t child = fork();
	if (child == 0)
		_exit(code);
	waitpid(child, &status, 0);
	ident("fork");
	printf(" child_pid=%d exit_code=%d\n", child, WEXITSTATUS(status));
	return 0;
}

static int do_ptrace(void)
{
	int status = 0;
	long rc;
	pid_t child = fork();
	if (child == 0) {
		pause();
		_exit(0);
	}
	rc = ptrace(PTRACE_ATTACH, child, 0, 0);
	int err = rc < 0 ? errno : 0;
	if (rc == 0) {
		waitpid(child, &status, 0);
		ptrace(PTRACE_DETACH, child, 0, 0);
	}
	kill(child, SIGKILL);
	waitpid(child, &status, 0);
	ident("ptrace");
	printf(" tracee_pid=%d rc=%ld errno=%d\n", child, rc, err);
	return 0;
}

/* bpf(BPF_MAP_CREATE) of a tiny array: enough to reach the kernel's security_bpf(). */
static int do_bpf(void)
{
	union bpf_attr attr;
	long fd;
	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = 4;
	attr.max_entries = 1;
	fd = syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof(attr));
	ident("bpf");
	printf(" cmd=%d rc=%ld errno=%d\n", BPF_MAP_CREATE, fd, fd < 0 ? errno : 0);
	if (fd >= 0)
		close((int)fd);
	return 0;
}

/* A user-space function for ufunc points: not inlined, so it has its own address. */
__attribute__((noinline)) long vms_ufunc_target(long a, long b)
{
	__asm__ volatile("" ::: "memory");
	return a * 1000 + b;
}

/* Nanoseconds from a to now (CLOCK_MONOTONIC): the timed part of a benchmark. */
static long ns_since(const struct timespec *a)
{
	struct timespec b;
	clock_gettime(CLOCK_MONOTONIC, &b);
	return (long)(b.tv_sec - a->tv_sec) * 1000000000L + (b.tv_nsec - a->tv_nsec);
}

/* A syscall-heavy loop for benchmarks: N getpid calls, made as raw syscalls so that
 * no libc caching hides them. */
static int do_loop(long n)
{
	long i, ns;
	struct timespec a;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (i = 0; i < n; i++)
		syscall(SYS_getpid);
	ns = ns_since(&a);
	ident("loop");
	printf(" n=%ld ns=%ld\n", n, ns);
	return 0;
}

/* A mixed, syscall-heavy workload for benchmarks: per round one fork+exec, ten
 * open/read/close, two loopback connects (refused) and fifty getpid calls. */
static int do_mix(long rounds)
{
	long i, j, ns;
	char buf[256];
	struct timespec a;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (i = 0; i < rounds; i++) {
		pid_t child = fork();
		if (child == 0) {
			execl("/bin/vmstest", "vmstest", "true", (char *)0);
			_exit(127);
		}
		waitpid(child, 0, 0);
		for (j = 0; j < 10; j++) {
			int fd = open("/etc/passwd", O_RDONLY);
			if (fd >= 0) {
				if (read(fd, buf, sizeof(buf)) < 0)
					perror("read");
				close(fd);
			}
		}
		for (j = 0; j < 2; j++) {
			struct sockaddr_in sa;
			int s = socket(AF_INET, SOCK_STREAM, 0);
			loopback(&sa, 5999);
			if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0)
				fprintf(stderr, "unexpected connect\n");
			close(s);
		}
		for (j = 0; j < 50; j++)
			syscall(SYS_getpid);
	}
	ns = ns_since(&a);
	ident("mix");
	printf(" rounds=%ld ns=%ld\n", rounds, ns);
	return 0;
}

static int do_sleep(int secs)
{
	ident("sleep");
	printf(" secs=%d\n", secs);
	fflush(stdout);
	sleep((unsigned int)secs);
	return 0;
}

int main(int argc, char **argv)
{
	/* "as UID ..." drops to that uid/gid first, then runs the rest as a subcommand:
	 * a non-root process for tests, without login or su. */
	if (argc >= 4 && strcmp(argv[1], "as") == 0) {
		int id = atoi(argv[2]);
		if (setgid((gid_t)id) != 0 || setuid((uid_t)id) != 0) {
			perror("vmstest as");
			return 1;
		}
		argv[2] = argv[0];
		return main(argc - 2, argv + 2);
	}
	if (argc >= 3 && strcmp(argv[1], "open") == 0)
		return do_open(argv[2]);
	if (argc >= 3 && strcmp(argv[1], "connect") == 0)
		return do_connect(atoi(argv[2]));
	if (argc >= 3 && strcmp(argv[1], "loop") == 0)
		return do_loop(atol(argv[2]));
	if (argc >= 3 && strcmp(argv[1], "mix") == 0)
		return do_mix(atol(argv[2]));
	if (argc >= 2 && strcmp(argv[1], "true") == 0)
		return 0;
	if (argc >= 3 && strcmp(argv[1], "sleep") == 0)
		return do_sleep(atoi(argv[2]));
	if (argc >= 3 && strcmp(argv[1], "bind") == 0)
		return do_bind(atoi(argv[2]), 0);
	if (argc >= 3 && strcmp(argv[1], "listen") == 0)
		return do_bind(atoi(argv[2]), 1);
	if (argc >= 3 && strcmp(argv[1], "unlink") == 0)
		return do_unlink(argv[2]);
	if (argc >= 4 && strcmp(argv[1], "rename") == 0)
		return do_rename(argv[2], argv[3]);
	if (argc >= 3 && strcmp(argv[1], "fork") == 0)
		return do_fork(atoi(argv[2]));
	if (argc >= 3 && strcmp(argv[1], "exit") == 0) {
		ident("exit");
		printf(" exit_code=%d\n", atoi(argv[2]));
		fflush(stdout);
		_exit(atoi(argv[2]));
	}
	if (argc >= 2 && strcmp(argv[1], "ptrace") == 0)
		return do_ptrace();
	if (argc >= 4 && strcmp(argv[1], "ufunc") == 0) {
		long r = vms_ufunc_target(atol(argv[2]), atol(argv[3]));
		ident("ufunc");
		printf(" a=%s b=%s result=%ld\n", argv[2], argv[3], r);
		return 0;
	}
	if (argc >= 3 && strcmp(argv[1], "ufunc-loop") == 0) {
		/* Call the target every 200 ms, N times: a long-running process for points
		 * that must be placed in a process that already runs. */
		long i, n = atol(argv[2]);
		ident("ufunc-loop");
		printf(" n=%ld\n", n);
		fflush(stdout);
		for (i = 0; i < n; i++) {
			vms_ufunc_target(i, 42);
			usleep(200000);
		}
		return 0;
	}
	if (argc >= 2 && strcmp(argv[1], "bpf") == 0)
		return do_bpf();
	if (argc >= 3 && strcmp(argv[1], "exec") == 0) {
		ident("exec");
		printf(" filename=%s\n", argv[2]);
		fflush(stdout);
		execv(argv[2], argv + 2);
		printf("vmstest exec errno=%d\n", errno);
		return 1;
	}
	if (argc >= 5 && strcmp(argv[1], "deep") == 0)
		return do_deep(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc >= 2 && strcmp(argv[1], "id") == 0) {
		ident("id");
		printf("\n");
		return 0;
	}
	fprintf(stderr, "usage: vmstest [as UID] open PATH | connect PORT | bind PORT | "
		"listen PORT | unlink PATH | rename A B | fork CODE | exit CODE | ptrace | bpf | "
		"exec PATH ARGS... | loop N | mix N | true | sleep S | id | deep ROOT DEPTH LEN\n");
	return 2;
}
