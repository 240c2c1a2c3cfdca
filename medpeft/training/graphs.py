"""CUDA graphs over the checkpointed decoder layers (--cuda_graphs): the host issues one replay per layer where it
issued a few hundred kernels, each after tens of microseconds of Python and dispatch (docs/performance.md: a QLoRA
step on the single-H200 host kept the GPU busy 29% of the time).

Graphs take the place of transformers' checkpoint function, with its meaning: forward keeps no activations, backward
recomputes them. Each checkpointed layer gets two graphs, captured at its first training call:

    forward   static input -> static output                                              (no grad)
    backward  static input, static output gradient -> input gradient, parameter gradients  (recompute + backward)

Every tensor a graph reads or writes lives in a buffer that outlasts it: a layer's output buffer is the next layer's
input buffer, so what waits for the recomputation is those buffers (what checkpointing keeps); the keyword tensors
(rotary cos/sin, example boundaries) are copied once per micro-batch into buffers all layers share. A replay repeats
the captured kernels with the captured shapes and Python values, so every micro-batch must look the same: packed rows
padded to one token count and one number of examples (packing.StaticRows). A call that differs (other shapes or
values, no grad) runs the layer's own checkpoint function.

`Rerun` stands in for a CUDA graph on the CPU: its replay runs the captured function again over the same buffers,
which is what a replay computes; the tests train with it.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..distributed import process_count, sharded
from ..errors import UsageError

WARMUP = 2  # eager runs before capture: cuBLAS workspaces, Triton autotuning and compilation happen outside it


class CudaGraph:
    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn):
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self):
        self.graph.replay()


class Rerun:
    """A graph's stand-in: capture records the function (and, like a CUDA capture, computes nothing), replay runs it."""

    def __init__(self, pool=None):
        self.fn = None

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


RECORDER = None  # None: CudaGraph; the tests set Rerun


def available(device: str) -> bool:
    return device == "cuda" or RECORDER is not None


def layer_dropout(layers) -> float:
    """The largest dropout probability in the layers: a replayed recomputation would draw other masks than its
    forward, where checkpointing restores the random state."""
    p = 0.0
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Dropout):
                p = max(p, m.p)
            p = max(p, float(getattr(m, "attention_dropout", 0.0) or 0.0))
    return p


def refusal(cfg, device: str, packing: bool, checkpointing: bool, layers) -> str | None:
    """Why this run's layers are not replayed as CUDA graphs, or None when they are; with --cuda_graphs on, the
    reason is an error. (P-Tuning's rows, which open with its virtual tokens, never come here: it does not
    checkpoint.)"""
    why = _refusal(cfg, device, packing, checkpointing, layers)
    if why and cfg.cuda_graphs == "on":
        raise UsageError(f"--cuda_graphs on: {why}")
    return why


def _refusal(cfg, device, packing, checkpointing, layers):
    if cfg.cuda_graphs == "off":
        return "--cuda_graphs off"
    if cfg.cuda_graphs == "auto":  # opt-in: on the H100 host, compiled layers were as fast without them (2026-12-05)
        return "--cuda_graphs auto: opt-in, --cuda_graphs on"
    reasons = [
        (not available(device), "no CUDA GPU"),
        (not packing, "no packed rows (--packing)"),
        (process_count() > 1 or sharded(), "several processes"),
        (not checkpointing, "no gradient checkpointing in this run (the graphs take its place)"),
        (cfg.checkpoint_share == "auto", "--checkpoint_share auto changes which layers recompute after capture"),
    ]
    why = next((what for bad, what in reasons if bad), None)
    if why is None and (p := layer_dropout(layers)) > 0:
        why = (f"dropout {p:g} in the layers: a replayed recomputation would draw other masks than its forward "
               "(set the method's dropout to 0, e.g. --lora_dropout 0)")
    return why


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph, x, *params):
        ctx.graph = graph
        if x.data_ptr() != graph.x.data_ptr():  # the layer before wrote it there already
            graph.x.copy_(x)
        graph.fwd.replay()
        return graph.y.detach()  # an alias: autograd records this call on it, not on the buffer

    @staticmethod
    def backward(ctx, gy):
        graph = ctx.graph
        if gy.data_ptr() != graph.gy.data_ptr():
            graph.gy.copy_(gy)
        graph.bwd.replay()
        return (None, graph.gx if graph.needs_x else None, *graph.param_grads)


