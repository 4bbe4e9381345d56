/*
 * vmsqga: a minimal guest agent for the lab guest, speaking the subset of
 * qemu-guest-agent's protocol that vmshield's symbol transfer uses, on the virtio-serial
 * port named org.qemu.guest_agent.0. Debian's qemu-guest-agent (glib, several MB of
 * libraries) is too heavy for the busybox initramfs; the host side is the same either
 * way, so a guest that runs the real agent works with vmshield unchanged.
 *
 * Commands: guest-sync, guest-sync-delimited, guest-ping, guest-exec (path, arg,
 * capture-output; the command runs to completion before the reply, its stdout is kept,
 * stderr goes to /dev/null) and guest-exec-status (pid). Requests are JSON objects, one
 * after the other (read until the braces balance); replies are one line each.
 * The host is trusted less than nothing here too: every length is bounded and a request
 * that does not parse gets an error reply, never a crash.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PORT_NAME "org.qemu.guest_agent.0"
#define MAX_REQUEST (64 * 1024)
#define MAX_OUTPUT (16 * 1024 * 1024) /* qemu-ga's own limit for captured output */
#define MAX_ARGS 32
#define MAX_ARG_LEN 16384
#define SLOTS 8

struct result {
	int pid;
	int exitcode;
	int signal;
	char *out;
	size_t out_len;
};

static struct result slots[SLOTS];
static int next_slot;
static int port = -1;

