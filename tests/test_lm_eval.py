"""lm-eval integration: exported task data and YAMLs, the runner, and agreement with the harness.

The key test runs lm-eval (``simple_evaluate`` on the saved HF checkpoint) on the three task kinds
of ``arith`` and ``courier`` and recomputes every number with the harness's own model and code:
greedy decoding with ``harness.evaluation.gold.complete`` (the gold evaluation's KV-cached sampler)
scored by ``task.reward`` (gold reward), log-probabilities of chosen vs rejected (preference
accuracy) and of the held-out texts (perplexities). The whole module takes ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.data.tokenizer import build_tokenizer  # noqa: E402
from harness.evaluation.gold import complete  # noqa: E402
from harness.evaluation.lm_eval_runner import (  # noqa: E402
    flatten_results,
    lm_eval_command,
    lm_eval_results,
    model_args,
    run_lm_eval,
)
from harness.evaluation.tasks import export_task_data, gold_process_results, task_names  # noqa: E402
from harness.models.architecture import ModelConfig  # noqa: E402
from harness.models.hf import save_checkpoint  # noqa: E402
from harness.models.llama import CausalLM  # noqa: E402

N_ROWS = 8          # rows per exported file
MAX_NEW = 16        # eval.max_new_tokens == max_gen_toks
MAX_LEN = 128       # the model's context (llama_tiny's max_seq_len)
TASK_CFGS = {name: dict(name=name, seed=0, n_train=64, n_pairs=32, n_val=N_ROWS, n_eval=N_ROWS)
             for name in ("arith", "courier")}
TASK_CFGS["arith"]["max_operand"] = 99  # two-digit sums: short enough for the tiny model to memorise


def _best_response(name: str, row: dict) -> str:
    """A response with the top gold reward for an eval row (what the model memorises)."""
    if name == "arith":
        return str(row["answer"])
    return f"Please send this {row['item']} to {row['city']}."


@pytest.fixture(scope="module")
def offline_datasets_cache(tmp_path_factory):
    """Keep ``datasets``' cache of the local JSON files in a tmp dir (env and the live config)."""
    import datasets

    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield cache


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, offline_datasets_cache):
    return tmp_path_factory.mktemp("lm_eval")


_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def export(workdir):
    """``export(name) -> (task, tokenizer, include dir)``: the built-in task ``name`` exported with
    N_ROWS rows per file into the shared include folder (built once per module)."""
    from harness.data.tasks import build_task

    def get(name: str):
        key = (workdir, name)
        if key not in _EXPORTS:
            task = build_task(dict(TASK_CFGS[name]), cache_dir=workdir / "data")
            tok = build_tokenizer(task.corpus(), vocab_size=512)
            include = export_task_data(task, workdir / "include", limit=N_ROWS, tokenizer=tok,
                                       max_gen_toks=MAX_NEW)
            _EXPORTS[key] = (task, tok, include)
        return _EXPORTS[key]

    return get


@pytest.fixture(scope="module")
def exported(export):
    """(task, tokenizer, include dir) of ``arith``."""
    return export("arith")


def _rows(include, kind, name="arith"):
    return [json.loads(line) for line in (include / name / f"{kind}.jsonl").read_text().splitlines()]


