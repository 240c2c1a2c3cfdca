"""Configuration: dataclasses with a help string per field, YAML files, flag overrides, validation.

Precedence, lowest first: dataclass default < method default < `--config FILE.yaml` < command-line flag.
Every value goes through `settle()`, whatever brought it (a flag, a YAML file, run_all's per-method sections): it is
converted to its field's type and checked against its choices; each dataclass's `validate()` and the rules between
sections follow, and every problem found is reported in one error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UsageError
from .modeling import DEFAULT_MODEL

DEFAULT_SYSTEM_PROMPT = ("You are a careful medical assistant. Answer the question accurately and concisely, "
                         "based on established medical knowledge.")


# Settings that change only where activations wait between forward and backward and which layers recompute them
# (the same function, rounding aside): they make neither a pipeline output stale nor a checkpoint another run's.
NOT_FINGERPRINTED = ("offload_checkpoints", "max_memory_gb", "cuda_graphs")
MIN_SWEEP_STEPS = 4  # fewer optimizer steps say little about a learning rate


def opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class PrepareConfig:
    input_data: Optional[str] = opt(None, "medical data: a CSV/TSV/JSON/JSONL/Parquet file, a folder of them, "
                                          "or a hub dataset id (online only)")
    output_dir: str = opt("processed_data", "where train.json, validation.json, test.json, metadata.json go")
    model_name: str = opt(DEFAULT_MODEL, "model whose tokenizer and chat template are used for length stats")
    max_length: int = opt(512, "maximum tokens per example (prompt + answer); longer answers are truncated")
    train_size: float = opt(0.8, "share of rows for training, in (0, 1); the rest is split into validation and test")
    validation_share: float = opt(0.5, "share of the non-training rows that goes to validation (rest: test)")
    seed: int = opt(42, "random seed of the split")
    group_by: Optional[str] = opt(None, "column whose groups stay inside one split (e.g. MedQuAD's 'focus')")
    schema: str = opt("auto", "input schema; auto detects it from the column names",
                      ["auto", "qa", "instruction", "prompt_response", "messages", "multiple_choice"])
    question_column: Optional[str] = opt(None, "column holding the question/prompt (overrides detection)")
    answer_column: Optional[str] = opt(None, "column holding the answer; for multiple choice the letter, "
                                             "index or option text")
    context_column: Optional[str] = opt(None, "column with extra context placed before the question")
    options_column: Optional[str] = opt(None, "column with the options of a multiple-choice item "
                                              "(list, dict letter->text, or JSON of either)")
    system_prompt: str = opt(DEFAULT_SYSTEM_PROMPT, "system prompt put before every question ('' for none)")
    max_rows: int = opt(-1, "read at most this many rows (-1 = all)")
    shorten_context: str = opt("middle", "a prompt too long for --max_length loses part of its context (the "
                                         "passage or abstract before the question), never its question, options "
                                         "or answer: middle = keep its start and end, end = keep its start, off = "
                                         "drop the row instead", ["middle", "end", "off"])
    allow_empty_splits: bool = opt(False, "prepare even when the validation or test split comes out empty "
                                          "(training data only), with a warning; otherwise that is an error")
    debug: int = opt(0, "print this many processed examples with their tokens coloured by label mask")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code")
    phi: str = opt("warn", "screen for likely patient identifiers (e-mail, phone, SSN, record number, date of birth, "
                           "date, street address): warn = count them per column, redact = replace them with "
                           "[TYPE] placeholders, off", ["warn", "redact", "off"])

    def validate(self) -> list[str]:
        problems = []
        if not self.input_data:
            problems.append("--input_data is required: a data file, a folder of them, or a hub dataset id")
        if not 0 < self.train_size < 1:
            problems.append(f"--train_size must be between 0 and 1 (exclusive), got {self.train_size}")
        if not 0 <= self.validation_share <= 1:
            problems.append(f"--validation_share must be between 0 and 1, got {self.validation_share}")
        if self.max_length < 16:
            problems.append(f"--max_length must be at least 16 tokens, got {self.max_length}")
        if self.max_rows == 0 or self.max_rows < -1:
            problems.append(f"--max_rows must be positive or -1 (all), got {self.max_rows}")
        return problems


@dataclass
class TrainConfig:
    model_name: str = opt(DEFAULT_MODEL, "base model: hub id, local directory, .gguf file, or 'smollm2-135m'")
    data_path: str = opt("processed_data", "directory written by prepare_dataset (train.json, validation.json)")
    output_dir: str = opt("models/run", "where the trained method, tokenizer, config and metrics.json go")
    num_epochs: float = opt(3.0, "passes over the training split (ignored when --max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run (-1 = as many as --num_epochs gives)")
    learning_rate: float = field(default=2e-4, metadata={
        "help": "peak learning rate, or auto: a short search over a log grid around the method's default (scaled "
                "for the model's size), each candidate scored on the validation split, then the run at the winner",
        "choices": None, "auto": True})
    sweep_steps: int = opt(0, "--learning_rate auto: optimizer steps each candidate trains (0 = a quarter of the "
                              "run, 4 to 100)")
    sweep_budget_s: float = opt(0.0, "--learning_rate auto: seconds the whole search may take (0 = no limit); each "
                                     "candidate gets its share and stops when it is spent")
    sweep_guard: bool = opt(True, "--learning_rate auto: when the search's winner is not the method's default, "
                                  "train the full run at the default too and keep whichever scores better on "
                                  "validation (a short candidate favours large steps)")
    select: str = opt("best", "what is saved: best = the checkpoint with the best validation score (multiple-choice "
                              "accuracy and macro-F1 where the data has options, answer loss otherwise), evaluated "
                              "every --eval_steps; last = the final step", ["best", "last"])
    early_stopping: int = opt(0, "stop after this many evaluations without a better validation score (0 = never)")
    balance: str = opt("off", "labels = oversample the training items of rarer labels until every label of "
                              "multiple-choice data is as frequent as the most frequent one", ["off", "labels"])
    batch_size: int = opt(8, "examples per device per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_length: int = opt(512, "truncate examples to this many tokens")
    warmup_ratio: float = opt(0.03, "share of steps with linear learning-rate warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradients' global norm to this before each step (0 = no clipping)")
    optim: str = opt("auto", "optimizer (auto = fused AdamW on a GPU, AdamW on a CPU; paged_adamw_8bit keeps its "
                             "state in 8 bits: a quarter of the optimizer memory, one kernel per tensor)",
                     ["auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"])
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", ["cosine", "linear", "constant_with_warmup"])
    eval_steps: int = opt(0, "evaluate on the validation split every N steps (0 = before and after, and for "
                             "--select best twice per epoch)")
    max_eval_samples: int = opt(256, "validation examples used for the loss (-1 = all)")
    logging_steps: int = opt(5, "log the training loss every N steps")
    seed: int = opt(42, "random seed (initialisation, data order, dropout)")
    group_by_length: bool = opt(True, "batch examples of similar length together (less padding)")
    load_in_4bit: bool = opt(False, "load the frozen base in 4-bit NF4 with double quantization (bitsandbytes)")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward to save memory "
                                             "(turned off for methods that do not support it)")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code")
    dtype: str = opt("auto", "compute dtype: of the base's weights, or of its 4-bit layers' arithmetic (auto = bf16 on "
                             "a GPU and on a CPU with native bf16, AVX512-BF16/AMX; float32 on other CPUs, where "
                             "bf16 is emulated ~30x slower)", ["auto", "float32", "bfloat16"])
    packing: str = opt("auto", "pack examples end to end into token-budget micro-batches with no attention across "
                               "them, no padding (auto = on CUDA)", ["auto", "on", "off"])
    tokens_per_batch: int = opt(0, "token budget of a packed micro-batch (0 = batch_size x max_length)")
    liger: str = opt("auto", "Liger Triton kernels: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE "
                             "(auto = on CUDA when liger-kernel is installed)", ["auto", "on", "off"])
    compile: str = opt("auto", "torch.compile each decoder layer: fused kernels, less Python per step; the first "
                               "steps pay for compilation, 1-2 minutes at 7B (auto = on one CUDA GPU for QLoRA/LoRA, "
                               "adapters and packed P-Tuning, not with --num_gpus; Liger then keeps only its fused "
                               "cross-entropy; never under --fsdp)",
                       ["auto", "on", "off"])
    save_steps: int = opt(100, "save a checkpoint (trainable weights, optimizer, scheduler, RNG, data position) "
                               "every N steps into OUTPUT_DIR.checkpoints; 0 = none")
    resume_from_checkpoint: str = opt("", "continue a killed run: 'auto' = the newest complete checkpoint of this "
                                          "--output_dir (fresh start when there is none), or a checkpoint folder")
    keep_checkpoints: bool = opt(False, "keep OUTPUT_DIR.checkpoints after the run succeeds (deleted by default)")
    auto_batch_size: bool = opt(False, "on out-of-memory, halve the micro-batch and double gradient accumulation "
                                       "until a step fits (the effective batch stays the same)")
    num_gpus: int = opt(1, "GPUs to train on: data-parallel processes through accelerate launch, one per GPU "
                           "(gradient_accumulation_steps is divided among them when it can be, keeping the "
                           "effective batch)")
    fsdp: bool = opt(False, "with --num_gpus N: shard the 4-bit base, LoRA weights, gradients and optimizer state "
                            "over the GPUs (FSDP, method qlora), for a base too large for one GPU; no checkpoints")
    report_to: str = opt("tensorboard", "training logs, comma-separated: tensorboard (event files in OUTPUT_DIR/logs, "
                                        "offline), wandb (when installed), or none")
    push_to_hub: str = opt("", "after saving, upload the output directory to this Hugging Face repository "
                               "(private; the token is read from HF_TOKEN only)")
    checkpoint_share: float = field(default=1.0, metadata={
        "help": "share of decoder layers whose activations are recomputed when gradient checkpointing is on (1 = "
                "all; less is faster, uses more memory), or auto: as many layers store theirs as fit under "
                "--max_memory_gb, measured on the first two steps (CUDA; on a CPU all recompute)",
        "choices": None, "auto": True})
    max_memory_gb: float = opt(0.0, "--checkpoint_share auto: GPU memory the run may take at its peak (0 = the "
                                    "GPU's total memory)")
    offload_checkpoints: str = opt("auto", "keep the inputs that checkpointed layers save for recomputation in "
                                           "pinned host memory until backward, copied out and back alongside the "
                                           "computation (1 GB at 4,096 tokens of a 7B model; auto = on a single "
                                           "GPU, off on a CPU and with several processes)", ["auto", "on", "off"])
    cuda_graphs: str = opt("auto", "replay each checkpointed decoder layer's forward and its recomputation with "
                                   "backward as CUDA graphs: one launch where there were hundreds, for hosts too "
                                   "slow to keep the GPU busy (on: one CUDA GPU, packed rows, gradient checkpointing, "
                                   "no dropout in the layers; about 1.2 GB more GPU memory at 7B; auto = off: no "
                                   "faster than compiled layers where measured, docs/performance.md)",
                           ["auto", "on", "off"])

    fp8: str = opt("off", "the frozen base's linear layers multiply in FP8 (e4m3, a scale per row) while training: "
                          "the FP8 tensor cores' rate, half the memory of a bf16 base (a 4-bit base stays 4-bit, its "
                          "dequantized weights rounded for each product); an approximation, opt-in (one CUDA GPU of "
                          "compute capability 8.9+; docs/performance.md)",
                   ["on", "off"])

    def validate(self) -> list[str]:
        problems = []
        if self.fp8 == "on" and (self.fsdp or self.num_gpus > 1):
            problems.append("--fp8 on: one process only (FSDP would shard the weights it converts; data parallel "
                            "was not tried with it); leave --fp8 off with --num_gpus or --fsdp")
        if self.checkpoint_share != "auto" and not 0 <= self.checkpoint_share <= 1:
            problems.append(f"--checkpoint_share must be in [0, 1], got {self.checkpoint_share}")
        reporters = [r.strip() for r in self.report_to.split(",") if r.strip()]
        unknown = sorted(set(reporters) - {"tensorboard", "wandb", "none"})
        if unknown or not reporters or ("none" in reporters and len(reporters) > 1):
            problems.append(f"--report_to must be tensorboard, wandb, both comma-separated, or none; got '{self.report_to}'")
        if self.push_to_hub and self.push_to_hub.count("/") > 1:
            problems.append(f"--push_to_hub must be a repository id like 'user/name', got '{self.push_to_hub}'")
        if self.num_gpus < 1:
            problems.append(f"--num_gpus must be 1 or more, got {self.num_gpus}")
        if self.offload_checkpoints == "on" and (self.num_gpus > 1 or self.fsdp):
            problems.append("--offload_checkpoints on: one process only (the reentrant checkpoint it needs was not "
                            "tried under data parallel or FSDP); leave it off with --num_gpus")
        if self.cuda_graphs == "on":
            needs = [(self.num_gpus > 1 or self.fsdp, "one process (not --num_gpus or --fsdp)"),
                     (self.packing == "off", "packed rows (not --packing off)"),
                     (not self.gradient_checkpointing, "--gradient_checkpointing (the graphs recompute as it does)"),
                     (self.checkpoint_share == "auto", "a fixed --checkpoint_share (auto changes which layers "
                                                       "recompute after the graphs are captured)")]
            problems += [f"--cuda_graphs on needs {what}" for bad, what in needs if bad]
        if self.max_memory_gb < 0:
            problems.append(f"--max_memory_gb must be 0 (the GPU's total memory) or positive, got {self.max_memory_gb}")
        if self.save_steps < 0:
            problems.append(f"--save_steps must be 0 or positive, got {self.save_steps}")
        if self.tokens_per_batch < 0:
            problems.append(f"--tokens_per_batch must be 0 or positive, got {self.tokens_per_batch}")
        for name in ("learning_rate", "batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) != "auto" and not getattr(self, name) > 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"--max_steps must be positive or -1, got {self.max_steps}")
        if self.max_steps == -1 and not self.num_epochs > 0:
            problems.append(f"--num_epochs must be positive, got {self.num_epochs}")
        if self.max_grad_norm < 0:
            problems.append(f"--max_grad_norm must be 0 (no clipping) or positive, got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_steps < 0:
            problems.append(f"--eval_steps must be 0 or positive, got {self.eval_steps}")
        if self.max_eval_samples == 0 or self.max_eval_samples < -1:
            problems.append(f"--max_eval_samples must be positive or -1, got {self.max_eval_samples}")
        if self.max_length < 16:
            problems.append(f"--max_length must be at least 16 tokens, got {self.max_length}")
        for name in ("sweep_steps", "sweep_budget_s", "early_stopping"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or positive, got {getattr(self, name)}")
        if self.learning_rate == "auto" and 0 < self.max_steps < 2 * MIN_SWEEP_STEPS:
            problems.append(f"--learning_rate auto needs a run of at least {2 * MIN_SWEEP_STEPS} steps (each "
                            f"candidate trains at least {MIN_SWEEP_STEPS}); --max_steps is {self.max_steps}: raise it "
                            "or give a --learning_rate")
        return problems


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _converter(tp, auto: bool = False):
    if auto:  # a number, or the word auto (the value is then found by a search)
        number = _converter(tp)
        return lambda v: "auto" if str(v).strip().lower() == "auto" else number(v)
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        convert = _converter(inner)
        return lambda v: None if v is None or str(v).lower() in ("none", "null") else convert(v)
    if tp is bool:
        def to_bool(v):
            if isinstance(v, bool):
                return v
            if str(v).lower() in ("1", "true", "yes", "on"):
                return True
            if str(v).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {v!r}")
        return to_bool
    if tp is float:
        def to_float(v):
            x = float(v)
            if not math.isfinite(x):
                raise ValueError(f"expected a finite number, got {v!r}")
            return x
        return to_float
    if tp is int:
        def to_int(v):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            return int(str(v))
        return to_int
    return str


def build_parser(prog: str, description: str, sections: list[type], defaults: dict | None = None,
                 exclude: tuple = ()):
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings; flags given here override it")
    defaults = defaults or {}
    seen = set(exclude)
    for section in sections:
        group = parser.add_argument_group(section.__name__)
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if f.name in seen:  # a field two sections share is one flag
                continue
            seen.add(f.name)
            default = defaults.get(f.name, f.default)
            help_text = f"{f.metadata['help']} (default: {default})"
            if hints[f.name] is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=_converter(hints[f.name], f.metadata.get("auto", False)),
                                   choices=f.metadata["choices"],
                                   help=help_text, metavar=f.name.upper())
    return parser


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config: '{path}' must hold a mapping of setting: value")
    return data


def config_file(argv) -> tuple[str | None, dict]:
    """The --config file named in argv and its settings (empty without one), read once."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], load_yaml(argv[i + 1])
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            return path, load_yaml(path)
    return None, {}


