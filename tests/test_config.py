"""The config layer: one home per default, every group checked before work, renamed fields named."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING

from harness.config import ConfigError, EvalConfig, LoggerConfig, RunSchema, TrainerConfig
from harness.methods.declaration import Method
from harness.methods.dpo import DPOConfig
from harness.methods.grpo import GRPOConfig
from harness.registry import (
    Registry,
    base_stages,
    discover,
    get_stage,
    stage_config,
    stage_names,
    stages,
)
from harness.settings import check_overrides, register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def composed(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ----------------------------------------------------------------- one home per default
def _schema_of(path: Path, data: dict) -> Any:
    """The schema a YAML of conf/ merges into: the ``base_*`` node it names, or its typed section."""
    group = path.parent.name
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("base_"):
            node = ConfigStore.instance().repo[group][f"{entry}.yaml"].node
            return node._metadata.object_type
    return {"trainer": TrainerConfig, "logger": LoggerConfig, "eval": EvalConfig}.get(group)


def _defaults(schema: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def _repeats(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        if key in ("defaults", "hydra") or key not in defaults:
            continue
        d = defaults[key]
        if isinstance(value, dict) and isinstance(d, dict):
            found += _repeats(value, d, f"{prefix}{key}.")
        elif value == d and d is not MISSING:
            found.append(f"{prefix}{key}={value!r}")
    return found


def test_no_yaml_repeats_a_schema_default():
    """Every default has one home, the dataclass: a YAML holds only what its option changes."""
    register_configs()
    checked, repeats = 0, []
    for path in sorted(CONF.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if path.name == "config.yaml":
            schema = RunSchema
        elif path.parent.name == "experiment" or path.parent.name == "sweep":
            continue  # set-ups: every value they set is a choice, checked by composing them
        else:
            schema = _schema_of(path, data)
        if schema is None:
            continue
        checked += 1
        repeats += [f"{path.relative_to(ROOT)}: {r}" for r in _repeats(data, _defaults(schema))]
    assert checked >= 25
    assert not repeats, "defaults repeated in YAML (delete them there):\n" + "\n".join(repeats)


def test_the_base_stage_sections_take_their_defaults_from_the_stage_configs():
    cfg = composed(["method=grpo"])
    for name in base_stages():
        schema = get_stage(name).config
        assert dataclasses.asdict(validate(cfg).stages[name]) == dataclasses.asdict(schema())
    assert validate(composed(["method=rloo"])).method == get_stage("rloo").config()


def test_every_registered_stage_has_a_method_option_and_composes():
    options = {p.stem for p in (CONF / "method").glob("*.yaml")}
    assert set(stage_names()) == options
    for name in stage_names():
        s = validate(composed([f"method={name}"]))
        assert s.method_name == name


def test_every_registered_stage_is_the_stage_its_package_declares():
    for name in stage_names():
        stage = get_stage(name)  # the registry compares its declaration with the entry on first use
        assert stage.method == stages().entry(name)
        assert (stage.name, stage.config) == (name, stage_config(name))
    assert base_stages() == ("sft", "rm")
    assert stage_names()[:2] == ("sft", "rm")  # the base stages first, in the order they build


@pytest.mark.parametrize(("entry", "message"), [
    (Method("grpo", DPOConfig, "harness.methods.grpo.stage:GRPOStage"), "declares"),
    (Method("grpo", GRPOConfig, "harness.methods.grpo.stage:GRPOStage", base=True), "declares"),
    (Method("grpo", GRPOConfig, "harness.methods.dpo.stage:DPOStage"), r"declares Method\(name='dpo'"),
])
def test_a_stage_that_disagrees_with_its_entry_is_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        Registry({"grpo": entry}).get("grpo")


def _package(root: Path, name: str, init: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(init)


def test_discovery_finds_every_declared_method_and_refuses_a_misnamed_one(tmp_path, monkeypatch):
    """A subpackage's ``METHOD`` registers it; one without is skipped (a helper package); one
    whose method's name is not its folder's is refused, naming both."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "plug", "")
    decl = ("from dataclasses import dataclass\nfrom harness.methods.declaration import Method\n"
            "@dataclass\nclass C:\n    name: str = {name!r}\n"
            "METHOD = Method({name!r}, C, 'plug.{folder}.stage:S'{extra})\n")
    _package(tmp_path / "plug", "zeta", decl.format(name="zeta", folder="zeta", extra=""))
    _package(tmp_path / "plug", "alpha", decl.format(name="alpha", folder="alpha", extra=""))
    _package(tmp_path / "plug", "base", decl.format(name="base", folder="base",
                                                    extra=", base=True, order=0"))
    _package(tmp_path / "plug", "helpers", "X = 1\n")
    assert list(discover("plug")) == ["base", "alpha", "zeta"]
    _package(tmp_path / "plug", "wrong", decl.format(name="other", folder="wrong", extra=""))
    with pytest.raises(ValueError, match="plug.wrong.METHOD must be a Method named 'wrong'"):
        discover("plug")



