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
