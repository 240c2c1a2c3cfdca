"""Helpers the seed kept in utils/common.py, now re-exported from the medpeft package."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medpeft.data import load_split  # noqa: E402,F401
from medpeft.tokens import tokenize_records  # noqa: E402,F401
from medpeft.modeling import load_model, load_tokenizer, resolve_model  # noqa: E402,F401
from medpeft.outputs import load_trained  # noqa: E402,F401