def _train(model: CausalLM, tok, texts: list[str], steps: int = 80, lr: float = 1e-2) -> None:
    """Memorise ``[bos] + text + [eos]`` for each text (so the metrics are not all trivial)."""
    seqs = [[tok.bos_token_id, *tok.encode(t), tok.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to busy cores
    try:
        model.train()
        for _ in range(steps):
            logits = model(ids).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


@pytest.fixture(scope="module", params=["arith", "courier"])
def trained(request, export, tmp_path_factory):
    """(name, task, tokenizer, include dir, model, checkpoint dir): a llama_tiny-sized model that
    memorised top-reward responses to half the gold prompts and some preference responses (chosen
    for some, rejected for others), saved as an HF checkpoint."""
    name = request.param
    task, tok, include = export(name)
    gold, pref = _rows(include, "gold", name), _rows(include, "pref", name)
    texts = [r["prompt"] + _best_response(name, r) for r in gold[: N_ROWS // 2]]
    texts += [r["prompt"] + r["chosen"] for r in pref[:3]] + [r["prompt"] + r["rejected"] for r in pref[3:5]]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=MAX_LEN)
    model = CausalLM(cfg)
    _train(model, tok, texts)
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / name, tokenizer=tok)
    return name, task, tok, include, model, ckpt


# ---------------------------------------------------------------------------------- harness side
def _harness_greedy(model: CausalLM, tok, prompts: list[str]) -> list[str]:
    """Greedy responses as the harness decodes them (its gold evaluation's own function)."""
    return complete(model, tok, prompts, MAX_NEW, batch_size=len(prompts), max_len=MAX_LEN)


@torch.no_grad()
def _logprob(model: CausalLM, ids: list[int], n_scored: int) -> float:
    """Sum of log p(token) over the last ``n_scored`` tokens of ``ids`` (each given the ones before)."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
    targets = x[0, 1:]
    token_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    return float(token_lp[-n_scored:].sum())


# ---------------------------------------------------------------------------------- export, YAMLs, CLI
def test_export_writes_rows_and_yamls(exported):
    task, tok, include = exported
    names = {p.name for p in include.iterdir()}
    assert {"harness_arith.yaml", *(f"{n}.yaml" for n in task_names("arith"))} <= names
    gold, pref, ppl = (_rows(include, k) for k in ("gold", "pref", "ppl"))
    assert len(gold) == len(pref) == len(ppl) == N_ROWS
    assert gold[0]["context"] == "<bos>" + gold[0]["prompt"]
    assert gold[0]["target"] == str(gold[0]["answer"])
    assert pref[0]["choices"] == [pref[0]["chosen"] + "<eos>", pref[0]["rejected"] + "<eos>"]
    assert {r["label"] for r in pref} == {0}
    assert all(r["text"] == r["prompt"] + r["response"] for r in ppl)
    # the BOS string in the context tokenizes to exactly [bos] + prompt tokens
    assert tok.encode(gold[0]["context"]) == [tok.bos_token_id, *tok.encode(gold[0]["prompt"])]
    assert tok.encode(pref[0]["choices"][0])[-1] == tok.eos_token_id
    yaml_text = (include / "harness_arith_gold.yaml").read_text()
    assert str(include / "arith" / "gold.jsonl") in yaml_text  # absolute data path
    assert "max_gen_toks: 16" in yaml_text
    manifest = json.loads((include / "arith" / "manifest.json").read_text())
    assert manifest["counts"] == {"gold": N_ROWS, "pref": N_ROWS, "ppl": N_ROWS}
    assert manifest["task_config"]["n_eval"] == N_ROWS


def test_gold_process_results_uses_the_task_reward(exported):
    task, _, include = exported
    row = _rows(include, "gold")[0]
    right, wrong = str(row["answer"]), str(row["answer"] + 1)
    assert gold_process_results(row, [right]) == {"gold_reward": task.reward(row["prompt"], right)} \
        == {"gold_reward": 1.0}
    assert gold_process_results(row, [wrong]) == {"gold_reward": 0.0}


def test_courier_export_and_gold_reward(export):
    task, tok, include = export("courier")
    gold = _rows(include, "gold", "courier")
    row = gold[0]
    assert row["context"] == "<bos>" + row["prompt"] and row["prompt"].endswith("### Response:\n")
    assert tok.encode(row["context"]) == [tok.bos_token_id, *tok.encode(row["prompt"])]
    for response in (_best_response("courier", row), f"Please send this {row['item']} to Atlantis.",
                     "whatever"):
        assert gold_process_results(row, [response]) == {"gold_reward": task.reward(row["prompt"], response)}
    assert gold_process_results(row, [_best_response("courier", row)]) == {"gold_reward": 1.0}
    assert "harness_courier_gold.yaml" in {p.name for p in include.iterdir()}


class NoGoldTask:
    """A task without a gold reward (like hub preference data): only pref and ppl are exported."""

    name = "nogold"
    has_gold_reward = False
    config = {"name": "nogold", "seed": 0}

    def preference_dataset(self, split):
        from datasets import Dataset

        return Dataset.from_dict({"prompt": ["Q: 1?\nA:", "Q: 2?\nA:"], "chosen": [" yes", " no"],
                                  "rejected": [" no", " yes"]})

    def sft_dataset(self, split):
        from datasets import Dataset

        return Dataset.from_dict({"prompt": ["Q: 1?\nA:"], "response": [" yes"]})


def test_export_without_gold_reward(tmp_path):
    include = export_task_data(NoGoldTask(), tmp_path, bos_token="<s>", eos_token="</s>")
    assert {p.name for p in include.glob("*.yaml")} == {"harness_nogold.yaml", "harness_nogold_pref.yaml",
                                                        "harness_nogold_ppl.yaml"}
    assert 'task: ["harness_nogold_pref", "harness_nogold_ppl"]' in (include / "harness_nogold.yaml").read_text()
    pref = _rows(include, "pref", "nogold")
    assert pref[0]["context"] == "<s>Q: 1?\nA:" and pref[0]["choices"] == [" yes</s>", " no</s>"]
    assert not (include / "nogold" / "gold.jsonl").exists()


def test_lm_eval_indexes_and_builds_the_exported_tasks(exported):
    from lm_eval.tasks import TaskManager

    _, _, include = exported
    manager = TaskManager(include_path=str(include), include_defaults=False)
    assert {"harness_arith", *task_names("arith")} <= set(manager.all_tasks)
    loaded = manager.load(["harness_arith"])
    assert set(loaded["tasks"]) == set(task_names("arith"))
    kinds = {name: t.config.output_type for name, t in loaded["tasks"].items()}
    assert kinds == {"harness_arith_gold": "generate_until", "harness_arith_pref": "multiple_choice",
                     "harness_arith_ppl": "loglikelihood_rolling"}
    gold = loaded["tasks"]["harness_arith_gold"]
    doc = next(iter(gold.test_docs()))
    assert gold.doc_to_text(doc) == "<bos>" + doc["prompt"]
    assert gold.config.generation_kwargs["until"] == ["<eos>"]
    pref = loaded["tasks"]["harness_arith_pref"]
    doc = next(iter(pref.test_docs()))
    assert pref.doc_to_choice(doc) == [doc["chosen"] + "<eos>", doc["rejected"] + "<eos>"]
    assert pref.doc_to_target(doc) == 0


def test_lm_eval_command_line(tmp_path):
    ckpt, include = tmp_path / "ckpt", tmp_path / "include"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    cmd = lm_eval_command(ckpt, include, ["harness_arith"], limit=50, batch_size=32)
    assert cmd == (f"lm_eval --model hf --model_args pretrained={ckpt},dtype=float32,add_bos_token=False,"
                   f"max_length=128 --include_path {include} --tasks harness_arith --batch_size 32 "
                   "--device cpu --limit 50")
    assert model_args(ckpt, max_length=64, add_bos_token=None) == f"pretrained={ckpt},dtype=float32,max_length=64"
    shots = lm_eval_command(ckpt, None, ["arc_challenge", "hellaswag", "mmlu"], None, "auto",
                            num_fewshot={"arc_challenge": 25, "hellaswag": 10, "mmlu": 25},
                            add_bos_token=True)
    first, second = shots.split(" && ")
    assert "--include_path" not in shots
    assert first.endswith("--tasks arc_challenge,mmlu --batch_size auto --device cpu --num_fewshot 25")
    assert second.endswith("--tasks hellaswag --batch_size auto --device cpu --num_fewshot 10")
    assert "add_bos_token=True" in first
    quoted = lm_eval_command(tmp_path / "a b", None, ["x"], None, 1)
    assert f"'pretrained={tmp_path / 'a b'},dtype=float32,add_bos_token=False'" in quoted


def test_flatten_results_names():
    results = {"results": {
        "harness_arith_pref": {"alias": "harness_arith_pref", "name": "harness_arith_pref", "sample_len": 8,
                               "acc,none": 0.5, "acc_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01},
        "harness_arith": {"alias": "harness_arith"},
    }}
    assert flatten_results(results) == {"eval/harness_arith_pref/acc": 0.5,
                                        "eval/gsm8k/exact_match/strict-match": 0.25}


def test_open_llm_eval_config_composes():
    from hydra import compose, initialize_config_dir

    from harness.settings import register_configs

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name="config", overrides=["eval=open_llm"])
    ev = cfg.eval
    assert (ev.max_new_tokens, ev.batch_size, ev.limit, ev.n_samples) == (16, 100, None, 8)
    assert list(ev.lm_eval.tasks) == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2",
                                      "winogrande", "gsm8k"]
    assert dict(ev.lm_eval.num_fewshot) == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5,
                                            "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}
    assert ev.lm_eval.enabled is True


# ---------------------------------------------------------------------------------- lm-eval runs
def test_lm_eval_numbers_equal_the_harness_numbers(trained):
    """simple_evaluate on the checkpoint == the harness's own computation, for all three kinds."""
    from harness.evaluation.gold import gold_eval

    name, task, tok, include, model, ckpt = trained
    group = f"harness_{name}"
    metrics = run_lm_eval(ckpt, include, [group], limit=None, batch_size=4)
    gold, pref, ppl = (_rows(include, k, name) for k in ("gold", "pref", "ppl"))

    # gold reward: greedy decoding with the harness sampler, scored by the task's gold reward
    prompts = [r["prompt"] for r in gold]
    rewards = task.rewards(prompts, _harness_greedy(model, tok, prompts))
    harness_gold = sum(rewards) / len(rewards)
    assert len(set(rewards)) > 1  # memorised half right, the rest not: the comparison means something
    assert metrics[f"eval/{group}_gold/gold_reward"] == pytest.approx(harness_gold, abs=1e-12)
    # ... and the pipeline's own eval/gold_reward function gives the same number
    pipeline = gold_eval(model, tok, task, prompts, max_new_tokens=MAX_NEW, batch_size=100,
                         max_len=MAX_LEN, progress=False)
    assert pipeline.mean_reward == pytest.approx(harness_gold, abs=1e-12)

    # preference accuracy: log p(chosen + eos | bos + prompt) vs rejected (ties go to chosen)
    wins = []
    for r in pref:
        ctx = [tok.bos_token_id, *tok.encode(r["prompt"])]
        lps = [_logprob(model, ctx + [*tok.encode(resp), tok.eos_token_id], len(tok.encode(resp)) + 1)
               for resp in (r["chosen"], r["rejected"])]
        wins.append(lps[0] >= lps[1])
    acc = metrics[f"eval/{group}_pref/acc"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(sum(wins) / len(wins), abs=1e-12)

    # perplexities of prompt + response, every token given BOS and the tokens before it
    lls = [_logprob(model, [tok.bos_token_id, *tok.encode(r["text"])], len(tok.encode(r["text"])))
           for r in ppl]
    words = sum(len(re.split(r"\s+", r["text"])) for r in ppl)
    n_bytes = sum(len(r["text"].encode("utf-8")) for r in ppl)
    expected = {"word_perplexity": math.exp(-sum(lls) / words),
                "byte_perplexity": math.exp(-sum(lls) / n_bytes),
                "bits_per_byte": -sum(lls) / n_bytes / math.log(2)}
    for metric, value in expected.items():
        assert metrics[f"eval/{group}_ppl/{metric}"] == pytest.approx(value, rel=1e-4), metric
    assert metrics[f"eval/{group}_ppl/byte_perplexity"] > 1.0
    assert metrics[f"eval/{group}_ppl/word_perplexity"] > 1.0
    assert metrics[f"eval/{group}_ppl/bits_per_byte"] > 0.0


def test_lm_eval_completions_equal_the_harness_completions(trained):
    """Per prompt: lm-eval's greedy completion is the harness's, string for string, and so is
    its reward (batch size 3: the batches mix prompt lengths, so left padding is exercised)."""
    name, task, tok, include, model, ckpt = trained
    results = lm_eval_results(ckpt, include, [f"harness_{name}_gold"], batch_size=3, log_samples=True)
    samples = sorted(results["samples"][f"harness_{name}_gold"], key=lambda s: s["doc_id"])
    prompts = [s["doc"]["prompt"] for s in samples]
    lm_eval_responses = [s["filtered_resps"][0] for s in samples]
    assert lm_eval_responses == _harness_greedy(model, tok, prompts)
    assert [s["gold_reward"] for s in samples] == task.rewards(prompts, lm_eval_responses)


def test_chat_formatted_prompts_export_the_task_and_grade_like_the_harness(tmp_path):
    from test_prompt_format import CHATML

    from harness.data.prompt_format import FormattedTask
    from harness.data.tasks import build_task
    from harness.evaluation.tasks.functions import RAW_PROMPT_FIELD, TASK_CLASS_FIELD

    task = build_task({"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 32, "n_eval": 8},
                      cache_dir=tmp_path / "data")
    tok = build_tokenizer(task.corpus(), vocab_size=300)
    tok.chat_template = CHATML
    chat = FormattedTask(task, "chat", tok)
    include = export_task_data(chat, tmp_path / "tasks", tokenizer=tok)
    row = _rows(include, "gold")[0]
    assert row[TASK_CLASS_FIELD] == "harness.data.tasks.arith:ArithTask"  # rebuilt as the task
    assert row["prompt"].startswith("<bos>user\nWhat is ") and row[RAW_PROMPT_FIELD].endswith("=")
    assert row["context"] == row["prompt"]  # the template's BOS, not a second one
    a, b = (int(x) for x in row[RAW_PROMPT_FIELD].rstrip("=").split("+"))
    for answer in (f"{a} + {b} = {a + b}", f"{a + b + 1}"):  # an instruct model's free form
        assert gold_process_results(row, [answer]) == {"gold_reward": chat.reward(row["prompt"],
                                                                                  answer)}
    assert gold_process_results(row, [f"{a} + {b} = {a + b}"]) == {"gold_reward": 1.0}