def settle(sections: list[type], values: dict, origins: dict | None = None, rules=None) -> tuple[list, list[str]]:
    """The one door every setting goes through, whatever brought it (a flag, a YAML file, a section of one): each
    value converted to its field's type and checked against its choices, one instance per section, then each
    section's validate() and the `rules` between them (a callable taking the instances, returning problems).
    `origins` names where a value came from, for the messages. Returns (instances, every problem found)."""
    known = {f.name: (s, f) for s in sections for f in dataclasses.fields(s)}
    origins = origins or {}
    problems, typed = [], {}
    for key, value in values.items():
        where = f"{origins[key]}: " if origins.get(key) else ""
        if key not in known:
            problems.append(f"{where}unknown setting '{key}' (known: {', '.join(sorted(known))})")
            continue
        section, f = known[key]
        try:
            typed[key] = _converter(typing.get_type_hints(section)[key], f.metadata.get("auto", False))(value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}{key}: {exc}")
            continue
        if f.metadata["choices"] and typed[key] not in f.metadata["choices"]:
            problems.append(f"{where}{key} must be one of {f.metadata['choices']}, got {value!r}")
    instances = []
    for section in sections:
        names = {f.name for f in dataclasses.fields(section)}
        instances.append(section(**{k: v for k, v in typed.items() if k in names}))
    if not problems:
        for inst in instances:
            problems.extend(inst.validate())
        if not problems and rules is not None:
            problems.extend(rules(*instances))
    return instances, problems


