/* What ext/_sys.pyx needs from headers that may predate it.
 *
 * idpin targets mainline Linux on glibc; build hosts can carry older kernel
 * and libc headers than the kernel idpin runs on. Every fallback here is the
 * kernel's own ABI value, used only when the header lacks the name.
 */
#ifndef IDPIN_COMPAT_H
#define IDPIN_COMPAT_H

#include <stdint.h>
#include <sched.h>
#include <linux/sched.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/msg.h>

#ifndef CLONE_ARGS_SIZE_VER1
/* Headers before 5.5 have no struct clone_args (5.3) or one without set_tid
 * (5.3, 5.4), and a 64-byte struct makes the kernel ignore set_tid. Declare the
 * full eleven-field ABI under our own tag so it cannot clash with the old one. */
#define clone_args idpin_clone_args
struct clone_args {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack;
    uint64_t stack_size;
    uint64_t tls;
    uint64_t set_tid;
    uint64_t set_tid_size;
    uint64_t cgroup;
};
#endif

/* clone3 ignores set_tid unless the size it is given covers the field. */
_Static_assert(sizeof(struct clone_args) >= 80, "struct clone_args lacks set_tid");

#ifndef SYS_clone3
#ifdef __NR_clone3
#define SYS_clone3 __NR_clone3
#else
#define SYS_clone3 435 /* the unified syscall table number (5.3), x86-64 included */
#endif
#endif

/* include/linux/pid_namespace.h, not exported: set_tid holds at most this many. */
#ifndef MAX_PID_NS_LEVEL
#define MAX_PID_NS_LEVEL 32
#endif

/* Linux 4.13: open the slave from the master without a path lookup. */
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

/* Linux 4.17, glibc 2.28: stat by index without read permission on the object. */
#ifndef SEM_STAT_ANY
#define SEM_STAT_ANY 20
#endif
#ifndef SHM_STAT_ANY
#define SHM_STAT_ANY 15
#endif
#ifndef MSG_STAT_ANY
#define MSG_STAT_ANY 13
#endif

/* Linux 3.8 (CONFIG_CHECKPOINT_RESTORE), glibc 2.18 under _GNU_SOURCE: msgrcv
 * copies the n-th message without removing it. */
#ifndef MSG_COPY
#define MSG_COPY 040000
#endif

/* seccomp user notification. linux/seccomp.h of Linux 6.1 (this build host)
 * lacks the 6.6 names; older headers may lack the 5.9-5.19 ones too. */
#include <poll.h>
#include <sys/uio.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438 /* 5.6, the unified syscall table */
#endif
#ifndef SECCOMP_FILTER_FLAG_NEW_LISTENER
#define SECCOMP_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#endif
#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5) /* 5.19 */
#endif
#ifndef SECCOMP_USER_NOTIF_FLAG_CONTINUE
#define SECCOMP_USER_NOTIF_FLAG_CONTINUE (1UL << 0) /* 5.5 */
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1) /* 5.14 */
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64) /* 6.6 */
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0) /* 6.6 */
#endif
#ifndef SECCOMP_IOCTL_NOTIF_ADDFD
/* 5.9: older headers lack the struct as well as the ioctl. */
struct seccomp_notif_addfd {
    __u64 id;
    __u32 flags;
    __u32 srcfd;
    __u32 newfd;
    __u32 newfd_flags;
};
#define SECCOMP_IOCTL_NOTIF_ADDFD SECCOMP_IOW(3, struct seccomp_notif_addfd)
#endif

#endif /* IDPIN_COMPAT_H */
