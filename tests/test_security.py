"""Secrets: a whole pipeline run with a token in the environment writes and prints it nowhere."""

import os
from pathlib import Path

import pytest

from medpeft.cli import run

pytestmark = pytest.mark.filterwarnings("ignore")


def test_token_appears_in_no_output_or_message(tiny_model, tmp_path, capfd, monkeypatch):
    token = "hf_" + "".join(chr(65 + (i * 7) % 26) for i in range(34))  # built here: no token-shaped literal
    monkeypatch.setenv("HF_TOKEN", token)
    root = tmp_path / "run"
    code = run(["run", "--model_name", tiny_model, "--output_root", str(root), "--methods", "qlora,adapter",
                "--max_steps", "2", "--max_samples", "6", "--max_new_tokens", "4", "--batch_size", "4"])
    assert code == 0
    printed = capfd.readouterr()
    assert token not in printed.out and token not in printed.err
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10  # processed data, two trained outputs, results, report
    leaks = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert leaks == []
    assert os.environ["HF_TOKEN"] == token  # read from the environment, left as it was
    assert not any(Path(tmp_path).glob("**/.huggingface/token"))
