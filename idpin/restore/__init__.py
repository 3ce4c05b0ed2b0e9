"""Plans, capture and parallel restore of a process tree's ids (DESIGN.md, "Parallel restore").

    plan = idpin.restore.capture(root_pid)                # a plan (dict)
    with idpin.restore.restore(plan, workers=2) as tree:  # skeleton up, every id verified
        tree.root, tree.pids                              # root's pid / {plan pid: pid here}
    # leaving the block kills and reaps the restored tree; tree.detach() keeps it

``load``/``validate``/``dump`` read, check and write plan documents
(idpin.restore.plan); ``restore`` is idpin.restore.engine's.
"""
from .capture import capture  # the function: it shadows its module's name here
from .engine import Restore, Tree
from .plan import dump, load, validate

__all__ = ["Restore", "Tree", "capture", "dump", "load", "restore", "validate"]


def restore(plan, *, workers=1, here=False, target=None, timeout=None, progress=None):
    """Recreate ``plan``'s tree with exactly its ids; a context manager giving a Tree.

    plan: a plan dict, or a path or file of its JSON (validated first).
    workers: helpers splitting each wide level (clone3 CLONE_PARENT).
    here: restore into the current namespaces instead of fresh
    user+pid+ipc+mount ones (where a root with pid 1 is their init).
    target: target(entry) runs in each restored process once the whole
    tree is verified; without it the processes wait until torn down.
    timeout: seconds the restore may take (default: 30 + 50 ms per task and object).
    progress: progress(done, total), called in this process as tasks report.

    Any failure tears everything down (no process, IPC object or pty left)
    and raises the error, with ``.entry`` naming the plan entry that failed.
    """
    return Restore(plan, workers=workers, here=here, target=target, timeout=timeout,
                   progress=progress)


for _name in ("restore", "Restore", "Tree"):
    globals()[_name].__module__ = "idpin.restore"
del _name
