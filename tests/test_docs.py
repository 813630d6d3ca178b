"""Every ```python block of the docs runs: in file order, in one namespace per file."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

DOCS = ["docs/gradients.md", "docs/instrumentation.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: str) -> list[str]:
    return FENCE.findall((ROOT / path).read_text())


@pytest.mark.parametrize("path", DOCS)
def test_every_snippet_runs(path: str) -> None:
    found = blocks(path)
    assert len(found) >= 2, f"{path}: expected its snippets, found {len(found)}"
    namespace: dict = {"__name__": "docs_snippet"}
    for i, code in enumerate(found):
        try:
            exec(compile(code, f"{path}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path}, python block {i} fails:\n{code}") from e


@pytest.mark.parametrize("path", DOCS)
def test_no_snippet_is_skipped(path: str) -> None:
    # every opened python fence is one block the runner executes
    assert len(blocks(path)) == (ROOT / path).read_text().count("```python\n")
