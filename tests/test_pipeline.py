"""The one-command pipeline (run_all.py): every stage end to end, skipping what is done, a failing method
reported, training stages through the launcher, and its settings: every training flag, per-method sections, all
problems at once before anything runs."""

import json
from pathlib import Path

import pytest

from conftest import free_port
from medpeft import config, methods
from medpeft.cli import run
from medpeft.errors import UsageError
from medpeft.pipeline import DEMO_CONFIG, plan


@pytest.mark.slow
def test_pipeline_benches_every_trained_model_after_the_evaluation(tiny_model, tmp_path, capsys):
    from conftest import write_jsonl
    from test_bench import general_rows, medqa_rows

    write_jsonl(tmp_path / "medqa_test.jsonl", medqa_rows(10))
    write_jsonl(tmp_path / "general_test.jsonl", general_rows(6))
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path / "run"), "--max_steps", "2",
            "--max_samples", "8", "--max_new_tokens", "4", "--batch_size", "4", "--methods", "qlora,ptuning",
            "--bench", "medqa_local", "--bench_general", "general_local", "--bench_data_dir", str(tmp_path)]
    assert run(argv, prog="run_all.py", command="run") == 0
    results = json.loads((tmp_path / "run" / "evaluation_results.json").read_text())
    assert set(results["models"]) == {"base", "qlora", "ptuning"}  # the evaluation is still there
    bench = results["bench"]["models"]
    assert set(bench) == {"base", "qlora", "ptuning"}
    assert all(bench[m]["medqa_local"]["items"] == 10 and bench[m]["general_local"]["items"] == 6 for m in bench)
    assert "gain_vs_base_ci" in bench["qlora"]["medqa_local"]
    assert "Forgetting check" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow  # make test-fast leaves it out
def test_pipeline_runs_every_stage_then_skips_them(tiny_model, tmp_path, monkeypatch, capsys):
    """run_all end to end on the tiny model; a second run skips every finished stage."""
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--max_samples", "12",
            "--max_new_tokens", "4", "--batch_size", "4"]
    assert run(argv, prog="run_all.py", command="run") == 0
    first = capsys.readouterr().out
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert set(results["models"]) == {"base", "qlora", "adapter", "ptuning"}
    assert all(e["status"] == "ok" for e in results["models"].values())
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    assert "model" in first and "qlora" in first and "gain vs base" in first  # the terminal summary table
    weights = tmp_path / "models" / "qlora" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns

    assert run(argv, prog="run_all.py", command="run") == 0
    second = capsys.readouterr().out
    assert second.count("up to date, skipped") == 5  # prepare, three methods, evaluation
    assert weights.stat().st_mtime_ns == stamp

    assert run(argv[:-2] + ["--batch_size", "2"], prog="run_all.py", command="run") == 0
    third = capsys.readouterr().out
    assert third.count("up to date, skipped") == 1 and "[1/3] prepare" in third  # only the data is reused


def test_a_failing_method_is_reported_not_fatal(tiny_model, tmp_path, monkeypatch, capsys):
    from medpeft.methods import adapter

    def broken(ctx, opts):
        raise RuntimeError("simulated adapter crash")

    monkeypatch.setattr(adapter, "prepare", broken)
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "1", "--max_samples", "6",
            "--max_new_tokens", "2", "--methods", "qlora,adapter"]
    assert run(argv, prog="run_all.py", command="run") == 0
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert results["models"]["qlora"]["status"] == "ok"
    assert results["models"]["adapter"] == {"name": "adapter", "path": None, "status": "failed",
                                            "error": "training failed: RuntimeError: simulated adapter crash"}
    assert "failed: training failed: RuntimeError: simulated adapter crash" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # make test-fast leaves it out
def test_run_all_trains_each_stage_through_the_launcher(tiny_model, tmp_path, monkeypatch, capsys):
    """run_all --num_gpus N hands each training stage to the launcher as `medpeft train --config FILE`; the
    launched run writes the stage's fingerprint, so a second run_all skips it. (The launcher is replaced by an
    in-process call here: this machine has no GPU.)"""
    launched = []

    def one_process_launch(num_gpus, argv, fsdp=False, env=None):
        import torch.distributed as dist

        launched.append((num_gpus, argv[:3], fsdp))
        # as in a launched process (of one), which does not launch again
        launched_env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), **(env or {})}
        for k, v in launched_env.items():
            monkeypatch.setenv(k, v)
        try:
            return run(argv)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for k in launched_env:
                monkeypatch.delenv(k, raising=False)  # the launched command consumes the stage fingerprint

    monkeypatch.setattr("medpeft.pipeline.launch", one_process_launch)
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--max_samples", "8",
            "--max_new_tokens", "4", "--batch_size", "4", "--methods", "qlora,adapter", "--num_gpus", "2"]
    assert run(argv, prog="run_all.py", command="run") == 0
    assert launched == [(2, ["train", "--method", "qlora"], False), (2, ["train", "--method", "adapter"], False)]
    settings = json.loads((tmp_path / "models" / "adapter" / "medpeft_config.json").read_text())["settings"]
    assert settings["num_gpus"] == 2 and settings["max_steps"] == 2 and settings["learning_rate"] == 1e-4
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert all(results["models"][m]["status"] == "ok" for m in ("base", "qlora", "adapter"))
    capsys.readouterr()
    assert run(argv, prog="run_all.py", command="run") == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 4 and len(launched) == 2


