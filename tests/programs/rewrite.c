/*
 * A supervised program that races the supervisor: while one thread passes a
 * buffer to an intercepted call, a second thread keeps rewriting it. Prints
 * one line per call: "kind=id" or "kind:errno=N".
 *
 *   rewrite request N ITER      write a request line on $IDPIN_REQUEST_FD that
 *                               flips between "pid=N" and "pid=xx..x" (same
 *                               length, any mix of the two is invalid), then
 *                               fork; ITER times
 *   rewrite clone3 N ITER BAD   write "pid=N" on the request fd, then clone3
 *                               a process from an argument block whose flags
 *                               flip between 0 and BAD (hex; an invalid
 *                               value, so the kernel fails the call when it
 *                               reads BAD); ITER times
 *   rewrite kinds N ITER        like clone3, but the flags flip between two
 *                               valid blocks: a process (flags 0) and a
 *                               thread (CLONE_VM|CLONE_SIGHAND|CLONE_THREAD),
 *                               both without an exit signal, on a stack of
 *                               their own; the new task exits at once. Prints
 *                               "process=ID:STATUS" (waitpid's status) or
 *                               "thread=ID" (not a child: ECHILD)
 *   rewrite eintr               print "forking", fork with a SIGUSR1 handler
 *                               without SA_RESTART; when the fork fails
 *                               (EINTR), read one byte from stdin and fork
 *                               again
 *   rewrite storm N             fork N times while a timer fires SIGALRM every
 *                               2 ms through a handler without SA_RESTART; a
 *                               fork failing with EINTR is tried again
 *                               (printed "retried=K" at the end)
 *   rewrite stalled             semget with more semaphores than allowed
 *                               (refused before the knob is read), read one
 *                               byte from stdin, then semget(1)
 *
 * Each call starts from a known state (the clean value on even iterations,
 * the other one on odd ones), so both outcomes are exercised even when the
 * rewriting thread gets no CPU; while it runs, which one the supervisor
 * reads is up to the race.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

/* The rewriting thread's bound: it stops when told, or after this many flips. */
#define MAX_FLIPS (1L << 28)

static volatile int done;
static char good[32], bad[32];
static volatile char line[32];
static size_t line_length;
static struct clone_args args __attribute__((aligned(64)));
static uint64_t bad_flags;

static void report(const char *kind, long id)
{
    if (id < 0)
        printf("%s:errno=%d\n", kind, errno);
    else
        printf("%s=%ld\n", kind, id);
    fflush(stdout);
}

static void set_line(const char *text)
{
    for (size_t i = 0; i < line_length; i++)
        line[i] = text[i];
}

/* Which value the rewriter writes: it alternates, and so does the one it
 * leaves in place while it yields (every 64 flips). */
static int phase(long flips)
{
    return (int)((flips ^ (flips >> 6)) & 1);
}

static void *rewrite_line(void *unused)
{
    (void)unused;
    for (long flips = 0; !done && flips < MAX_FLIPS; flips++) {
        set_line(phase(flips) ? good : bad);
        if ((flips & 63) == 0)
            sched_yield();
    }
    return NULL;
}

static void *rewrite_flags(void *unused)
{
    (void)unused;
    for (long flips = 0; !done && flips < MAX_FLIPS; flips++) {
        __atomic_store_n(&args.flags, phase(flips) ? 0 : bad_flags, __ATOMIC_RELAXED);
        if ((flips & 63) == 0)
            sched_yield();
    }
    return NULL;
}

static void fork_and_report(const char *kind)
{
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    report(kind, child);
    if (child > 0)
        waitpid(child, NULL, 0);
}

static int request_fd(void)
{
    const char *fd = getenv("IDPIN_REQUEST_FD");
    return fd ? atoi(fd) : -1;
}

static void requests(int pid, int iterations)
{
    pthread_t thread;
    int fd = request_fd();

    line_length = (size_t)snprintf(good, sizeof(good), "pid=%d", pid);
    memcpy(bad, "pid=", 4);
    memset(bad + 4, 'x', line_length - 4);
    pthread_create(&thread, NULL, rewrite_line, NULL);
    for (int i = 0; i < iterations; i++) {
        set_line(i & 1 ? bad : good);
        ssize_t written = write(fd, (const char *)line, line_length);
        if (written == (ssize_t)line_length)
            fork_and_report("ok");
        else if (written < 0 && errno == EINVAL)
            fork_and_report("einval");
        else
            report("write", written < 0 ? -1 : written);
    }
    done = 1;
    pthread_join(thread, NULL);
}

static void clone3s(int pid, int iterations)
{
    pthread_t thread;
    int fd = request_fd();
    char request[32];
    size_t length = (size_t)snprintf(request, sizeof(request), "pid=%d", pid);

    pthread_create(&thread, NULL, rewrite_flags, NULL);
    for (int i = 0; i < iterations; i++) {
        ssize_t written = write(fd, request, length);
        if (written != (ssize_t)length) {
            report("write", written < 0 ? -1 : written);
            continue;
        }
        __atomic_store_n(&args.flags, i & 1 ? bad_flags : 0, __ATOMIC_RELAXED);
        args.exit_signal = SIGCHLD;
        long child = syscall(SYS_clone3, &args, sizeof(args));
        if (child == 0)
            syscall(SYS_exit_group, 0);  /* only this thread was copied: no libc */
        report("clone3", child);
        if (child > 0)
            waitpid((pid_t)child, NULL, 0);
    }
    done = 1;
    pthread_join(thread, NULL);
}

