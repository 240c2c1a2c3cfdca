"""GPU training throughput at Mistral-7B scale: the plain recipe and medpeft's training path, side by side.

    python benchmarks/gpu_throughput.py                        # plain recipe + ours, every method, + check
    python benchmarks/gpu_throughput.py --skip_plain --methods qlora --steps 30
    LAYERS=4 python benchmarks/gpu_throughput.py --steps 6     # a quick smoke run on fewer layers

Mistral-7B shapes with random weights (speed and memory do not depend on the values), built once into
/tmp/mistral7b-random. Example lengths are drawn from MedQuAD's (benchmarks/medquad_lengths.json: token
count and prompt length of each training example, SmolLM2 tokenizer, chat template, cut at 512), token ids
are random. Ours runs `medpeft.training` itself (Trainer, packing, Liger, checkpointing policy), the plain
recipe is benchmarks/naive_baseline.py (padded 8 x 512 batches, hand loop).

Useful tokens/s counts example tokens only; the plain recipe's useful rate is its padded rate times the
padding efficiency of these lengths at 512. MFU counts the model FLOPs actually executed per token:
2N forward + 2N input-gradient backward + 2N recomputation for checkpointed layers (frozen base: no weight
gradients), N = parameter count, against the measured bf16 matrix rate of the card (--peak_tflops).
Writes benchmarks/results/gpu_throughput.json (or $OUT/gpu_throughput.json when OUT is set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Ours, per method: (medpeft method, method options, training overrides)
OURS = {
    "qlora": ("qlora", dict(lora_r=16, lora_alpha=32, lora_dropout=0.0), dict(load_in_4bit=True)),
    "lora": ("qlora", dict(lora_r=16, lora_alpha=32, lora_dropout=0.0), dict(load_in_4bit=False)),
    "adapter": ("adapter", dict(adapter_size=64), dict()),
    "ptuning": ("ptuning", dict(num_virtual_tokens=20), dict()),
}
PLAIN = {"qlora": "qlora_gc", "lora": "lora_gc", "adapter": "adapter_gc", "ptuning": "ptuning_nogc"}


def lengths_table():
    data = json.loads((HERE / "medquad_lengths.json").read_text())
    return data["examples"]  # [[tokens, prompt tokens], ...]


def synthetic_examples(n, seed, vocab=32000):
    import torch

    table = lengths_table()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        total, prompt = rng.choice(table)
        ids = torch.randint(100, vocab, (total,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def padding_efficiency(max_length=512):
    table = lengths_table()
    return sum(min(t, max_length) for t, _ in table) / (max_length * len(table))


class _Tok:  # what the training path needs of a tokenizer when the data is already token ids
    pad_token_id = 0
    eos_token_id = 2


def run_ours(name, ckpt, steps, tokens_per_batch, overrides, seed=0, examples=None, log=print,
             padded_groups=False):
    """One training run through medpeft.training. `padded_groups`: the same micro-batches as packing makes,
    padded instead, with plain SDPA attention (the correctness check's reference)."""
    import torch

    from medpeft.tokens import PadCollator
    from medpeft.training import TrainingRun

    if padded_groups:
        original = TrainingRun._batches

        class FlatPad(PadCollator):
            def __call__(self, groups):
                return super().__call__([e for g in groups for e in g])

        def padded(self, undo):
            import contextlib

            # what packing changed in the model is undone at once: the model's own attention (and P-Tuning's
            # own forward) and plain checkpointing again
            with contextlib.ExitStack() as packing_changes:
                data, _, batch_size, speed = original(self, packing_changes)
            speed.pop("offloaded_checkpoints", None)
            return data, FlatPad(0), batch_size, dict(speed, packing=False, padded_groups=True)

        TrainingRun._batches = padded

    from medpeft import methods
    from medpeft.config import TrainConfig
    from medpeft.training import build

    if os.environ.get("BENCH_PROFILE"):
        profile_steps(name, overrides, *map(int, os.environ["BENCH_PROFILE"].split(":")))
    if os.environ.get("BENCH_DDP"):
        ddp_options(json.loads(os.environ["BENCH_DDP"]))
    if os.environ.get("BENCH_AUTO_GC"):  # an A/B of medpeft.training.trainer.scheduled_gc: Python's collector left on
        import contextlib

        import medpeft.training.run

        medpeft.training.run.scheduled_gc = contextlib.nullcontext
    method, options, base = OURS[name]
    settings = dict(model_name=ckpt, data_path="-", output_dir=tempfile.mkdtemp(prefix="bench-") + "/out",
                    max_steps=steps, batch_size=8, max_length=512, learning_rate=2e-4, logging_steps=1,
                    max_eval_samples=8, seed=seed, warmup_ratio=0.0, tokens_per_batch=tokens_per_batch,
                    lr_scheduler_type="constant_with_warmup", report_to="none", save_steps=0)
    settings.update(base)
    settings.update(overrides)
    cfg = TrainConfig(**settings)
    n_examples = max(64, steps * max(tokens_per_batch, 4096) // 250)
    vocab = json.loads((Path(ckpt) / "config.json").read_text())["vocab_size"]
    examples = examples or synthetic_examples(n_examples, seed, vocab)
    run = build(method, cfg, methods.get(method).Options(**options), log=log,
                data=(_Tok(), examples, examples[:8], {"input_data": "synthetic MedQuAD-like lengths"}))
    try:
        metrics = run.fit()
        from torch._dynamo.utils import counters  # compiled layers: how many graphs, and where tracing stopped

        metrics["compile_stats"] = {"graphs": counters["stats"]["unique_graphs"],
                                    "graph_breaks": sum(counters["graph_break"].values())}
    finally:
        run.cleanup()
        del run
        gc.collect()
        torch.cuda.empty_cache()
    return metrics


def profile_steps(name, overrides, first, count):
    """Record optimizer steps first+1 .. first+count of every following run with torch.profiler: a Chrome trace
    (.json.gz, open in ui.perfetto.dev) and a text summary per process, beside the results. The summary's first
    line says how much of those steps' wall time the GPU spent in kernels."""
    import gzip
    import shutil

    import torch
    from torch.autograd import DeviceType
    from transformers import TrainerCallback

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = overrides.get("gradient_accumulation_steps", 1)
    stem = Path(os.environ.get("OUT") or HERE / "results") / f"profile_{name}_{world}gpu_ga{accumulation}_rank{rank}"
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                sync()
                self.wall = time.perf_counter()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step != first + count:
                return
            sync()
            wall = time.perf_counter() - self.wall
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            # the kernels' own rows: an operator's row repeats the time of the kernels it launched (what the
            # table's "Self CUDA time total" counts too)
            kernels = sum(e.self_device_time_total for e in events
                          if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e6
            table = events.table(sort_by="self_device_time_total", row_limit=30)
            stem.parent.mkdir(parents=True, exist_ok=True)
            cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=30)
            stem.with_suffix(".txt").write_text(
                f"steps {first + 1}-{first + count}: wall {wall:.3f} s, GPU kernels {kernels:.3f} s "
                f"({100 * kernels / wall:.0f}% busy)\n\n{table}\n\n{cpu_table}\n")
            trace = str(stem) + ".json"
            self.prof.export_chrome_trace(trace)
            with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(trace)
            self.prof = None

    base = current_trainer()

    class Profiled(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(Profile())

    use_trainer(lambda: Profiled)


def current_trainer():
    import medpeft.training.run

    return medpeft.training.run.trainer_class()


def use_trainer(factory):
    """Make TrainingRun build its Trainer from `factory` (run.py holds its own name for trainer_class)."""
    import medpeft.training.run

    medpeft.training.run.trainer_class = factory


def ddp_options(options):
    """Experiments with DistributedDataParallel's settings (--ddp): e.g. {"comm_hook": "bf16",
    "gradient_as_bucket_view": true, "static_graph": true, "bucket_cap_mb": 100}, set on accelerate's DDP
    handler after the Trainer made it (which happens just before the model is wrapped)."""
    from accelerate.utils import DDPCommunicationHookType

    base = current_trainer()

    class Tuned(base):
        def _wrap_model(self, model, training=True, dataloader=None):
            wrapped = super()._wrap_model(model, training, dataloader)
            handler = self.accelerator.ddp_handler
            if handler is not None:
                for key, value in options.items():
                    setattr(handler, key, DDPCommunicationHookType(value) if key == "comm_hook" else value)
            return wrapped

    use_trainer(lambda: Tuned)


RUN_TIMEOUT = None  # seconds a run in its own process may take (--run_timeout)


def run_ours_isolated(name, ckpt, steps, tokens_per_batch, overrides, seed=0, padded_groups=False, nproc=1, env=None):
    """run_ours in a fresh process: peak memory then counts this run alone (a model freed in the same process
    can leave memory behind that inflates the next run's peak). `nproc` > 1: that many data-parallel
    processes, one per GPU (torch.distributed.run, as accelerate launch does); `env`: more variables (FSDP's).
    The end of each run's output is appended to runs.log beside the results."""
    import signal
    import subprocess

    spec = json.dumps({"name": name, "ckpt": ckpt, "steps": steps, "tokens_per_batch": tokens_per_batch,
                       "overrides": overrides, "seed": seed, "padded_groups": padded_groups})
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    print(f"{time.strftime('%H:%M:%S')} start {name} x{nproc} {json.dumps(overrides)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *launcher, __file__, "--one", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NCCL_NVLS_ENABLE": "0", **(env or {})})
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher's workers run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        timed_out = True
    log = Path(os.environ.get("OUT") or HERE / "results") / "runs.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    lines = (stderr or "").splitlines()
    with log.open("a") as f:
        f.write(f"\n== {name} x{nproc} {json.dumps(overrides)}: {time.time() - t0:.0f} s\n")
        first = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
        if first is not None and first < len(lines) - 40:  # a worker's own error, before the launcher's report
            f.write("\n".join(lines[first:first + 60]) + "\n...\n")
        f.write("\n".join(lines[-40:]) + "\n")
    for line in stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    if timed_out:
        raise RuntimeError(f"stopped after --run_timeout {RUN_TIMEOUT} s")
    tail = (stderr or stdout).strip().splitlines()[-3:]
    raise RuntimeError(" / ".join(tail)[-400:])


def _descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by `pid` (from /proc: no psutil on the benchmark machine)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def flops_per_token(params, checkpointed_share):
    return 2 * params * (2 + checkpointed_share)


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="qlora,lora,adapter,ptuning")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens_per_batch", type=int, default=4096)
    p.add_argument("--skip_plain", action="store_true")
    p.add_argument("--skip_check", action="store_true")
    p.add_argument("--skip_single", action="store_true", help="no single-GPU table (with --num_gpus)")
    p.add_argument("--check_steps", type=int, default=50)
    p.add_argument("--check_method", default="qlora", help="the correctness check's method, or several comma-"
                   f"separated ({', '.join(OURS)}; qlora: also the step-0 per-example losses)")
    p.add_argument("--check_last", action="store_true", help="run the check after the speed runs (a call cut "
                   "short by its limit keeps the speed table)")
    p.add_argument("--peak_tflops", type=float, default=790.0, help="measured bf16 matrix rate of the card")
    p.add_argument("--variants", default="", help="extra runs, e.g. 'lora:checkpoint_share=0.5;adapter:liger=off'")
    p.add_argument("--num_gpus", type=int, default=1, help="also run each method data-parallel on this many "
                   "GPUs, against one GPU with the same effective batch (gradient accumulation 2 vs 1 each)")
    p.add_argument("--per_gpu_baseline", action="store_true", help="with --num_gpus: also one GPU with gradient "
                   "accumulation 1 (the same work per GPU; the default accumulation of 1 on n GPUs is n times the "
                   "global batch)")
    p.add_argument("--skip_fsdp", action="store_true", help="with --num_gpus: no FSDP run for QLoRA")
    p.add_argument("--logging_steps", type=int, default=5, help="runs of ours log (and the multi-GPU ones compare) "
                   "the loss every N steps, as training does by default; each log waits for the GPU (and gathers the "
                   "loss from every process). The correctness check logs every step")
    p.add_argument("--check_set", default="", help="settings of the optimised side of the loss-curve check "
                   "(default: --set's), e.g. 'offload_checkpoints=on'")
    p.add_argument("--set", default="", help="training settings for every run of ours, e.g. 'compile=on'")
    p.add_argument("--run_timeout", type=float, default=None, help="stop a run (and its processes) after this "
                   "many seconds, record it as failed and go on")
    p.add_argument("--profile", default="", metavar="FIRST:COUNT", help="record steps FIRST+1..FIRST+COUNT of each "
                   "run of ours with torch.profiler (a trace and a summary per process, beside the results)")
    p.add_argument("--ddp", default="", metavar="JSON", help="DistributedDataParallel settings for the multi-GPU runs, "
                   'e.g. \'{"comm_hook": "bf16", "gradient_as_bucket_view": true}\' (an experiment, not medpeft\'s default)')
    p.add_argument("--auto_gc", action="store_true", help="leave Python's garbage collector on while training "
                   "(medpeft turns it off and collects on a schedule): an A/B of that choice")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only print the table of these results files, "
                   "merged (the plain recipe and ours run at once on two GPUs of one machine, each with its own OUT)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, in its own process
    p.add_argument("--allreduce_probe", action="store_true", help=argparse.SUPPRESS)  # internal, under torchrun
    args = p.parse_args(argv)
    if args.allreduce_probe:
        allreduce_probe()
        return
    if args.one:
        spec = json.loads(args.one)
        m = run_ours(spec["name"], spec["ckpt"], spec["steps"], spec["tokens_per_batch"], spec["overrides"],
                     seed=spec["seed"], padded_groups=spec["padded_groups"], log=lambda *a: None)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(m))
        return
    global RUN_TIMEOUT
    RUN_TIMEOUT = args.run_timeout
    if args.auto_gc:
        os.environ["BENCH_AUTO_GC"] = "1"
    if args.ddp:
        os.environ["BENCH_DDP"] = json.dumps(json.loads(args.ddp))
    if args.merge:
        results = {}
        for path in args.merge:
            for key, value in json.loads(Path(path).read_text()).items():
                results[key] = {**results[key], **value} if isinstance(value, dict) and key in results else value
        table(results, [m.strip() for m in args.methods.split(",")])
        print(f"wrote {save(results)}")
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import naive_baseline as plain
    from medpeft.precision import cpu_name

    # the command and the host's CPU travel with the figures: rates differ between hosts (docs/performance.md)
    results = {"device": torch.cuda.get_device_name(0), "host_cpu": cpu_name(),
               "command": shlex.join(["python3", *sys.argv]), "versions": {}, "plain": {}, "ours": {}, "check": {}}
    import peft
    import transformers
    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}
    if not Path(plain.CK).joinpath("config.json").is_file():
        plain.build_checkpoint()
    eff = padding_efficiency()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.skip_plain:
        for name in names:
            spec = PLAIN[name]
            meth, g = spec.split("_")
            plain.bench(spec, meth == "qlora", use_gc=(g == "gc"), method="lora" if meth in ("qlora", "lora") else meth)
            r = plain.results[spec]
            results["plain"][name] = dict(r, useful_tokens_per_s=round(r["tokens_per_s"] * eff))
            save(results)
    common = {"logging_steps": args.logging_steps, **settings(args.set)}
    checks = [m.strip() for m in args.check_method.split(",") if m.strip()]
    unknown = sorted(set(checks) - set(OURS))
    if unknown:
        p.error(f"--check_method: unknown {', '.join(unknown)}; choose from {', '.join(OURS)}")

    def check():
        for method in checks:
            try:
                got = correctness_check(plain.CK, args.check_steps, args.tokens_per_batch, method,
                                        ours=settings(args.check_set or args.set))
            except Exception as exc:  # the other checks and the speed table still run
                got = {"method": method, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            # one method: the check's fields at the top, as in earlier results files
            results["check"] = got if len(checks) == 1 else {**results["check"], method: got}
            print("check", json.dumps(got), flush=True)
            save(results)

    if not args.skip_check and not args.check_last:
        check()
    if args.profile:  # the speed runs only, not the check's
        os.environ["BENCH_PROFILE"] = args.profile  # read by each run's own process
    if args.num_gpus > 1:
        results["multi_gpu"] = {}  # filled and saved run by run: a call cut short keeps what finished
        multi_gpu(names, plain.CK, args.steps, args.tokens_per_batch, args.num_gpus,
                  fsdp=not args.skip_fsdp, common=common, out=results["multi_gpu"],
                  saved=lambda: save(results), per_gpu_baseline=args.per_gpu_baseline)
        save(results)
    runs = [(n, n, dict(common)) for n in names] if not args.skip_single else []
    for spec in filter(None, args.variants.split(";")):
        name, _, kv = spec.partition(":")
        runs.append((f"{name}[{kv}]" if kv else name, name, {**common, **settings(kv)}))
    for label, name, over in runs:
        t = time.time()
        tpb = int(over.pop("tokens_per_batch", args.tokens_per_batch))
        try:
            m = run_ours_isolated(name, plain.CK, args.steps, tpb, over)
        except Exception as exc:  # one failing variant does not lose the table
            results["ours"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(label, "FAILED", results["ours"][label]["error"], flush=True)
            continue
        speed = m.get("speed_settings", {})
        layers = plain.cfg.num_hidden_layers
        share = speed.get("checkpointed_layers", 0) / layers
        mfu = m["steady_tokens_per_s"] * flops_per_token(m["total_parameters"], share) / (args.peak_tflops * 1e12)
        results["ours"][label] = {
            "useful_tokens_per_s": m["steady_tokens_per_s"], "padded_tokens_per_s": m["steady_padded_tokens_per_s"],
            "peak_gb": m["peak_memory_gb"], "step_s": m["steady_step_s"], "mfu": round(mfu, 3),
            "tokens_per_batch": tpb, **speed, "compile_stats": m.get("compile_stats"),
            "step_seconds": m.get("step_seconds_first_100"),
            "useful_tokens_per_s_median_step": median_rate(m), "wall_s": round(time.time() - t, 1)}
        print(label, json.dumps(results["ours"][label]), flush=True)
        save(results)
    table(results, names)
    if not args.skip_check and args.check_last:
        check()
    print(f"wrote {save(results)}")


def median_rate(metrics):
    """Useful tokens/s at the median steady step: what a long run sees when a few steps of a short one are slowed
    by one-off work (Triton compiling a kernel for a new shape). Tokens per step: the steady mean's."""
    import statistics

    if not metrics.get("steady_steps"):
        return None
    first = metrics["steps"] - 1 - metrics["steady_steps"]  # the warm-up steps the steady rate leaves out
    times = (metrics.get("step_seconds_first_100") or [])[first:]
    if not times:
        return None
    return round(metrics["steady_tokens_per_s"] * metrics["steady_step_s"] / statistics.median(times))


def settings(text):
    """'k=v,k=v' -> training overrides."""
    over = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        for cast in (int, float, str):
            try:
                over[k] = cast(v)
                break
            except ValueError:
                continue
    return over


def allreduce_probe():
    """In each of the launched processes: all-reduce times of LoRA-sized gradients (QLoRA r16 all-linear on
    Mistral-7B: 42M parameters, 168 MB in fp32) and of one DDP bucket (25 MB); the first process prints them."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()  # gloo on the CPU: a smoke test of the probe itself
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for label, numel, dtype in (("bucket_25MB_fp32", 25 * 2**20 // 4, torch.float32),
                                ("lora_grads_168MB_fp32", 41_943_040, torch.float32),
                                ("lora_grads_84MB_bf16", 41_943_040, torch.bfloat16)):
        x = torch.ones(numel, dtype=dtype, device="cuda" if cuda else "cpu")
        for _ in range(3):
            dist.all_reduce(x)
        sync()
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        sync()
        ms = (time.perf_counter() - start) * 100  # per all-reduce, in ms
        n = dist.get_world_size()
        out[label] = {"ms": round(ms, 3), "bus_GB_s": round(x.numel() * x.element_size() * 2 * (n - 1) / n / ms / 1e6, 1)}
    if rank == 0:
        print("PROBE " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def run_allreduce_probe(n):
    """allreduce_probe on n GPUs, with NCCL's own account of the transport it chose (P2P/NVLink, SHM, ...)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), __file__,
                           "--allreduce_probe"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "INFO"})
    result = next((json.loads(line.split("PROBE ", 1)[1]) for line in done.stdout.splitlines() if "PROBE " in line),
                  {"error": (done.stderr or done.stdout).strip()[-400:]})
    result["nccl_transport"] = sorted({line.split(" via ", 1)[1].strip() for line in done.stdout.splitlines()
                                       + done.stderr.splitlines() if "Channel" in line and " via " in line})[:6]
    print("allreduce", json.dumps(result), flush=True)
    return result