def test_run_all_on_more_gpus_than_the_machine_has_stops_with_one_line(tiny_model, tmp_path, capsys):
    code = run(["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--num_gpus", "2"],
               prog="run_all.py", command="run")
    assert code == 2
    assert "--num_gpus 2: 0 CUDA GPU(s) visible; lower --num_gpus" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_demo_run_config_parses():
    data = config.load_yaml(str(DEMO_CONFIG))
    steps = plan(["--config", str(DEMO_CONFIG)])
    assert steps.prepare.model_name == "smollm2-135m" and Path(steps.run.input_data).is_file()
    assert DEMO_CONFIG.read_text().startswith("# python run_all.py")
    for name in methods.NAMES:  # every per-method setting is a real field
        module = methods.get(name)
        known = {f for s in (config.TrainConfig, module.Options) for f in s.__dataclass_fields__}
        assert set(data.get(name, {})) <= known, name


def test_run_all_takes_every_training_flag_for_every_method(tmp_path):
    """A training flag is declared once (TrainConfig) and reaches every stage of run_all; what the pipeline sets
    itself (data and output folders, resuming) is not a flag."""
    steps = plan(["--output_root", str(tmp_path), "--max_grad_norm", "0.5", "--lr_scheduler_type", "linear",
                  "--methods", "qlora,ptuning"])
    assert set(steps.stages) == {"qlora", "ptuning"}
    for name, (train_cfg, _) in steps.stages.items():
        assert train_cfg.max_grad_norm == 0.5 and train_cfg.lr_scheduler_type == "linear"
        assert train_cfg.learning_rate == "auto"  # not given: searched (tests/test_selection.py)
        assert train_cfg.output_dir == str(tmp_path / "models" / name)
        assert train_cfg.resume_from_checkpoint == "auto"
    short = plan(["--output_root", str(tmp_path), "--max_steps", "2", "--methods", "qlora,ptuning"])
    for name, (train_cfg, _) in short.stages.items():  # too short to search unasked: the method's default
        assert train_cfg.learning_rate == methods.get(name).DEFAULTS["learning_rate"]
    with pytest.raises(Exception, match="unrecognized arguments: --output_dir"):
        plan(["--output_dir", "x"])


def test_a_new_training_flag_reaches_the_trainer(tiny_model, processed, tmp_path):
    """--max_grad_norm, added in one field of TrainConfig and one argument of the Trainer, clips the gradients."""
    from medpeft.config import TrainConfig
    from medpeft.training import build

    run_ = build("adapter", TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(tmp_path / "o"),
                                        max_steps=2, max_grad_norm=0.25, save_steps=0, report_to="none"),
                 methods.get("adapter").Options(adapter_size=8), log=lambda *a: None)
    seen = []
    original = run_._run_trainer

    def spy(*args):
        out = original(*args)
        seen.append(out[0].args.max_grad_norm)
        return out

    run_._run_trainer = spy
    try:
        run_.fit()
    finally:
        run_.cleanup()
    assert seen == [0.25]