def given_values(argv, prog: str, description: str, sections: list[type], defaults: dict | None = None,
                 nested: tuple = (), exclude: tuple = (), loaded: dict | None = None) -> tuple[dict, dict, dict]:
    """(the settings given explicitly, where each came from, the --config file's nested sections by name).
    Lowest first: the file's top level, then flags. Flags arrive typed, file values as written: `settle`
    converts both. `loaded`: the --config file's settings when the caller has read them already."""
    parser = build_parser(prog, description, sections, defaults, exclude)
    flags = vars(parser.parse_args(argv))
    path = flags.pop("config", None)
    data = (loaded if loaded is not None else load_yaml(path)) if path else {}
    found = {k: v for k, v in data.items() if k in nested and isinstance(v, dict)}
    top = {k: v for k, v in data.items() if k != "method" and k not in found}
    origins = {k: path for k in top if k not in flags}
    return {**top, **flags}, origins, {k: (v, f"{path}: {k}") for k, v in found.items()}


def raise_problems(prog: str, problems: list[str]) -> None:
    if problems:
        head = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise UsageError(f"{prog}: {head}" + "; ".join(problems))


def parse(argv, prog: str, description: str, sections: list[type], defaults: dict | None = None,
          nested: tuple = (), rules=None, exclude: tuple = (), loaded: dict | None = None) -> list:
    """Parse flags (+ optional YAML) into one instance per section; raise one UsageError listing every problem.
    Precedence, lowest first: the dataclass default < `defaults` < the --config file < a flag.

    `nested` names YAML keys that hold a mapping for someone else (run_all's per-method sections)."""
    given, origins, _ = given_values(argv, prog, description, sections, defaults, nested, exclude, loaded)
    instances, problems = settle(sections, {**(defaults or {}), **given}, origins, rules)
    raise_problems(prog, problems)
    return instances


