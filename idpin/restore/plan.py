"""Plans: the JSON document of a tree's ids (DESIGN.md, "Plans", version 1).

The structure (types, ranges, size caps, unknown fields) is the JSON Schema
shipped beside this module (plan-v1.schema.json), checked with the jsonschema
library; this module adds only what a schema cannot say: the relations
between entries (the tree, sessions and groups, ids used twice). Every
refusal is an idpin.RequestError whose message starts with the JSON path of
the offending entry, raised before anything is allocated.

    plan = load("plan.json")       # a path, a file object or a dict; validated, defaults filled
    dump(plan, "copy.json")
"""
import copy
import functools
import importlib.resources
import json
import os
import threading

import jsonschema

from .. import ipc as _ipc
from ..errors import RequestError

VERSION = 1
SCHEMA_FILE = "plan-v1.schema.json"
NEXT_KINDS = ("pid", "tid", "sem", "shm", "msg", "pty")

__all__ = ["VERSION", "load", "validate", "dump", "comparable", "schema", "with_defaults"]


@functools.cache
def schema():
    """The plan schema (a dict), as shipped in the package."""
    return json.loads(importlib.resources.files(__package__).joinpath(SCHEMA_FILE).read_text())


def _strict_integer(checker, instance):
    # JSON Schema counts 1.0 as an integer; a pid must be a Python int.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _inlined(node, defs):
    """``node`` with every local $ref replaced by the definition it names.

    The plan schema is not recursive, so this terminates; resolving a $ref is
    the largest cost of validating a 10,000-process plan.
    """
    if isinstance(node, list):
        return [_inlined(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _inlined(value, defs) for key, value in node.items() if key != "$defs"}
    ref = node.pop("$ref", None)
    if ref is not None:
        target = _inlined(defs[ref.removeprefix("#/$defs/")], defs)
        assert not set(target) & set(node), "the schema's %s clashes with its siblings" % ref
        node.update(target)
    return node


_found_valid = threading.local()


def _frozen(value):
    """A hashable stand-in for a JSON value that keeps apart what validation keeps apart (1, 1.0, True, "1")."""
    kind = type(value)
    if kind is list:
        return kind, tuple(map(_frozen, value))
    if kind is dict:
        return kind, tuple((type(key), key, _frozen(item)) for key, item in value.items())
    return kind, value


def _memo_key(subschema, value):
    # Long arrays (the processes, a queue's messages) do not repeat: keying them costs more than it saves.
    if type(value) is list and len(value) > 64:
        return None
    try:
        key = (id(subschema), _frozen(value))
        hash(key)
    except (TypeError, RecursionError):
        return None  # not JSON (a dict handed in by a caller): always checked
    return key


def _remembering_properties(validator, properties, instance, schema):
    """jsonschema's own "properties", skipping a (subschema, value) pair already found valid.

    Validity is a function of the pair alone, and a plan repeats most of its
    values (ppids, sids, cmdlines, empty lists): this makes a 10,000-process
    plan several times faster to check.
    """
    if not validator.is_type(instance, "object"):
        return
    for name, subschema in properties.items():
        if name not in instance:
            continue
        key = _memo_key(subschema, instance[name])
        if key is not None and key in _found_valid.pairs:
            continue
        errors = list(validator.descend(instance[name], subschema, path=name, schema_path=name))
        if key is not None and not errors:
            _found_valid.pairs.add(key)
        yield from errors


@functools.cache
def _validator():
    base = jsonschema.Draft202012Validator
    cls = jsonschema.validators.extend(
        base,
        validators={"properties": _remembering_properties},
        type_checker=base.TYPE_CHECKER.redefine("integer", _strict_integer),
    )
    return cls(_inlined(schema(), schema()["$defs"]))


def _refuse(path, what):
    raise RequestError("invalid plan: %s: %s" % (path, what), kind="plan")


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value):
    for name, types in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                        ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _describe(error):
    """What a schema error says, without quoting a possibly huge instance."""
    kind, value, sub = error.validator, error.instance, error.schema
    if kind == "type":
        return "must be of type %s, not %s %s" % (sub["type"], _json_type(value), _short(value))
    if kind in ("minimum", "maximum"):
        return "%s is out of range %s..%s" % (_short(value), sub.get("minimum", "-inf"), sub.get("maximum", "inf"))
    if kind in ("maxItems", "maxLength", "maxProperties"):
        unit = "characters" if kind == "maxLength" else "entries"
        return "has %d %s; at most %d are allowed" % (len(value), unit, error.validator_value)
    if kind in ("minItems",):
        return "must not be empty"
    if kind in ("enum", "const"):
        allowed = sub[kind] if kind == "enum" else [sub[kind]]
        return "must be one of %s, not %s" % (", ".join(json.dumps(a) for a in allowed), _short(value))
    if kind == "pattern" and "propertyNames" in error.absolute_schema_path:
        return "fds are named by decimal fd numbers (below 10**9), not %s" % _short(value)
    if kind == "pattern":
        return "%s is not base64" % _short(value)
    if kind in ("additionalProperties", "unevaluatedProperties"):
        return "unknown field (a version %d plan has no such field): %s" % (VERSION, error.message[:200])
    if kind == "uniqueItems":
        return "lists an id twice"
    return error.message[:200]