def test_per_method_sections_go_through_the_same_door_as_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("methods: qlora,adapter\nqlora:\n  learning_rate: 2e-3\n  lora_r: '8'\nadapter:\n  adapter_size: 4\n")
    steps = plan(["--config", str(path), "--output_root", str(tmp_path)])
    qlora_cfg, qlora_opts = steps.stages["qlora"]
    assert qlora_cfg.learning_rate == 2e-3 and isinstance(qlora_cfg.learning_rate, float)  # YAML reads 2e-3 as text
    assert qlora_opts.lora_r == 8 and steps.stages["adapter"][1].adapter_size == 4


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_config_float32_section_applies_where_models_compute_in_float32(native_bf16, tmp_path, monkeypatch):
    """The demo's smaller job for CPUs without native bf16 (about half as fast): the float32 section replaces the
    file's settings, top-level and per-method, but not a flag; elsewhere it is checked and left out."""
    import types

    from medpeft import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: types.SimpleNamespace(native=native_bf16))
    path = tmp_path / "run.yaml"
    path.write_text("num_epochs: 3\nmax_samples: -1\neval_steps: 9\nqlora:\n  max_eval_samples: 16\n"
                    "float32:\n  num_epochs: 2\n  max_samples: 80\n  eval_steps: 6\n  max_eval_samples: 8\n")
    steps = plan(["--config", str(path), "--output_root", str(tmp_path), "--eval_steps", "4"])
    qlora, adapter = steps.stages["qlora"][0], steps.stages["adapter"][0]
    if native_bf16:
        assert steps.float32_settings == {}
        assert (qlora.num_epochs, steps.evaluate.max_samples, qlora.max_eval_samples) == (3, -1, 16)
    else:
        assert steps.float32_settings == {"num_epochs": 2, "max_samples": 80, "max_eval_samples": 8}
        assert (qlora.num_epochs, adapter.num_epochs, steps.evaluate.max_samples) == (2, 2, 80)
        assert qlora.max_eval_samples == 8 and adapter.max_eval_samples == 8  # beats the qlora section
    assert qlora.eval_steps == 4  # the flag wins on either machine
    path.write_text("float32:\n  num_epoks: 2\n")
    with pytest.raises(UsageError, match="float32: .*unknown setting 'num_epoks'"):
        plan(["--config", str(path), "--output_root", str(tmp_path)])


def test_every_problem_of_every_stage_is_reported_before_anything_runs(tiny_model, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("qlora:\n  lora_r: 0\n  init_lora_weights: loftq\n  load_in_4bit: false\n"
                    "adapter:\n  adapter_sise: 4\nptuning:\n  learning_rate: fast\n")
    code = run(["--config", str(path), "--model_name", tiny_model, "--output_root", str(tmp_path / "out")],
               prog="run_all.py", command="run")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "qlora: --lora_r must be positive, got 0" in err
    assert "adapter: " in err and "unknown setting 'adapter_sise'" in err and "adapter_size" in err
    assert "ptuning: " in err and "learning_rate" in err and "fast" in err
    assert not (tmp_path / "out").exists()  # nothing prepared, nothing trained


def test_a_rule_between_settings_stops_a_run_before_any_model_loads(tiny_model, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("qlora:\n  init_lora_weights: loftq\n  load_in_4bit: false\n")
    code = run(["--config", str(path), "--model_name", tiny_model, "--output_root", str(tmp_path / "out"),
                "--methods", "qlora"], prog="run_all.py", command="run")
    assert code == 2 and "qlora: --init_lora_weights loftq fits LoRA to the 4-bit quantization error" in \
        capsys.readouterr().err and not (tmp_path / "out").exists()


def test_variants_train_beside_the_methods_and_are_compared_in_one_report(tiny_model, tmp_path, capsys):
    """run_all --variants: DoRA, rsLoRA and LoRA+ rows in one report with the base and the plain QLoRA."""
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--max_samples", "8",
            "--max_new_tokens", "4", "--batch_size", "4", "--methods", "qlora", "--variants",
            "qlora:use_dora=true;qlora:use_rslora=true;qlora:loraplus_lr_ratio=16"]
    assert run(argv, prog="run_all.py", command="run") == 0
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    names = ["qlora", "qlora-use_dora", "qlora-use_rslora", "qlora-loraplus_lr_ratio16"]
    assert set(results["models"]) == {"base", *names}
    assert all(results["models"][n]["status"] == "ok" for n in names)
    for name, option, value in (("qlora-use_dora", "use_dora", True), ("qlora-use_rslora", "use_rslora", True),
                                ("qlora-loraplus_lr_ratio16", "loraplus_lr_ratio", 16.0)):
        settings = json.loads((tmp_path / "models" / name / "medpeft_config.json").read_text())["settings"]
        assert settings[option] == value and settings["lora_r"] == 16  # the variant's option, the rest as qlora's
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names)


def test_a_bad_variant_is_refused_before_anything_runs(tiny_model, tmp_path, capsys):
    for variants, expected in (("lora:use_dora=true", "is not METHOD:OPTION=VALUE"),
                               ("qlora:use_dorra=true", "unknown setting 'use_dorra'"),
                               ("qlora:loraplus_lr_ratio=0.5", "0 (off) or at least 1")):
        code = run(["--model_name", tiny_model, "--output_root", str(tmp_path / "out"), "--variants", variants],
                   prog="run_all.py", command="run")
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