#define THREAD_FLAGS (CLONE_VM | CLONE_SIGHAND | CLONE_THREAD)

static char task_stack[1 << 16] __attribute__((aligned(64)));

/* clone3 whose new task (process or thread, on task_stack) calls exit(0) at
 * once, without touching memory: it runs no C code at all. */
static long clone3_exiting(struct clone_args *block)
{
    long ret = SYS_clone3;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "mov $60, %%eax\n\t" /* SYS_exit */
        "xor %%edi, %%edi\n\t"
        "syscall\n\t"
        "1:\n\t"
        : "+a"(ret)
        : "D"(block), "S"(sizeof(*block))
        : "rcx", "r11", "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

static void kinds(int pid, int iterations)
{
    pthread_t thread;
    int fd = request_fd();
    char request[32];
    size_t length = (size_t)snprintf(request, sizeof(request), "pid=%d", pid);

    bad_flags = THREAD_FLAGS;
    args.exit_signal = 0;
    args.stack = (uint64_t)(uintptr_t)task_stack;
    args.stack_size = sizeof(task_stack);
    pthread_create(&thread, NULL, rewrite_flags, NULL);
    for (int i = 0; i < iterations; i++) {
        ssize_t written = write(fd, request, length);
        if (written != (ssize_t)length) {
            report("write", written < 0 ? -1 : written);
            continue;
        }
        __atomic_store_n(&args.flags, i & 1 ? bad_flags : 0, __ATOMIC_RELAXED);
        long task = clone3_exiting(&args);
        if (task < 0) {
            report("clone3", -1);
            continue;
        }
        int status;
        if (waitpid((pid_t)task, &status, __WALL) == task) {
            printf("process=%ld:%d\n", task, status);
        } else {
            /* A thread: wait until it is gone, so its stack is free again. */
            for (int polls = 0; polls < 100000 && syscall(SYS_tgkill, getpid(), task, 0) == 0; polls++)
                sched_yield();
            printf("thread=%ld\n", task);
        }
        fflush(stdout);
    }
    done = 1;
    pthread_join(thread, NULL);
}

static void on_signal(int sig)
{
    (void)sig;
}

static void fork_interrupted(void)
{
    struct sigaction action;
    char go;

    memset(&action, 0, sizeof(action));
    action.sa_handler = on_signal;  /* no SA_RESTART: an interrupted call fails with EINTR */
    sigaction(SIGUSR1, &action, NULL);
    printf("forking\n");
    fflush(stdout);
    for (int attempt = 0; attempt < 2; attempt++) {
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        report("pid", child);
        if (child > 0) {
            waitpid(child, NULL, 0);
            return;
        }
        if (errno != EINTR || read(0, &go, 1) != 1)
            return;
    }
}

static void forks_under_interrupting_signals(int n)
{
    struct sigaction action;
    struct itimerval timer = {{0, 2000}, {0, 2000}};
    long retried = 0;

    memset(&action, 0, sizeof(action));
    action.sa_handler = on_signal;
    sigaction(SIGALRM, &action, NULL);
    setitimer(ITIMER_REAL, &timer, NULL);
    for (int i = 0; i < n; i++) {
        pid_t child = -1;
        for (int attempt = 0; attempt < 1000; attempt++) {
            child = fork();
            if (child >= 0 || errno != EINTR)
                break;
            retried++;
        }
        if (child == 0)
            _exit(0);
        report("pid", child);
        if (child > 0)
            while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
                ;
    }
    memset(&timer, 0, sizeof(timer));
    setitimer(ITIMER_REAL, &timer, NULL);
    printf("retried=%ld\n", retried);
}

static void stalled_semget(void)
{
    char go;
    int id = semget(IPC_PRIVATE, 1 << 20, IPC_CREAT | 0600);

    report("sem", id);
    if (read(0, &go, 1) != 1)
        return;
    id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    report("sem", id);
    if (id >= 0)
        semctl(id, 0, IPC_RMID);
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "request") == 0) {
        requests(atoi(argv[2]), atoi(argv[3]));
    } else if (argc >= 5 && strcmp(argv[1], "clone3") == 0) {
        bad_flags = strtoull(argv[4], NULL, 16);
        clone3s(atoi(argv[2]), atoi(argv[3]));
    } else if (argc >= 4 && strcmp(argv[1], "kinds") == 0) {
        kinds(atoi(argv[2]), atoi(argv[3]));
    } else if (argc >= 2 && strcmp(argv[1], "eintr") == 0) {
        fork_interrupted();
    } else if (argc >= 3 && strcmp(argv[1], "storm") == 0) {
        forks_under_interrupting_signals(atoi(argv[2]));
    } else if (argc >= 2 && strcmp(argv[1], "stalled") == 0) {
        stalled_semget();
    } else {
        fprintf(stderr, "usage: rewrite request N ITER | clone3 N ITER BAD | kinds N ITER | eintr | storm N | stalled\n");
        return 2;
    }
    return 0;
}