def _check_version(doc):
    if not isinstance(doc, dict):
        _refuse("$", "a plan is a JSON object, not %s" % _json_type(doc))
    if "idpin_plan" not in doc:
        _refuse("$", "not an idpin plan: the version field 'idpin_plan' is missing")
    version = doc["idpin_plan"]
    if _strict_integer(None, version) and version > VERSION:
        _refuse("$.idpin_plan", "plan version %d is newer than this idpin reads (version %d): upgrade idpin"
                % (version, VERSION))
    if not _strict_integer(None, version) or version != VERSION:
        _refuse("$.idpin_plan", "must be %d, not %s" % (VERSION, _short(version)))


def _relevance(error, _default=jsonschema.exceptions.relevance):
    # A failed "then" (a bad shm size) leaves its fields unevaluated: report
    # the bad field, not the unevaluatedProperties that follows from it.
    return (error.validator != "unevaluatedProperties",) + _default(error)


def _check_schema(doc):
    _found_valid.pairs = set()  # (id(subschema), value) pairs, for this check only
    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(doc), key=_relevance)
    finally:
        del _found_valid.pairs
    if error is not None:
        path = error.json_path
        _refuse(path, _describe(error))


def _proc(index, field=None):
    return "$.processes[%d]%s" % (index, "." + field if field else "")


def _check_ids(procs):
    """One pid, one tid each; the main thread first. Returns pid -> index, tid -> path."""
    where, tids = {}, {}
    for i, p in enumerate(procs):
        if p["tids"][0] != p["pid"]:
            _refuse(_proc(i, "tids[0]"), "must be the process's pid %d (the main thread comes first), not %d"
                    % (p["pid"], p["tids"][0]))
        if p["pid"] in where:
            _refuse(_proc(i, "pid"), "pid %d is also %s" % (p["pid"], _proc(where[p["pid"]])))
        where[p["pid"]] = i
        for j, tid in enumerate(p["tids"]):
            path = _proc(i, "tids[%d]" % j)
            if tid in tids:
                _refuse(path, "tid %d is also %s" % (tid, tids[tid]))
            tids[tid] = path
    return where, tids