class Shared:
    """What the layers of one model share: the memory pool, the streams, the keyword buffers, the buffers the layers
    pass along (hidden states forward, their gradients backward), and what happened.

    `offload`: a layer's input waits for backward in pinned host memory, not on the GPU. Its forward graph copies it
    out beside the computation; the backward graph of the layer above fetches it back beside its own, into one of
    two device buffers. The hidden states then need two device buffers instead of one per layer (32 MB each at
    4,096 tokens of a 7B model). The top layer's input is still on the GPU when its backward comes: it stays."""

    def __init__(self, device, log, offload: bool = False):
        self.device, self.log, self.offload = device, log, offload
        self.recorder = RECORDER or CudaGraph
        cuda = self.recorder is CudaGraph
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        # one stream for every warm-up and one for the host copies: cuBLAS keeps a workspace per stream it meets
        self.warmup_stream = torch.cuda.Stream() if cuda else None
        self.copy_stream = torch.cuda.Stream() if cuda and offload else None
        self.forked = False  # the copy stream has work to join (a capture must not wait on a stream outside it)
        self.sources, self.buffers, self.spec = None, None, None
        self.rings = {}
        self.stopped = None  # why no more layers are captured (a capture failed)
        self.stats = {"captured_layers": 0, "capture_s": 0.0, "replayed_calls": 0, "eager_calls": {},
                      "offloaded_inputs": offload}
        self.expected = 0

    def eager(self, why: str):
        first = why not in self.stats["eager_calls"]
        self.stats["eager_calls"][why] = self.stats["eager_calls"].get(why, 0) + 1
        if first:
            self.log(f"cuda graphs: a layer call ran without them ({why})")

    def keywords(self, kwargs, first_layer: bool):
        """The static keyword arguments for this call, or None when they cannot be shared: tensors are copied into the
        shared buffers when the first layer of a micro-batch brings new ones; later layers must bring the same."""
        leaves, spec = tree_flatten(kwargs)
        if self.spec is not None and spec != self.spec:
            return None
        if self.buffers is None:
            self.spec = spec
            self.buffers = [torch.empty_like(t) if isinstance(t, torch.Tensor) else t for t in leaves]
            self.sources = [None] * len(leaves)
        for i, (leaf, buf) in enumerate(zip(leaves, self.buffers)):
            if not isinstance(leaf, torch.Tensor):
                if isinstance(buf, torch.Tensor) or not _same_value(leaf, buf):
                    return None
                continue
            if leaf is self.sources[i]:
                continue
            if not first_layer or not isinstance(buf, torch.Tensor) or leaf.shape != buf.shape \
                    or leaf.dtype != buf.dtype or leaf.device != buf.device:
                return None
            buf.copy_(leaf)
            self.sources[i] = leaf
        return tree_unflatten(self.buffers, spec)

    def ring(self, name: str, slot: int, like: torch.Tensor):
        """The buffer `slot` of kind `name` ("hidden": layer inputs and outputs, "fetched": inputs back from the
        host, "grad": gradients passed down), made like `like` the first time."""
        bufs = self.rings.setdefault(name, {})
        if slot not in bufs:
            bufs[slot] = torch.zeros_like(like)
        if bufs[slot].shape != like.shape or bufs[slot].dtype != like.dtype:
            raise TypeError(f"layers disagree on the shape of their {name} tensors")
        return bufs[slot]

    def hidden_slot(self, index: int) -> int:
        return index % 2 if self.offload else index

    def owns(self, x: torch.Tensor) -> bool:
        return any(b.data_ptr() == x.data_ptr() for b in self.rings.get("hidden", {}).values())

    def side(self):
        """A context for a host copy beside the captured computation (joined by `join`)."""
        if self.copy_stream is None:
            return contextlib.nullcontext()
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        self.forked = True
        return torch.cuda.stream(self.copy_stream)

    def join(self):
        """Wait for the copies forked by `side` in this graph; without one, waiting on the copy stream (outside the
        capture) would fail the capture with cudaErrorStreamCaptureIsolation (seen on the H100, 2026-12-05)."""
        if self.forked:
            torch.cuda.current_stream().wait_stream(self.copy_stream)
            self.forked = False

    def pool_gb(self) -> float:
        """GPU memory the graphs' private pool holds: replays use it without the allocator counting it."""
        if self.pool is None:
            return 0.0
        segments = torch.cuda.memory._snapshot()["segments"]
        return round(sum(s["total_size"] for s in segments
                         if tuple(s.get("segment_pool_id", ())) == tuple(self.pool)) / 2**30, 3)


