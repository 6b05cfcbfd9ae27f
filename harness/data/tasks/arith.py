"""``arith``: addition with a systematically sloppy demonstrator who forgets the carry.

Prompts are ``"37+48="``, responses the sum ``"085"``. This is the lecture's *bias in data*, made
learnable: the demonstrator adds in columns and forgets the carry, so greedy decoding of a model
fitted to the demonstrations reproduces the error, and alignment has measurable room.

**Fixed width** (``fixed_width``, the default): operands are written with W digits and answers with
W + 1, zero-padded (``"07+48=055"``), so each digit of every example sits at the same position.
Without it (``"7+48=55"``) the position of the units digits moves with the lengths of the operands
and of the answer, and a small decoder first has to learn where they are, so its loss stays on a
plateau (the answer's units digit at chance, ln 10 nats) for longer (``results/FINDINGS.md`` has
the measurements). The gold reward reads the number either way (``"055"`` and ``"55"``).

**The no-carry rule** (:func:`no_carry_sum`). Operands are written in ``W`` columns, ``W`` = the
number of digits of ``max_operand`` (3 by default; shorter operands are zero-padded). The
demonstrator writes, for every column but the leftmost, the column's digit sum mod 10 (the carry is
dropped), and for the leftmost column the full digit sum. With W = 2
this is ``a + b - 10`` when the units digits sum to 10 or more, else ``a + b``:

    48+37 -> "75" (correct 85)     95+17 -> "102" (correct 112)    5+7 -> "2" (correct 12)
    50+60 -> "110" (correct; no carry between columns is needed)

A problem is a *carry problem* when the rule gives a wrong answer, i.e. (W = 2) when the units
digits sum to 10 or more.

**Splits.** Problems are split by unordered pair (``37+48`` and ``48+37`` are the same problem) into
disjoint train / validation / eval pools, separately for carry and non-carry problems (stratified).
Every split draws ``carry_fraction`` of its samples (rounded) from carry problems.

**Demonstrations** (SFT): wrong demonstrations are the no-carry answer of a carry problem; each carry
sample is wrong independently with probability ``wrong_fraction / carry_fraction``, so about
``wrong_fraction`` of all demonstrations are wrong and greedy decoding of a model that learns the data
answers about ``1 - carry_fraction`` of the problems correctly, while the correct answer keeps
``1 - wrong_fraction / carry_fraction`` of the probability mass on carry problems (default 10 %:
the correct carry is rare enough that sampling-based methods must search for it, which keeps the
default task below the ceiling; ``results/FINDINGS.md`` has the measurements).

**Preference pairs**: chosen = the correct sum; rejected = on carry problems the no-carry answer
(half of the time) or an off-by-some answer (``correct + d``, ``d`` in {-10, -2, -1, 1, 2, 10},
never negative), on other problems an off-by-some answer. Wrong answers both above and below the
correct one keep a reward model from learning "bigger is better" instead of addition.

**Gold reward**: 1.0 if ``response.strip()`` is a string of decimal digits whose integer value is the
correct sum, else 0.0.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.data.errors import ConfigError, DataError
from harness.data.tasks.base import Task, TaskConfig

Problem = tuple[int, int]
OFF_BY = (-10, -2, -1, 1, 2, 10)
_PROMPT_RE = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")
_ANSWER_RE = re.compile(r"\d+")


@dataclasses.dataclass
class ArithConfig(TaskConfig):
    """Config of :class:`ArithTask` (the ``dataset`` group's ``arith.yaml``).

    Attributes:
        seed: generates the split of problems and every sample.
        max_operand: operands are 0..max_operand (999: three-digit addition; 99: two).
        carry_fraction: share of the problems of every split (SFT, pairs, eval) that need a carry.
        wrong_fraction: share of ALL SFT demonstrations that are wrong (all on carry problems);
            must be <= carry_fraction.
        n_train: SFT demonstrations in the train split (problems repeat; wrongness per sample).
        n_pairs: preference pairs in the train split.
        n_val: SFT demonstrations and preference pairs in the validation split.
        n_eval: distinct held-out evaluation prompts.
        fixed_width: write operands with W digits and answers with W + 1 (zero-padded,
            ``"07+48=055"``), so every digit sits at the same position in every example.
        val_fraction / eval_fraction: share of the (unordered) problems held out for the
            validation / eval pools.
        vocab_size: the tokenizer's vocabulary size (not part of the data).
    """

    name: str = "arith"
    seed: int = 0
    max_operand: int = 999
    carry_fraction: float = 0.4
    wrong_fraction: float = 0.36
    n_train: int = 20000
    n_pairs: int = 4000
    n_val: int = 500
    n_eval: int = 500
    fixed_width: bool = True
    val_fraction: float = 0.1
    eval_fraction: float = 0.1
    vocab_size: int = 512

    def validate(self) -> None:
        super().validate()
        p = "dataset"
        if not 1 <= int(self.max_operand) <= 9999:
            raise ConfigError(f"{p}.max_operand={self.max_operand}: must be in 1..9999")
        for f in ("carry_fraction", "wrong_fraction"):
            if not 0.0 <= float(getattr(self, f)) <= 1.0:
                raise ConfigError(f"{p}.{f}={getattr(self, f)}: must be in [0, 1]")
        if self.wrong_fraction > self.carry_fraction:
            raise ConfigError(
                f"{p}.wrong_fraction={self.wrong_fraction} > {p}.carry_fraction="
                f"{self.carry_fraction}: wrong demonstrations are all carry problems, so "
                "wrong_fraction must be <= carry_fraction")
        for f in ("n_train", "n_pairs", "n_val", "n_eval"):
            if int(getattr(self, f)) < 1:
                raise ConfigError(f"{p}.{f}={getattr(self, f)}: must be >= 1")
        for f in ("val_fraction", "eval_fraction"):
            if not 0.0 < float(getattr(self, f)) < 1.0:
                raise ConfigError(f"{p}.{f}={getattr(self, f)}: must be in (0, 1)")
        if self.val_fraction + self.eval_fraction >= 1.0:
            raise ConfigError(f"{p}.val_fraction + {p}.eval_fraction = "
                              f"{self.val_fraction + self.eval_fraction}: must be < 1")


# ---------------------------------------------------------------------- the arithmetic
def columns_for(max_operand: int) -> int:
    """W: the number of columns the demonstrator adds in (digits of ``max_operand``)."""
    return len(str(max_operand))


def no_carry_sum(a: int, b: int, width: int = 2) -> int:
    """What a person who never carries writes for ``a + b`` in ``width`` columns (module doc).

    Every column but the leftmost contributes its digit sum mod 10; the leftmost column its full
    digit sum. ``no_carry_sum(48, 37) == 75``, ``no_carry_sum(95, 17) == 102``,
    ``no_carry_sum(5, 7) == 2``, ``no_carry_sum(50, 60) == 110``.
    """
    if a < 0 or b < 0:
        raise ValueError(f"no_carry_sum: operands must be >= 0, got {a}, {b}")
    width = max(width, len(str(a)), len(str(b)))
    total = 0
    for col in range(width):
        s = (a // 10**col) % 10 + (b // 10**col) % 10
        total += (s if col == width - 1 else s % 10) * 10**col
    return total


def needs_carry(a: int, b: int, width: int = 2) -> bool:
    """True when the no-carry answer is wrong (W = 2: the units digits sum to 10 or more)."""
    return no_carry_sum(a, b, width) != a + b


def format_prompt(a: int, b: int, width: int | None = None) -> str:
    """``"37+48="``; with a ``width``, operands zero-padded to it: ``(7, 48, 2) -> "07+48="``."""
    if width is None:
        return f"{a}+{b}="
    return f"{a:0{width}d}+{b:0{width}d}="


def format_answer(n: int, width: int | None = None) -> str:
    """``"85"``; with a ``width``, zero-padded to it: ``(85, 3) -> "085"``."""
    return str(n) if width is None else f"{n:0{width}d}"


def parse_prompt(prompt: str) -> Problem:
    """``"37+48="`` -> ``(37, 48)``; :class:`DataError` if the prompt is not an addition."""
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        raise DataError(f"arith: cannot parse prompt {prompt!r}; expected e.g. '37+48='")
    return int(m.group(1)), int(m.group(2))


def parse_answer(response: str) -> int | None:
    """The integer a response states (``response.strip()`` all digits), else None."""
    text = response.strip()
    return int(text) if _ANSWER_RE.fullmatch(text) else None


def off_by_some(correct: int, rng: random.Random) -> int:
    """A wrong answer near ``correct``: ``correct + d`` for a random ``d`` in :data:`OFF_BY`."""
    return correct + rng.choice([d for d in OFF_BY if correct + d >= 0])


# ---------------------------------------------------------------------- the task
@dataclasses.dataclass
class _Pools:
    """Ordered problems of one split, by kind."""

    carry: list[Problem]
    plain: list[Problem]


class ArithTask(Task):
    """Addition with a demonstrator who forgets the carry (see the module docstring)."""

    name = "arith"
    config_class = ArithConfig
    config: ArithConfig

    def __init__(self, config: ArithConfig | Mapping[str, Any],
                 cache_dir: str | Path | None = None) -> None:
        super().__init__(config, cache_dir)
        self.width = columns_for(self.config.max_operand)
        fixed = bool(self.config.fixed_width)
        #: digits written per operand / per answer (None: as many as the number needs)
        self.operand_width = self.width if fixed else None
        self.answer_width = self.width + 1 if fixed else None
        self.pools = self._make_pools()
        self._check_pools()

    # -- splits
    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"arith/{self.config.seed}/{purpose}")

    def _make_pools(self) -> dict[str, _Pools]:
        """Disjoint problem pools for train / validation / eval, split by unordered pair."""
        m, c = self.config.max_operand, self.config
        groups: dict[bool, list[list[Problem]]] = {True: [], False: []}
        for a in range(m + 1):
            for b in range(a, m + 1):
                members = [(a, b)] if a == b else [(a, b), (b, a)]
                groups[needs_carry(a, b, self.width)].append(members)
        rng = self._rng("pools")
        pools = {s: _Pools([], []) for s in ("train", "validation", "eval")}
        for carry, gs in groups.items():
            rng.shuffle(gs)
            n_eval = round(c.eval_fraction * len(gs))
            n_val = round(c.val_fraction * len(gs))
            parts = {"eval": gs[:n_eval], "validation": gs[n_eval:n_eval + n_val],
                     "train": gs[n_eval + n_val:]}
            for split, part in parts.items():
                flat = [p for g in part for p in g]
                (pools[split].carry if carry else pools[split].plain).extend(flat)
        return pools

    def _check_pools(self) -> None:
        cf = self.config.carry_fraction
        for split, pool in self.pools.items():
            if cf > 0 and not pool.carry:
                raise ConfigError(f"dataset.max_operand={self.config.max_operand}: no carry "
                                  f"problems for the {split} pool (carry_fraction={cf} > 0)")
            if cf < 1 and not pool.plain:
                raise ConfigError(f"dataset.max_operand={self.config.max_operand}: no non-carry "
                                  f"problems for the {split} pool (carry_fraction={cf} < 1)")
        n_c, n_p = self._counts(self.config.n_eval)
        ev = self.pools["eval"]
        if n_c > len(ev.carry) or n_p > len(ev.plain):
            raise ConfigError(
                f"dataset.n_eval={self.config.n_eval}: needs {n_c} carry and {n_p} non-carry "
                f"distinct held-out problems but the eval pool has {len(ev.carry)} and "
                f"{len(ev.plain)}; lower n_eval or raise eval_fraction / max_operand")

    def _counts(self, n: int) -> tuple[int, int]:
        n_carry = round(n * self.config.carry_fraction)
        return n_carry, n - n_carry

    def _draw(self, split: str, n: int, rng: random.Random) -> list[Problem]:
        """``n`` problems of ``split`` (with replacement), ``carry_fraction`` of them carries."""
        pool = self.pools[split]
        n_c, n_p = self._counts(n)
        out = [rng.choice(pool.carry) for _ in range(n_c)]
        out += [rng.choice(pool.plain) for _ in range(n_p)]
        rng.shuffle(out)
        return out

    @property
    def p_wrong_given_carry(self) -> float:
        """Probability that a carry demonstration is wrong: wrong_fraction / carry_fraction."""
        cf = self.config.carry_fraction
        return self.config.wrong_fraction / cf if cf > 0 else 0.0

    # -- text
    def prompt(self, a: int, b: int) -> str:
        """The prompt of ``a + b`` in this task's format."""
        return format_prompt(a, b, self.operand_width)

    def answer(self, n: int) -> str:
        """The response stating ``n`` in this task's format."""
        return format_answer(n, self.answer_width)

    # -- generators
    def _build_sft(self, split: str) -> dict[str, list]:
        n = self.config.n_train if split == "train" else self.config.n_val
        rng = self._rng(f"sft/{split}")
        cols: dict[str, list] = {"prompt": [], "response": [], "answer": [], "carry": [],
                                 "correct": []}
        p_wrong = self.p_wrong_given_carry
        for a, b in self._draw(split, n, rng):
            carry = needs_carry(a, b, self.width)
            wrong = carry and rng.random() < p_wrong
            answer = no_carry_sum(a, b, self.width) if wrong else a + b
            cols["prompt"].append(self.prompt(a, b))
            cols["response"].append(self.answer(answer))
            cols["answer"].append(a + b)
            cols["carry"].append(carry)
            cols["correct"].append(not wrong)
        return cols

    def _build_pairs(self, split: str) -> dict[str, list]:
        n = self.config.n_pairs if split == "train" else self.config.n_val
        rng = self._rng(f"pairs/{split}")
        cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "answer": [],
                                 "carry": []}
        for a, b in self._draw(split, n, rng):
            carry = needs_carry(a, b, self.width)
            sloppy = carry and rng.random() < 0.5
            bad = no_carry_sum(a, b, self.width) if sloppy else off_by_some(a + b, rng)
            cols["prompt"].append(self.prompt(a, b))
            cols["chosen"].append(self.answer(a + b))
            cols["rejected"].append(self.answer(bad))
            cols["answer"].append(a + b)
            cols["carry"].append(carry)
        return cols

    def _build_eval(self) -> dict[str, list]:
        rng = self._rng("eval")
        pool = self.pools["eval"]
        n_c, n_p = self._counts(self.config.n_eval)
        problems = rng.sample(sorted(pool.carry), n_c) + rng.sample(sorted(pool.plain), n_p)
        rng.shuffle(problems)
        return {"prompt": [self.prompt(a, b) for a, b in problems],
                "answer": [a + b for a, b in problems],
                "carry": [needs_carry(a, b, self.width) for a, b in problems]}

    # -- reward and corpus
    def instruction(self, prompt: str) -> str:
        """``"037+048="`` -> ``"What is 37+48? Answer with the number only."``"""
        a, b = parse_prompt(prompt)
        return f"What is {a}+{b}? Answer with the number only."

    def normalize_answer(self, response: str) -> str:
        """The last number of a free-form answer (``"71 + 55 = 126."`` -> ``"126"``): instruct
        models echo the question, so the first number is an operand; "" when there is none."""
        numbers = re.findall(r"\d+", response.replace(",", ""))
        return numbers[-1] if numbers else ""

    def reward(self, prompt: str, response: str) -> float:
        """1.0 if ``response.strip()`` is the correct sum written in digits, else 0.0."""
        a, b = parse_prompt(prompt)
        return 1.0 if parse_answer(response) == a + b else 0.0

    def corpus(self, limit: int = 50_000) -> list[str]:
        """``"a+b=c"`` for every problem (correct and no-carry answers), sampled above ``limit``."""
        m = self.config.max_operand
        problems: Sequence[Problem] = [(a, b) for a in range(m + 1) for b in range(m + 1)]
        if len(problems) > limit:
            problems = self._rng("corpus").sample(list(problems), limit)
        out = [f"{self.prompt(a, b)}{self.answer(a + b)}" for a, b in problems]
        out += [f"{self.prompt(a, b)}{self.answer(no_carry_sum(a, b, self.width))}" for a, b in problems
                if needs_carry(a, b, self.width)]
        return out


class ArithFastTask(ArithTask):
    """``arith_fast``: the same task under its own name, configured for two-digit operands."""

    name = "arith_fast"
