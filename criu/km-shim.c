/*
 * km-shim — a minimal container supervisor (what conmon does for CRI-O), for criu/demo.sh and
 * as the model of what the test kubelet must do when it starts or restores a container with crun.
 *
 *   km-shim -l LOG [-p CONTAINER_PIDFILE] [-e EXITFILE] [-s SHIM_PIDFILE] -- CMD [ARG...]
 *
 * CMD is typically `criu/enter.sh ... crun run --detach ...` or `... crun restore --detach ...`.
 *
 * What it does:
 *   - forks a daemon that calls setsid() (no controlling terminal, own session and process
 *     group: signals to the caller's job never reach the container), closes every fd it does not
 *     own (nothing of the caller — harness pipes, sockets — is inherited by the container), and
 *     becomes a child subreaper (PR_SET_CHILD_SUBREAPER), so that the container's init, orphaned
 *     when `crun run --detach` / `crun restore --detach` exits, is re-parented to the shim instead
 *     of the host's pid 1;
 *   - runs CMD with stdin, stdout and stderr connected to three pipes. Pipes are what CRIU needs:
 *     crun records them in descriptors.json at checkpoint time and, at restore, reconnects the
 *     restored process's fds 0-2 to the pipes it is given (criu --inherit-fd pipe:[ino]).
 *     A file or /dev/null of the host is outside the container's mount namespace and makes the
 *     dump fail or the restore lose its output;
 *   - copies everything the container writes to LOG (append), reaps every child, records the
 *     container init's exit status (pid from CONTAINER_PIDFILE, written by crun --pid-file) in
 *     EXITFILE, and exits when CMD and the container are gone and the pipes are closed;
 *   - the process the caller started exits as soon as CMD has finished, with CMD's exit status
 *     (so `km-shim ... crun run --detach` returns when the container runs, or fails with crun).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *log_path, *ctr_pidfile, *exit_path, *shim_pidfile;
static int log_fd = -1;

static void on_sigchld(int sig) { (void)sig; /* only to interrupt poll() */ }

static void die(const char *what) {
    fprintf(stderr, "km-shim: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
    char buf[512];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = strftime(buf, sizeof buf, "%FT%T", &tm);
    n += snprintf(buf + n, sizeof buf - n, ".%03ldZ km-shim[%d]: ", ts.tv_nsec / 1000000, getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (log_fd >= 0 && write(log_fd, buf, n) < 0) { /* nothing to do */ }
}

static void close_other_fds(const int *keep, int nkeep) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return;
    int dfd = dirfd(d);
    int fds[1024], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || fd <= 2 || fd == dfd) continue;
        int k = 0;
        for (int i = 0; i < nkeep; i++) k |= keep[i] == fd;
        if (!k) fds[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++) close(fds[i]);
}

static pid_t read_pidfile(void) {
    if (!ctr_pidfile) return 0;
    FILE *f = fopen(ctr_pidfile, "r");
    if (!f) return 0;
    long p = 0;
    if (fscanf(f, "%ld", &p) != 1) p = 0;
    fclose(f);
    return (pid_t)p;
}

