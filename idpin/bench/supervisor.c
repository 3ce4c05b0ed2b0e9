/*
 * `idpin bench supervisor`: the workload a supervised program runs, and the
 * physical floor of a supervisor (a C loop answering CONTINUE), in one
 * binary compiled at run time by idpin.bench.supervisor.
 *
 *   supervisor ioctl N        N ioctl(/dev/null, TIOCGPTN): trapped, nothing pending
 *   supervisor fork N         N fork + _exit + waitpid
 *   supervisor semget N       N semget(IPC_PRIVATE) + IPC_RMID
 *   supervisor pty N          N openpty + close
 *   supervisor floor SYNC N PROG ARGS...
 *                             run PROG with a filter trapping ioctl TIOCGPTN and
 *                             answer its N notifications CONTINUE (SYNC=1: ask
 *                             for SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP first)
 *
 * A workload prints "ns=<nanoseconds per operation>", then "id=<id>" for
 * every id it got (or "err=<errno>").
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pty.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int workload(const char *what, int n)
{
    long *ids = calloc(n, sizeof(long));
    int *errs = calloc(n, sizeof(int));
    int null = open("/dev/null", O_RDONLY);
    double start = now_ns();

    for (int i = 0; i < n; i++) {
        if (strcmp(what, "ioctl") == 0) {
            unsigned int index;
            ioctl(null, TIOCGPTN, &index);
        } else if (strcmp(what, "fork") == 0) {
            pid_t child = fork();
            if (child == 0)
                _exit(0);
            ids[i] = child;
            errs[i] = child < 0 ? errno : 0;
            if (child > 0)
                waitpid(child, NULL, 0);
        } else if (strcmp(what, "semget") == 0) {
            int id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
            ids[i] = id;
            errs[i] = id < 0 ? errno : 0;
            if (id >= 0)
                semctl(id, 0, IPC_RMID);
        } else if (strcmp(what, "pty") == 0) {
            int master, slave;
            if (openpty(&master, &slave, NULL, NULL, NULL) == 0) {
                unsigned int index;
                ioctl(master, TIOCGPTN, &index);
                ids[i] = index;
                close(master);
                close(slave);
            } else {
                errs[i] = errno;
            }
        } else {
            return 2;
        }
    }
    printf("ns=%.1f\n", (now_ns() - start) / n);
    if (strcmp(what, "ioctl") != 0)
        for (int i = 0; i < n; i++)
            errs[i] ? printf("err=%d\n", errs[i]) : printf("id=%ld\n", ids[i]);
    return 0;
}

static int install_filter(void)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 5),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TIOCGPTN, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(code) / sizeof(code[0]), code};

    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
}

static int floor_supervisor(int sync, int n, char **argv)
{
    int to_parent[2], to_child[2], fd, listener, pidfd, status;
    char go = 'g';
    pid_t child;

    if (pipe(to_parent) || pipe(to_child))
        return 3;
    child = fork();
    if (child == 0) {
        fd = install_filter();
        if (write(to_parent[1], &fd, sizeof(fd)) != sizeof(fd) || read(to_child[0], &go, 1) != 1)
            _exit(126);
        execvp(argv[0], argv);
        _exit(127);
    }
    if (read(to_parent[0], &fd, sizeof(fd)) != sizeof(fd) || fd < 0)
        return 4;
    pidfd = syscall(SYS_pidfd_open, child, 0);
    listener = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (listener < 0)
        return 5;
    if (sync && ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP))
        fprintf(stderr, "floor: SYNC_WAKE_UP refused: %s\n", strerror(errno));
    if (write(to_child[1], &go, 1) != 1)
        return 6;
    for (int i = 0; i < n; i++) {
        struct seccomp_notif req;
        struct seccomp_notif_resp resp;
        memset(&req, 0, sizeof(req));
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req)) {
            if (errno == EINTR || errno == ENOENT) {
                i--;
                continue;
            }
            return 7;
        }
        memset(&resp, 0, sizeof(resp));
        resp.id = req.id;
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 8;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "floor") == 0)
        return floor_supervisor(atoi(argv[2]), atoi(argv[3]), argv + 4);
    if (argc == 3)
        return workload(argv[1], atoi(argv[2]));
    fprintf(stderr, "usage: supervisor ioctl|fork|semget|pty N | floor SYNC N PROG ARGS...\n");
    return 2;
}
