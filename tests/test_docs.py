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


def test_readmes_python_snippet_runs_with_its_paths_filled_in(tmp_path, monkeypatch) -> None:
    """README's one Python block (composing with one's own config folder, then
    ``trainer.run``) with its placeholders filled in: this project's configs, examples/byo's,
    the run folder; it overrode the model alone, which could not train on the default data
    (a probe's)."""
    (code,) = FENCE.findall((ROOT / "README.md").read_text())
    filled = {
        "/path/to/this/project/configs": str(ROOT / "configs"),
        "file:///path/to/yourproject/configs": (ROOT / "examples" / "byo" / "configs").as_uri(),
        '"outputs/from_python"': repr(str(tmp_path / "from_python")),
        "trainer.max_steps=100": "trainer.max_steps=3",  # (the snippet's run, shorter)
    }
    for placeholder, value in filled.items():
        assert code.count(placeholder) == 1, placeholder
        code = code.replace(placeholder, value)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "byo"))
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md[python block]", "exec"), namespace)
    metrics = namespace["metrics"]
    assert metrics["status"] == "completed" and metrics["step"] == 3, metrics
    assert (tmp_path / "from_python" / "metrics.json").is_file()
