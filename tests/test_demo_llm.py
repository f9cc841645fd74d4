"""The real-LLM demo's helpers: grading, DeLong AUROC intervals, token printing (no model needed)."""

import numpy as np
import pytest
import torch

from interp.cli.demo_llm import token_line
from interp.grading import is_correct, normalize
from interp.probes.linear import auroc
from interp.stats import auroc_ci


@pytest.mark.parametrize(
    ("response", "answer", "aliases", "expected"),
    [
        ("The capital of Japan is Tokyo.", "Tokyo", [], True),
        ("Tokyoite food is great", "Tokyo", [], False),  # whole words only
        ("It is Brasília.", "Brasilia", [], True),  # accents removed
        ("About 1,000 metres", "1000", [], True),  # thousands commas dropped
        ("One inch is 2.54 cm", "2.54", [], True),  # decimals stay one word
        ("One inch is 2 54 cm", "2.54", [], False),
        ("Water freezes at -273", "273", [], True),  # signs dropped
        ("The symbol is Au", "Gold", ["Au"], True),  # aliases
        ("It was the Beatles", "Beatles", [], True),  # articles dropped
        ("Paris or Lyon", "Marseille", ["Nice"], False),
    ],
)
def test_grading(response, answer, aliases, expected):
    assert is_correct(response, answer, aliases) is expected


def test_normalize():
    assert normalize("The city: Brasília, 1,000,000 people; 2.54 cm!") == "city brasilia 1000000 people 2.54 cm"


def test_auroc_ci_matches_interp_auroc_and_bootstrap_spread():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = y + rng.normal(0, 1.5, 400)
    r = auroc_ci(s, y)
    assert r["auroc"] == pytest.approx(auroc(torch.tensor(s), torch.tensor(y)), abs=1e-12)
    # DeLong's standard error agrees with the bootstrap's
    idx = rng.integers(0, 400, (2000, 400))
    boot = [auroc(torch.tensor(s[i]), torch.tensor(y[i])) for i in idx]
    se_delong = (r["hi"] - r["lo"]) / (2 * 1.96)
    assert se_delong == pytest.approx(np.std(boot), rel=0.15)
    assert r["lo"] < r["auroc"] < r["hi"]


def test_auroc_ci_ties_and_single_class():
    assert auroc_ci([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1])["auroc"] == 0.5
    assert np.isnan(auroc_ci([0.1, 0.2], [1, 1])["auroc"])


def test_token_line_plain_and_colour():
    plain = token_line(["The", " sky"], [-1.0, 2.5], 0.0, color=False)
    assert plain == "The[-1.00]  sky[+2.50]"
    coloured = token_line(["The", " sky"], [-1.0, 2.5], 0.0, color=True)
    assert coloured.count("\x1b[0m") == 2 and "The" in coloured and " sky" in coloured
