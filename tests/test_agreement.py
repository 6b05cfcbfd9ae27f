"""The rule the run-agreement tests use (tests/agreement.py), on made-up metrics."""

from __future__ import annotations

import pytest
from agreement import assert_runs_agree


def test_continuous_metrics_agree_to_rounding_only():
    assert_runs_agree({"train/loss": 0.35054}, {"train/loss": 0.350545}, ["train/loss"], {})
    with pytest.raises(AssertionError, match="train/loss"):
        assert_runs_agree({"train/loss": 0.3505}, {"train/loss": 0.3506}, ["train/loss"], {})


def test_a_count_may_differ_by_two_decisions_not_three():
    one = {"train/value_clip_frac": 26 / 128, "eval/gold_reward": 3 / 8}
    two_flips = {"train/value_clip_frac": 28 / 128, "eval/gold_reward": 5 / 8}
    keys = list(one)
    assert_runs_agree(one, two_flips, keys, {"tokens": 128, "prompts": 8})
    with pytest.raises(AssertionError, match="more than 2 of 128 tokens"):
        assert_runs_agree(one, {**two_flips, "train/value_clip_frac": 29 / 128}, keys,
                          {"tokens": 128, "prompts": 8})


def test_an_unclassified_count_is_refused():
    with pytest.raises(AssertionError, match="add it to"):
        assert_runs_agree({"eval/new_acc": 0.5}, {"eval/new_acc": 0.5}, ["eval/new_acc"], {})
