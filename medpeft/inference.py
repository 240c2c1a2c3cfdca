"""Answers from a base or tuned model: batch generation to a file, and an interactive chat.

    medpeft generate --adapter models/qlora --prompt "What causes scurvy?"
    medpeft generate --adapter models/adapter --input questions.jsonl --output answers.jsonl
    medpeft chat --adapter models/ptuning          # or --model smollm2-135m for the base model
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import DEFAULT_SYSTEM_PROMPT, opt
from .errors import UsageError
from .modeling import autocast, default_device, load_model, load_tokenizer, resolve_model
from .outputs import load_trained
from .precision import explain, resolve
from .readers import read_rows
from .scoring import generate_answers
from .tokens import render

NOTICE = ("medpeft chat: answers come from a language model and are NOT medical advice; they can be wrong. "
          "Ask a clinician. Type 'exit' or press Ctrl-D to leave.")


@dataclass
class GenerateConfig:
    adapter: Optional[str] = opt(None, "a medpeft training output (any method); omit to use --model alone")
    model: str = opt("smollm2-135m", "the base model, when no --adapter is given")
    prompt: Optional[str] = opt(None, "one question")
    input: Optional[str] = opt(None, "a JSONL/JSON/CSV file of questions (a 'question' column or field)")
    output: Optional[str] = opt(None, "where the answers go as JSONL (default: print them)")
    system_prompt: str = opt(DEFAULT_SYSTEM_PROMPT, "system prompt put before every question ('' for none)")
    max_new_tokens: int = opt(256, "longest answer, in tokens")
    batch_size: int = opt(8, "questions answered together")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code")
    dtype: str = opt("auto", "compute dtype (auto = bf16 on a GPU or on a CPU with native bf16, else float32)",
                     ["auto", "float32", "bfloat16"])

    def validate(self) -> list[str]:
        problems = []
        if self.max_new_tokens <= 0 or self.batch_size <= 0:
            problems.append("--max_new_tokens and --batch_size must be positive")
        return problems


def load_for_inference(cfg):
    """(model, tokenizer) of a training output or of a bare base model. The compute dtype's line goes to stderr:
    stdout carries the answers."""
    print(explain(cfg.dtype, default_device()), file=sys.stderr)
    if cfg.adapter:
        model, tokenizer, _ = load_trained(cfg.adapter, dtype=None if cfg.dtype == "auto" else cfg.dtype)
        return model, tokenizer
    resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
    model = load_model(resolved, device=default_device(), trust_remote_code=cfg.trust_remote_code,
                       dtype=resolve(cfg.dtype, default_device()))
    model.eval()
    return model, tokenizer


def _messages(system_prompt: str, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history


def read_questions(path: str) -> list[str]:
    try:
        rows, _ = read_rows(path)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--input_data", "--input")) from exc
    questions = []
    for i, row in enumerate(rows):
        lowered = {str(k).lower(): v for k, v in row.items()}
        q = lowered.get("question") or lowered.get("prompt") or lowered.get("input")
        if not isinstance(q, str) or not q.strip():
            raise UsageError(f"--input: row {i + 1} of '{path}' has no 'question' text; give each row a question")
        questions.append(q.strip())
    return questions


def generate(cfg, log=print) -> list[dict]:
    if bool(cfg.prompt) == bool(cfg.input):
        raise UsageError("give exactly one of --prompt \"...\" or --input FILE")
    questions = [cfg.prompt] if cfg.prompt else read_questions(cfg.input)
    model, tokenizer = load_for_inference(cfg)
    records = [{"messages": _messages(cfg.system_prompt, [{"role": "user", "content": q}, {"role": "assistant",
                                                                                          "content": ""}])}
               for q in questions]
    answers, timing = generate_answers(model, tokenizer, records, cfg.batch_size, cfg.max_new_tokens, "generate")
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)
        log(f"wrote {len(rows)} answers to {out} ({timing['latency_s_per_answer']:.2f} s per answer)")
    else:
        for r in rows:
            print(r["answer"] if cfg.prompt else json.dumps(r, ensure_ascii=False))
    return rows


def chat(cfg, stdin=None, stdout=None) -> None:
    """Read a question, stream the answer token by token, keep the conversation; 'exit' or EOF ends it."""
    import torch
    from transformers import TextIteratorStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_for_inference(cfg)
    device = next(model.parameters()).device
    print(NOTICE, file=stdout, flush=True)
    history: list[dict] = []
    while True:
        print("\nyou> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip().lower() in ("exit", "quit"):
            print("", file=stdout, flush=True)
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        text = render(tokenizer, _messages(cfg.system_prompt, history), add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work(enc=enc, streamer=streamer, failure=failure):
            try:
                with torch.no_grad(), autocast(model):
                    model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, streamer=streamer,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            except Exception as exc:  # noqa: BLE001 - reported in the main thread; the stream must still end
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work)
        thread.start()
        print("model> ", end="", file=stdout, flush=True)
        answer = []
        for piece in streamer:
            answer.append(piece)
            print(piece, end="", file=stdout, flush=True)
        thread.join()
        if failure:
            raise failure[0]
        print("", file=stdout, flush=True)
        history.append({"role": "assistant", "content": "".join(answer).strip()})
