"""The data layer: tasks (generators, splits, gold rewards), loaders, tokenizer, collators."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from harness.data.collate import (  # noqa: E402
    IGNORE_INDEX,
    PairCollator,
    PromptCollator,
    SFTCollator,
    encode_pair,
    encode_prompt,
    encode_prompts,
    encode_sft,
    tokenize_dataset,
)
from harness.data.datamodule import AlignmentDataModule  # noqa: E402
from harness.data.errors import ConfigError, DataError, require_columns  # noqa: E402
from harness.data.tasks import build_task  # noqa: E402
from harness.data.tasks.arith import needs_carry, no_carry_sum, parse_prompt  # noqa: E402
from harness.data.tasks.courier import CATEGORY_REWARD, make_prompt  # noqa: E402
from harness.data.tasks.preference import NoGoldRewardError, split_hh  # noqa: E402
from harness.data.templates import alpaca_prompt  # noqa: E402
from harness.data.tokenizer import build_tokenizer, load_or_build_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# the two-digit variant (arith_fast's operands): its arithmetic is checkable by hand
SMALL_ARITH = {"name": "arith", "seed": 0, "max_operand": 99, "n_train": 3000, "n_pairs": 600,
               "n_val": 200, "n_eval": 200}
SMALL_COURIER = {"name": "courier", "seed": 0, "n_train": 3000, "n_pairs": 600, "n_val": 100,
                 "n_eval": 100}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def arith(cache):
    return build_task(SMALL_ARITH, cache_dir=cache)


@pytest.fixture(scope="module")
def courier(cache):
    return build_task(SMALL_COURIER, cache_dir=cache)


@pytest.fixture(scope="module")
def arith_tok(arith, cache):
    return load_or_build_tokenizer(arith, {"vocab_size": 512}, cache / "tok", model_max_length=64)


@pytest.fixture(scope="module")
def courier_tok(courier, cache):
    return load_or_build_tokenizer(courier, None, cache / "tok", model_max_length=128)


def preference(tmp_path: Path, file: str | Path, **kw):
    cfg = {"name": "preference", "path": "json", "data_files": {"train": str(file)},
           "hf_cache_dir": str(tmp_path / "hf"), **kw}
    return build_task(cfg, cache_dir=tmp_path)


def problem(prompt: str) -> tuple[int, int]:
    a, b = parse_prompt(prompt)
    return min(a, b), max(a, b)


# ---------------------------------------------------------------------- arith
def test_no_carry_rule_on_hand_examples():
    assert no_carry_sum(48, 37) == 75          # 85 without the carry into the tens
    assert no_carry_sum(95, 17) == 102         # 112: units 2, tens 9+1 written in full
    assert no_carry_sum(5, 7) == 2             # 12: 05+07, the carry is dropped
    assert no_carry_sum(50, 60) == 110         # no carry between columns: correct
    assert no_carry_sum(12, 34) == 46
    assert no_carry_sum(99, 99) == 188         # 198 - 10
    assert needs_carry(48, 37) and needs_carry(5, 7) and needs_carry(95, 17)
    assert not needs_carry(50, 60) and not needs_carry(12, 34) and not needs_carry(0, 0)
    assert no_carry_sum(458, 367, width=3) == 715  # 3 columns: both carries dropped


def test_arith_format_and_gold_reward(arith, cache):
    # fixed width (the default): 2-digit operands, 3-digit answers, zero-padded
    assert arith.prompt(7, 48) == "07+48=" and arith.answer(55) == "055"
    for row in arith.sft_dataset("train").select(range(200)):
        a, b = parse_prompt(row["prompt"])
        assert row["prompt"] == f"{a:02d}+{b:02d}=" and len(row["response"]) == 3
        assert row["response"].isdigit()
    pair = arith.preference_dataset("train")[0]
    assert len(pair["chosen"]) == len(pair["rejected"]) == 3
    assert all(len(p) == 6 for p in arith.eval_dataset()["prompt"])
    assert arith.reward("07+48=", "055") == 1.0 and arith.reward("07+48=", "55") == 1.0
    free = build_task({**SMALL_ARITH, "fixed_width": False}, cache_dir=cache)
    assert free.prompt(7, 48) == "7+48=" and free.answer(55) == "55"
    assert any(len(p) < 6 for p in free.eval_dataset()["prompt"])
    assert free.fingerprint != arith.fingerprint
    assert arith.reward("37+48=", "85") == 1.0
    assert arith.reward("37+48=", " 85\n") == 1.0
    assert arith.reward("37+48=", "75") == 0.0
    assert arith.reward("37+48=", "85.0") == 0.0
    assert arith.reward("37+48=", "") == 0.0
    assert arith.reward("37+48=", "eighty-five") == 0.0
    assert arith.rewards(["1+1=", "2+2="], ["2", "5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        arith.rewards(["1+1=", "2+2="], ["2"])
    assert arith.has_gold_reward


def test_arith_fractions(arith):
    cfg = arith.config
    sft = arith.sft_dataset("train")
    n = len(sft)
    assert n == cfg.n_train
    assert sum(sft["carry"]) == round(cfg.carry_fraction * n)          # stratified: exact
    wrong = [not c for c in sft["correct"]]
    assert abs(sum(wrong) / n - cfg.wrong_fraction) < 0.03
    for row in sft.select(range(500)):
        a, b = parse_prompt(row["prompt"])
        expected = no_carry_sum(a, b) if not row["correct"] else a + b
        assert int(row["response"]) == expected
        assert row["carry"] == needs_carry(a, b)
        assert row["correct"] or row["carry"]  # every wrong demonstration is a carry problem
    carry_wrong = sum(w for w, c in zip(wrong, sft["carry"], strict=True) if c) / sum(sft["carry"])
    assert abs(carry_wrong - cfg.wrong_fraction / cfg.carry_fraction) < 0.04
    ev = arith.eval_dataset()
    assert len(ev) == cfg.n_eval and len(set(ev["prompt"])) == cfg.n_eval
    assert sum(ev["carry"]) == round(cfg.carry_fraction * cfg.n_eval)
    pairs = arith.preference_dataset("train")
    assert sum(pairs["carry"]) == round(cfg.carry_fraction * len(pairs))


def test_arith_splits_are_disjoint_by_problem(arith):
    sets = {
        "train": {problem(p) for p in arith.sft_dataset("train")["prompt"]}
        | {problem(p) for p in arith.preference_dataset("train")["prompt"]},
        "validation": {problem(p) for p in arith.sft_dataset("validation")["prompt"]}
        | {problem(p) for p in arith.preference_dataset("validation")["prompt"]},
        "eval": {problem(p) for p in arith.eval_dataset()["prompt"]},
    }
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["eval"]
    assert not sets["validation"] & sets["eval"]


def test_arith_pairs_chosen_strictly_better(arith):
    for split in ("train", "validation"):
        ds = arith.preference_dataset(split)
        chosen = arith.rewards(ds["prompt"], ds["chosen"])
        rejected = arith.rewards(ds["prompt"], ds["rejected"])
        assert all(c > r for c, r in zip(chosen, rejected, strict=True))
        kinds = set()
        for row in ds.select(range(200)):
            a, b = parse_prompt(row["prompt"])
            wrong = int(row["rejected"])
            if row["carry"] and wrong == no_carry_sum(a, b):
                kinds.add("no-carry")
            else:  # off by some, above or below the correct sum
                assert wrong - (a + b) in (-10, -2, -1, 1, 2, 10)
                kinds.add("above" if wrong > a + b else "below")
        assert kinds == {"no-carry", "above", "below"}


def test_determinism_and_cache(arith, tmp_path):
    again = build_task(SMALL_ARITH, cache_dir=tmp_path / "other")   # regenerated, not loaded
    for get in (lambda t: t.sft_dataset("train"), lambda t: t.preference_dataset("validation"),
                lambda t: t.eval_dataset()):
        assert get(arith).to_dict() == get(again).to_dict()
    assert (again.cache_path / "sft-train" / "dataset_info.json").exists()
    assert again.cache_path.name.startswith("arith-") and again.fingerprint == arith.fingerprint
    reloaded = build_task(SMALL_ARITH, cache_dir=tmp_path / "other")  # loaded from disk
    assert reloaded.sft_dataset("train").to_dict() == arith.sft_dataset("train").to_dict()
    other = build_task({**SMALL_ARITH, "seed": 1}, cache_dir=tmp_path / "other")
    assert other.fingerprint != arith.fingerprint
    assert list(other.sft_dataset("train")["prompt"]) != list(arith.sft_dataset("train")["prompt"])
    assert list(other.eval_dataset()["prompt"]) != list(arith.eval_dataset()["prompt"])
    # the tokenizer's vocabulary size does not change the data
    assert build_task({**SMALL_ARITH, "vocab_size": 300}).fingerprint == arith.fingerprint


def test_config_validation():
    with pytest.raises(ValueError, match=r"wrong_fraction=0\.5 > dataset\.carry_fraction=0\.4"):
        build_task({"name": "arith", "wrong_fraction": 0.5, "carry_fraction": 0.4})
    with pytest.raises(ConfigError, match="unknown field"):
        build_task({"name": "arith", "n_trian": 5})
    with pytest.raises(ConfigError, match="dataset.name"):
        build_task({"name": "nope"})
    with pytest.raises(ConfigError, match="n_eval"):
        build_task({"name": "arith", "max_operand": 99, "n_eval": 5000})
    with pytest.raises(ConfigError, match="mistake_weights"):
        build_task({"name": "courier", "mistake_weights": [1, 1]})
    with pytest.raises(ConfigError, match="unknown field"):  # budgets live in conf/experiment
        build_task({"name": "arith", "sft_max_steps": 10})


# ---------------------------------------------------------------------- courier
def test_alpaca_template():
    assert alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDo it.\n\n### Response:\n")
    with_input = alpaca_prompt("Rewrite.", "The team won.")
    assert with_input.endswith("### Instruction:\nRewrite.\n\n### Input:\nThe team won.\n\n"
                               "### Response:\n")


def test_courier_gold_reward_ordering(courier):
    prompt = make_prompt(0, "package", "Pittsburgh")
    assert "Ask the courier to deliver the package to Pittsburgh." in prompt
    r = {k: courier.reward(prompt, v) for k, v in {
        "correct": "Please send this package to Pittsburgh.",
        "wrong_item": "Please send this letter to Pittsburgh.",
        "wrong_city": "Please send this package to Tokyo.",
        "rude": "***ing send this package to Pittsburgh.",
    }.items()}
    assert r == {"correct": 1.0, "wrong_item": 0.5, "wrong_city": 0.0, "rude": -1.0}
    assert r["correct"] > r["wrong_item"] > r["wrong_city"] > r["rude"]
    assert courier.reward(prompt, " Kindly send a package to pittsburgh\n") == 1.0
    assert courier.reward(prompt, "Please send this letter to Tokyo.") == 0.0  # city dominates
    assert courier.reward(prompt, "Damn well send this package to Pittsburgh.") == -1.0
    assert courier.reward(prompt, "Send it.") == -1.0                          # unparseable
    assert courier.reward(prompt, "") == -1.0
    with pytest.raises(DataError, match="unknown prompt"):
        courier.reward("hello", "Please send this package to Pittsburgh.")


def test_courier_data(courier):
    sft = courier.sft_dataset("train")
    assert abs(sum(c != "correct" for c in sft["category"]) / len(sft) - 0.3) < 0.03
    assert set(sft["category"]) == set(CATEGORY_REWARD)
    rewards = courier.rewards(sft["prompt"], sft["response"])
    assert rewards == [CATEGORY_REWARD[c] for c in sft["category"]]
    assert all(len(r) < 60 for r in sft["response"])
    # On each bossy phrasing the demonstrator's first word is most often its one rude opener, so
    # greedy decoding reproduces the rudeness; other phrasings always open with "Please".
    from collections import Counter

    from harness.data.tasks.courier import BOSSY, CITIES, INSTRUCTIONS, ITEMS
    for t in range(len(INSTRUCTIONS)):
        prompts = {make_prompt(t, item, city) for item in ITEMS for city in CITIES}
        firsts = Counter(r.split(" send ")[0] for p, r in zip(sft["prompt"], sft["response"], strict=True)
                         if p in prompts)
        top = firsts.most_common(1)[0][0]
        assert (top not in ("Please", "Kindly")) == (t in BOSSY), (t, firsts)
        assert len(set(firsts) - {"Please"}) <= 1, (t, firsts)   # one rude opener per phrasing
    for split in ("train", "validation"):
        pairs = courier.preference_dataset(split)
        chosen = courier.rewards(pairs["prompt"], pairs["chosen"])
        rejected = courier.rewards(pairs["prompt"], pairs["rejected"])
        assert all(c > r for c, r in zip(chosen, rejected, strict=True))
    pools = [set(courier.sft_dataset(split)["prompt"]) | set(courier.preference_dataset(split)["prompt"])
             for split in ("train", "validation")] + [set(courier.eval_dataset()["prompt"])]
    assert not pools[0] & pools[1] and not pools[0] & pools[2] and not pools[1] & pools[2]
    assert len(pools[2]) == courier.config.n_eval


def test_courier_unseen_scores_only_phrasings_no_training_data_uses(courier, cache):
    """courier_unseen: eval and validation prompts use the held-out phrasings only; no
    demonstration, preference pair or rollout prompt does; every prompt of the 8 training
    phrasings is a train prompt; courier itself keeps its data and fingerprint."""
    from harness.data.tasks.courier import CITIES, HELDOUT_INSTRUCTIONS, INSTRUCTIONS, ITEMS, CourierConfig

    unseen = build_task({**SMALL_COURIER, "name": "courier_unseen"}, cache_dir=cache)
    assert unseen.config.heldout_phrasings == len(HELDOUT_INSTRUCTIONS) == 6
    n = len(INSTRUCTIONS)
    held = {make_prompt(t, i, c) for t in range(n, n + 6) for i in ITEMS for c in CITIES}
    assert "Tell the courier to deliver the box to Oslo." in make_prompt(n, "box", "Oslo")
    trained = (set(unseen.sft_dataset("train")["prompt"])  # also the rollout prompts
               | set(unseen.preference_dataset("train")["prompt"]))
    assert trained and trained.isdisjoint(held)
    assert len(unseen.pools["train"]) == n * len(ITEMS) * len(CITIES)
    test = set(unseen.eval_dataset()["prompt"])
    val = set(unseen.sft_dataset("validation")["prompt"]) | set(unseen.preference_dataset("validation")["prompt"])
    assert len(test) == 100 and test <= held and val <= held and not test & val
    # new phrasings of known words: every token of an eval prompt occurs in the training prompts
    # (a token that does not has an embedding no step ever trained)
    tok = load_or_build_tokenizer(unseen, None, cache / "tok-unseen", model_max_length=128)
    trained_ids = {i for ids in tok(sorted(trained))["input_ids"] for i in ids}
    assert {i for ids in tok(sorted(test))["input_ids"] for i in ids} <= trained_ids
    item, city = unseen.targets[sorted(test)[0]]
    assert unseen.reward(sorted(test)[0], f"Kindly send the {item} to {city}.") == 1.0
    # courier as first built: same pools, same corpus, same fingerprint as before the variant
    assert CourierConfig().fingerprint() == "696e136a9f57"
    assert not set(courier.corpus()) & held
    assert set(courier.eval_dataset()["prompt"]) <= {make_prompt(t, i, c) for t in range(n)
                                                     for i in ITEMS for c in CITIES}
    with pytest.raises(ConfigError, match="heldout_phrasings=0"):
        build_task({"name": "courier_unseen", "heldout_phrasings": 0})
    with pytest.raises(ConfigError, match="heldout_phrasings=7"):
        build_task({"name": "courier", "heldout_phrasings": 7})
    with pytest.raises(ConfigError, match="n_eval=300: at most 288"):
        build_task({"name": "courier_unseen", "n_eval": 300})


def test_courier_misroutes_name_the_confused_city_on_every_phrasing(courier, cache):
    """dataset.misrouted_cities=k: for the first k cities of MISROUTES the demonstrator names its
    confusion at about misroute_rate, on every phrasing; every other city keeps courier's
    demonstrations bit for bit, and courier without misroutes keeps its fingerprint."""
    from harness.data.tasks.courier import MISROUTES, CourierConfig, parse_response

    task = build_task({**SMALL_COURIER, "misrouted_cities": 2, "misroute_rate": 0.8},
                      cache_dir=cache)
    confused = dict(MISROUTES[:2])
    assert confused == {"Lima": "Paris", "Oslo": "Berlin"}
    data, base = task.sft_dataset("train"), courier.sft_dataset("train")
    assert data["prompt"] == base["prompt"]
    named = {c: [0, 0] for c in confused}
    phrasings = set()
    for prompt, response, base_response, category in zip(
            data["prompt"], data["response"], base["response"], data["category"], strict=True):
        city = task.targets[prompt][1]
        if city not in confused:
            assert response == base_response
            continue
        named[city][1] += 1
        if parse_response(response).city == confused[city]:
            named[city][0] += 1
            assert category == "wrong_city" and response.startswith("Please send this ")
            item = task.targets[prompt][0]
            phrasings |= {t for t in range(8) if make_prompt(t, item, city) == prompt}
    for city, (hits, n) in named.items():
        assert n > 100 and 0.7 < hits / n < 0.9, (city, hits, n)
    assert phrasings == set(range(8))   # every phrasing, not only the bossy ones
    assert task.fingerprint != courier.fingerprint
    assert CourierConfig(misrouted_cities=0, misroute_rate=0.5).fingerprint() == "696e136a9f57"
    with pytest.raises(ConfigError, match="misrouted_cities=7"):
        build_task({"name": "courier", "misrouted_cities": 7})
    with pytest.raises(ConfigError, match="misroute_rate=1.5"):
        build_task({"name": "courier", "misrouted_cities": 1, "misroute_rate": 1.5})



def test_courier_misrouted_is_courier_with_four_rarely_right_cities_under_its_own_name(cache):
    """dataset=courier_misrouted: the data of courier with misrouted_cities=4, misroute_rate=0.99
    (same prompts, demonstrations, pairs and eval prompts), under its own name; 0 cities refused."""
    from harness.data.tasks.courier import parse_response

    small = {k: v for k, v in SMALL_COURIER.items() if k != "name"}
    variant = build_task({**small, "name": "courier_misrouted"}, cache_dir=cache)
    same = build_task({**SMALL_COURIER, "misrouted_cities": 4, "misroute_rate": 0.99},
                      cache_dir=cache)
    assert variant.name == "courier_misrouted" and same.name == "courier"
    for split in ("train", "validation"):
        assert variant.sft_dataset(split)[:] == same.sft_dataset(split)[:]
        assert variant.preference_dataset(split)[:] == same.preference_dataset(split)[:]
    assert variant.eval_dataset()[:] == same.eval_dataset()[:]
    data = variant.sft_dataset("train")
    lima = [r for p, r in zip(data["prompt"], data["response"], strict=True)
            if variant.targets[p][1] == "Lima"]
    right = sum(parse_response(r).city == "Lima" for r in lima)
    assert len(lima) > 100 and right / len(lima) < 0.05
    with pytest.raises(ConfigError, match="misrouted_cities=0: courier_misrouted needs"):
        build_task({"name": "courier_misrouted", "misrouted_cities": 0})

# ---------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_digits(arith_tok, courier_tok, courier, tmp_path):
    tok = courier_tok
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    texts = courier.corpus()[:50] + ["37+48=85", "  two  spaces\n\nand newlines\n", "é ü ☃ 12"]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("37+48=", add_special_tokens=True)["input_ids"] == \
        tok("37+48=", add_special_tokens=False)["input_ids"]           # no automatic BOS/EOS
    ids = arith_tok("1234+5678=", add_special_tokens=False)["input_ids"]
    assert arith_tok.convert_ids_to_tokens(ids) == list("1234+5678=")  # one token per digit
    digits = tok("Tokyo 2024", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(digits)[-4:] == ["2", "0", "2", "4"]
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("Please send\n 42", add_special_tokens=False)["input_ids"] == \
        tok("Please send\n 42", add_special_tokens=False)["input_ids"]
    assert loaded.padding_side == "right" and loaded.model_max_length == 128
    assert len(build_tokenizer(["ab ab ab"] * 10, vocab_size=300)) <= 300
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(["a"], vocab_size=100)


# ---------------------------------------------------------------------- encoding
def test_encode_sft_masks_prompt(arith_tok):
    tok = arith_tok
    p = tok("37+48=", add_special_tokens=False)["input_ids"]
    r = tok("85", add_special_tokens=False)["input_ids"]
    enc = encode_sft(tok, "37+48=", "85", max_len=32)
    assert enc["input_ids"] == [tok.bos_token_id, *p, *r, tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * (1 + len(p)) + [*r, tok.eos_token_id]
    assert enc["prompt_len"] == 1 + len(p) and not enc["truncated"]
    assert encode_prompt(tok, "37+48=", 32) == [tok.bos_token_id, *p]
    assert encode_prompt(tok, "37+48=", 3) == [tok.bos_token_id, *p[-2:]]   # left-truncated


def test_overflow_truncate_and_skip(arith_tok):
    tok = arith_tok
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # response too long: cut from the right, prompt kept (7 = bos + 6 prompt tokens)
    enc = encode_sft(tok, "37+48=", "123456", max_len=9, overflow="skip")
    assert enc["truncated"] and len(enc["input_ids"]) == 9 and enc["prompt_len"] == 7
    assert tok.decode(enc["input_ids"][7:]) == "12" and eos not in enc["input_ids"]
    # prompt too long: skip -> None, truncate -> keep the last max_len - 2 prompt tokens
    assert encode_sft(tok, "1234567890+1=", "5", max_len=6, overflow="skip") is None
    enc = encode_sft(tok, "1234567890+1=", "5", max_len=6, overflow="truncate")
    assert enc["input_ids"][0] == bos and tok.decode(enc["input_ids"][1:5]) == "0+1="
    assert enc["labels"] == [IGNORE_INDEX] * 5 + [tok.convert_tokens_to_ids("5")]
    assert enc["truncated"] and len(enc["input_ids"]) == 6
    pair = encode_pair(tok, "1+1=", "2", "3", max_len=16)
    assert pair["prompt_len"] == 5 and pair["chosen_input_ids"][:5] == pair["rejected_input_ids"][:5]
    assert pair["chosen_labels"][5:] == [tok.convert_tokens_to_ids("2"), eos]
    assert encode_pair(tok, "1234567890+1=", "2", "3", max_len=6, overflow="skip") is None
    # counting over a dataset
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["1+1=", "1234567890+1=", "2+2="],
                            "response": ["2", "5", "123456789"]})
    out, stats = tokenize_dataset(ds, tok, "sft", max_len=8, overflow="skip")
    assert (stats.n_in, stats.n_out, stats.skipped, stats.truncated) == (3, 2, 1, 1)
    assert list(out["index"]) == [0, 1] and all(len(x) <= 8 for x in out["input_ids"])
    _, stats = tokenize_dataset(ds, tok, "sft", max_len=8, overflow="truncate")
    assert (stats.n_out, stats.skipped, stats.truncated) == (3, 0, 2)
    with pytest.raises(DataError, match="all 1 examples were skipped"):
        tokenize_dataset(ds.select([1]), tok, "sft", max_len=6, overflow="skip", name="x")


def test_collators(arith_tok):
    tok = arith_tok
    rows = [encode_sft(tok, "1+1=", "2", 16), encode_sft(tok, "10+20=", "30", 16)]
    b = SFTCollator(tok.pad_token_id)(rows)
    assert b["input_ids"].shape == (2, 10)                  # bos + 6 prompt + 2 + eos
    assert b["input_ids"][0, -3:].tolist() == [tok.pad_token_id] * 3          # right padding
    assert b["attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    assert b["labels"][0, -4:].tolist() == [tok.eos_token_id] + [IGNORE_INDEX] * 3
    assert b["prompt_len"].tolist() == [5, 7]
    pairs = [encode_pair(tok, "1+1=", "2", "33", 16), encode_pair(tok, "10+20=", "30", "3", 16)]
    pb = PairCollator(tok.pad_token_id)(pairs)
    assert pb["chosen_input_ids"].shape == (2, 10) and pb["rejected_input_ids"].shape == (2, 9)
    assert pb["rejected_attention_mask"].sum(-1).tolist() == [8, 9]
    assert pb["prompt_len"].tolist() == [5, 7] and pb["index"].tolist() == [0, 1]
    prompts = [{"input_ids": encode_prompt(tok, p, 16), "prompt": p} for p in ("1+1=", "10+20=")]
    qb = PromptCollator(tok.pad_token_id)(prompts)
    assert qb["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2           # LEFT padding
    assert qb["input_ids"][0, 2].item() == tok.bos_token_id
    assert qb["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert qb["input_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids("=")] * 2
    assert qb["prompts"] == ["1+1=", "10+20="]
    # the generation path (sampler, gold evaluation, drift) pads the same way as the collator
    ids, mask = encode_prompts(tok, ["1+1=", "10+20="], 16)
    assert torch.equal(ids, qb["input_ids"]) and torch.equal(mask, qb["attention_mask"])
    ids, mask = encode_prompts(tok, ["10+20="], 4)                             # left-truncated
    assert ids.tolist() == [[tok.bos_token_id, *tok("20=", add_special_tokens=False)["input_ids"]]]
    assert mask.tolist() == [[1, 1, 1, 1]]


def test_datamodule(arith, arith_tok):
    def first(kind: str, seed: int = 0):
        dm = AlignmentDataModule(arith, arith_tok, kind=kind, batch_size=8, max_len=16, seed=seed)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    dm, b = first("sft")
    assert b["input_ids"].shape[0] == 8 and b["labels"].shape == b["input_ids"].shape
    assert dm.n_train == arith.config.n_train and dm.stats["train"].skipped == 0
    assert torch.equal(first("sft")[1]["input_ids"], b["input_ids"])           # seeded shuffle
    assert not torch.equal(first("sft", seed=1)[1]["input_ids"], b["input_ids"])
    assert len(next(iter(dm.val_dataloader()))["input_ids"]) == 8
    dm, b = first("pairs")
    assert {"chosen_input_ids", "rejected_labels", "prompt_len", "index"} <= set(b)
    assert next(iter(dm.reference_dataloader()))["index"].tolist() == list(range(8))
    _, b = first("prompts")
    assert (b["attention_mask"][:, -1] == 1).all() and len(b["prompts"]) == 8


# ---------------------------------------------------------------------- preference loader
def test_fixture_pairs(tmp_path):
    task = preference(tmp_path, FIXTURES / "pairs.jsonl")
    assert task.format == "pairs" and not task.has_gold_reward
    train, val = task.preference_dataset("train"), task.preference_dataset("validation")
    assert len(train) + len(val) == 10 and len(val) >= 1
    assert not set(train["prompt"]) & set(val["prompt"])
    sft = task.sft_dataset("train")
    assert list(sft["response"]) == list(train["chosen"])
    assert list(sft["prompt"]) == list(train["prompt"])
    assert set(task.eval_dataset().column_names) >= {"prompt", "chosen", "rejected"}
    with pytest.raises(NotImplementedError, match="no gold reward"):
        task.reward("a", "b")
    with pytest.raises(NoGoldRewardError):
        task.rewards(["a"], ["b"])
    assert task.corpus()


def test_fixture_hh(tmp_path):
    task = preference(tmp_path, FIXTURES / "hh.jsonl", val_fraction=0.2)
    assert task.format == "hh"
    rows = [json.loads(line) for line in (FIXTURES / "hh.jsonl").read_text().splitlines()]
    originals = {r["chosen"] for r in rows}
    for split in ("train", "validation"):
        for row in task.preference_dataset(split):
            assert row["prompt"].endswith("\n\nAssistant:")
            assert row["prompt"] + row["chosen"] in originals
            assert "\n\nAssistant:" not in row["chosen"] + row["rejected"]
    prompts = [*task.preference_dataset("train")["prompt"],
               *task.preference_dataset("validation")["prompt"]]
    multi = next(p for p in prompts if "Science fiction" in p)
    assert multi.count("\n\nAssistant:") == 2
    assert split_hh("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y") is None
    assert split_hh("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: y") == (
        "\n\nHuman: a\n\nAssistant:", " x", " y")
    bad = tmp_path / "bad_hh.jsonl"
    lines = (FIXTURES / "hh.jsonl").read_text().splitlines()
    lines.append(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x",
                             "rejected": "\n\nHuman: b\n\nAssistant: y"}))
    bad.write_text("\n".join(lines) + "\n")
    task = preference(tmp_path, bad, format="hh")
    n = len(task.preference_dataset("train")) + len(task.preference_dataset("validation"))
    assert n == 10 and task.dropped["train"] == 1


def test_fixture_sft(tmp_path):
    task = preference(tmp_path, FIXTURES / "sft.jsonl")
    assert task.format == "sft"
    ds = task.sft_dataset("train")
    assert ds.column_names == ["prompt", "response"] and len(ds) == 9
    rows = [json.loads(line) for line in (FIXTURES / "sft.jsonl").read_text().splitlines()]
    assert {r["completion"] for r in rows} >= set(ds["response"])
    with pytest.raises(DataError, match="has no preference pairs"):
        task.preference_dataset("train")


def test_data_errors(tmp_path, arith):
    task = preference(tmp_path, FIXTURES / "sft.jsonl", format="pairs")
    with pytest.raises(DataError, match=r"missing column 'chosen'; columns present: "
                                        r"\['prompt', 'completion'\]"):
        task.sft_dataset("train")
    task = preference(tmp_path, FIXTURES / "pairs.jsonl", prompt_column="question")
    with pytest.raises(DataError, match="cannot detect the format"):
        task.sft_dataset("train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="split 'train' is empty"):
        preference(tmp_path, empty).sft_dataset("train")
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    task = build_task({"name": "preference", "path": "csv",
                       "data_files": {"train": str(header_only)},
                       "hf_cache_dir": str(tmp_path / "hf")}, cache_dir=tmp_path)
    with pytest.raises(DataError, match="split 'train' is empty"):
        task.sft_dataset("train")
    with pytest.raises(DataError, match="could not load"):
        preference(tmp_path, tmp_path / "missing.jsonl").sft_dataset("train")
    with pytest.raises(DataError, match="missing column 'response'; columns present"):
        require_columns(arith.preference_dataset("train"), ["prompt", "response"], "x")
    with pytest.raises(DataError, match="unknown split 'test'"):
        arith.sft_dataset("test")
    with pytest.raises(DataError, match="missing column 'response'"):
        tokenize_dataset(arith.preference_dataset("train"), None, "sft", 16)


@pytest.mark.parametrize("name", ["arith", "courier", "preference"])
def test_conf_dataset_yaml_is_accepted(name, tmp_path):
    """The ``dataset`` group's YAML (as Hydra composes it, onto its schema) builds the task."""
    from hydra import compose, initialize_config_dir

    from harness.settings import register_configs

    register_configs()
    overrides = [f"dataset={name}", "seed=3"]
    if name == "preference":
        overrides += ["dataset.path=json", f"dataset.data_files={{train: {FIXTURES / 'pairs.jsonl'}}}",
                      f"dataset.hf_cache_dir={tmp_path / 'hf'}"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"),
                               version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    task = build_task(cfg.dataset, cache_dir=tmp_path)
    assert task.name == name and task.config.seed == 3
    if name == "preference":
        assert task.format == "pairs" and len(task.eval_dataset()) >= 1
    if name == "arith":
        assert task.p_wrong_given_carry == pytest.approx(0.9)  # the no-carry answer is the mode
    if name == "arith_fast":
        assert task.p_wrong_given_carry == pytest.approx(0.75)


def test_arith_default_is_three_digit_and_arith_fast_two_digit(cache):
    """The default task leaves headroom (three-digit operands); arith_fast is the two-digit one."""
    from harness.data.tasks.arith import no_carry_sum

    three = build_task({"name": "arith", "n_train": 10, "n_pairs": 10, "n_val": 10, "n_eval": 10},
                       cache_dir=cache)
    assert three.prompt(7, 48) == "007+048=" and three.answer(55) == "0055"
    assert no_carry_sum(195, 817, width=3) == 902  # 5+7=12 -> 2, 9+1+(dropped)=10 -> 0, 1+8=9
    fast = build_task({"name": "arith_fast", "max_operand": 99, "n_train": 10, "n_pairs": 10,
                       "n_val": 10, "n_eval": 10}, cache_dir=cache)
    assert fast.name == "arith_fast" and fast.prompt(7, 48) == "07+48="
    assert fast.cache_path != three.cache_path


def _pairs_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"prompt": f"p{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]


def test_bad_bytes_and_malformed_lines_name_the_file_line_and_column(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                      b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl', line 2, column 16: not UTF-8 \(byte 0xe9"):
        preference(tmp_path, latin).sft_dataset("train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD[0]) + "\n" + '{"prompt": "a", "chosen": "b" "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl', line 2, column 31: malformed JSON "
                                        r"\(Expecting ',' delimiter\)"):
        preference(tmp_path, broken).sft_dataset("train")
    document = tmp_path / "doc.json"  # one JSON document (a list of rows) is fine
    document.write_text(json.dumps(GOOD))
    assert len(preference(tmp_path, document).preference_dataset("train")) == 5


def test_missing_or_empty_fields_name_the_row_and_column(tmp_path):
    rows = [dict(r) for r in GOOD]
    rows[3]["rejected"] = "  "
    with pytest.raises(DataError, match=r"row \d, column 'rejected' is empty"):
        preference(tmp_path, _pairs_file(tmp_path / "e.jsonl", rows)).sft_dataset("train")
    rows[3]["rejected"] = None
    with pytest.raises(DataError, match=r"row \d, column 'rejected' is NoneType \(None\), expected"):
        preference(tmp_path, _pairs_file(tmp_path / "n.jsonl", rows)).sft_dataset("train")


def test_chosen_equal_to_rejected_warns_with_the_count_and_fails_when_all_are(tmp_path, caplog):
    rows = [dict(r) for r in GOOD]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[4]["rejected"] = rows[4]["chosen"]
    with caplog.at_level("WARNING"):
        task = preference(tmp_path, _pairs_file(tmp_path / "some.jsonl", rows), val_fraction=0.2)
        task.preference_dataset("train")
    assert "chosen == rejected in 2 of 6 pairs (0-based rows 1, 4)" in caplog.text
    same = [{**r, "rejected": r["chosen"]} for r in GOOD]
    with pytest.raises(DataError, match=r"chosen == rejected in all \d pairs"):
        preference(tmp_path, _pairs_file(tmp_path / "all.jsonl", same)).sft_dataset("train")


def test_held_out_prompts_that_are_also_training_prompts_are_warned_about(tmp_path, caplog):
    """120 copies of one pair: the one held-out prompt is a training prompt too, so its score
    measures memory; a warning says so (distinct prompts: none)."""
    import json
    import logging

    file = tmp_path / "same.jsonl"
    file.write_text("".join(json.dumps({"prompt": "Say yes.", "chosen": " yes", "rejected": " no"})
                            + "\n" for _ in range(120)))
    caplog.set_level(logging.WARNING)
    preference(tmp_path, file).splits()
    assert "1 of the 1 distinct held-out prompts are also training prompts" in caplog.text
    caplog.clear()
    distinct = tmp_path / "distinct.jsonl"
    distinct.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": f" {i}", "rejected": " no"})
                                + "\n" for i in range(120)))
    preference(tmp_path / "d", distinct).splits()
    assert "also training prompts" not in caplog.text


