/*
 * The physical floor of a pinned SysV creation, for `idpin bench perf`.
 *
 * The syscalls idpin's knob path cannot avoid, in a C loop: take the IPC
 * namespace lock, arm <kind>_next_id, create, unlock; then remove the
 * object. Called once through ctypes for the whole loop, so the ctypes
 * overhead is paid once, not per object. Compiled at run time by
 * idpin.bench.floor.
 */
#include <errno.h>
#include <stdio.h>
#include <sys/file.h>
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
