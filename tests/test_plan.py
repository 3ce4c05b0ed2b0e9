"""Plans (idpin.restore.plan): good plans load, hostile ones are refused with their JSON path."""
import copy
import io
import json
import random
import tracemalloc

import hypothesis
import jsonschema
import pytest
from hypothesis import strategies as st

import idpin
from idpin.restore import plan

ABSENT = object()


def example():
    """A valid plan: DESIGN.md's example grown into a tree with sessions and groups.

    pid 1 leads session 1 and group 1 (thread 9); 2 is in its group; 3 leads
    session 3 (thread 10); 4 and 6 are in group 5 of session 3, whose leader
    is gone; 7 leads group 7 in session 1. Indices in processes: 0..5.
    """
    def proc(pid, ppid, pgid, sid, *threads, **extra):
        return dict(pid=pid, ppid=ppid, pgid=pgid, sid=sid, tids=[pid, *threads], **extra)

    return {
        "idpin_plan": 1,
        "root": 1,
        "processes": [
            proc(1, 0, 1, 1, 9, cmdline=["/usr/bin/server", "--port", "80"],
                 fds={"0": {"pty": 3, "end": "slave"}, "5": {"pty": 3, "end": "master"}},
                 next={"pid": [12, 13], "tid": [], "sem": [32769], "shm": [], "msg": [], "pty": []}),
            proc(2, 1, 1, 1, fds={"1": {"pty": 3, "end": "slave"}}),
            proc(3, 1, 3, 3, 10),
            proc(4, 3, 5, 3),
            proc(6, 4, 5, 3),
            proc(7, 1, 7, 1),
        ],
        "ipc": [
            {"kind": "sem", "id": 32769, "key": 0, "mode": 0o600, "nsems": 3, "values": [0, 1, 2]},
            {"kind": "msg", "id": 98307, "key": 4660, "mode": 0o600,
             "messages": [{"type": 1, "data": "aGVsbG8="}, {"type": 7, "data": ""}]},
            {"kind": "shm", "id": 65538, "key": 0, "mode": 0o640, "size": 4096, "data": "AAECAw=="},
        ],
        "ptys": [{"index": 3}],
    }


def refusal(doc):
    with pytest.raises(idpin.RequestError) as info:
        plan.validate(doc)
    return str(info.value)


def mutated(path, value):
    """example() with the field at ``path`` (keys and indices) set to value (ABSENT: removed)."""
    doc = example()
    *parents, last = path
    target = doc
    for key in parents:
        target = target[key]
    if value is ABSENT:
        del target[last]
    elif isinstance(target, list) and last == len(target):
        target.append(value)
    else:
        target[last] = value
    return doc