def test_checking_a_config_at_the_entry_point_imports_neither_lightning_nor_torch():
    """`--cfg job`, `--help` and a bad value's error come before the run's heavy imports."""
    for args in (["method=grpo", "--cfg", "job"], ["method=dpo", "method.beta=-1"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "omegaconf" in imported  # the import log was read
        assert not imported & {"torch", "lightning", "transformers"}, args
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "config error: method.beta=-1.0: must be > 0"


def test_a_rollout_longer_than_its_max_len_stops_every_on_policy_method():
    for method in ("ppo", "grpo", "rloo"):
        with pytest.raises(ConfigError, match=r"method\.rollout\.max_new_tokens=32: must be < "
                                              r"method\.max_len=32"):
            validate(composed([f"method={method}", "method.max_len=32",
                               "method.rollout.max_new_tokens=32"]))
        validate(composed([f"method={method}", "method.max_len=33",
                           "method.rollout.max_new_tokens=32"]))


def test_the_precision_names_are_lightnings():
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    from harness.config import PRECISIONS

    names = {str(v) for part in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(part)}
    assert set(PRECISIONS) == names


# ------------------------------------------------------------------ checks before work
@pytest.mark.parametrize(("override", "field"), [
    ("eval.limit=-3", "eval.limit"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.split=train", "eval.split"),
    ("trainer.devices=0", "trainer.devices"), ("seed=-1", "seed=-1"),
    ("logger.kind=tensorboard", "logger.kind"), ("sft.max_steps=0", "sft.max_steps"),
    ("rm.pooling=max", "rm.pooling"), ("eval.lm_eval.batch_size=0", "eval.lm_eval.batch_size"),
    ("model.n_kv_heads=3", "model.n_kv_heads"), ("dataset.max_operand=0", "dataset.max_operand"),
    ("method.rollout.max_new_tokens=128", "method.rollout.max_new_tokens"),
    ("eval.max_new_tokens=128", "eval.max_new_tokens"), ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.accelerator=tpu", "trainer.accelerator"),
    # one rule for every float: finite (these trained the SFT base, then failed with a traceback)
    ("method.beta=inf", "method.beta=inf: must be a finite"),
    ("sft.optim.lr=inf", "sft.optim.lr=inf: must be a finite"),
    ("sft.optim.grad_clip=nan", "sft.optim.grad_clip=nan: must be a finite"),
    ("sft.optim.beta1=nan", "sft.optim.beta1=nan: must be a finite"),
    ("eval.lm_eval.limit=0", "eval.lm_eval.limit"),
    # an allocation of 72 TB aborted the tokenizer trainer (exit 134)
    ("dataset.vocab_size=1099511627776", "dataset.vocab_size=1099511627776: must be <= 1048576"),
])
def test_bad_values_of_every_group_are_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(composed(["method=grpo", override]))


def test_ppo_on_the_gold_reward_refuses_a_critic_from_a_reward_model_it_has_not():
    with pytest.raises(ConfigError, match=r"method\.critic_init='rm': needs a reward model, and "
                                          r"method\.reward_source='gold' trains none"):
        validate(composed(["method=ppo", "method.reward_source=gold", "method.critic_init=rm"]))
    gold = validate(composed(["method=ppo", "method.reward_source=gold"])).method
    assert gold.critic_start == "sft"  # null: the SFT base when there is no reward model
    rm = validate(composed(["method=ppo"])).method
    assert rm.reward_source == "rm" and rm.critic_start == "rm"
    assert validate(composed(["method=ppo", "method.critic_init=sft"])).method.critic_start == "sft"


def test_wandb_online_without_a_key_is_refused_before_work(monkeypatch, tmp_path):
    from harness.util.wandb_auth import credentials_found, wants_online

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "")
    assert wants_online(False) and not wants_online(True) and not credentials_found()
    with pytest.raises(ConfigError, match=r"logger\.offline=False: W&B online needs a key"):
        validate(composed(["method=grpo", "logger.offline=false"]))
    validate(composed(["method=grpo", "logger.offline=false", "logger.kind=csv"]))  # no W&B, no key
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment keeps it offline
    validate(composed(["method=grpo", "logger.offline=false"]))
    monkeypatch.setenv("WANDB_MODE", "online")  # ... or forces it online
    assert wants_online(True)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert credentials_found()  # what `wandb login` writes
    validate(composed(["method=grpo"]))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a server of one's own
    assert not credentials_found()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert credentials_found()


def test_method_values_are_checked():
    with pytest.raises(ConfigError, match=r"method\.group_size=1"):
        validate(composed(["method=rloo", "method.group_size=1"]))
    with pytest.raises(ConfigError, match=r"method\.kl_penalty='both'"):
        validate(composed(["method=rloo", "method.kl_penalty=both"]))


def test_unknown_keys_are_rejected_by_the_schemas():
    for override in ("method.foo=1", "eval.nope=1", "sft.optim.nope=1"):
        with pytest.raises(ConfigCompositionException):
            composed(["method=grpo", override])
    # `+key=` adds past the schema; validation names it before any work
    for override, field in (("+method.foo=1", "method.foo"), ("+trainer.foo=1", "trainer.foo"),
                            ("+method.optim.foo=1", "method.optim.foo"), ("+rm.x=1", "rm.x")):
        with pytest.raises(ConfigError, match=f"{field.replace('.', '[.]')}: unknown field"):
            validate(composed(["method=grpo", override]))


@pytest.mark.parametrize(("override", "new"), [
    ("method.kl_coef=0.1", "method.beta"), ("method.ppo_epochs=4", "method.update_epochs"),
    ("method.num_inner_iterations=2", "method.update_epochs"),
    ("method.epsilon_high=0.28", "method.clip_eps_high"),
    ("dataset.sft_max_steps=10", "sft.max_steps"), ("experiment=compare", "group"),
])
def test_renamed_fields_fail_naming_the_new_one(override, new):
    with pytest.raises(ConfigError, match=f"renamed to {new}"):
        check_overrides(["method=ppo", override], experiments=["courier"])


def test_a_sweep_config_that_selects_the_method_counts_as_choosing_it():
    from harness.__main__ import method_of

    assert method_of(["+sweep=tune_dpo", "method.beta=1.0"]) == "dpo"
    assert method_of(["+sweep=compare"]) == "sft" and method_of([]) == "sft"
    assert method_of(["+sweep=tune_ppo", "method=grpo"]) == "ppo"  # method= is read by check_overrides
    check_overrides(["+sweep=tune_dpo", "method.beta=1.0"], default_method=method_of(
        ["+sweep=tune_dpo", "method.beta=1.0"]))  # accepted: the sweep's method has a beta


@pytest.mark.parametrize("method", ["grpo", "rloo", "online_dpo", "ppo"])
def test_a_sweep_that_extends_another_selects_the_method_it_inherits(method):
    """tune_<m>_preferences extends tune_<m> (its defaults list), which selects the method: the
    extended grid's method counts, so extending the grid from the command line (``method.beta=``)
    is accepted, as it is for the grid it extends."""
    from harness.__main__ import config_method, method_of

    argv = [f"+sweep=tune_{method}_preferences", "method.beta=1.0,2.0"]
    assert config_method("sweep", f"tune_{method}_preferences") == method
    assert method_of(argv) == method
    check_overrides(argv, default_method=method_of(argv))
    assert config_method("sweep", "compare") is None and config_method("sweep", "nowhere") is None


def test_base_stage_methods_are_configured_in_their_own_section():
    from harness.__main__ import default_choice

    assert default_choice("method") == "sft" and default_choice("model") == "llama_small"
    with pytest.raises(ConfigError, match=r"use sft\.max_steps"):
        check_overrides(["method.max_steps=5"], default_method="sft")
    with pytest.raises(ConfigError, match=r"use rm\.pooling"):
        check_overrides(["method=rm", "method.pooling=mean"])
    check_overrides(["method=grpo", "method.beta=0.1", "sft.max_steps=5", "experiment=courier",
                     "hydra.run.dir=x"], experiments=["courier"])


def test_the_entry_point_stops_a_renamed_field_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "harness", "method=ppo", "method.kl_coef=0.1"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        "config error: method.kl_coef: renamed to method.beta"


@pytest.mark.parametrize("sweep", ["tracks", "tracks_preferences", "compare_courier"])
def test_the_comparison_sweeps_cover_every_aligning_method(sweep):
    """A method added to the registry (and conf/method) joins the comparison with no sweep edit:
    every aligning method on the preferences track, every one but the offline pair methods on the
    oracle track (``+sweep=compare`` keeps the methods it was run with)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    register_configs()
    spec = yaml.safe_load((CONF / "sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    override = OverridesParser.create().parse_override(f"method={spec['method']}")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    swept = override.value().filter(loader.get_group_options("method"))
    expected = set(stage_names()) - set(base_stages()) - ({"dpo"} if sweep == "tracks" else set())
    assert sorted(swept) == sorted(expected)
    assert "rloo" in swept and "online_dpo" in swept
    cfg = composed([f"+sweep={sweep}"])
    assert cfg.group == ("tracks" if sweep.startswith("tracks") else sweep)
    if sweep == "compare_courier":
        assert cfg.dataset.name == "courier_misrouted" and cfg.sft.max_steps == 1000


def test_the_trainer_names_the_device_a_run_computes_and_evaluates_on():
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    assert TrainerConfig(accelerator="cpu").device() == "cpu"
    assert TrainerConfig(accelerator="gpu").device() == gpu
    assert TrainerConfig(accelerator="auto").device() == gpu


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo", "online_dpo"])
def test_a_track_is_one_override_for_every_online_method(method):
    """track=oracle: the gold reward; track=preferences: the reward model (and for PPO its
    critic from it); the composed config itself says so, as the run's record will."""
    for track, source, critic in (("oracle", "gold", "sft"), ("preferences", "rm", "rm")):
        cfg = composed([f"method={method}", f"track={track}"])
        settings = validate(cfg)
        assert settings.method.reward_source == source and cfg.method.reward_source == source
        if method == "ppo":
            assert settings.method.critic_start == critic


def test_tracks_refuse_what_has_no_run_on_them():
    validate(composed(["method=dpo", "track=preferences"]))  # offline DPO learns from the pairs
    with pytest.raises(ConfigError, match="track=oracle: method=dpo learns from the preference"):
        validate(composed(["method=dpo", "track=oracle"]))
    with pytest.raises(ConfigError, match="track=oracle: method=sft aligns nothing"):
        validate(composed(["method=sft", "track=oracle"]))
    with pytest.raises(ConfigError, match="track='gold': must be one of"):
        validate(composed(["method=grpo", "track=gold"]))
    with pytest.raises(ConfigError, match="method.reward_source: set by track=oracle"):
        check_overrides(["method=ppo", "track=oracle", "method.reward_source=rm"])


def test_every_online_method_samples_scores_and_steps_alike_by_default():
    """Matched budgets within a track: PPO, GRPO, RLOO and online DPO each sample and score 19,200
    responses (300 rollout batches of 64) and take one optimiser step per rollout batch."""
    from harness.methods.config import planned_budget

    for method in ("ppo", "grpo", "rloo", "online_dpo"):
        cfg = validate(composed([f"method={method}"])).method
        assert planned_budget(cfg) == {"responses": 19_200, "steps_per_batch": 1}, method
