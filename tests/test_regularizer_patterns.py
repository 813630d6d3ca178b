"""Regularizer selection on models researchers write (tied, parametrized weights): a probe's
findings, 2026-12-07."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from trainer.regularizers import Regularizer


class WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = parametrizations.weight_norm(nn.Linear(8, 4))
        self.b = nn.Linear(4, 3)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.head2 = nn.Linear(4, 3)
        self.head2.weight = self.head.weight  # one Parameter, listed as head.weight


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (WeightNormed, "a.weight_g"),  # the old weight_norm's name: this one's is original0
        (WeightNormed, "a.weight"),  # the computed weight: not a parameter
        (WeightNormed, "b.wieght"),  # a typo
    ],
)
def test_an_exclude_pattern_that_matches_no_parameter_is_named(model, pattern) -> None:
    """An include pattern matching no parameter's name is refused, naming it (a typo there was
    ignored until 2026-12-07); an exclude pattern matching none is ignored, and the parameter
    the user meant to leave out is regularized, unsaid: e.g. exclude=["a.weight_g"] on a
    parametrized weight_norm layer (its gain is a.parametrizations.weight.original0) keeps
    the gain in the selection."""
    m = model()
    with pytest.raises(ValueError, match=rf"^regularizer.l2.exclude: \['{pattern}'\] matches "
                       r"no parameter of the model \(fnmatch patterns on named_parameters\(\) "
                       r"names: a.bias, a.parametrizations.weight.original0"):  # fmt: skip
        r = Regularizer("l2", 1.0, exclude=[pattern]).bind(m)
        # (what it selected instead: the parameter meant to be left out, on the tied and
        # weight-norm models)
        pytest.fail(f"exclude={[pattern]} matched no parameter, unsaid; selected {r.names}")


@pytest.mark.parametrize("name", ["head.weight", "head2.weight"])
def test_a_tied_weight_is_matched_under_each_of_its_names(name) -> None:
    """One Parameter held as head.weight and head2.weight (named_parameters() lists it once,
    as head.weight): excluding it by its second name matched nothing and it stayed
    regularized (a probe's); either name leaves it out now, and either selects it."""
    m = Tied()
    assert Regularizer("l2", 1.0, exclude=[name], min_ndim=1).bind(m).names == [
        "head.bias", "head2.bias"]  # fmt: skip
    assert Regularizer("l2", 1.0, include=[name]).bind(m).names == ["head.weight"]


def test_a_shared_presets_pattern_may_match_nothing_where_allowed(caplog) -> None:
    """A pattern matching no parameter is refused (a typo), which also refused a preset shared
    by models that differ (exclude=["*norm*"] on a model without norm layers) with no way
    out; ``allow_unmatched=true`` lets it through, named in a warning, and the selection is
    the one without it. An empty selection stays an error."""
    m = Tied()
    with pytest.raises(
        ValueError,
        match=r"^regularizer.l2.exclude: \['\*norm\*'\] matches no "
        r"parameter of the model \(fnmatch .*\); a pattern a shared preset names "
        r"for other models is allowed with regularizer.l2.allow_unmatched=true$",
    ):
        Regularizer("l2", 1.0, exclude=["*norm*"]).bind(m)  # fmt: skip
    with caplog.at_level("WARNING", logger="trainer.regularizers"):
        r = Regularizer("l2", 1.0, include=["head.*", "enc*"], exclude=["*norm*"],
                        min_ndim=1, allow_unmatched=True).bind(m)  # fmt: skip
    assert r.names == Regularizer("l2", 1.0, include=["head.*"], min_ndim=1).bind(m).names
    said = [rec.getMessage() for rec in caplog.records]
    assert [s.split(" (fnmatch")[0] for s in said] == [
        "regularizer.l2.include: ['enc*'] matches no parameter of the model",
        "regularizer.l2.exclude: ['*norm*'] matches no parameter of the model",
    ]
    assert all(s.endswith("; allowed: regularizer.l2.allow_unmatched=true") for s in said)
    with pytest.raises(ValueError, match=r"^regularizer.l2: no parameter matches include="):
        Regularizer("l2", 1.0, include=["*norm*"], allow_unmatched=True).bind(m)
    with pytest.raises(TypeError, match=r"^regularizer.l2.allow_unmatched: got 'false', "):
        Regularizer("l2", 1.0, allow_unmatched="false")  # type: ignore[arg-type]


def test_allow_unmatched_changes_neither_the_run_nor_its_identity(tmp_path) -> None:
    """Through the config: the run with an unmatched exclude allowed trains bit for bit as the
    one without the pattern, under the same run id (the key is not part of a run's identity:
    a run started before it existed keeps its id, and toggling it resumes)."""
    from conftest import final_params, make_cfg, read_scalars, train

    from trainer.checkpoint import derive_run_id
    from trainer.run import identity_config

    keys = ("regularizer=[l2]", "trainer.max_steps=3", "logging.every_n_steps=1")
    allowed = ("regularizer.l2.exclude=[*norm*]", "regularizer.l2.allow_unmatched=true")
    train(tmp_path / "a", *keys, *allowed)
    train(tmp_path / "b", *keys)
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_scalars(tmp_path / "a")["reg/l2"] == read_scalars(tmp_path / "b")["reg/l2"]
    ids = {derive_run_id(identity_config(make_cfg(*keys, *extra)))
           for extra in ((), ("regularizer.l2.allow_unmatched=true",))}  # fmt: skip
    assert len(ids) == 1
