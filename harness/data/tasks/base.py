"""The task interface every dataset of the harness implements, and the on-disk dataset cache.

A task provides, for the splits ``"train"`` and ``"validation"``:

- ``sft_dataset(split)``: columns ``prompt``, ``response`` (demonstrations);
- ``preference_dataset(split)``: columns ``prompt``, ``chosen``, ``rejected``;

and ``eval_dataset()`` (held-out prompts: ``prompt`` plus what the gold reward needs),
``reward(prompt, response)`` / ``rewards(prompts, responses)`` (the GOLD reward: pure and
deterministic; only where ``has_gold_reward``), and ``corpus()`` (text to train the tokenizer on).
Extra columns (e.g. ``carry``, ``category``) may be present; consumers select what they need.

Built-in tasks generate their data from their config (``seed`` included) and cache every dataset
with ``save_to_disk`` under ``<cache_dir>/<name>-<fingerprint>/<dataset>``, where the fingerprint
hashes exactly the config fields that generate data; later calls ``load_from_disk``. Writes are
atomic (a temporary folder renamed into place), so concurrent runs of a sweep can share the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from datasets import Dataset, load_from_disk
from datasets import utils as hf_progress

from harness.data.errors import ConfigError, DataError, require_columns, require_nonempty
from harness.util.atomic import folder_damage, publish_dir, write_json, write_manifest

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation")
SFT_COLUMNS: tuple[str, ...] = ("prompt", "response")
PAIR_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
DEFAULT_CACHE_DIR = Path("~/.cache/harness/data")
#: The largest tokenizer vocabulary a task config may ask for.
MAX_VOCAB = 1 << 20
#: Bump when a generator changes, so cached datasets are regenerated.
DATA_VERSION = 3


@dataclasses.dataclass
class TaskConfig:
    """Fields shared by every task config. ``vocab_size`` (the tokenizer's) is not part of the
    data fingerprint; every other field generates data and enters it."""

    name: str = ""
    seed: int = 0
    vocab_size: int = 512
    #: how prompts reach the model (harness.data.prompt_format): auto | raw | alpaca | chat
    prompt_format: str = "auto"

    #: Fields that do not change the data (left out of the fingerprint).
    NON_DATA_FIELDS: ClassVar[tuple[str, ...]] = ("vocab_size", "prompt_format")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> Self:
        """Build from a config mapping; unknown keys raise :class:`ConfigError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        prefix = f"dataset[{cfg.get('name', '?')}]"
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ConfigError(f"{prefix}: unknown field(s) {unknown}; known: {sorted(names)}")
        out = cls(**dict(cfg))
        out.validate()
        return out

    def validate(self) -> None:
        """Check the values; raise :class:`ConfigError` naming the field. Subclasses extend."""
        from harness.data.templates import FORMATS

        if self.prompt_format not in FORMATS:
            raise ConfigError(f"dataset.prompt_format={self.prompt_format!r}: must be one of "
                              f"{list(FORMATS)}")
        if self.vocab_size is not None and int(self.vocab_size) < 260:
            raise ConfigError(f"dataset.vocab_size={self.vocab_size}: must be >= 260 "
                              "(256 bytes + 4 special tokens)")
        if self.vocab_size is not None and int(self.vocab_size) > MAX_VOCAB:
            raise ConfigError(f"dataset.vocab_size={self.vocab_size}: must be <= {MAX_VOCAB} "
                              "(the tokenizer trainer allocates per entry; LLaMA 3 has 128,256)")

    def data_fields(self) -> dict[str, Any]:
        """The fields that generate the data (the fingerprint's input)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.NON_DATA_FIELDS}

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`data_fields` (and the generator version)."""
        blob = json.dumps({"version": DATA_VERSION, **self.data_fields()}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Task(ABC):
    """A dataset of the harness: SFT demonstrations, preference pairs, held-out prompts, and the
    gold reward. Subclasses set ``name`` and ``config_class`` and implement the ``_build_*``
    generators (returning plain column dicts); this class validates, caches and loads them."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    #: Whether :meth:`reward` exists (a verifiable gold reward); eval falls back otherwise.
    has_gold_reward: ClassVar[bool] = True
    #: The best gold reward a response can get: ``eval/gold_accuracy`` is the share that gets it.
    gold_max: ClassVar[float] = 1.0
    #: Whether generated datasets are cached with ``save_to_disk`` (loaders rely on HF's cache).
    disk_cache: ClassVar[bool] = True

    def __init__(self, config: TaskConfig | Mapping[str, Any],
                 cache_dir: str | Path | None = None) -> None:
        if not isinstance(config, TaskConfig):
            config = self.config_class.from_mapping({"name": self.name, **dict(config)})
        self.config = config
        self.cache_root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
        self.cache_root = self.cache_root.expanduser()
        self._memo: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ identity and cache
    @property
    def fingerprint(self) -> str:
        """Hash of the config fields that generate the data."""
        return self.config.fingerprint()

    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/<name>-<fingerprint>``: where this task's datasets are saved."""
        return self.cache_root / f"{self.name}-{self.fingerprint}"

    def _cached(self, key: str, build: Callable[[], Mapping[str, Sequence[Any]]]) -> Dataset:
        """The dataset ``key``: from memory, else from disk, else built, saved and reloaded."""
        if key in self._memo:
            return self._memo[key]
        if not self.disk_cache:
            ds = _to_dataset(build())
        else:
            path = self.cache_path / key
            problem = folder_damage(path) if path.is_dir() else None
            if problem is not None:  # derived data: built again, not trusted
                log.warning("data: cached %s/%s is damaged (%s); generating it again",
                            self.cache_path.name, key, problem)
            if problem is not None or not (path / "dataset_info.json").exists():
                log.debug("data: generating %s/%s", self.cache_path.name, key)
                _save_atomic(_to_dataset(build()), path, replace=problem is not None)
                self._write_config()
            ds = load_from_disk(str(path))
        self._memo[key] = ds
        return ds

    def _write_config(self) -> None:
        """Leave the generating config beside the cached datasets (for people, not for code)."""
        path = self.cache_path / "config.json"
        if not path.exists():
            write_json(path, {"version": DATA_VERSION, **self.config.data_fields()})

    @staticmethod
    def check_split(split: str) -> str:
        """Return ``split`` if it is one of :data:`SPLITS`, else raise :class:`DataError`."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return split

    def _checked(self, ds: Dataset, columns: Sequence[str], split: str, what: str) -> Dataset:
        where = f"{self.name} {what}"
        require_columns(ds, columns, where)
        require_nonempty(ds, split, where)
        return ds

    # ------------------------------------------------------------------ the interface
    def sft_dataset(self, split: str = "train") -> Dataset:
        """Demonstrations of ``split``: columns ``prompt``, ``response`` (+ task extras)."""
        self.check_split(split)
        ds = self._cached(f"sft-{split}", lambda: self._build_sft(split))
        return self._checked(ds, SFT_COLUMNS, split, "SFT dataset")

    def preference_dataset(self, split: str = "train") -> Dataset:
        """Preference pairs of ``split``: columns ``prompt``, ``chosen``, ``rejected`` (+ extras)."""
        self.check_split(split)
        ds = self._cached(f"pairs-{split}", lambda: self._build_pairs(split))
        return self._checked(ds, PAIR_COLUMNS, split, "preference dataset")

    def eval_dataset(self) -> Dataset:
        """Held-out prompts (disjoint from train/validation): column ``prompt`` + reward extras."""
        ds = self._cached("eval", self._build_eval)
        return self._checked(ds, ("prompt",), "eval", "eval dataset")

    @abstractmethod
    def _build_sft(self, split: str) -> Mapping[str, Sequence[Any]]:
        """Generate the SFT columns of ``split``."""

    @abstractmethod
    def _build_pairs(self, split: str) -> Mapping[str, Sequence[Any]]:
        """Generate the preference-pair columns of ``split``."""

    @abstractmethod
    def _build_eval(self) -> Mapping[str, Sequence[Any]]:
        """Generate the held-out evaluation prompts."""

    def instruction(self, prompt: str) -> str:
        """``prompt`` as a question in words, for chat and Alpaca prompts (default: as is)."""
        return prompt

    def normalize_answer(self, response: str) -> str:
        """A free-form answer (an instruct model's) reduced to what :meth:`reward` grades
        (default: as is). Used only for formatted prompts (harness.data.prompt_format)."""
        return response

    @abstractmethod
    def reward(self, prompt: str, response: str) -> float:
        """The gold reward of ``response`` to ``prompt``: pure and deterministic."""

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """:meth:`reward` of each (prompt, response) pair; the two lists must have equal length."""
        if len(prompts) != len(responses):
            raise ValueError(f"rewards: {len(prompts)} prompts but {len(responses)} responses")
        return [float(self.reward(p, r)) for p, r in zip(prompts, responses, strict=True)]

    @abstractmethod
    def corpus(self) -> list[str]:
        """Text to train the tokenizer on (every string the task can produce, or a sample)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _to_dataset(columns: Mapping[str, Sequence[Any]]) -> Dataset:
    return columns if isinstance(columns, Dataset) else Dataset.from_dict(dict(columns))


def _save_atomic(ds: Dataset, path: Path, replace: bool = False) -> None:
    """``save_to_disk`` into a temporary sibling folder with its manifest (size and sha256 of every
    file, checked on load), then publish it as ``path`` (``replace``: over a damaged copy)."""
    was_disabled = hf_progress.are_progress_bars_disabled()
    hf_progress.disable_progress_bars()  # one bar per small file is noise in the run's log

    def build(tmp: Path) -> None:
        ds.save_to_disk(str(tmp))
        write_manifest(tmp)

    try:
        publish_dir(path, build, replace=replace)
    finally:
        if not was_disabled:
            hf_progress.enable_progress_bars()
