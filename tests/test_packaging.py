"""What the installed distribution carries: metadata, changelog, typing."""
import importlib.metadata
import pathlib
import re

import pytest

import idpin

pytestmark = pytest.mark.host
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_metadata_names_the_authors_and_the_version():
    meta = importlib.metadata.metadata("idpin")
    assert meta["Name"] == "idpin" and meta["Version"] == idpin.__version__
    assert meta["Author"] == "The idpin developers"


def test_the_changelog_has_the_current_version_and_an_unreleased_section():
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "Unreleased"
    assert idpin.__version__ in headings


def test_the_installed_package_says_it_is_typed():
    import importlib.resources

    assert (importlib.resources.files("idpin") / "py.typed").is_file()


def test_mypy_finds_no_error_in_the_package_and_the_typed_usage():
    # The configuration is pyproject.toml's [tool.mypy]; tests/typed_usage.py
    # fails the check when a public annotation is missing or wrong.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found"), done.stdout


@pytest.mark.parametrize("name", ["idpin.ipc", "idpin.pty"])
def test_ipc_and_pty_list_their_public_names_only(name):
    import importlib

    module = importlib.import_module(name)
    assert [attr for attr in module.__all__ if not hasattr(module, attr)] == []
    assert dir(module) == sorted(module.__all__)
    assert not {"os", "errno", "collections", "contextlib", "_sys"} & set(dir(module))
    namespace: dict = {}
    exec("from %s import *" % name, namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(module.__all__)