P = "processes"
# (where to change, new value, JSON path reported, what the message says)
HOSTILE = [
    # the tree
    ((P, 1, "ppid"), 42, "$.processes[1].ppid", "42 is not the pid of a process of the plan"),
    ((P, 3, "ppid"), 6, "$.processes[3].ppid", "cycle, not a tree rooted at 1: 4 -> 6 -> 4"),
    ((P, 1, "ppid"), 2, "$.processes[1].ppid", "cycle, not a tree rooted at 1: 2 -> 2"),
    ((P, 1, "ppid"), 0, "$.processes[1].ppid", "only the root (pid 1) has ppid 0"),
    ((P, 0, "ppid"), 2, "$.processes[0].ppid", "the root's ppid must be 0"),
    (("root",), 99, "$.root", "99 is not the pid of a process of the plan"),
    (("root",), 9, "$.root", "9 is not the pid of a process of the plan"),
    ((P, 6), {"pid": 3, "ppid": 1, "pgid": 1, "sid": 1, "tids": [3]}, "$.processes[6].pid",
     "pid 3 is also $.processes[2]"),
    ((P, 1, "tids"), [2, 9], "$.processes[1].tids[1]", "tid 9 is also $.processes[0].tids[1]"),
    ((P, 1, "tids"), [2, 3], "$.processes[2].tids[0]", "tid 3 is also $.processes[1].tids[1]"),
    ((P, 1, "tids"), [2, 11, 11], "$.processes[1].tids", "lists an id twice"),
    ((P, 1, "tids"), [11, 2], "$.processes[1].tids[0]", "must be the process's pid 2 (the main thread comes first)"),
    ((P, 1, "tids"), [], "$.processes[1].tids", "must not be empty"),
    # sessions and groups
    ((P, 5, "pgid"), 3, "$.processes[5].pgid", "the leader of group 3, $.processes[2], is alive in session 3"),
    ((P, 4, "sid"), 1, "$.processes[4].sid", "differs from the session 3 of its group 5 ($.processes[3])"),
    ((P, 2, "pgid"), 1, "$.processes[2].pgid", "a session leader leads its own group: must be 3, not 1"),
    ((P, 1, "sid"), 7, "$.processes[1].sid", "the leader of session 7, $.processes[5], is in session 1"),
    ((P, 5, "pgid"), 2, "$.processes[5].pgid", "the leader of group 2, $.processes[1], is in group 1"),
    ((P, 1, "pgid"), 9, "$.processes[1].pgid", "9 is a thread ($.processes[0].tids[1])"),
    ((P, 3, "sid"), 10, "$.processes[3].sid", "10 is a thread ($.processes[2].tids[1])"),
    ((P, 6), {"pid": 8, "ppid": 1, "pgid": 3, "sid": 1, "tids": [8]}, "$.processes[6].pgid",
     "the leader of group 3, $.processes[2], is alive in session 3, not in this process's session 1"),
    # ranges and types
    ((P, 1, "pid"), 4194304, "$.processes[1].pid", "4194304 is out of range 1..4194303"),
    ((P, 1, "pid"), 0, "$.processes[1].pid", "0 is out of range 1..4194303"),
    ((P, 1, "tids"), [2, -5], "$.processes[1].tids[1]", "-5 is out of range 1..4194303"),
    ((P, 1, "ppid"), -1, "$.processes[1].ppid", "-1 is out of range 0..4194303"),
    ((P, 1, "sid"), 2**70, "$.processes[1].sid", "out of range 0..4194303"),
    ((P, 1, "pid"), 2.0, "$.processes[1].pid", "must be of type integer, not number 2.0"),
    ((P, 1, "pid"), True, "$.processes[1].pid", "must be of type integer, not boolean True"),
    ((P, 1, "pid"), "2", "$.processes[1].pid", "must be of type integer, not string '2'"),
    ((P, 1, "pgid"), None, "$.processes[1].pgid", "must be of type integer, not null"),
    # values equal to ones already found valid, but of another type (validation remembers valid pairs)
    ((P, 2, "ppid"), 1.0, "$.processes[2].ppid", "must be of type integer, not number 1.0"),
    ((P, 1, "sid"), True, "$.processes[1].sid", "must be of type integer, not boolean True"),
    ((P, 2, "next"), {"pid": [12.0]}, "$.processes[2].next.pid[0]", "must be of type integer, not number 12.0"),
    ((P, 1, "cmdline"), ["ok", 5], "$.processes[1].cmdline[1]", "must be of type string"),
    ((P, 0, "next", "pid"), [0], "$.processes[0].next.pid[0]", "0 is out of range 1..4194303"),
    ((P, 0, "next", "sem"), [-1], "$.processes[0].next.sem[0]", "-1 is out of range 0..2147483647"),
    ((P, 0, "next", "pty"), [1 << 20], "$.processes[0].next.pty[0]", "out of range 0..1048575"),
    ((P,), [], "$.processes", "must not be empty"),
    ((P,), {}, "$.processes", "must be of type array, not object"),
    ((P, 1, "pid"), ABSENT, "$.processes[1]", "'pid' is a required property"),
    # unknown fields
    (("extra",), 1, "$", "unknown field (a version 1 plan has no such field)"),
    ((P, 1, "cwd"), "/", "$.processes[1]", "unknown field"),
    ((P, 0, "next", "fd"), [], "$.processes[0].next", "unknown field"),
    ((P, 0, "fds", "0", "flags"), 2, "$.processes[0].fds['0']", "unknown field"),
    (("ipc", 0, "owner"), 0, "$.ipc[0]", "unknown field"),
    (("ipc", 0, "size"), 4096, "$.ipc[0]", "unknown field"),
    (("ipc", 1, "messages", 0, "prio"), 1, "$.ipc[1].messages[0]", "unknown field"),
    (("ptys", 0, "mode"), 0o620, "$.ptys[0]", "unknown field"),
    # the version
    (("idpin_plan",), 2, "$.idpin_plan", "plan version 2 is newer than this idpin reads (version 1): upgrade idpin"),
    (("idpin_plan",), 0, "$.idpin_plan", "must be 1, not 0"),
    (("idpin_plan",), "1", "$.idpin_plan", "must be 1, not '1'"),
    (("idpin_plan",), True, "$.idpin_plan", "must be 1, not True"),
    (("idpin_plan",), ABSENT, "$", "not an idpin plan: the version field 'idpin_plan' is missing"),
    # SysV IPC
    (("ipc", 3), {"kind": "sem", "id": 32769 + (1 << 15), "key": 0, "mode": 0, "nsems": 1, "values": [0]},
     "$.ipc[3].id", "sem id 65537 has index 1, like $.ipc[0] (id 32769)"),
    (("ipc", 3), {"kind": "sem", "id": 32769, "key": 0, "mode": 0, "nsems": 1, "values": [0]},
     "$.ipc[3].id", "like $.ipc[0]"),
    (("ipc", 3), {"kind": "msg", "id": 5, "key": 4660, "mode": 0, "messages": []},
     "$.ipc[3].key", "msg key 4660 is also the key of $.ipc[1]"),
    (("ipc", 0, "values"), [0, 1], "$.ipc[0].values", "has 2 values for nsems 3"),
    (("ipc", 0, "values"), [0, 1, 32768], "$.ipc[0].values[2]", "32768 is out of range 0..32767"),
    (("ipc", 0, "nsems"), 0, "$.ipc[0].nsems", "0 is out of range 1..32000"),
    (("ipc", 0, "nsems"), 10**9, "$.ipc[0].nsems", "out of range 1..32000"),
    (("ipc", 0, "kind"), "fifo", "$.ipc[0].kind", 'must be one of "sem", "shm", "msg", not \'fifo\''),
    (("ipc", 0, "kind"), "shm", "$.ipc[0]", "'size' is a required property"),
    (("ipc", 0, "id"), -1, "$.ipc[0].id", "-1 is out of range 0..2147483647"),
    (("ipc", 0, "id"), 2**31, "$.ipc[0].id", "out of range 0..2147483647"),
    (("ipc", 0, "key"), 2**31, "$.ipc[0].key", "out of range -2147483648..2147483647"),
    (("ipc", 0, "mode"), 0o1000, "$.ipc[0].mode", "512 is out of range 0..511"),
    (("ipc", 2, "size"), 1 << 40, "$.ipc[2].size", "1099511627776 is out of range 1..1073741824"),
    (("ipc", 2, "size"), 0, "$.ipc[2].size", "0 is out of range 1..1073741824"),
    (("ipc", 2, "size"), 3, "$.ipc[2].data", "holds 4 bytes, more than the segment's size 3"),
    (("ipc", 2, "data"), "AAEC!w==", "$.ipc[2].data", "'AAEC!w==' is not base64"),
    (("ipc", 2, "data"), "AAE", "$.ipc[2].data", "is not base64: its length 3 is not a multiple of 4"),
    (("ipc", 1, "messages", 0, "type"), 0, "$.ipc[1].messages[0].type", "0 is out of range 1..9223372036854775807"),
    (("ipc", 1, "messages", 0, "type"), 2**63, "$.ipc[1].messages[0].type", "out of range 1.."),
    (("ipc", 1, "messages", 0, "data"), "aGVsbG8", "$.ipc[1].messages[0].data", "its length 7 is not a multiple of 4"),
    (("ipc", 1, "messages", 0, "data"), ABSENT, "$.ipc[1].messages[0]", "'data' is a required property"),
    # ptys
    (("ptys", 1), {"index": 3}, "$.ptys[1].index", "pty 3 is also $.ptys[0]"),
    (("ptys", 0, "index"), 4, "$.processes[0].fds['0'].pty", "pty 3 is not in $.ptys"),
    (("ptys", 0, "index"), -1, "$.ptys[0].index", "-1 is out of range 0..1048575"),
    ((P, 1, "fds", "1", "end"), "both", "$.processes[1].fds['1'].end", 'must be one of "master", "slave"'),
    ((P, 1, "fds", "stdin"), {"pty": 3, "end": "slave"}, "$.processes[1].fds",
     "fds are named by decimal fd numbers (below 10**9), not 'stdin'"),
    ((P, 1, "fds", "01"), {"pty": 3, "end": "slave"}, "$.processes[1].fds", "not '01'"),
    ((P, 1, "fds", "-1"), {"pty": 3, "end": "slave"}, "$.processes[1].fds", "not '-1'"),
    ((P, 1, "fds", "1000000000"), {"pty": 3, "end": "slave"}, "$.processes[1].fds", "not '1000000000'"),
]