def as_dict(*instances) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for inst in instances:
        out.update(dataclasses.asdict(inst))
    return out


MORE_MODELS_HELP = ("more trained outputs of any method, compared beside the others: NAME=DIR separated by ';' "
                    "(e.g. qlora-dora=models/qlora-dora)")


def more_models(text: str) -> list[tuple[str, str]]:
    """--more_models 'a=dir1;b=dir2' -> [('a', 'dir1'), ('b', 'dir2')]."""
    return [tuple(p.strip() for p in item.split("=", 1)) for item in text.split(";") if item.strip()]


def more_models_problems(text: str) -> list[str]:
    pairs = more_models(text)
    bad = [" = ".join(p) for p in pairs if len(p) != 2 or not all(p) or p[0] in ("base", "qlora", "adapter", "ptuning")]
    names = [p[0] for p in pairs]
    return ([f"--more_models: '{b}' is not NAME=DIR with a new name (not base, qlora, adapter, ptuning)" for b in bad]
            + ([f"--more_models: a name appears twice in {names}"] if len(set(names)) != len(names) else []))


@dataclass
class ComparedModels:
    """The models an evaluation compares (evaluate and bench): the base and the trained outputs."""
    base_model: str = opt(DEFAULT_MODEL, "the base model every trained output is compared with")
    qlora_model: Optional[str] = opt(None, "output directory of qlora/train_qlora.py")
    adapter_model: Optional[str] = opt(None, "output directory of adapter_tuning/train_adapter.py")
    ptuning_model: Optional[str] = opt(None, "output directory of p_tuning/train_ptuning.py")
    more_models: str = opt("", MORE_MODELS_HELP)
    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code")
    dtype: str = opt("auto", "compute dtype of every model (auto = bf16 on a GPU and on a CPU with native bf16, "
                             "float32 on other CPUs; tuned models as trained)", ["auto", "float32", "bfloat16"])

    def validate(self) -> list[str]:
        return more_models_problems(self.more_models)


