/*
 * An unmodified program for the supervisor tests: it knows nothing of
 * idpin (except in "request" mode, which writes to $IDPIN_REQUEST_FD as any
 * language could). It allocates with the plain libc calls and prints what
 * it got, one "kind=id" per line, or "kind:errno=N" when a call failed.
 *
 *   allocate all         fork, a thread, semget, shmget, msgget, openpty
 *   allocate fork N      fork N times
 *   allocate request L   write line L on $IDPIN_REQUEST_FD, print the write's
 *                        result, then fork once
 *   allocate signals N   fork N times while a SA_RESTART timer fires every 2 ms
 *   allocate reuse PATH  close $IDPIN_REQUEST_FD, open PATH at that number and
 *                        write "pid=9" to it: a plain write, not a request
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *kind, long id)
{
    if (id < 0)
        printf("%s:errno=%d\n", kind, errno);
    else
        printf("%s=%ld\n", kind, id);
    fflush(stdout);
}

static void fork_once(void)
{
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    report("pid", child);
    if (child > 0)
        waitpid(child, NULL, 0);
}

static void *thread_main(void *arg)
{
    *(long *)arg = syscall(SYS_gettid);
    return NULL;
}

static void all(void)
{
    pthread_t thread;
    long tid = -1;
    int master, slave, id;

    fork_once();
    errno = pthread_create(&thread, NULL, thread_main, &tid);
    if (errno == 0)
        pthread_join(thread, NULL);
    report("tid", errno ? -1 : tid);
    id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    report("sem", id);
    if (id >= 0)
        semctl(id, 0, IPC_RMID);
    id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    report("shm", id);
    if (id >= 0)
        shmctl(id, IPC_RMID, NULL);
    id = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    report("msg", id);
    if (id >= 0)
        msgctl(id, IPC_RMID, NULL);
    if (openpty(&master, &slave, NULL, NULL, NULL) == 0) {
        printf("pty=%s\n", ptsname(master) + strlen("/dev/pts/"));
        close(master);
        close(slave);
    } else {
        report("pty", -1);
    }
}

static void on_alarm(int sig)
{
    (void)sig;
}

static void forks_under_signals(int n)
{
    struct sigaction action;
    struct itimerval timer = {{0, 2000}, {0, 2000}};

    memset(&action, 0, sizeof(action));
    action.sa_handler = on_alarm;
    action.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &action, NULL);
    setitimer(ITIMER_REAL, &timer, NULL);
    for (int i = 0; i < n; i++)
        fork_once();
    memset(&timer, 0, sizeof(timer));
    setitimer(ITIMER_REAL, &timer, NULL);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "all") == 0) {
        all();
    } else if (argc >= 3 && strcmp(argv[1], "fork") == 0) {
        for (int i = atoi(argv[2]); i > 0; i--)
            fork_once();
    } else if (argc >= 3 && strcmp(argv[1], "request") == 0) {
        const char *fd = getenv("IDPIN_REQUEST_FD");
        ssize_t written = fd ? write(atoi(fd), argv[2], strlen(argv[2])) : -1;
        report("write", written);
        fork_once();
    } else if (argc >= 3 && strcmp(argv[1], "reuse") == 0) {
        int fd = atoi(getenv("IDPIN_REQUEST_FD"));
        close(fd);
        int file = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0600);
        report("reused", file == fd ? file : -1);
        report("write", write(file, "pid=9", 5));
        fork_once();
    } else if (argc >= 3 && strcmp(argv[1], "signals") == 0) {
        forks_under_signals(atoi(argv[2]));
    } else {
        fprintf(stderr, "usage: allocate all | fork N | request LINE | signals N\n");
        return 2;
    }
    return 0;
}
