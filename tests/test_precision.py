"""The compute dtype follows what the CPU runs natively: the probe's verdict for both CPU kinds, and a run, an
evaluation and generate that follow it (the probe patched each way, so both kinds are tested on either machine)."""

import os

import pytest
import torch

from medpeft import methods, precision
from medpeft.config import TrainConfig
from medpeft.modeling import model_compute_dtype
from test_methods import MATRIX, make

pytestmark = pytest.mark.filterwarnings("ignore")

ZEN3 = {"machine": "x86_64", "capability": "AVX2", "onednn_bf16": False, "avx512_bf16": False, "amx": False,
        "onednn_limit": None}  # AMD EPYC Zen 3: AVX2, no AVX512
ZEN4 = dict(ZEN3, capability="AVX512", onednn_bf16=True, avx512_bf16=True)
SAPPHIRE_RAPIDS = dict(ZEN4, amx=True)
SKYLAKE = dict(ZEN3, capability="AVX512", onednn_bf16=True)  # AVX512 without bf16: oneDNN emulates it
LIMITED = dict(ZEN4, capability="AVX2", onednn_bf16=False, onednn_limit="AVX2")  # ONEDNN_MAX_CPU_ISA=AVX2
GRAVITON3 = dict(ZEN3, machine="aarch64", capability="SVE256", onednn_bf16=True, avx512_bf16=None, amx=None)
GRAVITON2 = dict(GRAVITON3, capability="DEFAULT", onednn_bf16=False)


@pytest.mark.parametrize("found, native, why", [
    (ZEN3, False, "no AVX512-BF16 or AMX instructions"),
    (ZEN4, True, "AVX512-BF16"),
    (SAPPHIRE_RAPIDS, True, "AVX512-BF16+AMX"),
    (SKYLAKE, False, "no AVX512-BF16 or AMX instructions"),
    (LIMITED, False, "AVX512-BF16 present but oneDNN will not use it: ONEDNN_MAX_CPU_ISA=AVX2"),
    (GRAVITON3, True, "oneDNN bf16 on aarch64"),
    (GRAVITON2, False, "no oneDNN bf16 on aarch64"),
])
def test_the_probe_calls_bf16_native_only_where_the_instructions_and_onednn_both_say_so(found, native, why):
    verdict = precision.judge(found)
    assert verdict.native is native and verdict.why == why and verdict.capability == found["capability"]


def test_this_machines_probe_reads_pytorch():
    found = precision.probe()
    assert found["capability"] == torch.backends.cpu.get_cpu_capability()
    assert precision.cpu_bf16() == precision.judge(found)
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2"):  # the AVX2-only kind, simulated
        assert not precision.cpu_bf16().native


@pytest.fixture(params=["avx2", "bf16"])
def cpu_kind(request, monkeypatch):
    """The probe's verdict patched to one CPU kind, whatever this machine is."""
    verdict = precision.judge(ZEN3 if request.param == "avx2" else ZEN4)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: verdict)
    return request.param


def test_auto_and_explicit_dtypes_on_each_cpu_kind(cpu_kind):
    native = cpu_kind == "bf16"
    assert precision.resolve("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve("float32", "cpu") == torch.float32
    assert precision.resolve("bfloat16", "cpu") == torch.bfloat16
    line = precision.explain("auto", "cpu")
    if native:
        assert line == "CPU with native bf16 (AVX512; AVX512-BF16): computing in bfloat16"
    else:
        assert line == "CPU without native bf16 (AVX2; no AVX512-BF16 or AMX instructions): computing in float32"
    forced = precision.explain("bfloat16", "cpu")
    assert ("warning: bf16 is emulated on this CPU, about 30x slower than --dtype float32" in forced) is not native
    assert "warning" not in precision.explain("float32", "cpu")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        precision.resolve("float16", "cpu")


@pytest.mark.parametrize("row", ["qlora-nf4", "adapter-pfeiffer"])
def test_a_run_computes_in_the_dtype_the_cpu_runs_natively(cpu_kind, row, tiny_model, processed, tmp_path):
    """4-bit layers' compute, 16-bit weights, the Trainer's mixed precision and the logged line all follow the probe;
    an explicit --dtype float32 wins on either kind."""
    method, options, overrides, _ = MATRIX[row]
    expected = torch.bfloat16 if cpu_kind == "bf16" else torch.float32
    run = make(tiny_model, processed, tmp_path / "out", method, options, overrides, max_steps=1, save_steps=0,
               report_to="none")
    try:
        assert model_compute_dtype(run.model) == expected
        if overrides.get("load_in_4bit"):
            layer = run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
            assert layer.compute_dtype == expected
        else:  # the frozen base's weights; the method's own stay float32
            assert run.model.model.layers[0].self_attn.q_proj.weight.dtype == expected
        before = os.environ.get("ACCELERATE_MIXED_PRECISION")
        seen = []
        original = run._run_trainer

        def spy(*args):  # the Trainer's mixed precision while it trains
            out = original(*args)
            seen.append((os.environ.get("ACCELERATE_MIXED_PRECISION"), out[0].args.bf16))
            return out

        run._run_trainer = spy
        metrics = run.fit()
        assert seen == [("bf16", True) if cpu_kind == "bf16" else ("no", False)]
        assert metrics["compute_dtype"] == ("bfloat16" if cpu_kind == "bf16" else "float32")
        assert os.environ.get("ACCELERATE_MIXED_PRECISION") == before  # the process is left as it was
    finally:
        run.cleanup()
    forced = make(tiny_model, processed, tmp_path / "fp32", method, options, overrides, max_steps=1, save_steps=0,
                  report_to="none", dtype="float32")
    try:
        assert model_compute_dtype(forced.model) == torch.float32
    finally:
        forced.cleanup()


def test_the_run_logs_its_choice(cpu_kind, tiny_model, processed, tmp_path):
    from medpeft.training import build

    lines = []
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(tmp_path / "o"), max_steps=1)
    run = build("adapter", cfg, methods.get("adapter").Options(adapter_size=8), log=lines.append)
    run.cleanup()
    assert precision.explain("auto", "cpu") in lines


def test_evaluation_and_generate_follow_the_probe(cpu_kind, tiny_model, processed, tmp_path, capsys):
    from medpeft.cli import run
    from medpeft.config import EvalConfig
    from medpeft.evaluation import run_evaluation

    lines = []
    results = run_evaluation(EvalConfig(base_model=tiny_model, test_data=f"{processed}/test.json", max_samples=2,
                                        max_new_tokens=2, output_file=str(tmp_path / "r.json")), log=lines.append)
    assert results["models"]["base"]["status"] == "ok"
    assert precision.explain("auto", "cpu") in lines
    assert run(["generate", "--model", tiny_model, "--prompt", "What causes scurvy?", "--max_new_tokens", "2"]) == 0
    assert precision.explain("auto", "cpu") in capsys.readouterr().err
    assert run(["generate", "--model", tiny_model, "--prompt", "Hi", "--max_new_tokens", "2",
                "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert ("about 30x slower" in err) is (cpu_kind == "avx2")


def test_the_readme_shows_the_lines_a_run_prints(monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for found in (ZEN3, ZEN4):
        verdict = precision.judge(found)
        monkeypatch.setattr(precision, "cpu_bf16", lambda verdict=verdict: verdict)
        assert f"    {precision.explain('auto', 'cpu')}\n" in readme