static void write_exit(int status) {
    if (!exit_path) return;
    FILE *f = fopen(exit_path, "w");
    if (!f) return;
    if (WIFEXITED(status)) fprintf(f, "exited %d\n", WEXITSTATUS(status));
    else if (WIFSIGNALED(status)) fprintf(f, "signaled %d\n", WTERMSIG(status));
    else fprintf(f, "status %d\n", status);
    fclose(f);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "+l:p:e:s:")) != -1) {
        switch (opt) {
        case 'l': log_path = optarg; break;
        case 'p': ctr_pidfile = optarg; break;
        case 'e': exit_path = optarg; break;
        case 's': shim_pidfile = optarg; break;
        default:
            fprintf(stderr, "usage: km-shim -l LOG [-p CONTAINER_PIDFILE] [-e EXITFILE] [-s SHIM_PIDFILE] -- CMD [ARG...]\n");
            return 2;
        }
    }
    if (!log_path || optind >= argc) {
        fprintf(stderr, "usage: km-shim -l LOG [-p CONTAINER_PIDFILE] [-e EXITFILE] [-s SHIM_PIDFILE] -- CMD [ARG...]\n");
        return 2;
    }
    char **cmd = argv + optind;

    int sync[2];
    if (pipe2(sync, O_CLOEXEC) < 0) die("pipe");
    pid_t daemon_pid = fork();
    if (daemon_pid < 0) die("fork");
    if (daemon_pid > 0) {
        /* The caller's process: wait for CMD's exit status, then leave. */
        close(sync[1]);
        int st = -1;
        ssize_t r;
        do r = read(sync[0], &st, sizeof st); while (r < 0 && errno == EINTR);
        waitpid(daemon_pid, NULL, WNOHANG);
        if (r != sizeof st) { fprintf(stderr, "km-shim: supervisor died before CMD finished; see %s\n", log_path); return 125; }
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return 0;
        fprintf(stderr, "km-shim: command failed (%s %d); see %s\n",
                WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), log_path);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }

    /* The supervisor. */
    close(sync[0]);
    if (setsid() < 0) die("setsid");
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) die("prctl(PR_SET_CHILD_SUBREAPER)");
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigchld; /* no SA_RESTART: a child's exit interrupts poll() at once */
    sigaction(SIGCHLD, &sa, NULL);
    log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) die("open log");
    int devnull = open("/dev/null", O_RDWR);
    if (devnull < 0) die("open /dev/null");
    dup2(devnull, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    close(devnull);
    int keep[] = {sync[1], log_fd};
    close_other_fds(keep, 2);
    if (shim_pidfile) {
        FILE *f = fopen(shim_pidfile, "w");
        if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
    }

    int in[2], out[2], err[2];
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) die("pipe");
    logf_("starting: %s ...", cmd[0]);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        /* dup2 clears O_CLOEXEC on the copies: CMD gets exactly fds 0, 1, 2. */
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        signal(SIGHUP, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        execvp(cmd[0], cmd);
        fprintf(stderr, "km-shim: exec %s: %s\n", cmd[0], strerror(errno));
        _exit(127);
    }
    close(in[0]);
    close(in[1]); /* the container's stdin is an empty pipe at EOF */
    close(out[1]);
    close(err[1]);

    struct pollfd pfd[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int open_pipes = 2, cmd_done = 0, children = 1;
    pid_t ctr = 0;
    char buf[65536];
    for (;;) {
        int r = poll(pfd, 2, 200);
        if (r < 0 && errno != EINTR) die("poll");
        for (int i = 0; i < 2; i++) {
            if (pfd[i].fd < 0 || !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(pfd[i].fd, buf, sizeof buf);
            if (n > 0) {
                if (write(log_fd, buf, n) < 0) { /* log full: drop */ }
            } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                close(pfd[i].fd);
                pfd[i].fd = -1;
                open_pipes--;
            }
        }
        for (;;) {
            int st;
            pid_t p = waitpid(-1, &st, WNOHANG);
            if (p < 0 && errno == ECHILD) { children = 0; break; }
            if (p <= 0) break;
            if (p == child) {
                cmd_done = 1;
                logf_("command exited: %s %d", WIFEXITED(st) ? "exit" : "signal",
                      WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                ctr = read_pidfile();
                if (ctr) logf_("container init pid %d", ctr);
                if (write(sync[1], &st, sizeof st) < 0) { /* caller gone */ }
                close(sync[1]);
            } else {
                if (p == ctr || (!ctr && (ctr = read_pidfile()) == p)) {
                    logf_("container init %d exited: %s %d", p, WIFEXITED(st) ? "exit" : "signal",
                          WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                    write_exit(st);
                } else {
                    logf_("reaped %d", p);
                }
            }
        }
        if (cmd_done && !children && open_pipes == 0) break;
    }
    logf_("done");
    return 0;
}
