"""Config helpers that are not part of a method's schema."""

from __future__ import annotations

from harness.config import differing_fields


def test_differing_fields_names_each_leaf_that_an_ignored_section_overrides():
    used = {"max_steps": 40, "optim": {"lr": 3e-3, "warmup_steps": 100}}
    ignored = {"max_steps": 7, "optim": {"lr": 3e-3, "warmup_steps": 5}}
    assert differing_fields(used, ignored, ("method", "sft")) == [
        "sft.max_steps=7 (method.max_steps=40)",
        "sft.optim.warmup_steps=5 (method.optim.warmup_steps=100)",
    ]
    assert differing_fields(used, used, ("method", "sft")) == []
