"""Using trained outputs: merge, model cards, batch generation, chat in a pseudo-terminal, recommendations."""

import json
import sys
from pathlib import Path

import pytest
import torch

from medpeft.cli import run

from conftest import train_tiny as _train, within
from medpeft.modeling import autocast
from medpeft.outputs import load_trained

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def outputs(tiny_model, processed, tmp_path_factory):
    root = tmp_path_factory.mktemp("using")
    return {
        "qlora": _train(tiny_model, processed, root / "qlora", "qlora", dict(lora_r=4, lora_alpha=8),
                        load_in_4bit=True),
        "lora": _train(tiny_model, processed, root / "lora", "qlora", dict(lora_r=4, lora_alpha=8)),
        "dora": _train(tiny_model, processed, root / "dora", "qlora", dict(lora_r=4, lora_alpha=8, use_dora=True),
                       load_in_4bit=True),
        "rslora": _train(tiny_model, processed, root / "rslora", "qlora", dict(lora_r=4, lora_alpha=8, use_rslora=True)),
        "adapter": _train(tiny_model, processed, root / "adapter", "adapter", dict(adapter_size=8)),
        "ptuning": _train(tiny_model, processed, root / "ptuning", "ptuning", dict(num_virtual_tokens=4)),
    }


@pytest.mark.parametrize("name", ["lora", "qlora", "dora", "rslora"])
def test_merge_gives_a_plain_model_with_the_adapters_logits(outputs, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medpeft.modeling import autocast
    from medpeft.outputs import load_trained

    out = tmp_path / "merged"
    assert run(["merge", "--adapter", outputs[name], "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft, no quantization
    assert not hasattr(merged, "peft_config") and getattr(merged.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("What causes scurvy?", return_tensors="pt")["input_ids"]
    model, _, _ = load_trained(outputs[name])
    with torch.no_grad(), autocast(model):
        expected = model(input_ids=ids).logits.float()
    with torch.no_grad(), autocast(merged):
        got = merged(input_ids=ids).logits.float()
    span = float(expected.max() - expected.min())
    # float32: exact to float error; bf16: the merged weights are rounded to bf16 once more
    assert within(model, float((got - expected).abs().max()) / span, float32=1e-4, bfloat16=0.05,
                  what=f"merge {name}: max |logit difference| / logit span")
    card = (out / "README.md").read_text()
    assert "Merge check" in card and "Not medical advice" in card


@pytest.mark.parametrize("name", ["adapter", "ptuning"])
def test_merge_refuses_methods_that_cannot_be_merged(outputs, tmp_path, capsys, name):
    code = run(["merge", "--adapter", outputs[name], "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be merged" in err and "medpeft generate --adapter" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_every_output_has_a_model_card(outputs, tiny_model):
    for path in outputs.values():
        card = (Path(path) / "README.md").read_text()
        assert "Not medical advice" in card and tiny_model in card
        assert "validation loss" in card and "## Intended use and limits" in card and "sha256" in card
        assert card.startswith("---\nbase_model: ") and "training logs: `logs/`" in card
        assert any(f.name.startswith("events.out.tfevents") for f in (Path(path) / "logs").iterdir())


def test_generate_answers_every_question_of_a_file(outputs, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("What causes scurvy?", "How does "
                                                                                "warfarin work?", "Hi")))
    for name in ("adapter", "ptuning"):
        answers = tmp_path / f"{name}.jsonl"
        assert run(["generate", "--adapter", outputs[name], "--input", str(questions), "--output", str(answers),
                    "--max_new_tokens", "6"]) == 0
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
        assert [r["question"] for r in rows] == ["What causes scurvy?", "How does warfarin work?", "Hi"]
        assert all(isinstance(r["answer"], str) for r in rows)


def test_generate_needs_one_source_of_questions(outputs, capsys):
    assert run(["generate", "--adapter", outputs["lora"]]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err


def test_chat_in_a_pseudo_terminal(outputs, tmp_path):
    import pexpect  # installed by the test set-up (make test)

    child = pexpect.spawn(sys.executable, ["-m", "medpeft.cli", "chat", "--adapter", outputs["lora"],
                                           "--max_new_tokens", "8"], cwd=str(ROOT), encoding="utf-8", timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    transcript_path = ROOT / "build" / "test-artifacts" / "chat_transcript.txt"  # kept for reading
    transcript_path.parent.mkdir(parents=True, exist_ok=True)
    child.logfile_read = open(transcript_path, "w")
    child.expect("NOT medical advice")
    child.expect("you> ")
    child.sendline("What causes scurvy?")
    child.expect("model> ")
    child.expect("you> ")  # the streamed answer came, and the conversation goes on
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child.logfile_read.close()
    transcript = transcript_path.read_text()
    assert "What causes scurvy?" in transcript and transcript.count("model> ") == 1


def test_recommend_ranks_methods_within_a_memory_budget(tmp_path, capsys):
    def entry(acc, mem, secs):
        return {"status": "ok", "choice": {"accuracy_loglik": acc},
                "efficiency": {"peak_memory_gb": mem, "train_runtime_s": secs, "size_bytes": 1e6}}

    results = {"models": {"base": {"status": "ok", "choice": {"accuracy_loglik": 0.2}},
                          "qlora": entry(0.6, 5.0, 100), "adapter": entry(0.7, 9.0, 80),
                          "ptuning": entry(0.4, 8.0, 120)}}
    results["models"]["qlora"]["training"] = {  # ranked as selected: the searched rate and the step kept say so
        "learning_rate_search": {"winner": 2e-3, "seconds": 41.6},
        "selection": {"chosen_step": 9, "last_step": 18, "select": "best"}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert run(["recommend", "--results", str(path), "--memory_gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "recommended: qlora" in out  # the adapter is better but needs 9 GB
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert "| 1 | qlora |" in lines[1] and "| - | adapter |" in out
    assert lines[1].endswith("| lr 0.002 searched (42 s); step 9 of 18 (best) |")
    assert lines[2].endswith("| as given, last step |")
    assert run(["recommend", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recommended: adapter" in out
    pareto = {line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ")
              and line.split("|")[8].strip() == "yes"}
    assert pareto == {"adapter", "qlora"}  # P-Tuning is worse, bigger and slower than qlora
    assert run(["recommend", "--results", str(tmp_path / "missing.json")]) == 2


def test_lora_output_is_a_standard_peft_adapter(outputs):
    from safetensors import safe_open

    for name in ("qlora", "lora"):
        out = Path(outputs[name])
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
        assert {t.split(".")[-1] for t in config["target_modules"]} >= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"}
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        # the key layout serving engines (vLLM, TGI) read: base_model.model.<module path>.lora_{A,B}.weight
        assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                            for k in keys)


@pytest.mark.parametrize("name", ["qlora", "lora", "adapter", "ptuning"])
def test_option_scores_with_a_shared_prompt_cache_equal_scoring_each_option_alone(outputs, processed, name):
    """score_options runs each prompt once and continues every option from its cache; scoring each option
    with the whole prompt in its own forward pass gives the same numbers."""
    from medpeft.data import load_split
    from medpeft.scoring import _prompt, score_options
    from medpeft.modeling import autocast
    from medpeft.outputs import load_trained

    model, tok, _ = load_trained(outputs[name], device="cpu")
    records = [r for r in load_split(processed, "test") if r["options"]][:6]
    assert len(records) == 6
    fast = score_options(model, tok, records, batch_size=4)  # two batches, of 4 and 2 records
    with torch.no_grad(), autocast(model):
        for record, scores in zip(records, fast):
            prompt = _prompt(tok, record)
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            for letter, text in record["options"].items():
                ids = tok(prompt + text, add_special_tokens=False)["input_ids"]
                start = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
                logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]
                logprobs = torch.log_softmax(logits[start - 1:-1].float(), dim=-1)
                alone = float(logprobs.gather(-1, torch.tensor(ids[start:])[:, None]).mean())
                # other shapes, other rounding: bf16 matmuls of a batch and of one sequence differ
                assert within(model, abs(scores[letter] - alone), float32=1e-4, bfloat16=1e-2,
                              what=f"option scores {name}: |cached - alone|"), (letter, scores[letter], alone)


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_evaluated_merged_on_the_cpu_scores_as_trained(outputs, processed, name):
    """The CPU evaluation folds LoRA into the (dequantized) base for speed: the answer loss barely moves."""
    from types import SimpleNamespace

    from medpeft.data import load_split
    from medpeft.evaluation import _merge_for_evaluation
    from medpeft.scoring import answer_loss
    from medpeft.tokens import answer_examples
    from medpeft.outputs import load_trained

    model, tok, _ = load_trained(outputs[name], device="cpu", dequantize=True)
    records = load_split(processed, "test")[:24]
    examples = answer_examples(tok, records, 256)
    as_trained = answer_loss(model, examples, tok.pad_token_id, 8)["loss"]
    merged, speed = _merge_for_evaluation(model, tok, records, SimpleNamespace(batch_size=8, max_new_tokens=3, max_length=256))
    assert not hasattr(merged, "peft_config") and speed["unmerged_latency_s_per_answer"] > 0
    change = abs(answer_loss(merged, examples, tok.pad_token_id, 8)["loss"] - as_trained) / as_trained
    assert within(model, change, float32=1e-5, bfloat16=2e-3, what=f"merged evaluation {name}: relative loss change")


def test_evaluation_refuses_an_output_of_another_method_or_base(outputs, processed, tmp_path, capsys, tiny_model):
    from transformers import AutoConfig

    argv = ["evaluate", "--base_model", tiny_model, "--test_data", f"{processed}/test.json",
            "--output_file", str(tmp_path / "r.json")]
    assert run([*argv, "--qlora_model", outputs["adapter"]]) == 2
    assert "holds the output of adapter, not qlora; pass it as --adapter_model" in capsys.readouterr().err
    other = tmp_path / "other-base"
    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_size, config.num_attention_heads = 32, 2
    config.save_pretrained(other)
    argv[2] = str(other)
    assert run([*argv, "--adapter_model", outputs["adapter"]]) == 2
    err = capsys.readouterr().err
    assert "was trained on base model" in err and "(hidden_size 64 vs 32, num_attention_heads 4 vs 2)" in err, err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("name", ["base", "qlora", "lora", "adapter", "ptuning"])
def test_one_pass_evaluation_equals_separate_loss_and_generation(outputs, processed, tiny_model, name):
    """score_and_generate runs each prompt once, then continues the answer (loss), the options and greedy decoding
    from its cache: the same loss as a full teacher-forced pass, and the same answers as generating each question
    alone. float32 on either CPU kind: this checks the cache and positions, not the rounding of bf16."""
    from medpeft.data import load_split
    from medpeft.scoring import answer_loss, generate_answers, loss_summary, score_and_generate
    from medpeft.tokens import answer_examples
    from medpeft.modeling import load_model, load_tokenizer
    from medpeft.outputs import load_trained

    if name == "base":
        model, tok = load_model(tiny_model, device="cpu", dtype=torch.float32).eval(), load_tokenizer(tiny_model)
    else:
        model, tok, _ = load_trained(outputs[name], device="cpu", dtype="float32")
    records = load_split(processed, "test")
    records = [r for r in records if r["options"]][:3] + [r for r in records if not r["options"]][:4]
    found = score_and_generate(model, tok, records, batch_size=3, max_new_tokens=5, max_length=256)
    separate = answer_loss(model, answer_examples(tok, records, 256), tok.pad_token_id, batch_size=1)
    together = loss_summary([n for n in found["nll"] if n is not None], [t for t in found["tokens"] if t])
    assert together["tokens"] == separate["tokens"] and together["examples"] == separate["examples"] == 7
    assert abs(together["loss"] - separate["loss"]) < 1e-4, (together, separate)
    alone = [generate_answers(model, tok, [r], batch_size=1, max_new_tokens=5)[0][0] for r in records]
    assert found["answers"] == alone
    assert [sorted(o) if o else None for o in found["options"]] == [sorted(r["options"]) if r["options"] else None
                                                                   for r in records]
    assert found["timing"]["generated_tokens"] > 0 and found["timing"]["latency_s_per_answer"] > 0


@pytest.mark.parametrize("name", ["lora", "ptuning"])
def test_one_pass_evaluation_does_not_depend_on_where_the_shared_prompt_ends(outputs, processed, name, monkeypatch):
    """When an option merges with the prompt's last token, the shared prefix ends earlier and the rest of the prompt
    is continued before decoding: the prefix shortened by hand for some records changes no result."""
    from medpeft import scoring
    from medpeft.data import load_split
    from medpeft.outputs import load_trained

    model, tok, _ = load_trained(outputs[name], device="cpu", dtype="float32")
    records = load_split(processed, "test")
    records = [r for r in records if r["options"]][:3] + [r for r in records if not r["options"]][:3]
    expected = scoring.score_and_generate(model, tok, records, batch_size=3, max_new_tokens=5, max_length=256)
    items = scoring._items

    def shorter(tokenizer, recs, max_length):
        out = items(tokenizer, recs, max_length)
        for n, it in enumerate(out):
            cut = n % 3  # 0, 1 or 2 tokens moved from the shared prefix into every continuation
            if not cut:
                continue
            moved = it.prefix[-cut:]
            it.prefix, it.generation_tail = it.prefix[:-cut], moved + it.generation_tail
            it.answer_tail, it.answer_scored = moved + it.answer_tail, [False] * cut + it.answer_scored
            it.options = [(letter, moved + tail, start + cut) for letter, tail, start in it.options]
        return out

    monkeypatch.setattr(scoring, "_items", shorter)
    got = scoring.score_and_generate(model, tok, records, batch_size=3, max_new_tokens=5, max_length=256)
    assert got["answers"] == expected["answers"] and got["tokens"] == expected["tokens"]
    for a, b in zip(got["nll"], expected["nll"]):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))
    for a, b in zip(got["options"], expected["options"]):
        assert (a is None) == (b is None) and all(abs(a[k] - b[k]) < 1e-4 for k in (b or {}))


def python_blocks(markdown: str) -> list[str]:
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


@pytest.mark.parametrize("name", ["qlora", "lora", "adapter", "ptuning"])
def test_the_model_cards_loading_snippet_runs_as_written(outputs, name):
    """A card's "Loading" snippet, run as it stands: the model it loads gives medpeft's own logits (16-bit bases;
    a QLoRA adapter loads onto the 16-bit base, as serving engines do)."""
    (snippet,) = python_blocks((Path(outputs[name]) / "README.md").read_text())
    assert outputs[name] in snippet  # its own folder, not a placeholder
    scope: dict = {}
    exec(compile(snippet, f"{name}/README.md", "exec"), scope)
    model = scope["model"].eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), autocast(model):
        got = model(input_ids=ids).logits.float()
    assert torch.isfinite(got).all()
    if name != "qlora":
        expected_model, _, _ = load_trained(outputs[name], device="cpu", dtype="float32")
        with torch.no_grad():
            expected = expected_model(input_ids=ids).logits.float()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_readmes_loading_snippet_runs_as_written(outputs, tiny_model, tmp_path, monkeypatch):
    (snippet,) = [b for b in python_blocks((ROOT / "README.md").read_text()) if "PeftModel" in b]
    merged = tmp_path / "merged"
    assert run(["merge", "--adapter", outputs["qlora"], "--output", str(merged)]) == 0
    for placeholder, path in (('"mistralai/Mistral-7B-Instruct-v0.2"', tiny_model), ('"merged/"', str(merged)),
                              ('"models/qlora"', outputs["qlora"]), ('"models/ptuning"', outputs["ptuning"]),
                              ('"models/adapter"', outputs["adapter"])):
        assert placeholder in snippet
        snippet = snippet.replace(placeholder, repr(path))
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    ids = torch.tensor([[5, 6, 7, 8]])
    for name in ("qlora", "ptuning", "adapter", "merged"):
        with torch.no_grad(), autocast(scope[name]):
            assert torch.isfinite(scope[name].eval()(input_ids=ids).logits).all(), name
    assert scope["adapter"].active_adapters is not None and hasattr(scope["qlora"], "peft_config")
