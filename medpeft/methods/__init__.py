"""The three methods, each a module of the same shape:

    NAME, HELP                      what it is
    DEFAULTS                        training settings that differ from TrainConfig's defaults
    GRADIENT_CHECKPOINTING          whether the method works with activation recomputation
    pack(model) -> (slots, undo)    optional, for packed rows (medpeft/packing.py): slots at the start of each
                                    row that every example sees as its own prefix, for the method to fill, and
                                    what undoes its packed forward
    LIGER, LIGER_FUSED_CE           whether Liger kernels, and its fused linear cross-entropy, are used by default
                                    on the GPU (medpeft/speedups.py)
    COMPILE                         whether --compile auto compiles its decoder layers on the GPU (measured faster):
                                    True, False, or "packed" (on packed rows only)
    FSDP                            whether --fsdp may shard it over several GPUs (medpeft/distributed.py)
    WEIGHTS_FILE                    the file save() writes the trained weights to
    Options                         dataclass of the method's own flags, with validate()
    prepare(ctx, opts) -> model     base model (from ctx.load_base) with the method attached, only it trainable
    disabled(model)                 context manager: the bare base model's behaviour
    save(model, out_dir, ctx)       the method's weights in the library's own format (FSDP methods also take
                                    state_dict=, the trainable weights gathered from the shards)
    load(base_model, out_dir, opts) -> model   the inverse of save, for evaluation and generation
"""

from importlib import import_module

from ..errors import UsageError

NAMES = ("qlora", "adapter", "ptuning")


def get(name: str):
    if name not in NAMES:
        raise UsageError(f"unknown method '{name}'; known methods: {', '.join(NAMES)}")
    try:
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise UsageError(f"method '{name}' is not implemented yet") from exc