def _check_tree(doc, procs, where):
    root = doc["root"]
    if root not in where:
        _refuse("$.root", "%d is not the pid of a process of the plan" % root)
    for i, p in enumerate(procs):
        if p["pid"] == root and p["ppid"] != 0:
            _refuse(_proc(i, "ppid"), "the root's ppid must be 0 (its parent is outside the plan), not %d" % p["ppid"])
        if p["pid"] != root and p["ppid"] == 0:
            _refuse(_proc(i, "ppid"), "only the root (pid %d) has ppid 0" % root)
        if p["ppid"] and p["ppid"] not in where:
            _refuse(_proc(i, "ppid"), "%d is not the pid of a process of the plan" % p["ppid"])
    rooted = {root}
    for i, p in enumerate(procs):
        chain, seen, pid = [], set(), p["pid"]
        while pid not in rooted:
            if pid in seen:
                loop = chain[chain.index(pid):] + [pid]
                _refuse(_proc(i, "ppid"), "the parents form a cycle, not a tree rooted at %d: %s"
                        % (root, " -> ".join(map(str, loop))))
            chain.append(pid)
            seen.add(pid)
            pid = procs[where[pid]]["ppid"]
        rooted.update(chain)


def _check_sessions(procs, where, tids):
    sessions = {p["sid"] for p in procs}
    groups = {}
    for i, p in enumerate(procs):
        pid, pgid, sid = p["pid"], p["pgid"], p["sid"]
        for field, value in (("sid", sid), ("pgid", pgid)):
            if value in tids and value not in where:
                _refuse(_proc(i, field), "%d is a thread (%s), but a %s names its leader's pid"
                        % (value, tids[value], "session" if field == "sid" else "process group"))
        if pid == sid and pgid != pid:
            _refuse(_proc(i, "pgid"), "a session leader leads its own group: must be %d, not %d" % (pid, pgid))
        if sid in where and procs[where[sid]]["sid"] != sid:
            _refuse(_proc(i, "sid"), "the leader of session %d, %s, is in session %d"
                    % (sid, _proc(where[sid]), procs[where[sid]]["sid"]))
        if pgid in where:
            leader = procs[where[pgid]]
            if leader["pgid"] != pgid:
                _refuse(_proc(i, "pgid"), "the leader of group %d, %s, is in group %d" % (pgid, _proc(where[pgid]), leader["pgid"]))
            if leader["sid"] != sid:
                _refuse(_proc(i, "pgid"), "the leader of group %d, %s, is alive in session %d, not in this process's session %d"
                        % (pgid, _proc(where[pgid]), leader["sid"], sid))
        if pgid and pgid in sessions and sid != pgid:
            _refuse(_proc(i, "pgid"), "group %d belongs to session %d (its leader led both), not to session %d" % (pgid, pgid, sid))
        # 0: a group outside the pid namespace, maybe a different one each.
        group_sid, first = groups.setdefault(pgid, (sid, i)) if pgid else (sid, i)
        if group_sid != sid:
            _refuse(_proc(i, "sid"), "%d differs from the session %d of its group %d (%s): a group lies in one session"
                    % (sid, group_sid, pgid, _proc(first)))


def _decoded_size(text):
    return len(text) // 4 * 3 - text[-2:].count("=") if text else 0


def _check_ipc(objects):
    mask = (1 << _ipc.ipc_shift()) - 1
    indices, keys = {}, {}
    for i, obj in enumerate(objects):
        kind, id, path = obj["kind"], obj["id"], "$.ipc[%d]" % i
        other = indices.setdefault((kind, id & mask), i)
        if other != i:
            _refuse(path + ".id", "%s id %d has index %d, like $.ipc[%d] (id %d): one %s per index"
                    % (kind, id, id & mask, other, objects[other]["id"], kind))
        if obj["key"] != _ipc.IPC_PRIVATE:
            other = keys.setdefault((kind, obj["key"]), i)
            if other != i:
                _refuse(path + ".key", "%s key %d is also the key of $.ipc[%d]" % (kind, obj["key"], other))
        if kind == "sem" and len(obj["values"]) != obj["nsems"]:
            _refuse(path + ".values", "has %d values for nsems %d" % (len(obj["values"]), obj["nsems"]))
        if kind == "shm" and _decoded_size(obj.get("data", "")) > obj["size"]:
            _refuse(path + ".data", "holds %d bytes, more than the segment's size %d" % (_decoded_size(obj["data"]), obj["size"]))
        for where, text in _base64_fields(obj, path):
            if len(text) % 4:
                _refuse(where, "is not base64: its length %d is not a multiple of 4" % len(text))