def _same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return a is b  # another object (a cache, a module): the captured call may depend on it


class LayerGraph:
    """The checkpoint function of one decoder layer: replays where the call matches the captured one."""

    def __init__(self, shared: Shared, index: int, layer, original, below=None):
        self.shared, self.index, self.layer, self.original, self.below = shared, index, layer, original, below
        self.fwd = self.bwd = None
        self.x = self.y = self.gx = self.gy = self.host = self.saved = None
        self.needs_x, self.params, self.param_grads, self.key = False, [], [], None

    def __call__(self, fn, *args, **kwargs):
        why = self._why_not(fn, args, kwargs)
        if why is None:
            static = self.shared.keywords(fn.keywords, first_layer=self.index == 0)
            if static is None:
                why = "its keyword arguments differ from the captured ones"
        if why is None and self.fwd is None:
            try:
                self._capture(fn.func, args[0], static)
            except Exception as exc:  # noqa: BLE001 - the layer runs as before; the reason is logged once
                self.fwd = self.bwd = None
                first = exc.__context__ or exc  # capture_end's error names only the consequence of the first one
                why = self.shared.stopped = self.shared.stats["stopped"] = (
                    f"capture failed at layer {self.index}: {type(first).__name__}: {str(first)[:300]}")
                self.shared.log(f"cuda graphs: {why}; this layer and the ones not captured yet run without them")
        if why is not None:
            self.shared.eager(why)
            if args and isinstance(args[0], torch.Tensor) and self.shared.owns(args[0]):
                # the checkpoint keeps its input until backward, and the replays reuse these buffers
                args = (args[0].clone(), *args[1:])
            return self.original(fn, *args, **kwargs)
        self.shared.stats["replayed_calls"] += 1
        return _Replay.apply(self, args[0], *self.params)

    def _why_not(self, fn, args, kwargs):
        if not torch.is_grad_enabled():
            return "no grad"
        if kwargs or len(args) != 1 or not isinstance(fn, functools.partial) or not isinstance(args[0], torch.Tensor):
            return "an unexpected call signature"
        key = (tuple(args[0].shape), args[0].dtype, args[0].device, args[0].requires_grad, _autocast_state(args[0]))
        if self.fwd is None:
            if self.shared.stopped:
                return self.shared.stopped
            self.key = key
            return None
        return None if key == self.key else "its input differs from the captured one in shape, dtype or grad"

    def _capture(self, call, x, static):
        t0 = time.perf_counter()
        shared, below, i = self.shared, self.below, self.index
        self.needs_x = x.requires_grad
        self.params = [p for p in self.layer.parameters() if p.requires_grad]
        self.x = shared.ring("hidden", shared.hidden_slot(i), x)
        if x.data_ptr() != self.x.data_ptr():
            self.x.copy_(x)
        top = i == shared.expected - 1
        if shared.offload and not top:
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
            self.saved = shared.ring("fetched", i % 2, x)
        else:
            self.saved = self.x
        device_type, autocast_on, autocast_dtype = _autocast_state(x)

        def autocast():  # weights cast inside the graph each time: autocast's cache would bake in stale copies
            return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on, cache_enabled=False)

        def forward():
            if self.host is not None:
                with shared.side():
                    self.host.copy_(self.x, non_blocking=True)
            with torch.no_grad(), autocast():
                self.y.copy_(call(self.x, **static))
            shared.join()

        def backward():
            if below is not None and below.host is not None:  # the next layer back: its input comes home meanwhile
                with shared.side():
                    below.saved.copy_(below.host, non_blocking=True)
            xi = self.saved.detach().requires_grad_(self.needs_x)
            with torch.enable_grad(), autocast():
                y = call(xi, **static)
            grads = torch.autograd.grad(y, ([xi] if self.needs_x else []) + self.params, self.gy, allow_unused=True)
            if self.needs_x:
                self.gx.copy_(grads[0])
            for buf, g in zip(self.param_grads, grads[int(self.needs_x):]):
                if buf is not None:
                    buf.copy_(g)
            shared.join()

        with torch.no_grad(), autocast():
            out = call(self.x, **static)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise TypeError(f"the layer returned {type(out).__name__}, not a tensor shaped like its input")
        self.y = shared.ring("hidden", shared.hidden_slot(i + 1), out)
        self.gy = shared.ring("grad", (i + 1) % 2, out)
        self.gx = shared.ring("grad", i % 2, x)
        if self.host is not None:
            self.saved.copy_(self.x)  # the probe below reads what backward will read
        # which parameters get a gradient (a parameter the layer does not use gets None, as autograd gives)
        xi = self.saved.detach().requires_grad_(self.needs_x)
        with torch.enable_grad(), autocast():
            probe = torch.autograd.grad(call(xi, **static), ([xi] if self.needs_x else []) + self.params, self.gy,
                                        allow_unused=True)[int(self.needs_x):]
        self.param_grads = [torch.zeros_like(p) if g is not None else None for p, g in zip(self.params, probe)]
        del probe, out
        stream = shared.warmup_stream  # off the default stream, as torch.cuda.make_graphed_callables warms up
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(WARMUP):
                forward()
                backward()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        self.fwd, self.bwd = shared.recorder(shared.pool), shared.recorder(shared.pool)
        self.fwd.capture(forward)
        self.bwd.capture(backward)
        shared.stats["captured_layers"] += 1
        shared.stats["capture_s"] = round(shared.stats["capture_s"] + time.perf_counter() - t0, 2)
        if shared.stats["captured_layers"] == shared.expected:
            shared.stats["graph_pool_gb"] = shared.pool_gb()
            shared.log(f"cuda graphs: {shared.expected} layers captured in {shared.stats['capture_s']} s (a forward "
                       f"graph and a recompute-and-backward graph each; pool {shared.stats['graph_pool_gb']} GB)")


def _autocast_state(x):
    device_type = x.device.type
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def graph_layers(layers, device: str, log=print, offload: bool = False):
    """Give each checkpointed layer in `layers` a LayerGraph as its checkpoint function; `offload`: their inputs wait
    in host memory (Shared). Returns (the shared state, whose `stats` say what happened, what undoes it)."""
    shared = Shared(device, log, offload)
    checkpointed = [m for m in layers if getattr(m, "gradient_checkpointing", False)
                    and hasattr(m, "_gradient_checkpointing_func")]
    shared.expected = len(checkpointed)
    originals = [m._gradient_checkpointing_func for m in checkpointed]
    below = None
    for i, (layer, original) in enumerate(zip(checkpointed, originals)):
        below = layer._gradient_checkpointing_func = LayerGraph(shared, i, layer, original, below)

    def undo():
        for layer, original in zip(checkpointed, originals):
            graph = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = original
            if isinstance(graph, LayerGraph):  # the graphs and their buffers go with the last reference
                graph.fwd = graph.bwd = graph.x = graph.y = graph.host = graph.saved = graph.below = None
                graph.param_grads = []
        shared.buffers = shared.sources = None
        shared.rings.clear()

    return shared, undo
