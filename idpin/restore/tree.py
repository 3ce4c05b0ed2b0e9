"""Who creates whom, in which order: a plan turned into restore scripts.

Pure computation, no side effect: ``layout(plan, ...)`` returns one Script
per task of the restore, keyed by the task's pid. The tasks are the plan's
processes, stand-ins for dead session and group leaders, helpers that split
a wide level, and (in fresh namespaces, when the plan's root is not pid 1)
idpin's own init. The kernel's rules decide the order (KERNEL.md, "Process
trees"; CRIU's pstree.c makes the same choices):

- A session is inherited at fork, and setsid makes a new one only for a
  process that leads no group. So a session leader forks its children that
  stay in its old session first, then calls setsid, then forks the rest.
- setpgid joins only a group of the caller's own session that exists. A
  group leader calls setpgid(0, 0) before forking; members join after
  forking their own children (so a member never waits on its descendants).
- A dead session leader's pid is held by a stand-in forked by the plan
  parent of the session's orphans: it calls setsid, creates them with
  CLONE_PARENT (so their parent is right without reparenting) and exits.
- A dead group leader's pid is held by a stand-in forked by its session's
  owner (leader or stand-in); it calls setpgid(0, 0) and exits once a member
  has joined, after which the group lives on with its members.
- A wide level (many children of one parent) is split over helpers that
  create the children with CLONE_PARENT in parallel with the parent.

Every task gets a chosen pid (clone3 set_tid), helpers too: a pid left to the
kernel's allocator could be one of the plan's, not yet created.
"""
import dataclasses

from ..errors import UnsupportedError

# The pid namespace's init in fresh namespaces when the plan's root is not pid 1.
INIT = 1
# The restorer, parent of the top task: not a pid of the tree.
RESTORER = 0
# Children of one parent from which a level is split over helpers.
WIDE = 16
# Pids tried per helper slot: in the current namespaces a spare pid may be in use.
SPARE_TRIES_HERE = 8


@dataclasses.dataclass
class Script:
    """What one task of the restore does, in order."""

    pid: int
    role: str                 # "process", "init", "session", "group", "helper", "ipc"
    parent: int               # the pid its parent has (RESTORER for the top task)
    entry: dict | None = None  # the plan's entry, for "process"
    index: int = -1           # the entry's position in plan["processes"]
    early: list = dataclasses.field(default_factory=list)     # children forked before setsid
    setsid: bool = False
    lead_group: bool = False
    standins: list = dataclasses.field(default_factory=list)  # stand-in pids it forks
    helpers: list = dataclasses.field(default_factory=list)   # [(pid candidates, [children])]
    children: list = dataclasses.field(default_factory=list)  # forked directly, after setsid
    siblings: list = dataclasses.field(default_factory=list)  # created with CLONE_PARENT
    join: int | None = None   # the group to join once its own children are forked
    members: list = dataclasses.field(default_factory=list)   # group stand-in: who joins

    def where(self):
        """The plan entry this task restores (or what it stands for), for error messages."""
        if self.role == "process":
            return "processes[%d] (pid %d)" % (self.index, self.pid)
        if self.role in ("session", "group"):
            return "the %s stand-in %d" % (self.role, self.pid)
        return "idpin's %s %d" % (self.role, self.pid)


@dataclasses.dataclass
class Layout:
    scripts: dict             # pid -> Script (stand-ins and idpin's init included)
    restorer: Script          # what the restorer itself forks (the top, stand-ins)
    process_pids: list        # the plan's pids, in plan order
    ipc_pids: list            # candidate pids for the IPC worker
    fresh: bool               # fresh namespaces (else the current ones)


def layout(plan, workers=1, fresh=True, ambient=(None, None)):
    """Scripts for ``plan`` (already validated).

    ``ambient`` is (sid, pgid) of the restorer in the current namespaces:
    a root in that session (or group) stays in it rather than getting a
    stand-in. Raises UnsupportedError naming the entry the kernel's rules
    cannot recreate.
    """
    return _Builder(plan, workers, fresh, ambient).build()


