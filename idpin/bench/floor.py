"""The C floor of a pinned SysV creation: floor.c, compiled at run time.

It is built once per run on the host (compiling writes nothing but a
temporary directory) and loaded inside the namespaces with ctypes, so the
loop runs at C speed with one ctypes call per measurement.
"""
import ctypes
import importlib.resources
import os
import shlex
import shutil
import subprocess
import tempfile


class FloorUnavailable(Exception):
    """No C compiler, or the floor did not compile: the rows that need it are skipped."""


def build(name="floor"):
    """Compile <name>.c (floor.c, tree_floor.c) into a shared object; (its path, the directory to remove)."""
    compiler = shlex.split(os.environ.get("CC", "gcc"))
    if shutil.which(compiler[0]) is None:
        raise FloorUnavailable("no C compiler %r (set CC, or apt-get install gcc)" % compiler[0])
    workdir = tempfile.mkdtemp(prefix="idpin-bench-")
    source = os.path.join(workdir, name + ".c")
    shared = os.path.join(workdir, name + ".so")
    with open(source, "wb") as f:
        f.write(importlib.resources.files(__package__).joinpath(name + ".c").read_bytes())
    command = compiler + ["-O2", "-shared", "-fPIC", "-o", shared, source]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise FloorUnavailable("%s failed: %s" % (" ".join(command), done.stderr.strip()[-500:]))
    return shared, workdir


def load(shared):
    """The C loop, as a Python function: (created, wrong) or OSError."""
    loop = ctypes.CDLL(shared).pinned_create_loop
    loop.restype = ctypes.c_long
    loop.argtypes = [ctypes.c_int] * 6 + [ctypes.POINTER(ctypes.c_int)]

    def pinned_create_loop(lock_fd, knob_fd, kind, first_id, count, size):
        wrong = ctypes.c_int(0)
        done = loop(lock_fd, knob_fd, kind, first_id, count, size, ctypes.byref(wrong))
        if done < 0:
            raise OSError(-done, "floor loop: %s" % os.strerror(-done))
        return done, wrong.value

    return pinned_create_loop


class BlockFds(ctypes.Structure):
    """floor.c's struct block_fds."""
    _fields_ = [("pid_lock", ctypes.c_int), ("ipc_lock", ctypes.c_int),
                ("knobs", ctypes.c_int * 3), ("census", ctypes.c_int),
                ("cursor", ctypes.c_int), ("tasks", ctypes.c_int)]


def load_checked(shared):
    """The C loop of a request block's syscalls, as a Python function: (created, wrong)."""
    loop = ctypes.CDLL(shared).checked_create_loop
    loop.restype = ctypes.c_long
    loop.argtypes = [ctypes.POINTER(BlockFds), ctypes.c_char_p, ctypes.c_char_p] + \
        [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int)]

    def checked_create_loop(fds, cursor_record, consuming_record, kind, first_id, count, size,
                            index_bits):
        wrong = ctypes.c_int(0)
        done = loop(ctypes.byref(fds), os.fsencode(cursor_record), os.fsencode(consuming_record),
                    kind, first_id, count, size, index_bits, ctypes.byref(wrong))
        if done < 0:
            raise OSError(-done, "block floor loop: %s" % os.strerror(-done))
        return done, wrong.value

    return checked_create_loop
