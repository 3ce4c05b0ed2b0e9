"""The machine a run happened on: every figure is only meaningful beside it."""
import datetime
import importlib
import os
import platform

from .. import __version__


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_backends():
    """(backends that load, {backend: why not}) — a missing extension skips its cells."""
    loaded, missing = [], {}
    for name in ("cython", "ctypes"):
        try:
            importlib.import_module("idpin._sys._" + name)
        except ImportError as err:
            missing[name] = str(err)
        else:
            loaded.append(name)
    return loaded, missing


def describe():
    loaded, missing = available_backends()
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "idpin": __version__,
        "backends": loaded,
        "backends_missing": missing,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def one_line(machine):
    return "Linux %s, %s CPUs (%s), Python %s, %s" % (
        machine["kernel"], machine["cpus"], machine["cpu_model"], machine["python"], machine["date"])
