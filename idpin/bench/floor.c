/*
 * The physical floor of a pinned SysV creation, for `idpin bench perf`.
 *
 * The syscalls idpin's knob path cannot avoid, in a C loop: take the IPC
 * namespace lock, arm <kind>_next_id, create, unlock; then remove the
 * object. Called once through ctypes for the whole loop, so the ctypes
 * overhead is paid once, not per object. Compiled at run time by
 * idpin.bench.floor.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <unistd.h>

/* idpin._sys._abi's kind codes. */
enum { KIND_SEM = 0, KIND_SHM = 1, KIND_MSG = 2 };

static int create(int kind, int size)
{
    int flags = IPC_CREAT | IPC_EXCL | 0600;

    if (kind == KIND_SEM)
        return semget(IPC_PRIVATE, size, flags);
    if (kind == KIND_SHM)
        return shmget(IPC_PRIVATE, (size_t)size, flags);
    return msgget(IPC_PRIVATE, flags);
}

static int remove_object(int kind, int id)
{
    if (kind == KIND_SEM)
        return semctl(id, 0, IPC_RMID);
    if (kind == KIND_SHM)
        return shmctl(id, IPC_RMID, NULL);
    return msgctl(id, IPC_RMID, NULL);
}

/*
 * Create `count` objects asking for ids first_id, first_id + 1, ... and
 * remove each again. Returns `count`, or -errno of the first call that
 * failed. *wrong counts objects that came out with another id.
 */
long pinned_create_loop(int lock_fd, int knob_fd, int kind, int first_id, int count,
                        int size, int *wrong)
{
    char value[16];

    for (int i = 0; i < count; i++) {
        int want = first_id + i;
        int length = snprintf(value, sizeof value, "%d", want);
        int got, err;

        if (flock(lock_fd, LOCK_EX) != 0)
            return -errno;
        /* Offset 0 every time: a sysctl ignores a write past its start. */
        if (pwrite(knob_fd, value, length, 0) != length) {
            err = errno ? errno : EIO;
            flock(lock_fd, LOCK_UN);
            return -err;
        }
        got = create(kind, size);
        err = errno;
        flock(lock_fd, LOCK_UN);
        if (got < 0)
            return -err;
        if (got != want)
            (*wrong)++;
        if (remove_object(kind, got) != 0)
            return -errno;
    }
    return count;
}

/* What idpin's request block needs besides that, as its Python layer makes them. */
struct block_fds {
    int pid_lock, ipc_lock;    /* the pid and IPC namespace files (the lock order) */
    int knobs[3];              /* sem_next_id, shm_next_id, msg_next_id */
    int census;                /* /proc/sysvipc/<kind> */
    int cursor;                /* ns_last_pid, read-only */
    int tasks;                 /* /proc/self/task */
};

static int read_whole(int fd)
{
    char buf[16384];
    off_t at = 0;
    ssize_t got;

    while ((got = pread(fd, buf, sizeof buf, at)) > 0)
        at += got;
    return got < 0 ? -1 : 0;
}

static int stat_index(int kind, int index)
{
    struct semid_ds sem;
    struct shmid_ds shm;
    struct msqid_ds msg;

    if (kind == KIND_SEM)
        return semctl(index, 0, SEM_STAT_ANY, &sem);
    if (kind == KIND_SHM)
        return shmctl(index, SHM_STAT_ANY, &shm);
    return msgctl(index, MSG_STAT_ANY, &msg);
}

/*
 * The syscalls of one idpin request block around a routed creation, and the
 * removal, in the order idpin makes them (strace of `with request(sem=N):
 * semget()`, then remove): the namespace check, both locks with the dead-holder
 * checks (two records, three knobs), the busy check, the census and cursor for
 * crediting a creation idpin does not route, the arming; the routed creation
 * (busy check, arm, create); the exit check, the unlocks, the removal. This is
 * the floor of idpin's design, against the bare floor above.
 */
long checked_create_loop(const struct block_fds *fds, const char *cursor_record,
                         const char *consuming_record, int kind, int first_id, int count,
                         int size, int index_bits, int *wrong)
{
    char value[16], link[64], small[32];
    struct stat st;

    for (int i = 0; i < count; i++) {
        int want = first_id + i;
        int length = snprintf(value, sizeof value, "%d", want);
        int index = want & ((1 << index_bits) - 1);
        int got;
        mqd_t record;

        if (readlink("/proc/self/ns/ipc", link, sizeof link) < 0 || fstat(fds->tasks, &st) != 0)
            return -errno;
        if (flock(fds->pid_lock, LOCK_EX | LOCK_NB) != 0)
            return -errno;
        if ((record = mq_open(cursor_record, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) >= 0)
            mq_close(record);
        if (flock(fds->ipc_lock, LOCK_EX | LOCK_NB) != 0)
            return -errno;
        if ((record = mq_open(consuming_record, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) >= 0)
            mq_close(record);
        for (int k = 0; k < 3; k++)
            if (pread(fds->knobs[k], small, sizeof small, 0) < 0)
                return -errno;
        if (stat_index(kind, index) >= 0)
            return -EEXIST;
        if (read_whole(fds->census) != 0 || pread(fds->cursor, small, sizeof small, 0) < 0)
            return -errno;
        if (pwrite(fds->knobs[kind], value, length, 0) != length)
            return -EIO;
        if (stat_index(kind, index) >= 0)
            return -EEXIST;
        if (pwrite(fds->knobs[kind], value, length, 0) != length)
            return -EIO;
        got = create(kind, size);
        if (got < 0)
            return -errno;
        if (pread(fds->knobs[kind], small, sizeof small, 0) < 0)
            return -errno;
        flock(fds->ipc_lock, LOCK_UN);
        flock(fds->pid_lock, LOCK_UN);
        if (got != want)
            (*wrong)++;
        if (remove_object(kind, got) != 0)
            return -errno;
    }
    return count;
}
