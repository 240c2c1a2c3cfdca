"""What a run measures about itself: parameter counts, memory, and the steady-state speed of its steps."""

from __future__ import annotations

import resource
import threading
import time

import torch

from ..distributed import sum_over_processes


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2 * getattr(p, "quant_storage", torch.uint8).itemsize
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


class RssSampler:
    """The largest resident set size seen while a run lasts (the process-wide maximum would carry over from
    earlier runs in the same process, as in run_all)."""

    def __init__(self, every_s: float = 0.2):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * resource.getpagesize()
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self, every_s):
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._rss())


def peak_memory_gb(device: str, sampler: RssSampler | None = None, speed: dict | None = None) -> dict:
    if device == "cuda":
        # CUDA graphs' replays use their private pool, which the allocator counts only while capturing: added whole
        # (an upper bound: the peak may already hold a capture's share of it)
        graphs = (speed or {}).get("cuda_graphs")
        pool = graphs.get("graph_pool_gb", 0.0) if isinstance(graphs, dict) else 0.0
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30 + pool, 3),
                "memory_kind": "cuda_allocated" + (" + cuda graph pool" if pool else "")}
    if sampler is not None:
        return {"peak_memory_gb": round(sampler.stop() / 2**30, 3), "memory_kind": "cpu_peak_rss_during_run"}
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "memory_kind": "cpu_peak_rss_process"}


class StepTimer:
    """Step end times and tokens seen, for the steady-state speed (the first steps pay for warm-up and kernel
    compilation). Tokens are counted at collation, one batch ahead of the step: the offset cancels out.
    On CUDA a step's end is an event on the GPU's stream: timing never makes the CPU wait for the GPU."""

    def __init__(self, collator, device):
        from transformers import TrainerCallback

        self.collator, self.device, self.marks = collator, device, []
        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if timer.device == "cuda":
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                else:
                    end = time.perf_counter()
                timer.marks.append((end, timer.collator.real_tokens, timer.collator.padded_tokens))

        self.callback = Callback()

    def steady(self) -> dict:
        if len(self.marks) < 4:
            return {}
        first = min(3, len(self.marks) // 4)
        (t0, r0, p0), (t1, r1, p1) = self.marks[first], self.marks[-1]
        if self.device == "cuda":
            t1.synchronize()  # every earlier event has completed too

            def elapsed(a, b):
                return a.elapsed_time(b) / 1000
        else:
            def elapsed(a, b):
                return b - a
        seconds = elapsed(t0, t1)
        real, padded = sum_over_processes([r1 - r0, p1 - p0])
        ends = [m[0] for m in self.marks[:101]]  # the first 100 steps' times show the warm-up
        steps = [elapsed(a, b) for a, b in zip(ends, ends[1:])]
        return {"steady_tokens_per_s": round(real / seconds, 1),
                "steady_padded_tokens_per_s": round(padded / seconds, 1),
                "steady_step_s": round(seconds / (len(self.marks) - 1 - first), 4),
                "steady_steps": len(self.marks) - 1 - first, "step_seconds_first_100": [round(x, 4) for x in steps]}