static int write_all(const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(port, buf, len);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static void reply(const char *text)
{
	write_all(text, strlen(text));
	write_all("\n", 1);
}

static void reply_error(const char *cls, const char *desc)
{
	char buf[512];
	snprintf(buf, sizeof(buf), "{\"error\": {\"class\": \"%s\", \"desc\": \"%s\"}}", cls, desc);
	reply(buf);
}

/* Position just after "key": in obj, or NULL. Keys are matched as whole strings. */
static const char *find_key(const char *obj, const char *key)
{
	size_t klen = strlen(key);
	const char *p = obj;
	while ((p = strchr(p, '"')) != NULL) {
		if (strncmp(p + 1, key, klen) == 0 && p[1 + klen] == '"') {
			const char *q = p + 2 + klen;
			while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
				q++;
			if (*q == ':')
				return q + 1;
		}
		p++;
	}
	return NULL;
}

static const char *skip_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

/* A JSON string at p into out (at most cap-1 bytes); returns the position after it. */
static const char *parse_string(const char *p, char *out, size_t cap)
{
	size_t n = 0;
	p = skip_ws(p);
	if (*p != '"')
		return NULL;
	p++;
	while (*p && *p != '"') {
		char c = *p++;
		if (c == '\\') {
			c = *p++;
			switch (c) {
			case 'n': c = '\n'; break;
			case 't': c = '\t'; break;
			case 'r': c = '\r'; break;
			case '"': case '\\': case '/': break;
			default: return NULL; /* \uXXXX and others: not needed here */
			}
		}
		if (n + 1 >= cap)
			return NULL;
		out[n++] = c;
	}
	if (*p != '"')
		return NULL;
	out[n] = 0;
	return p + 1;
}

static int parse_int(const char *p, long *v)
{
	char *end;
	p = skip_ws(p);
	errno = 0;
	*v = strtol(p, &end, 10);
	return end != p && errno == 0;
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *base64(const char *in, size_t len)
{
	char *out = malloc(4 * ((len + 2) / 3) + 1), *o = out;
	size_t i;
	if (!out)
		return NULL;
	for (i = 0; i + 2 < len; i += 3) {
		unsigned v = (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8 |
			     (unsigned char)in[i + 2];
		*o++ = b64[v >> 18];
		*o++ = b64[(v >> 12) & 63];
		*o++ = b64[(v >> 6) & 63];
		*o++ = b64[v & 63];
	}
	if (i < len) {
		unsigned v = (unsigned char)in[i] << 16;
		if (i + 1 < len)
			v |= (unsigned char)in[i + 1] << 8;
		*o++ = b64[v >> 18];
		*o++ = b64[(v >> 12) & 63];
		*o++ = i + 1 < len ? b64[(v >> 6) & 63] : '=';
		*o++ = '=';
	}
	*o = 0;
	return out;
}

static void do_exec(const char *req)
{
	static char args[MAX_ARGS + 1][MAX_ARG_LEN];
	char *argv[MAX_ARGS + 2];
	int argc = 0, fds[2], status = 0;
	const char *p = find_key(req, "path");
	struct result *r;
	pid_t pid;
	char *buf;
	size_t len = 0, cap = 65536;

	if (!p || !parse_string(p, args[0], MAX_ARG_LEN)) {
		reply_error("GenericError", "guest-exec needs a string path");
		return;
	}
	argv[argc++] = args[0];
	p = find_key(req, "arg");
	if (p) {
		p = skip_ws(p);
		if (*p != '[') {
			reply_error("GenericError", "arg is not an array");
			return;
		}
		p = skip_ws(p + 1);
		while (*p != ']') {
			if (argc > MAX_ARGS || !(p = parse_string(p, args[argc], MAX_ARG_LEN))) {
				reply_error("GenericError", "bad or too many arguments");
				return;
			}
			argv[argc] = args[argc];
			argc++;
			p = skip_ws(p);
			if (*p == ',')
				p = skip_ws(p + 1);
			else if (*p != ']') {
				reply_error("GenericError", "bad argument array");
				return;
			}
		}
	}
	argv[argc] = NULL;
	if (pipe(fds) < 0) {
		reply_error("GenericError", "pipe failed");
		return;
	}
	pid = fork();
	if (pid < 0) {
		reply_error("GenericError", "fork failed");
		return;
	}
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		dup2(null, 0);
		dup2(null, 2);
		dup2(fds[1], 1);
		close(fds[0]);
		close(fds[1]);
		execv(argv[0], argv);
		_exit(127);
	}
	close(fds[1]);
	buf = malloc(cap);
	for (;;) {
		ssize_t n;
		if (buf && len == cap && cap < MAX_OUTPUT) {
			char *bigger = realloc(buf, cap * 2);
			if (bigger) {
				buf = bigger;
				cap *= 2;
			}
		}
		if (buf && len < cap)
			n = read(fds[0], buf + len, cap - len);
		else {
			char sink[4096]; /* over the limit: drain, keep the first MAX_OUTPUT */
			n = read(fds[0], sink, sizeof(sink));
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (buf && len < cap)
			len += (size_t)n;
	}
	close(fds[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	r = &slots[next_slot++ % SLOTS];
	free(r->out);
	r->pid = pid;
	r->exitcode = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
	r->signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
	r->out = buf;
	r->out_len = buf ? len : 0;
	{
		char text[64];
		snprintf(text, sizeof(text), "{\"return\": {\"pid\": %d}}", (int)pid);
		reply(text);
	}
}

static void do_exec_status(const char *req)
{
	const char *p = find_key(req, "pid");
	long pid;
	int i;
	if (!p || !parse_int(p, &pid)) {
		reply_error("GenericError", "guest-exec-status needs a pid");
		return;
	}
	for (i = 0; i < SLOTS; i++) {
		struct result *r = &slots[i];
		if (r->pid && r->pid == pid) {
			char *data = base64(r->out ? r->out : "", r->out_len);
			char *text;
			size_t size;
			if (!data) {
				reply_error("GenericError", "out of memory");
				return;
			}
			size = strlen(data) + 160;
			text = malloc(size);
			if (!text) {
				free(data);
				reply_error("GenericError", "out of memory");
				return;
			}
			if (r->signal)
				snprintf(text, size,
					 "{\"return\": {\"exited\": true, \"signal\": %d, "
					 "\"out-data\": \"%s\"}}", r->signal, data);
			else
				snprintf(text, size,
					 "{\"return\": {\"exited\": true, \"exitcode\": %d, "
					 "\"out-data\": \"%s\"}}", r->exitcode, data);
			reply(text);
			free(text);
			free(data);
			r->pid = 0;
			free(r->out);
			r->out = NULL;
			return;
		}
	}
	reply_error("GenericError", "no such guest-exec pid");
}

static void handle(const char *req)
{
	char cmd[64];
	const char *p = find_key(req, "execute");
	long id;
	if (!p || !parse_string(p, cmd, sizeof(cmd))) {
		reply_error("GenericError", "no execute member");
		return;
	}
	if (!strcmp(cmd, "guest-sync") || !strcmp(cmd, "guest-sync-delimited")) {
		char text[64];
		p = find_key(req, "id");
		if (!p || !parse_int(p, &id)) {
			reply_error("GenericError", "guest-sync needs an integer id");
			return;
		}
		if (cmd[10] == '-')
			write_all("\xff", 1);
		snprintf(text, sizeof(text), "{\"return\": %ld}", id);
		reply(text);
	} else if (!strcmp(cmd, "guest-ping")) {
		reply("{\"return\": {}}");
	} else if (!strcmp(cmd, "guest-exec")) {
		do_exec(req);
	} else if (!strcmp(cmd, "guest-exec-status")) {
		do_exec_status(req);
	} else {
		reply_error("CommandNotFound", "this lab agent has no such command");
	}
}

/* The /dev node of the virtio port called PORT_NAME, from sysfs. */
static int open_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	int fd = -1;
	if (!d)
		return -1;
	while (fd < 0 && (e = readdir(d)) != NULL) {
		char path[300], name[64] = {0};
		FILE *f;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(name, sizeof(name), f) && !strncmp(name, PORT_NAME, strlen(PORT_NAME))) {
			snprintf(path, sizeof(path), "/dev/%s", e->d_name);
			fd = open(path, O_RDWR);
		}
		fclose(f);
	}
	closedir(d);
	return fd;
}

int main(void)
{
	static char req[MAX_REQUEST + 1];
	size_t len = 0;
	int depth = 0, in_str = 0, esc = 0;

	port = open_port();
	if (port < 0) {
		fprintf(stderr, "vmsqga: no virtio port named %s\n", PORT_NAME);
		return 1;
	}
	for (;;) {
		char c;
		ssize_t n = read(port, &c, 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			usleep(100000); /* host not connected: the port reads EOF; wait */
			continue;
		}
		if (len == 0 && c != '{')
			continue; /* between requests (newlines, a 0xff resync byte) */
		if (len >= MAX_REQUEST) {
			reply_error("GenericError", "request too long");
			len = 0;
			depth = in_str = esc = 0;
			continue;
		}
		req[len++] = c;
		if (in_str) {
			if (esc)
				esc = 0;
			else if (c == '\\')
				esc = 1;
			else if (c == '"')
				in_str = 0;
		} else if (c == '"') {
			in_str = 1;
		} else if (c == '{') {
			depth++;
		} else if (c == '}' && --depth == 0) {
			req[len] = 0;
			handle(req);
			len = 0;
		}
	}
}
