"""The peer a user would pick instead: Unsloth's QLoRA on the same random Mistral-7B checkpoint and MedQuAD lengths
as benchmarks/gpu_throughput.py, in the same call as ours and the plain recipe (the numbers come from one host).

Unsloth pins trl <= 1.15 and datasets < 5, so it runs in a site folder of its own (benchmarks/unsloth_wheels.sh):

    python3 -m pip install -q --no-index --no-deps --target /tmp/us .whl/transformers*.whl .whl/tokenizers*.whl \
        .whl/huggingface_hub*.whl .whl/peft*.whl .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl \
        .whl-unsloth/*.whl      # not all of .whl: its trl 1.16 and datasets 5 would shadow Unsloth's pins
    PYTHONPATH=/tmp/us python3 benchmarks/unsloth_peer.py --steps 20

What it runs is Unsloth's documented recipe: FastLanguageModel.from_pretrained(load_in_4bit=True), get_peft_model
with r 16, alpha 32, no dropout, all seven projections, use_gradient_checkpointing="unsloth", then a hand loop
(AdamW, lr 2e-4) over batches of --batch_size examples grouped by length and padded to the batch's longest, the
prompt and the padding masked out of the loss. Useful tokens/s counts example tokens only, as gpu_throughput does.
The random checkpoint has no tokenizer; a word-level one over its 32,000 ids is written beside it (the ids are
random anyway). Writes $OUT/unsloth_peer.json (or benchmarks/results/unsloth_peer.json), after each stage, so a
run that fails says where.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine reaches no hub; Unsloth would wait on it
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # its usage statistics download from the hub

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # medpeft (its CPU name only) and gpu_throughput
CK = "/tmp/mistral7b-random"


def word_tokenizer(vocab=32000):
    """A PreTrainedTokenizerFast over ids 0..vocab-1 (<unk>, <s>, </s> first, as Mistral's), for a checkpoint
    saved without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", model_max_length=32768)


def length_grouped_batches(examples, batch_size, seed):
    """Batches of `batch_size` examples of similar length (sorted within pools of 16 batches, then the batches
    shuffled): what the Trainer's group_by_length does."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = 16 * batch_size
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i:i + pool], key=lambda j: -len(examples[j]["input_ids"]))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def collate(examples, idx, pad_id=0):
    import torch

    width = max(len(examples[j]["input_ids"]) for j in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, j in enumerate(idx):
        n = len(examples[j]["input_ids"])
        ids[row, :n] = torch.tensor(examples[j]["input_ids"])
        labels[row, :n] = torch.tensor(examples[j]["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps timed, after --warmup")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the rate (kernel compilation)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="examples a step (16 x MedQuAD's mean 264 tokens ~ ours' 4,096-token rows)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from gpu_throughput import synthetic_examples
    from medpeft.precision import cpu_name

    out = Path(os.environ.get("OUT") or HERE / "results") / "unsloth_peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join(["python3", *sys.argv]), "host_cpu": cpu_name(), "stage": "import"}

    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    save()
    try:
        import unsloth  # first: it patches transformers, peft and trl as it loads
        from unsloth import FastLanguageModel
        import torch
        import transformers

        result["versions"] = {"unsloth": unsloth.__version__, "torch": torch.__version__,
                              "transformers": transformers.__version__}
        result["device"] = torch.cuda.get_device_name(0)
        result["stage"] = "checkpoint"
        save()
        if not Path(CK, "config.json").is_file():
            import naive_baseline

            naive_baseline.build_checkpoint()
        if not Path(CK, "tokenizer_config.json").is_file():
            word_tokenizer().save_pretrained(CK)
        result["stage"] = "load"
        save()
        t = time.time()
        model, _ = FastLanguageModel.from_pretrained(CK, max_seq_length=args.max_length, dtype=torch.bfloat16,
                                                     load_in_4bit=True, fix_tokenizer=False)
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            random_state=args.seed)
        result["load_s"] = round(time.time() - t, 1)
        result["weights_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        result["stage"] = "train"
        save()
        n = (args.steps + args.warmup) * args.batch_size * 2
        examples = synthetic_examples(n, args.seed)
        for e in examples:  # gpu_throughput's lengths are cut at 512 already; kept for another --max_length
            e["input_ids"], e["labels"] = e["input_ids"][:args.max_length], e["labels"][:args.max_length]
        batches = length_grouped_batches(examples, args.batch_size, args.seed)[:args.steps + args.warmup]
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4, fused=True)
        torch.cuda.reset_peak_memory_stats()
        times, useful, padded, losses = [], [], [], []
        for idx in batches:
            ids, labels, mask = (x.cuda(non_blocking=True) for x in collate(examples, idx))
            torch.cuda.synchronize()
            t0 = time.time()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.time() - t0)
            useful.append(int(mask.sum()))
            padded.append(mask.numel())
            losses.append(round(loss.item(), 4))
        steady = slice(args.warmup, None)
        seconds = sum(times[steady])
        result.update(stage="done", steps=len(times[steady]), batch_size=args.batch_size,
                      useful_tokens_per_s=round(sum(useful[steady]) / seconds),
                      padded_tokens_per_s=round(sum(padded[steady]) / seconds),
                      step_s=round(seconds / len(times[steady]), 4),
                      peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      step_seconds=[round(x, 4) for x in times], losses=losses)
    except BaseException as exc:  # the file says which stage failed and why; the call's other results stand
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        result["traceback"] = traceback.format_exc()[-4000:]
    save()
    print("unsloth", json.dumps({k: v for k, v in result.items() if k not in ("traceback", "step_seconds")}),
          flush=True)
    return 0 if result["stage"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
