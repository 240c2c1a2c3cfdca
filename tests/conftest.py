"""Shared fixtures: a tiny random Mistral with an offline tokenizer, small datasets, an isolated cache.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session.
"""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Like Mistral-7B-Instruct-v0.2: no system role, [INST] ... [/INST] answer</s>
MISTRAL_LIKE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
                "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def _corpus():
    from medpeft.sample_data import build

    texts = []
    for r in build():
        texts.append(r["question"])
        texts.append(str(r["answer"]))
        if r["options"]:
            texts.extend(r["options"].values())
    texts.append("You are a careful medical assistant. Answer the question accurately and concisely, "
                 "based on established medical knowledge. Answer with the letter of the correct option.")
    return texts


def build_tokenizer(template=CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    eos = "<|im_end|>" if template == CHATML else "</s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=eos,
                                   pad_token="<pad>")
    fast.chat_template = template
    return fast


def build_model_dir(path: Path, template=CHATML) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = build_tokenizer(template)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           sliding_window=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
                           initializer_range=0.15)  # logits with room to move, unlike std 0.02
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random MistralForCausalLM (the 7B's module names) saved as a local model directory."""
    return str(build_model_dir(tmp_path_factory.mktemp("tiny-mistral")))


@pytest.fixture(scope="session")
def tiny_mistral_template_model(tmp_path_factory) -> str:
    return str(build_model_dir(tmp_path_factory.mktemp("tiny-mistral-inst"), MISTRAL_LIKE))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n=40):
    from medpeft.sample_data import build

    rows = [r for r in build() if r["options"] is None]
    return [{"question": r["question"], "answer": r["answer"], "focus": r["fact_id"]} for r in rows[:n]]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows())


@pytest.fixture(scope="session")
def processed(tmp_path_factory, tiny_model) -> str:
    """The bundled sample, prepared with the tiny model's tokenizer."""
    from medpeft.config import PrepareConfig
    from medpeft.data import prepare
    from medpeft.sample_data import SAMPLE_PATH

    out = tmp_path_factory.mktemp("data") / "processed"
    prepare(PrepareConfig(input_data=str(SAMPLE_PATH), output_dir=str(out), model_name=tiny_model),
            log=lambda *a: None)
    return str(out)


def report_results() -> dict:
    """A results file with two evaluated models and a failed one: enough for every part of the report."""
    return {
        "test_data": "t.json", "test_items": 3, "choice_items": 2, "created": "now",
        "models": {
            "base": {"name": "base", "status": "ok", "loss": {"loss": 2.0, "perplexity": 7.39,
                                                              "perplexity_ci": [6.5, 8.2]},
                     "choice": {"accuracy_loglik": 0.5, "accuracy_loglik_ci": [0.0, 1.0], "accuracy_generate": 0.5,
                                "unparseable_rate": 0.0},
                     "generation": {"rougeL": 0.2, "rougeL_ci": [0.1, 0.3], "bleu": 3.0, "token_f1": 0.25},
                     "efficiency": {"latency_s_per_answer": 0.5, "generated_tokens_per_s": 20.0},
                     "samples": [{"question": "Q1?", "reference": "R1", "answer": "base says <b>"}]},
            "qlora": {"name": "qlora", "status": "ok", "loss": {"loss": 1.0, "perplexity": 2.72},
                      "choice": {"accuracy_loglik": 1.0, "accuracy_loglik_ci": [1.0, 1.0], "accuracy_generate": 1.0,
                                 "unparseable_rate": 0.0, "gain_vs_base": 0.5, "gain_vs_base_ci": [0.0, 1.0],
                                 "gain_significant": False},
                      "generation": {"rougeL": 0.6, "rougeL_ci": [0.5, 0.7], "bleu": 30.0, "token_f1": 0.7},
                      "efficiency": {"trainable_parameters": 1000, "size_bytes": 2**20, "train_runtime_s": 12.0,
                                     "train_tokens_per_s": 100.0, "peak_memory_gb": 1.5},
                      "training": {"loss_curve": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]},
                      "samples": [{"question": "Q1?", "reference": "R1", "answer": "tuned says R1"}]},
            "ptuning": {"name": "ptuning", "status": "failed", "error": "training failed: boom"},
        }}


def full_report_results() -> dict:
    """report_results with every section a benchmark run adds: coverage, the majority baseline and each model's
    picks, lm-eval's figures with a forgetting task, and how the numbers were computed."""
    from medpeft.classification import majority, paired, picks
    from medpeft.evaluation import SCORING

    results = report_results()
    gold = ["A", "B"]
    results["coverage"] = {"line": "2 of 2 test items scored"}
    results["majority_baseline"] = majority(["A", "A", "B"], gold, ["A", "B"], "the training split") | {
        "names": {"A": "yes", "B": "no"}}
    for name, predicted in (("base", ["A", "A"]), ("qlora", ["A", "B"])):
        choice = results["models"][name]["choice"]
        choice["picks"] = {s: picks(predicted, gold, ["A", "B"]) for s in ("loglik", "letter")}
        hits = [float(p == g) for p, g in zip(predicted, gold)]
        vs = paired(hits, results["majority_baseline"]["hits"])
        choice |= {"gain_vs_majority": vs["gain"], "gain_vs_majority_ci": vs["ci"],
                   "gain_vs_majority_significant": vs["significant"]}
    results["scoring"] = SCORING
    task = {"acc": 0.5, "acc_stderr": 0.1, "items": 20}
    results["bench"] = {"lm_eval_version": "0.4.13", "limit": -1, "tasks": ["medqa_local"],
                        "general": ["general_local"], "models": {
                            "base": {"medqa_local": task, "general_local": task},
                            "qlora": {"medqa_local": task | {"acc": 0.6, "gain_vs_base": 0.1,
                                                             "gain_vs_base_ci": [0.0, 0.2], "significant": False},
                                      "general_local": task | {"acc": 0.45, "gain_vs_base": -0.05,
                                                               "gain_vs_base_ci": [-0.1, 0.0], "significant": False}}}}
    return results



def within(model, difference: float, float32: float, bfloat16: float, what: str) -> bool:
    """Whether `difference`, between two computations that round differently, is within the tolerance for the dtype
    `model` computes in (float32 on CPUs without native bf16, bfloat16 on those with it: medpeft.precision). Each
    call's two figures sit above the largest differences measured on both CPU kinds (docs/field-notes.md lists
    them); `MEDPEFT_TOLERANCE_LOG=FILE pytest ...` appends every difference checked, to measure them again."""
    import torch

    from medpeft.modeling import model_compute_dtype

    dtype = model_compute_dtype(model)
    if os.environ.get("MEDPEFT_TOLERANCE_LOG"):
        with open(os.environ["MEDPEFT_TOLERANCE_LOG"], "a", encoding="utf-8") as fh:
            fh.write(f"{what}\t{dtype}\t{difference:.3g}\n")
    return difference <= {torch.float32: float32, torch.bfloat16: bfloat16}[dtype]


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(tiny_model, processed, out, method, options, **overrides) -> str:
    """A few steps of one method on the tiny model: a real training output to load, score and serve."""
    from medpeft import methods
    from medpeft.config import TrainConfig
    from medpeft.training import train

    settings = dict(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=4, batch_size=8,
                    learning_rate=1e-2, logging_steps=1, max_eval_samples=8, seed=0)
    settings.update(overrides)
    train(method, TrainConfig(**settings), methods.get(method).Options(**options), log=lambda *a: None)
    return str(out)
