# Kernel structs and the C declarations ext/_sys.pyx calls: nothing else.
# Names Cython's own libc/posix .pxd files already declare are cimported in
# _sys.pyx; this file holds the Linux-specific rest. Calls that share a name
# with a function of the module's interface carry a c_ prefix.

from libc.stdint cimport uint64_t


cdef extern from "compat.h" nogil:
    struct clone_args:
        uint64_t flags
        uint64_t pidfd
        uint64_t child_tid
        uint64_t parent_tid
        uint64_t exit_signal
        uint64_t stack
        uint64_t stack_size
        uint64_t tls
        uint64_t set_tid
        uint64_t set_tid_size
        uint64_t cgroup

    enum:
        SYS_clone3
        SYS_get_robust_list
        SYS_set_robust_list
        CLONE_CHILD_SETTID
        CLONE_CHILD_CLEARTID
        CLONE_PARENT
        MAX_PID_NS_LEVEL

        TIOCGPTN
        TIOCSPTLCK
        TIOCGPTPEER

        IPC_RMID
        SEM_STAT_ANY
        SHM_STAT_ANY
        MSG_STAT_ANY
        SETALL
        IPC_NOWAIT

    ctypedef int key_t

    # *_STAT_ANY fills one of them; a capture reads the two sizes.
    struct semid_ds:
        unsigned long sem_nsems
    struct shmid_ds:
        size_t shm_segsz
    struct msqid_ds:
        pass

    int semget(key_t key, int nsems, int semflg)
    int shmget(key_t key, size_t size, int shmflg)
    int msgget(key_t key, int msgflg)
    int semctl(int semid, int semnum, int cmd, ...)
    int shmctl(int shmid, int cmd, shmid_ds *buf)
    int msgctl(int msqid, int cmd, msqid_ds *buf)
    int msgsnd(int msqid, const void *msgp, size_t msgsz, int msgflg)
    void *shmat(int shmid, const void *shmaddr, int shmflg)
    int shmdt(const void *shmaddr)

    int ioctl(int fd, unsigned long request, ...)

    # Reading objects' contents (idpin.restore.capture).
    enum:
        IPC_STAT
        IPC_NOWAIT
        GETALL
        SHM_RDONLY
        MSG_COPY
    ssize_t msgrcv(int msqid, void *msgp, size_t msgsz, long msgtyp, int msgflg)
    void *shmat(int shmid, const void *shmaddr, int shmflg)
    int shmdt(const void *shmaddr)


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()


cdef extern from "<sched.h>" nogil:
    int c_unshare "unshare"(int flags)
    int c_setns "setns"(int fd, int nstype)


cdef extern from "<sys/prctl.h>" nogil:
    int c_prctl "prctl"(int option, ...)


cdef extern from "<sys/mount.h>" nogil:
    int c_mount "mount"(const char *source, const char *target, const char *filesystemtype,
                        unsigned long mountflags, const void *data)


cdef extern from "<sys/file.h>" nogil:
    int c_flock "flock"(int fd, int operation)
    enum:
        LOCK_EX
        LOCK_NB
        LOCK_UN


# CPython's own fork protocol: these run Python code, so they need the GIL.
cdef extern from "Python.h":
    void PyOS_BeforeFork()
    void PyOS_AfterFork_Parent()
    void PyOS_AfterFork_Child()


# seccomp user notification (compat.h supplies what the host's headers lack).
from libc.stdint cimport uint16_t, uint32_t, int32_t, int64_t

cdef extern from "compat.h" nogil:
    enum:
        SYS_seccomp
        SYS_pidfd_getfd
        SECCOMP_SET_MODE_FILTER
        SECCOMP_GET_ACTION_AVAIL
        SECCOMP_GET_NOTIF_SIZES
        SECCOMP_FILTER_FLAG_NEW_LISTENER
        SECCOMP_USER_NOTIF_FLAG_CONTINUE
        SECCOMP_IOCTL_NOTIF_RECV
        SECCOMP_IOCTL_NOTIF_SEND
        SECCOMP_IOCTL_NOTIF_ID_VALID
        SECCOMP_IOCTL_NOTIF_ADDFD
        SECCOMP_IOCTL_NOTIF_SET_FLAGS
        POLLIN
        POLLHUP
        POLLERR
        POLLNVAL

    struct sock_filter:
        uint16_t code
        unsigned char jt
        unsigned char jf
        uint32_t k

    struct sock_fprog:
        unsigned short len
        sock_filter *filter

    struct seccomp_data:
        int nr
        uint32_t arch
        uint64_t instruction_pointer
        uint64_t args[6]

    struct seccomp_notif:
        uint64_t id
        uint32_t pid
        uint32_t flags
        seccomp_data data

    struct seccomp_notif_resp:
        uint64_t id
        int64_t val
        int32_t error
        uint32_t flags

    struct seccomp_notif_addfd:
        uint64_t id
        uint32_t flags
        uint32_t srcfd
        uint32_t newfd
        uint32_t newfd_flags

    struct notif_sizes "seccomp_notif_sizes":
        uint16_t seccomp_notif
        uint16_t seccomp_notif_resp
        uint16_t seccomp_data

    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd *fds, unsigned long nfds, int timeout)

    struct iovec:
        void *iov_base
        size_t iov_len

    ssize_t process_vm_readv(int pid, const iovec *local_iov, unsigned long liovcnt,
                             const iovec *remote_iov, unsigned long riovcnt, unsigned long flags)