def test_the_example_plan_is_valid_and_loads_with_every_default_filled():
    doc = example()
    assert plan.validate(doc) is doc and doc == example()
    loaded = plan.load(doc)
    assert doc == example(), "load must not change the dict it was given"
    assert loaded["processes"][1] == {
        "pid": 2, "ppid": 1, "pgid": 1, "sid": 1, "tids": [2], "cmdline": [],
        "fds": {"1": {"pty": 3, "end": "slave"}},
        "next": {"pid": [], "tid": [], "sem": [], "shm": [], "msg": [], "pty": []},
    }
    minimal = {"idpin_plan": 1, "root": 5, "processes": [{"pid": 5, "ppid": 0, "pgid": 0, "sid": 0, "tids": [5]}]}
    assert plan.load(minimal)["ipc"] == [] and plan.load(minimal)["ptys"] == []


def test_load_takes_a_path_a_file_object_or_a_dict_and_dump_round_trips(tmp_path):
    path = tmp_path / "plan.json"
    plan.dump(example(), str(path))
    text = io.StringIO()
    plan.dump(example(), text)
    assert json.loads(path.read_text()) == json.loads(text.getvalue()) == example()
    with open(path) as f:
        from_file = plan.load(f)
    assert plan.load(path) == plan.load(str(path)) == from_file == plan.load(example())
    with pytest.raises(idpin.RequestError, match=r"invalid plan: \$.root"):
        plan.dump(dict(example(), root=99), io.StringIO())


