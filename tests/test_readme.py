"""The README's Python examples run as written, in fresh namespaces."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# The first block is the one-line teaser; the rest are complete programs.
PROGRAMS = EXAMPLES[1:]


def test_the_readme_has_examples():
    assert len(PROGRAMS) >= 6


@pytest.mark.parametrize("source", PROGRAMS, ids=[p.splitlines()[0][:40] for p in PROGRAMS])
def test_readme_example_runs(source):
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})
