"""Error rates of the judging layer, measured by simulation at every preset's sample sizes.

Every interval a verdict reads covers at least 93% at nominal 95%, and no rule says
"reproduced" (or "shown but small") of a false claim in more than 5% of draws. The Monte
Carlo error of each rate is printed beside it (``python -m impact_core error-rates`` prints the
whole table)."""
from __future__ import annotations

import pytest

from impact_core import error_rates as E
from impact_core.config import load_config

PRESETS = ["smoke", "default", "replicates", "seeds", "paper"]


def _draws(design, small: int, large: int) -> int:
    return large if design.n * design.groups >= 10_000 else small


@pytest.mark.parametrize("preset", PRESETS)
def test_every_interval_covers_at_least_93_percent(preset):
    for d in E.designs(load_config(preset)):
        n = _draws(d, 2000, 600)
        cov = E.coverage(d, n, seed=1)
        print(f"{preset}: {d.name}: coverage {cov:.3f} +- {E.mc_error(cov, n):.3f} ({n} draws)")
        assert cov >= E.COVERAGE_FLOOR, (preset, d, cov)


@pytest.mark.parametrize("preset", PRESETS)
def test_no_rule_says_reproduced_of_a_false_claim_more_than_5_percent(preset):
    for d in E.designs(load_config(preset)):
        n = _draws(d, 400, 150)
        for rule, rate in E.rule_rates(d, n, seed=2).items():
            print(f"{preset}: {d.name}: {rule}: {rate:.3f} +- {E.mc_error(rate, n):.3f} ({n} draws)")
            assert rate <= E.FALSE_REPRODUCED, (preset, d, rule, rate)


def test_the_designs_follow_the_preset():
    names = [d.name for d in E.designs(load_config("default"))]
    assert "3 SAE seeds" in names and "10000 images, top-1" in names and "10 classes (circuits)" in names
    seeds = E.designs(load_config("seeds"))
    assert all(d.groups == 3 for d in seeds)
    assert all(d.groups == 3 for d in E.designs(load_config("default")))  # three replicates
    assert all(d.groups == 5 for d in E.designs(load_config("replicates")))
    smoke = E.designs(load_config("smoke", {"sae.seeds": 4}))
    assert "4 SAE seeds" in [d.name for d in smoke]


def test_replicates_hold_the_error_rate_that_one_run_per_condition_cannot():
    """Sparsity does nothing, but every fine-tuned model carries its own run-to-run offset as large
    as the class noise: with one run per condition the classes' interval cannot see that noise;
    with the replicates as the units the rule holds its rate."""
    one = E.pipeline_noise(replicates=1, draws=400)
    three = E.pipeline_noise(replicates=3, draws=400)
    print(f"one run per condition: {one:.3f}; three replicates: {three:.3f}")
    assert three <= E.FALSE_REPRODUCED < one