@pytest.mark.parametrize("chunk", range(4))
def test_hostile_plans_are_refused_with_the_json_path_and_what_is_wrong(chunk):
    # Four chunks keep each namespace run short; every case is checked.
    for where, value, path, says in HOSTILE[chunk::4]:
        message = refusal(mutated(where, value))
        assert message.startswith("invalid plan: %s: " % path), (where, value, message)
        assert says in message, (where, value, message)


def test_inconsistent_sessions_that_need_a_tree_of_their_own_are_refused():
    doc = example()
    # 8 led session 8 and group 8 and is gone: group 8 cannot be in session 1.
    doc["processes"][1:] = [
        {"pid": 2, "ppid": 1, "pgid": 8, "sid": 8, "tids": [2]},
        {"pid": 3, "ppid": 1, "pgid": 8, "sid": 1, "tids": [3]},
    ]
    doc["processes"][0]["fds"] = {}
    assert refusal(doc) == ("invalid plan: $.processes[2].pgid: group 8 belongs to session 8 "
                            "(its leader led both), not to session 1")


def test_json_text_that_is_not_a_plan_is_refused(tmp_path):
    cases = {
        '{"idpin_plan": 1, "root": 1, "root": 2}': "the field 'root' appears twice in one object",
        '{"idpin_plan": NaN}': "NaN is not a JSON number",
        '{"idpin_plan": 1,': "is not a plan's JSON",
        "[1, 2]": "$: a plan is a JSON object, not array",
        "[" * 100000 + "]" * 100000: "is not a plan's JSON",
        '{"idpin_plan": 1, "root": 1, "processes": [{"pid": 1' + "0" * 5000 + "}]}": "is not a plan's JSON",
    }
    for text, says in cases.items():
        with pytest.raises(idpin.RequestError) as info:
            plan.load(io.StringIO(text))
        assert says in str(info.value), (text[:40], str(info.value))
    with pytest.raises(idpin.RequestError, match="cannot read the plan .*missing.json: No such file"):
        plan.load(tmp_path / "missing.json")
    with pytest.raises(idpin.RequestError, match="a plan is a path, a file object or a dict, not list"):
        plan.load([example()])


def test_huge_declared_sizes_are_refused_without_allocating_them():
    # Each would be gigabytes if anything sized a buffer from it before the check.
    huge = [
        (("ipc", 2, "size"), 2**62, "$.ipc[2].size"),
        (("ipc", 0, "nsems"), 2**40, "$.ipc[0].nsems"),
        (("ipc", 1, "messages", 0, "type"), 2**100, "$.ipc[1].messages[0].type"),
        ((P, 0, "fds", "999999999"), {"pty": 2**31, "end": "master"}, "$.processes[0].fds['999999999'].pty"),
    ]
    for where, value, path in huge:
        doc = mutated(where, value)
        tracemalloc.start()
        try:
            message = refusal(doc)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert message.startswith("invalid plan: %s: " % path), message
        assert peak < 1 << 20, (path, peak)