def multi_gpu(names, ckpt, steps, tokens_per_batch, n, fsdp=True, common=None, out=None,
              saved=lambda: None, per_gpu_baseline=False):
    """Each method on one GPU with gradient accumulation n, then on n GPUs with 1 each: the same global batch.
    QLoRA also sharded with FSDP (--fsdp) on the n GPUs. `per_gpu_baseline`: also one GPU with gradient
    accumulation 1, the same work per GPU (what --num_gpus n does to a run with the default accumulation of 1:
    n times the global batch). Rows go into `out` as they finish; `saved` writes them."""
    from medpeft.distributed import fsdp_environment

    out = {} if out is None else out
    try:
        out["allreduce"] = run_allreduce_probe(n)
    except Exception as exc:  # the probe is a hint, not the measurement
        out["allreduce"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    saved()
    for name in names:
        row = out[name] = {}
        runs = [("one", 1, n, None), ("many", n, n, None)]
        runs += [("one_ga1", 1, 1, None)] if per_gpu_baseline else []
        runs += [("fsdp", n, n, fsdp_environment())] if name == "qlora" and fsdp else []
        for label, nproc, accumulation, env in runs:
            try:
                m = run_ours_isolated(name, ckpt, steps, tokens_per_batch,
                                      {**(common or {}), "gradient_accumulation_steps": accumulation},
                                      seed=1, nproc=nproc, env=env)
            except Exception as exc:  # keep the other rows
                row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(name, label, "FAILED", row[label]["error"], flush=True)
                continue
            row[label] = {"useful_tokens_per_s": m["steady_tokens_per_s"], "peak_gb_per_gpu": m["peak_memory_gb"],
                          "step_s": m["steady_step_s"], "processes": m.get("processes"), "sharded": m.get("sharded"),
                          "parameters_per_process": m.get("parameters_per_process"),
                          "validation_loss_base": m.get("validation_loss_base"),
                          "validation_loss_final": m.get("validation_loss_final"),
                          "curve": [p["loss"] for p in m["loss_curve"]], "step_seconds": m.get("step_seconds_first_100"),
                          "useful_tokens_per_s_median_step": median_rate(m)}
            print(name, label, json.dumps({k: v for k, v in row[label].items() if k not in ("curve", "step_seconds")}),
                  flush=True)
            saved()
        if "error" not in row.get("one", {"error": 1}) and "error" not in row.get("many", {"error": 1}):
            a, b = row["one"]["curve"], row["many"]["curve"]
            rel = [abs(x - y) / x for x, y in zip(a, b)]
            row.update(scaling=round(row["many"]["useful_tokens_per_s"] / row["one"]["useful_tokens_per_s"], 3),
                       curve_steps=len(rel), curve_max_rel_diff=round(max(rel), 5))
            if "error" not in row.get("one_ga1", {"error": 1}):
                row.update(scaling_same_per_gpu=round(
                    row["many"]["useful_tokens_per_s"] / row["one_ga1"]["useful_tokens_per_s"], 3))
            if "error" not in row.get("fsdp", {"error": 1}):
                rel = [abs(x - y) / x for x, y in zip(a, row["fsdp"]["curve"])]
                row.update(fsdp_scaling=round(row["fsdp"]["useful_tokens_per_s"] / row["one"]["useful_tokens_per_s"], 3),
                           fsdp_curve_max_rel_diff=round(max(rel), 5))
        print(name, json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    print(f"\n| method | 1 GPU useful tok/s | {n} GPUs useful tok/s | scaling | peak GB per GPU (1 / {n}) "
          "| loss curves max rel. diff |\n|---|---:|---:|---:|---|---:|")
    for name, r in out.items():
        if "scaling" in r:
            print(f"| {name} | {r['one']['useful_tokens_per_s']:.0f} | {r['many']['useful_tokens_per_s']:.0f} | "
                  f"{r['scaling']:.2f}x | {r['one']['peak_gb_per_gpu']} / {r['many']['peak_gb_per_gpu']} | "
                  f"{r['curve_max_rel_diff']:.4f} ({r['curve_steps']} steps) |")
        if "scaling_same_per_gpu" in r:
            print(f"| {name}, 1 GPU with accumulation 1 | {r['one_ga1']['useful_tokens_per_s']:.0f} | "
                  f"{r['many']['useful_tokens_per_s']:.0f} | {r['scaling_same_per_gpu']:.2f}x | "
                  f"{r['one_ga1']['peak_gb_per_gpu']} / {r['many']['peak_gb_per_gpu']} | (other global batch) |")
        if "fsdp_scaling" in r:
            print(f"| {name}, FSDP | {r['one']['useful_tokens_per_s']:.0f} | {r['fsdp']['useful_tokens_per_s']:.0f} | "
                  f"{r['fsdp_scaling']:.2f}x | {r['one']['peak_gb_per_gpu']} / {r['fsdp']['peak_gb_per_gpu']} | "
                  f"{r['fsdp_curve_max_rel_diff']:.4f} |")
    return out


def save(results) -> Path:
    out = Path(os.environ.get("OUT") or HERE / "results") / "gpu_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return out


def per_example_losses(model, examples, packed):
    """Step-0 mean answer loss of each example, from one packed row or from padded rows."""
    import torch

    from medpeft.tokens import PadCollator
    from medpeft.training.packing import PackedCollator, enable_varlen_attention

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        if packed:
            restore_attention = enable_varlen_attention(model)
            batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in PackedCollator()([examples]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            restore_attention()
            losses, start = [], 0
            for e in examples:
                n = len(e["input_ids"])
                lg, lb = logits[0, start:start + n - 1], labels[0, start + 1:start + n]
                losses.append(torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100).item())
                start += n
            return losses
        batch = {k: v.to(device) for k, v in PadCollator(0)(examples).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        return [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100).item()
                for i in range(len(examples))]


def correctness_check(ckpt, steps, tokens_per_batch, method="qlora", ours=None):
    """QLoRA: (1) per-example losses at step 0, packed + Liger vs padded plain model; (2) 50-step loss curves
    of the optimised path (with `ours`, the --set settings, e.g. offload_checkpoints=on) and of the plain one
    (padded batches of the same examples, SDPA, no Liger, eager). Another method (`--check_method`): (2) only."""
    import torch

    if method != "qlora":
        return loss_curves(method, ckpt, steps, tokens_per_batch, ours)

    from medpeft import methods
    from medpeft.config import TrainConfig
    from medpeft.training.speedups import apply_liger
    from medpeft.training import RunContext

    examples = synthetic_examples(12, seed=1)
    out = {}
    # (1) step 0: the same model, plain then optimised
    cfg = TrainConfig(model_name=ckpt, load_in_4bit=True, output_dir="/tmp/check-out")
    ctx = RunContext(cfg=cfg, resolved_model=ckpt, device="cuda", work_dir=Path(tempfile.mkdtemp()),
                     gradient_checkpointing=True)
    model = methods.get("qlora").prepare(ctx, methods.get("qlora").Options(lora_r=16, lora_alpha=32, lora_dropout=0.0))
    sample = examples[:12]
    plain_losses = per_example_losses(model, sample, packed=False)
    apply_liger(model)
    ours_losses = per_example_losses(model, sample, packed=True)
    rel = [abs(a - b) / b for a, b in zip(ours_losses, plain_losses)]
    out["step0_max_rel_diff"] = round(max(rel), 5)
    out["step0_plain"] = [round(x, 4) for x in plain_losses]
    out["step0_ours"] = [round(x, 4) for x in ours_losses]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    out.update(loss_curves("qlora", ckpt, steps, tokens_per_batch, ours))
    return out


def loss_curves(method, ckpt, steps, tokens_per_batch, ours=None):
    """(2) of the check: curves over the same micro-batches (same examples, same order), each run in its own
    process; the plain side pads each packed group and runs the library's own forward, checkpoints in place."""
    curves, chosen = {}, {}
    plain = {"liger": "off", "compile": "off", "offload_checkpoints": "off", "cuda_graphs": "off"}
    for label, over, padded in (("plain", plain, True), ("ours", dict(ours or {}), False)):
        m = run_ours_isolated(method, ckpt, steps, tokens_per_batch, dict(over, packing="on", logging_steps=1),
                              seed=1, padded_groups=padded)
        curves[label] = [p["loss"] for p in m["loss_curve"]]
        chosen[label] = m.get("speed_settings", {})  # what each side ran with (a lever may have fallen back)
    rel = [abs(a - b) / b for a, b in zip(curves["ours"], curves["plain"])]
    return dict(method=method, ours_settings=ours or {}, ours_speed_settings=chosen["ours"],
                plain_speed_settings=chosen["plain"], curve_steps=len(rel), curve_max_rel_diff=round(max(rel), 5),
                curve_mean_rel_diff=round(sum(rel) / len(rel), 5), curve_ours=curves["ours"],
                curve_plain=curves["plain"])


def table(results, names):
    print("\n| method | plain useful tok/s | plain padded tok/s | plain peak GB | ours useful tok/s | ours peak GB "
          "| MFU | x plain (useful) | settings |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, r in results["ours"].items():
        name = label.split("[")[0]
        pl = results["plain"].get(name, {})
        if "error" in r:
            print(f"| {label} | | | | failed: {r['error'][:80]} | | | | |")
            continue
        ratio = r["useful_tokens_per_s"] / pl["useful_tokens_per_s"] if pl else float("nan")
        settings = (f"packing {r.get('packing')}, liger {r.get('liger')}, "
                    f"checkpointed {r.get('checkpointed_layers', 0)}, {r['tokens_per_batch']} tok/batch"
                    f"{', compiled' if r.get('compiled_layers') else ''}")
        print(f"| {label} | {pl.get('useful_tokens_per_s', '')} | {pl.get('tokens_per_s', '')} | "
              f"{pl.get('peak_gb', '')} | {r['useful_tokens_per_s']:.0f} | {r['peak_gb']} | {r['mfu']} | "
              f"{ratio:.2f} | {settings} |")


if __name__ == "__main__":
    main()
