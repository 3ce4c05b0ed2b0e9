"""Kernel ABI numbers for x86-64 Linux that the stdlib does not export.

Shared by both backends' Python side; ext/_sys.pxd takes the same values
from the system headers.
"""
SYS_clone3 = 435
SYS_get_robust_list = 274
SYS_set_robust_list = 273
SYS_setns = 308
SYS_unshare = 272

CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000
CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_ARGS_SIZE_VER1 = 80  # the first size that carries set_tid; 64 ignores it
MAX_PID_NS_LEVEL = 32

PR_SET_DUMPABLE = 4
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_RMID = 0
IPC_NOWAIT = 0o4000
SETALL = 17
SEM_INFO = 19
SHM_INFO = 14
MSG_INFO = 12
# Where *_INFO puts the number of objects in use: seminfo.semusz,
# shm_info.used_ids, msginfo.msgpool (as the int at this index).
INFO_IN_USE_FIELD = (7, 0, 0)
SEM_STAT_ANY = 20
SHM_STAT_ANY = 15
MSG_STAT_ANY = 13

# One code per IPC kind, shared by the backends' ipc_* calls.
SEM, SHM, MSG = 0, 1, 2
IPC_KIND_CODES = {"sem": SEM, "shm": SHM, "msg": MSG}

# Reading objects' contents (a capture), and the two fields it needs from
# glibc's x86-64 struct semid_ds and struct shmid_ds.
IPC_STAT = 2
IPC_NOWAIT = 0o4000
GETALL = 13
SHM_RDONLY = 0o10000
MSG_COPY = 0o40000
SEMID_DS_SIZE, SEMID_DS_NSEMS_OFFSET = 104, 80
SHMID_DS_SIZE, SHMID_DS_SEGSZ_OFFSET = 112, 48

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441

# seccomp user notification (linux/seccomp.h). SET_FLAGS and SYNC_WAKE_UP
# are 6.6, newer than this build host's headers (KERNEL.md).
SYS_seccomp = 317
SYS_pidfd_getfd = 438
SYS_process_vm_readv = 310
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100      # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101      # _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103     # _IOW('!', 3, struct seccomp_notif_addfd)
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # _IOW('!', 4, __u64), 6.6
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
# Offsets in the control buffer notif_loop reads on every notification.
LOOP_FAST = 0       # nonzero = answer CONTINUE in the loop itself
LOOP_ANSWERED = 1   # how many calls the loop answered itself
LOOP_SLOW_NR = 2    # a syscall number the fast path never answers (write)
LOOP_ARCH = 3       # the audit arch the fast paths apply to
LOOP_EXITS_FAST = 4  # nonzero = answer the two numbers below even when [0] is 0
LOOP_EXIT_NRS = (5, 6)
LOOP_CONTROL_INTS = 7
# Outcomes of ipc_create_batch: where a pinned creation stopped (the first
# five are also the steps of one pinned creation, in the Cython backend).
BATCH_DONE = 0
BATCH_KNOB = 1    # the knob write failed (value: errno)
BATCH_SHORT = 2   # the knob write was short
BATCH_GET = 3     # the creation (or the index check) failed (value: errno)
BATCH_RMID = 4    # a wrongly numbered object could not be removed (value: its id)
BATCH_WRONG = 100  # created with another id, removed already (value: that id)
BATCH_BUSY = 101   # the index check found it held (value: the holder's id); nothing created