def _base64_fields(obj, path):
    if obj["kind"] == "shm" and "data" in obj:
        yield path + ".data", obj["data"]
    for j, message in enumerate(obj.get("messages", ())):
        yield path + ".messages[%d].data" % j, message["data"]


def _check_ptys(doc, procs):
    indices = {}
    for i, pty in enumerate(doc.get("ptys", [])):
        other = indices.setdefault(pty["index"], i)
        if other != i:
            _refuse("$.ptys[%d].index" % i, "pty %d is also $.ptys[%d]" % (pty["index"], other))
    for i, p in enumerate(procs):
        for fd, held in p.get("fds", {}).items():
            if held["pty"] not in indices:
                _refuse(_proc(i, "fds['%s'].pty" % fd), "pty %d is not in $.ptys" % held["pty"])


def validate(doc):
    """``doc`` itself if it is a valid version 1 plan; else RequestError naming the JSON path."""
    _check_version(doc)
    _check_schema(doc)
    procs = doc["processes"]
    where, tids = _check_ids(procs)
    _check_tree(doc, procs, where)
    _check_sessions(procs, where, tids)
    _check_ipc(doc.get("ipc", []))
    _check_ptys(doc, procs)
    return doc


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("the field %r appears twice in one object" % key)
        obj[key] = value
    return obj


def _refuse_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def _parse(text, origin):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise RequestError("invalid plan: %s is not a plan's JSON: %s" % (origin, str(err)[:200]), kind="plan") from None


def _read(source):
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if hasattr(source, "read"):
        return _parse(source.read(), getattr(source, "name", "the file"))
    if isinstance(source, (str, bytes, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return _parse(f.read(), os.fsdecode(source))
        except OSError as err:
            raise RequestError("cannot read the plan %s: %s" % (os.fsdecode(source), err.strerror), kind="plan") from None
    raise RequestError("a plan is a path, a file object or a dict, not %s" % type(source).__name__, kind="plan")


def with_defaults(plan):
    """Fill the optional fields in place (ipc, ptys; per process cmdline, fds, next lists); ``plan``."""
    plan.setdefault("ipc", [])
    plan.setdefault("ptys", [])
    for p in plan["processes"]:
        p.setdefault("cmdline", [])
        p.setdefault("fds", {})
        nxt = p.setdefault("next", {})
        for kind in NEXT_KINDS:
            nxt.setdefault(kind, [])
    return plan


def load(source):
    """A validated plan, every optional field filled, from a path, a file object or a dict.

    A dict is copied, never changed. Raises RequestError naming the JSON path of
    what is wrong.
    """
    return with_defaults(validate(_read(source)))


def dump(plan, destination):
    """Write ``plan`` (validated first) as JSON to a path or a text file object."""
    validate(plan)
    if hasattr(destination, "write"):
        json.dump(plan, destination, indent=1)
        destination.write("\n")
        return
    with open(destination, "w") as f:
        json.dump(plan, f, indent=1)
        f.write("\n")


def comparable(plan, ignore=()):
    """A normalized copy of ``plan`` for ==: defaults filled, entries sorted by id.

    ``ignore`` names process fields to drop (e.g. ("cmdline",) to compare a
    restored skeleton that has not exec'd with its capture).
    """
    plan = load(plan)
    for p in plan["processes"]:
        p["tids"] = p["tids"][:1] + sorted(p["tids"][1:])
        for field in ignore:
            p.pop(field, None)
    plan["processes"].sort(key=lambda p: p["pid"])
    plan["ipc"].sort(key=lambda o: (o["kind"], o["id"]))
    plan["ptys"].sort(key=lambda t: t["index"])
    return plan