def test_oversized_contents_are_refused_without_quoting_them():
    oversized = [
        (("ipc", 1, "messages", 0, "data"), "A" * (2 << 20), "$.ipc[1].messages[0].data", "at most 1398104"),
        (("ipc", 0, "values"), [0] * 32001, "$.ipc[0].values", "has 32001 entries"),
    ]
    for where, value, path, says in oversized:
        message = refusal(mutated(where, value))
        assert message.startswith("invalid plan: %s: " % path) and says in message, message
        assert len(message) < 200, message


def test_the_shipped_schema_is_a_valid_draft_2020_12_schema():
    schema = plan.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["idpin_plan"] == {"const": 1}


def test_comparable_ignores_the_order_of_entries_and_named_fields():
    shuffled = example()
    random.Random(7).shuffle(shuffled["processes"])
    shuffled["ipc"].reverse()
    shuffled["processes"][0]["tids"] = shuffled["processes"][0]["tids"][:1] + shuffled["processes"][0]["tids"][:0:-1]
    assert plan.comparable(shuffled) == plan.comparable(example())
    renamed = example()
    renamed["processes"][0]["cmdline"] = ["python3"]
    assert plan.comparable(renamed) != plan.comparable(example())
    assert plan.comparable(renamed, ignore=("cmdline",)) == plan.comparable(example(), ignore=("cmdline",))


@st.composite
def trees(draw):
    """Valid plans: random trees whose processes inherit, create or lead sessions and groups."""
    count = draw(st.integers(1, 25))
    ids = draw(st.lists(st.integers(1, 4194303), min_size=3 * count, max_size=3 * count, unique=True))
    pids, spare = ids[:count], ids[count:]
    processes = []
    for i, pid in enumerate(pids):
        if i == 0:
            ppid, pgid, sid = 0, draw(st.sampled_from([0, pid])), 0
            sid = pid if pgid == pid else 0
        else:
            parent = processes[draw(st.integers(0, i - 1))]
            ppid, pgid, sid = parent["pid"], parent["pgid"], parent["sid"]
            how = draw(st.sampled_from(["inherit", "setsid", "setpgid"]))
            if how == "setsid":
                pgid = sid = pid
            elif how == "setpgid":
                pgid = pid
        threads = [spare.pop() for _ in range(draw(st.integers(0, 2)))]
        processes.append({"pid": pid, "ppid": ppid, "pgid": pgid, "sid": sid, "tids": [pid] + threads})
    return {"idpin_plan": 1, "root": pids[0], "processes": processes}


@hypothesis.settings(max_examples=30)
@hypothesis.given(trees(), st.randoms(use_true_random=False))
def test_any_consistent_tree_loads_and_a_duplicated_pid_is_refused(doc, rng):
    assert plan.load(doc)["processes"] == plan.with_defaults(copy.deepcopy(doc))["processes"]
    shuffled = copy.deepcopy(doc)
    rng.shuffle(shuffled["processes"])
    assert plan.comparable(shuffled) == plan.comparable(doc)
    hypothesis.assume(len(doc["processes"]) >= 2)
    i, j = sorted(rng.sample(range(len(doc["processes"])), 2))
    twin = copy.deepcopy(doc)
    twin["processes"][j] = dict(twin["processes"][i])
    assert refusal(twin).startswith("invalid plan: $.processes[%d].pid: pid %d is also $.processes[%d]"
                                    % (j, doc["processes"][i]["pid"], i))


def paths(node, prefix=()):
    """Every place in a JSON document: (keys and indices) tuples."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from paths(child, prefix + (key,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
PLACES = [path for path in paths(example()) if path]


@hypothesis.settings(max_examples=150)
@hypothesis.given(st.sampled_from(PLACES), json_values | st.sampled_from([0, 1, 3, 5, 9, 2**31, "slave", "shm"]))
def test_any_value_anywhere_is_accepted_or_refused_with_a_path_never_a_crash(where, value):
    doc = mutated(where, value)
    try:
        plan.validate(doc)
    except idpin.RequestError as err:
        assert str(err).startswith("invalid plan: $"), str(err)
