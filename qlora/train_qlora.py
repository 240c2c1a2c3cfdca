"""Seed entry point: `python qlora/train_qlora.py --help`. The logic lives in medpeft/ (see medpeft.cli)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medpeft.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], prog="qlora/train_qlora.py", command="train", method="qlora"))
