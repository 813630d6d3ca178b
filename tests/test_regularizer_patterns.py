"""Regularizer selection on models researchers write (tied, parametrized weights): a probe's
findings, 2026-12-07."""

from __future__ import annotations

import pytest
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
