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
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <arpa/inet.h>

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

static int do_connect(int port)
{
	struct sockaddr_in sa;
	int s = socket(AF_INET, SOCK_STREAM, 0);
	int rc, err;

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	rc = connect(s, (struct sockaddr *)&sa, sizeof(sa));
	err = rc < 0 ? errno : 0;
	ident("connect");
	printf(" addr=127.0.0.1 port=%d rc=%d errno=%d\n", port, rc, err);
	close(s);
	return 0;
}

/* A syscall-heavy loop for benchmarks: N getpid calls, made as raw syscalls so that
 * no libc caching hides them. */
static int do_loop(long n)
{
	long i;
	for (i = 0; i < n; i++)
		syscall(SYS_getpid);
	ident("loop");
	printf(" n=%ld\n", n);
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
	if (argc >= 3 && strcmp(argv[1], "sleep") == 0)
		return do_sleep(atoi(argv[2]));
	if (argc >= 2 && strcmp(argv[1], "id") == 0) {
		ident("id");
		printf("\n");
		return 0;
	}
	fprintf(stderr, "usage: vmstest [as UID] open PATH | connect PORT | loop N | sleep S | id\n");
	return 2;
}