@dataclass
class EvalConfig(ComparedModels):
    test_data: str = opt("processed_data/test.json", "test split written by prepare_dataset")
    output_file: str = opt("evaluation_results.json", "results JSON; report.md and report.html go beside it")
    max_samples: int = opt(200, "test items evaluated, drawn with --seed (-1 = all)")
    batch_size: int = opt(8, "sequences per forward pass / generation batch")
    max_new_tokens: int = opt(128, "longest generated answer, in tokens")
    max_length: int = opt(512, "truncate test examples to this many tokens for the loss")
    num_samples_shown: int = opt(5, "test questions shown with every model's answer in the report")
    seed: int = opt(42, "seed for the test subset and the bootstrap intervals")

    def validate(self) -> list[str]:
        problems = []
        for name in ("batch_size", "max_new_tokens", "max_length"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_samples == 0 or self.max_samples < -1:
            problems.append(f"--max_samples must be positive or -1 (all), got {self.max_samples}")
        return problems + super().validate()


@dataclass
class BenchConfig(ComparedModels):
    tasks: str = opt("medical", "lm-eval tasks or groups, comma-separated: medical (the Open Medical-LLM "
                                "Leaderboard's: pubmedqa, medqa_4options, medmcqa, six MMLU subjects), medical_local "
                                "(medqa_local, medmcqa_local, pubmedqa_local: files in --data_dir), or task names")
    general_tasks: str = opt("", "general tasks for the forgetting check, shown apart: general (arc_easy and two "
                                 "non-medical MMLU subjects), general_local (general_test.jsonl in --data_dir)")
    tasks_dir: Optional[str] = opt(None, "a folder of your own lm-eval task YAML files")
    data_dir: Optional[str] = opt(None, "folder holding the local tasks' files (medqa_test.jsonl, "
                                        "medmcqa_test.jsonl, pubmedqa_test.jsonl, general_test.jsonl)")
    limit: int = opt(-1, "items per task (-1 = all)")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int = opt(2048, "longest prompt + answer in tokens; longer ones lose their start (lm-eval's way)")
    output_file: str = opt("evaluation_results.json", "results JSON (a 'bench' section is added to an existing one); "
                                                      "report.md and report.html go beside it")
    seed: int = opt(42, "seed of lm-eval and of the paired bootstrap")

    def validate(self) -> list[str]:
        problems = [f"--{n} must be positive, got {getattr(self, n)}" for n in ("batch_size", "max_length")
                    if getattr(self, n) <= 0]
        if self.limit == 0 or self.limit < -1:
            problems.append(f"--limit must be positive or -1 (all), got {self.limit}")
        for flag in ("tasks_dir", "data_dir"):
            if getattr(self, flag) and not Path(getattr(self, flag)).is_dir():
                problems.append(f"--{flag}: '{getattr(self, flag)}' is not a folder")
        return problems + super().validate()
