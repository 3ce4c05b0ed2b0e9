/*
 * The physical floor of a tree restore, for `idpin bench restore`.
 *
 * Creates an unpinned process tree of a given shape with plain fork(): each
 * process forks its own children (so the tree's depth is walked by fork
 * chains, as a restore must), writes one byte to `ready_fd` and waits to be
 * killed (PR_SET_PDEATHSIG: its parent's death kills it). The caller counts
 * the bytes. No ids are chosen, no session or group is made: the bare cost
 * of the forks. Compiled at run time by idpin.bench.floor.build_tree_floor.
 */
#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

/* first_child[i] .. first_child[i + 1] - 1 index children[] for task i. */
static void become(int task, const int *first_child, const int *children, int ready_fd,
                   pid_t parent)
{
    for (;;) {
        int next = -1;

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        for (int k = first_child[task]; k < first_child[task + 1]; k++) {
            pid_t me = getpid();
            pid_t child = fork();

            if (child < 0)
                _exit(2);
            if (child == 0) {
                /* Become the child: iterate, so a deep chain needs no stack. */
                next = children[k];
                parent = me;
                break;
            }
        }
        if (next >= 0) {
            task = next;
            continue;
        }
        char byte = 1;
        if (write(ready_fd, &byte, 1) != 1)
            _exit(3);
        for (;;)
            pause();
    }
}

/*
 * Fork task 0 (the root) and let the tree grow; return once `n` tasks
 * reported, after killing the root (the rest follow by PDEATHSIG) and
 * reaping everything reparented here. Returns n, or -errno.
 */
long tree_floor(int n, const int *first_child, const int *children, int ready_fd, int read_fd)
{
    pid_t me = getpid();
    pid_t root = fork();
    long got = 0;
    char buf[4096];

    if (root < 0)
        return -errno;
    if (root == 0) {
        close(read_fd);
        become(0, first_child, children, ready_fd, me);
    }
    while (got < n) {
        ssize_t r = read(read_fd, buf, sizeof buf);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += r;
    }
    kill(root, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        ;
    return got;
}
