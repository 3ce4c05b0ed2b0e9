"""Parallel workers: forked processes that start together and report back."""
import os
import pickle
import traceback

from ..interpose import ORIGINALS


def run_parallel(work, count):
    """Run ``work(index)`` in ``count`` forked processes at once.

    Returns one ("ok", value) or ("error", traceback text) per worker, in
    order. The workers start together, once all are forked, so that forking
    them cannot take pids from ranges the first ones are already pinning.
    """
    go_read, go_write = os.pipe()
    started = []
    for index in range(count):
        read_end, write_end = os.pipe()
        child = ORIGINALS["os.fork"]()
        if child == 0:
            os.close(read_end)
            os.close(go_write)
            _worker(work, index, go_read, write_end)
        # Closed before the next fork, so no other worker holds this pipe open.
        os.close(write_end)
        started.append((child, read_end))
    os.close(go_read)
    os.write(go_write, b"g" * count)
    os.close(go_write)
    return [_collect(child, read_end) for child, read_end in started]


def _worker(work, index, go_read, write_end):
    try:
        os.read(go_read, 1)
        os.close(go_read)
        try:
            outcome = ("ok", work(index))
        except BaseException:
            outcome = ("error", traceback.format_exc())
        data = pickle.dumps(outcome)
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
    finally:
        os._exit(0)


def _collect(child, read_end):
    data = read_all(read_end)
    os.close(read_end)
    _, status = os.waitpid(child, 0)
    if not data:
        return ("error", "worker %d died without reporting (wait status %#x)" % (child, status))
    return pickle.loads(data)


def read_all(fd):
    """Everything written to a pipe until its last writer closes it."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