class _Builder:
    def __init__(self, plan, workers, fresh, ambient):
        self.plan = plan
        self.workers = max(1, int(workers))
        self.fresh = fresh
        self.ambient_sid, self.ambient_pgid = (None, None) if fresh else ambient
        self.procs = {p["pid"]: p for p in plan["processes"]}
        self.index = {p["pid"]: i for i, p in enumerate(plan["processes"])}
        self.root = plan["root"]
        self.scripts = {}
        self.restorer = Script(RESTORER, "restorer", -1)
        used = {INIT}
        for p in plan["processes"]:
            used.update((p["pid"], p["pgid"], p["sid"]))
            used.update(p.get("tids", ()))
        self._next_spare = max(used) + 1

    def spare(self):
        """Pids no one has in the plan, for one helper (several to try here)."""
        tries = 1 if self.fresh else SPARE_TRIES_HERE
        found = list(range(self._next_spare, self._next_spare + tries))
        self._next_spare += tries
        return found

    def where(self, pid):
        return "processes[%d] (pid %d)" % (self.index[pid], pid)

    def build(self):
        for pid, entry in self.procs.items():
            self.scripts[pid] = Script(pid, "process", entry["ppid"], entry, self.index[pid])
        self.virtual = self._root_parent()
        self.scripts[self.root].parent = self.virtual.pid
        if self.virtual is not self.restorer:
            self.scripts[INIT] = self.virtual
            self.restorer.children.append(INIT)
        for pid in self.procs:
            self._place(pid)
        self._groups()
        self._split_wide()
        ipc_pids = self.spare()
        return Layout(self.scripts, self.restorer, list(self.procs), ipc_pids, self.fresh)

    def _root_parent(self):
        """The restorer itself, or idpin's init as pid 1 of the fresh namespace."""
        if self.fresh and self.root != INIT:
            return Script(INIT, "init", RESTORER)
        root = self.procs[self.root]
        if self.fresh and (root["sid"] != INIT or root["pgid"] != INIT):
            raise UnsupportedError(
                "%s: the root becomes pid 1 of a fresh pid namespace, which is born first "
                "and so must lead its own session and group (sid and pgid 1, not %d and %d); "
                "restore it with here=True" % (self.where(self.root), root["sid"], root["pgid"]))
        return self.restorer

    def parent_script(self, pid):
        return self.virtual if pid == self.root else self.scripts[self.procs[pid]["ppid"]]

    def sid_of(self, script):
        """The session a task is in once it has done its own setsid (None: outside the plan)."""
        if script.role == "process":
            return script.entry["sid"]
        if script.role == "session":
            return script.pid
        if script is self.restorer:
            return self.ambient_sid
        return None

    def _place(self, pid):
        """Which task forks plan process ``pid``, and when (sessions decide)."""
        sid = self.procs[pid]["sid"]
        script = self.scripts[pid]
        parent = self.parent_script(pid)
        script.setsid = sid == pid
        if sid == pid or sid == self.sid_of(parent):
            parent.children.append(pid)
        elif parent.role == "process" and parent.setsid and \
                sid == self.sid_of(self.parent_script(parent.pid)):
            parent.early.append(pid)  # stays in the session its parent is about to leave
        elif sid in self.procs:
            raise UnsupportedError(
                "%s: it is in session %d, whose leader lives, but its parent %d is not in "
                "that session; idpin recreates a session only through its leader's "
                "descendants, or through a stand-in when the leader is dead"
                % (self.where(pid), sid, self.procs[pid]["ppid"]))
        else:
            self._adopt_orphan(pid, sid, parent)

    def _adopt_orphan(self, pid, sid, parent):
        """``pid`` outlived its session's leader: a stand-in recreates the session."""
        standin = self.scripts.get(sid)
        if standin is None:
            standin = Script(sid, "session", parent.pid, setsid=True)
            self.scripts[sid] = standin
            parent.standins.append(sid)
        elif standin.parent != parent.pid:
            raise UnsupportedError(
                "%s: the processes of dead session leader %d have different parents (%d "
                "and %d), and the one stand-in that can recreate the session makes "
                "siblings of itself only" % (self.where(pid), sid, standin.parent, parent.pid))
        standin.siblings.append(pid)

    def _session_owner(self, sid, where):
        owner = self.scripts.get(sid)
        if owner is not None and owner.role in ("process", "session"):
            return owner
        if sid == self.ambient_sid:
            return self.restorer
        raise UnsupportedError(
            "%s: its session %d has neither a leader in the plan nor an orphan a stand-in "
            "leader could adopt, so no process can create its dead group" % (where, sid))

    def _groups(self):
        for pid, entry in self.procs.items():
            script = self.scripts[pid]
            pgid = entry["pgid"]
            if pgid == pid:
                script.lead_group = not script.setsid
                continue
            script.join = pgid
            if pgid in self.procs or pgid == self.ambient_pgid:
                continue
            standin = self.scripts.get(pgid)
            if standin is None:
                owner = self._session_owner(entry["sid"], self.where(pid))
                standin = Script(pgid, "group", owner.pid, lead_group=True)
                self.scripts[pgid] = standin
                owner.standins.append(pgid)
            # A session stand-in leads the group of its own pid as well.
            standin.members.append(pid)

    def _split_wide(self):
        if self.workers < 2:
            return
        for script in list(self.scripts.values()):
            if len(script.children) < WIDE:
                continue
            chunks = [script.children[i::self.workers] for i in range(self.workers)]
            script.children = chunks[0]
            script.helpers = [(self.spare(), chunk) for chunk in chunks[1:]]