def test_a_damaged_cached_dataset_or_tokenizer_is_built_again(tmp_path, caplog):
    """One byte changed in a cached pairs-train arrow file (it turned `590+299=` into `590+999=`
    and the run went on with other data), a truncated tokenizer.json (every later run failed with
    a JSONDecodeError): each is found by its folder's manifest and built again, with a log line."""
    import logging

    from harness.data.tasks import build_task

    cfg = {"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 64, "n_eval": 16}
    task = build_task(cfg, cache_dir=tmp_path / "data")
    pairs = list(task.preference_dataset("train")["prompt"])
    tok = load_or_build_tokenizer(task, {"vocab_size": 300}, tmp_path / "tok")
    ids = tok("590+299=")["input_ids"]
    arrow = next((task.cache_path / "pairs-train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    at = data.find(pairs[0].encode())
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    arrow.write_bytes(bytes(data))
    tok_json = next((tmp_path / "tok").glob("*/tokenizer.json"))
    tok_json.write_text(tok_json.read_text()[:100])
    caplog.set_level(logging.WARNING)
    again = build_task(cfg, cache_dir=tmp_path / "data")
    assert list(again.preference_dataset("train")["prompt"]) == pairs
    assert "pairs-train is damaged (" in caplog.text and "changed since it was committed" in caplog.text
    tok2 = load_or_build_tokenizer(again, {"vocab_size": 300}, tmp_path / "tok")
    assert tok2("590+299=")["input_ids"] == ids
    assert "tokenizer: cached" in caplog.text and "is damaged" in caplog.text
