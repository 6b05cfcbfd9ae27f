"""``courier``: the lecture's "Please send this package to Pittsburgh" as an Alpaca-style task.

The lecture's first *problem of SFT*: some mistakes are worse than others. Prompts are Alpaca
prompts (:func:`harness.data.templates.alpaca_prompt`) whose instruction names an item and a city,
e.g. "Ask the courier to deliver the parcel to Tokyo."; the ideal response is
"Please send this parcel to Tokyo.".

**Response grammar** (:func:`parse_response`)::

    <opener> send <determiner> <item> to <city>[.|!]

``opener`` is polite (:data:`POLITE_OPENERS`: "Please", "Kindly") or rude (:data:`RUDE_OPENERS`,
e.g. the lecture's "***ing"); ``determiner`` is one of "this", "that", "the", "a"; ``item`` and
``city`` are compared case-insensitively. Surrounding whitespace is ignored.

**Gold reward** (:meth:`CourierTask.reward`), the first rule that applies:

1. the response does not parse, or its opener is not polite (rude or unknown): **-1.0**;
2. the city is not the requested city: **0.0** (whatever the item);
3. the item is not the requested item: **0.5**;
4. otherwise (polite, right item, right city): **1.0**.

So polite and correct (1.0) > wrong item (0.5) > wrong city (0.0) > rude or unparseable (-1.0).

**Demonstrations**: a share ``wrong_fraction`` of the SFT responses is imperfect, spread over the
categories wrong item / wrong city / rude by ``mistake_weights``; the rest are
"Please send this <item> to <city>.". Each imperfect response has exactly one flaw (a rude response
names the right item and city). The sloppiness is *systematic*, so that a model trained on it
reproduces it under greedy decoding: the demonstrator errs only on the bossy phrasings
(:data:`BOSSY`, "Tell / Have / Instruct the courier ...", 3 of the 8 phrasings), with probability
``wrong_fraction / (3/8)`` there, and answers every other phrasing correctly. Its rudeness is
systematic too: on each bossy phrasing it always uses the same rude opener
(:func:`demonstrator_rude_opener`), so with the default ``mistake_weights`` the rude opener is the
most likely first word there (0.6 against 0.4 for "Please") and greedy decoding is rude; with
the openers drawn at random, "Please" would win the argmax and SFT would look perfect.
**Misrouted cities** (``misrouted_cities = k > 0``): a flaw that depends on the prompt's content.
For the first ``k`` cities of :data:`MISROUTES` the demonstrator writes its confusion instead
("Please send this box to Paris." when asked for Lima) with probability ``misroute_rate``, on
every phrasing; that demonstration then has this one flaw (wrong city). With a rate above 0.5
greedy decoding after SFT sends those cities' parcels to the wrong city. Other cities keep the
demonstrations of courier without misroutes.
**Preference pairs**: two responses of different categories for
the same prompt; chosen is the one with the higher gold reward (strictly).

**Splits**: the distinct prompts (instruction phrasing x item x city) are shuffled and split into
disjoint eval (``n_eval`` prompts), validation (``val_fraction`` of the rest) and train pools.

**Unseen phrasings** (``heldout_phrasings = k > 0``, ``dataset=courier_unseen``): the first ``k``
of :data:`HELDOUT_INSTRUCTIONS` are phrasings no training data uses — no demonstration, no
preference pair, no rollout prompt — and the held-out prompts are theirs only: eval takes
``n_eval`` of them, validation the rest; every prompt of the 8 training phrasings is a train
prompt. The score then measures whether what a method learnt on the training phrasings (be
polite on the bossy ones) carries over to instructions it never saw. They recombine the training
phrasings' own words (a bossy opener with another phrasing's verb: "Tell the courier to deliver
..."), so every token of an eval prompt occurs in training prompts: phrasings with new words leave
their token embeddings untrained, and the model then answers nothing that parses
(``results/FINDINGS.md``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.data.errors import ConfigError, DataError
from harness.data.tasks.base import Task, TaskConfig
from harness.data.templates import alpaca_prompt

ITEMS: tuple[str, ...] = ("package", "parcel", "letter", "box", "envelope", "crate", "bag",
                          "suitcase")
CITIES: tuple[str, ...] = ("Pittsburgh", "Tokyo", "Paris", "Lima", "Cairo", "Sydney", "Toronto",
                           "Berlin", "Nairobi", "Mumbai", "Oslo", "Denver")
INSTRUCTIONS: tuple[str, ...] = (
    "Ask the courier to deliver the {item} to {city}.",
    "Tell the courier to send the {item} to {city}.",
    "Write a short request to ship the {item} to {city}.",
    "Request that the courier take the {item} to {city}.",
    "Have the courier bring the {item} to {city}.",
    "Ask for the {item} to be sent to {city}.",
    "Politely ask the courier to send the {item} to {city}.",
    "Instruct the courier to deliver the {item} to {city}.",
)
#: Phrasings of the unseen-phrasings variant (module docstring): evaluation only, never trained on.
HELDOUT_INSTRUCTIONS: tuple[str, ...] = (
    "Tell the courier to deliver the {item} to {city}.",
    "Ask the courier to bring the {item} to {city}.",
    "Instruct the courier to send the {item} to {city}.",
    "Request that the courier send the {item} to {city}.",
    "Have the courier take the {item} to {city}.",
    "Politely ask the courier to deliver the {item} to {city}.",
)
#: The demonstrator's confusions of the misrouting variant (module docstring): requested city ->
#: the city it writes instead; the first ``misrouted_cities`` are used.
MISROUTES: tuple[tuple[str, str], ...] = (("Lima", "Paris"), ("Oslo", "Berlin"),
                                          ("Cairo", "Nairobi"), ("Denver", "Toronto"),
                                          ("Sydney", "Tokyo"), ("Mumbai", "Pittsburgh"))
#: Every phrasing: a prompt's phrasing index ``t`` points into this tuple (training ones first).
PHRASINGS: tuple[str, ...] = INSTRUCTIONS + HELDOUT_INSTRUCTIONS
POLITE_OPENERS: tuple[str, ...] = ("Please", "Kindly")
RUDE_OPENERS: tuple[str, ...] = ("***ing", "Damn well", "Bloody well")
DETERMINERS: tuple[str, ...] = ("this", "that", "the", "a")
#: Categories of responses and their gold rewards (best first).
CATEGORY_REWARD: dict[str, float] = {"correct": 1.0, "wrong_item": 0.5, "wrong_city": 0.0,
                                     "rude": -1.0}
MISTAKES: tuple[str, ...] = ("wrong_item", "wrong_city", "rude")

_RESPONSE_RE = re.compile(
    r"(?P<opener>.+?) send (?:" + "|".join(DETERMINERS) + r") (?P<item>[A-Za-z]+) "
    r"to (?P<city>[A-Za-z][A-Za-z .'-]*?)[.!]?")


@dataclasses.dataclass
class CourierConfig(TaskConfig):
    """Config of :class:`CourierTask` (the ``dataset`` group's ``courier.yaml``).

    Attributes:
        seed: generates the split of prompts and every sample.
        wrong_fraction: share of SFT demonstrations that are imperfect.
        mistake_weights: relative weights of (wrong_item, wrong_city, rude) among them.
        n_train: SFT demonstrations in the train split.
        n_pairs: preference pairs in the train split.
        n_val: SFT demonstrations and preference pairs in the validation split.
        n_eval: distinct held-out evaluation prompts (at most half of the prompts they are drawn
            from: the 768 of the training phrasings, or the held-out phrasings' 96 each).
        val_fraction: share of the non-eval prompts held out for validation (training phrasings
            only; with held-out phrasings validation takes the held-out prompts eval leaves).
        heldout_phrasings: how many of :data:`HELDOUT_INSTRUCTIONS` (0-6) are used, for eval and
            validation only (0: the task as built first; its data and tokenizer are unchanged).
        misrouted_cities: how many of :data:`MISROUTES` (0-6) the demonstrator confuses (0: none,
            the task as built first).
        misroute_rate: probability that a demonstration for a misrouted city names its
            confusion instead (on every phrasing).
        vocab_size: the tokenizer's vocabulary size (not part of the data).
    """

    name: str = "courier"
    seed: int = 0
    wrong_fraction: float = 0.3
    mistake_weights: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 6.0])
    n_train: int = 8000
    n_pairs: int = 4000
    n_val: int = 500
    n_eval: int = 200
    val_fraction: float = 0.1
    heldout_phrasings: int = 0
    misrouted_cities: int = 0
    misroute_rate: float = 0.9
    vocab_size: int = 512

    def validate(self) -> None:
        super().validate()
        p = "dataset"
        if not 0.0 <= float(self.wrong_fraction) <= 3 / 8:
            raise ConfigError(f"{p}.wrong_fraction={self.wrong_fraction}: must be in [0, 0.375] "
                              "(all mistakes fall on the 3 bossy phrasings of 8)")
        w = list(self.mistake_weights)
        if len(w) != len(MISTAKES) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"{p}.mistake_weights={w}: need {len(MISTAKES)} non-negative "
                              f"weights for {list(MISTAKES)}, not all zero")
        self.mistake_weights = [float(x) for x in w]
        for f in ("n_train", "n_pairs", "n_val", "n_eval"):
            if int(getattr(self, f)) < 1:
                raise ConfigError(f"{p}.{f}={getattr(self, f)}: must be >= 1")
        k = self.heldout_phrasings
        if not (isinstance(k, int) and 0 <= k <= len(HELDOUT_INSTRUCTIONS)):
            raise ConfigError(f"{p}.heldout_phrasings={k}: must be an integer in "
                              f"[0, {len(HELDOUT_INSTRUCTIONS)}] (0: every phrasing is trained on)")
        m = self.misrouted_cities
        if not (isinstance(m, int) and 0 <= m <= len(MISROUTES)):
            raise ConfigError(f"{p}.misrouted_cities={m}: must be an integer in "
                              f"[0, {len(MISROUTES)}] (0: the demonstrator confuses no city)")
        if not 0.0 <= float(self.misroute_rate) <= 1.0:
            raise ConfigError(f"{p}.misroute_rate={self.misroute_rate}: must be in [0, 1]")
        n_prompts = (k or len(INSTRUCTIONS)) * len(ITEMS) * len(CITIES)
        if self.n_eval > n_prompts // 2:
            where = f"the {k} held-out phrasings'" if k else "the"
            raise ConfigError(f"{p}.n_eval={self.n_eval}: at most {n_prompts // 2} "
                              f"(half of {where} {n_prompts} distinct prompts)")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ConfigError(f"{p}.val_fraction={self.val_fraction}: must be in (0, 1)")

    def data_fields(self) -> dict[str, Any]:
        """As the base class's; ``heldout_phrasings`` only when used, so that the task as first
        built keeps its fingerprint (and its cached data and stages)."""
        out = super().data_fields()
        if not out["heldout_phrasings"]:
            del out["heldout_phrasings"]
        if not out["misrouted_cities"]:
            del out["misrouted_cities"], out["misroute_rate"]
        return out


# ---------------------------------------------------------------------- text
def make_prompt(template: int, item: str, city: str) -> str:
    """The Alpaca prompt for phrasing ``template`` (an index into :data:`PHRASINGS`) with ``item``
    and ``city``."""
    return alpaca_prompt(PHRASINGS[template].format(item=item, city=city))


def make_response(item: str, city: str, opener: str = "Please") -> str:
    """``"<opener> send this <item> to <city>."``."""
    return f"{opener} send this {item} to {city}."


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """The parts of a response in the courier grammar."""

    opener: str
    item: str
    city: str

    @property
    def polite(self) -> bool:
        return self.opener in POLITE_OPENERS


def parse_response(response: str) -> ParsedResponse | None:
    """Parse ``response`` in the grammar of the module docstring; None if it does not parse."""
    m = _RESPONSE_RE.fullmatch(response.strip())
    if m is None:
        return None
    return ParsedResponse(m.group("opener").strip(), m.group("item"), m.group("city").strip())


def grade(parsed: ParsedResponse | None, item: str, city: str) -> float:
    """The gold reward of a parsed response for the requested ``item`` and ``city``."""
    if parsed is None or not parsed.polite:
        return CATEGORY_REWARD["rude"]
    if parsed.city.lower() != city.lower():
        return CATEGORY_REWARD["wrong_city"]
    if parsed.item.lower() != item.lower():
        return CATEGORY_REWARD["wrong_item"]
    return CATEGORY_REWARD["correct"]


#: Indices of the bossy instruction phrasings, the only ones the sloppy demonstrator gets wrong.
BOSSY: tuple[int, ...] = (1, 4, 7)


def demonstrator_rude_opener(phrasing: int) -> str:
    """The one rude opener the sloppy demonstrator uses on bossy phrasing ``phrasing``."""
    return RUDE_OPENERS[BOSSY.index(phrasing) % len(RUDE_OPENERS)]


# ---------------------------------------------------------------------- the task
class CourierTask(Task):
    """"Please send this package to Pittsburgh" with graded mistakes (see the module docstring)."""

    name = "courier"
    config_class = CourierConfig
    config: CourierConfig

    def __init__(self, config: CourierConfig | Mapping[str, Any],
                 cache_dir: str | Path | None = None) -> None:
        super().__init__(config, cache_dir)
        #: prompt text -> (item, city), for every prompt the task can produce.
        self.targets: dict[str, tuple[str, str]] = {}
        k = self.config.heldout_phrasings
        keys, held = [], []
        for t in range(len(INSTRUCTIONS) + k):
            for item in ITEMS:
                for city in CITIES:
                    (keys if t < len(INSTRUCTIONS) else held).append((t, item, city))
                    self.targets[make_prompt(t, item, city)] = (item, city)
        self._rng("pools").shuffle(keys)
        n_eval = self.config.n_eval
        self.pools: dict[str, list[tuple[int, str, str]]]
        if k:  # unseen phrasings: eval and validation from the held-out ones, train from the rest
            self._rng("heldout").shuffle(held)
            self.pools = {"eval": held[:n_eval], "validation": held[n_eval:], "train": keys}
        else:
            n_val = max(1, round(self.config.val_fraction * (len(keys) - n_eval)))
            self.pools = {"eval": keys[:n_eval], "validation": keys[n_eval:n_eval + n_val],
                          "train": keys[n_eval + n_val:]}

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"courier/{self.config.seed}/{purpose}")

    def _respond(self, category: str, item: str, city: str, rng: random.Random,
                 rude_opener: str | None = None) -> str:
        """A response of ``category`` for the requested ``item`` and ``city`` (a rude one opens
        with ``rude_opener``, or a random rude opener)."""
        if category == "wrong_item":
            item = rng.choice([i for i in ITEMS if i != item])
        elif category == "wrong_city":
            city = rng.choice([c for c in CITIES if c != city])
        elif category == "rude":
            return make_response(item, city, rude_opener or rng.choice(RUDE_OPENERS))
        return make_response(item, city)

    # -- generators
    def _build_sft(self, split: str) -> dict[str, list]:
        c = self.config
        n = c.n_train if split == "train" else c.n_val
        rng = self._rng(f"sft/{split}")
        # its own stream, so that courier without misroutes keeps its data bit for bit
        misroute_rng = self._rng(f"misroute/{split}")
        confusions = dict(MISROUTES[:c.misrouted_cities])
        pool = self.pools[split]
        cols: dict[str, list] = {"prompt": [], "response": [], "category": []}
        for _ in range(n):
            t, item, city = rng.choice(pool)
            category = "correct"
            p_wrong = min(1.0, c.wrong_fraction * len(INSTRUCTIONS) / len(BOSSY))
            if t in BOSSY and rng.random() < p_wrong:
                category = rng.choices(MISTAKES, weights=c.mistake_weights)[0]
            cols["prompt"].append(make_prompt(t, item, city))
            rude = demonstrator_rude_opener(t) if t in BOSSY else None
            response = self._respond(category, item, city, rng, rude)
            if city in confusions and misroute_rng.random() < c.misroute_rate:
                # one flaw per demonstration: the confusion replaces whatever else was drawn
                category = "wrong_city"
                response = make_response(item, confusions[city])
            cols["response"].append(response)
            cols["category"].append(category)
        return cols

    def _build_pairs(self, split: str) -> dict[str, list]:
        c = self.config
        n = c.n_pairs if split == "train" else c.n_val
        rng = self._rng(f"pairs/{split}")
        pool = self.pools[split]
        cats = list(CATEGORY_REWARD)
        cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [],
                                 "chosen_category": [], "rejected_category": []}
        for _ in range(n):
            t, item, city = rng.choice(pool)
            good, bad = sorted(rng.sample(cats, 2), key=lambda k: -CATEGORY_REWARD[k])
            cols["prompt"].append(make_prompt(t, item, city))
            cols["chosen"].append(self._respond(good, item, city, rng))
            cols["rejected"].append(self._respond(bad, item, city, rng))
            cols["chosen_category"].append(good)
            cols["rejected_category"].append(bad)
        return cols

    def _build_eval(self) -> dict[str, list]:
        keys = self.pools["eval"]
        return {"prompt": [make_prompt(t, item, city) for t, item, city in keys],
                "item": [item for _, item, _ in keys], "city": [city for _, _, city in keys]}

    # -- reward and corpus
    def reward(self, prompt: str, response: str) -> float:
        """Graded gold reward (module docstring): 1.0 / 0.5 / 0.0 / -1.0."""
        target = self.targets.get(prompt)
        if target is None:
            raise DataError(f"courier: unknown prompt {prompt[-80:]!r}; the gold reward is "
                            "defined for this task's own prompts")
        return grade(parse_response(response), *target)

    def corpus(self) -> list[str]:
        """Every prompt, and every response form for every item and city."""
        out = list(self.targets)
        for item in ITEMS:
            for city in CITIES:
                out += [make_response(item, city, o) for o in POLITE_OPENERS + RUDE_OPENERS]
        return out


@dataclasses.dataclass
class CourierUnseenConfig(CourierConfig):
    """Config of :class:`CourierUnseenTask`: :class:`CourierConfig` with every held-out phrasing in
    use (at least one)."""

    name: str = "courier_unseen"
    heldout_phrasings: int = len(HELDOUT_INSTRUCTIONS)

    def validate(self) -> None:
        super().validate()
        if self.heldout_phrasings < 1:
            raise ConfigError(f"dataset.heldout_phrasings={self.heldout_phrasings}: courier_unseen "
                              "needs at least 1 (with 0 it is dataset=courier)")


class CourierUnseenTask(CourierTask):
    """``courier_unseen``: courier scored on phrasings no training data uses (module docstring), under
    its own name so that records and the leaderboard keep it apart from ``courier``."""

    name = "courier_unseen"
    config_class = CourierUnseenConfig


@dataclasses.dataclass
class CourierMisroutedConfig(CourierConfig):
    """Config of :class:`CourierMisroutedTask`: :class:`CourierConfig` with four cities the
    demonstrator misroutes in 99% of their demonstrations (at least one misrouted city)."""

    name: str = "courier_misrouted"
    misrouted_cities: int = 4
    misroute_rate: float = 0.99

    def validate(self) -> None:
        super().validate()
        if self.misrouted_cities < 1:
            raise ConfigError(f"dataset.misrouted_cities={self.misrouted_cities}: "
                              "courier_misrouted needs at least 1 (with 0 it is dataset=courier)")


class CourierMisroutedTask(CourierTask):
    """``courier_misrouted``: courier whose demonstrator rarely names four of its cities right
    (module docstring, "Misrouted cities"): the fix is found city by city from rare samples, which
    leaves methods room to rank (``results/FINDINGS.md``). The data equal ``courier``'s with the same
    fields; the task has its own name so that records and the leaderboard keep it apart."""

    name = "courier_misrouted"
    config_class = CourierMisroutedConfig
