import sys
from pathlib import Path

# The trainer tests' helpers (tiny word-level chat tokenizer, tiny models, interaction streams).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from tiny_models import single_thread  # noqa: E402, F401  (autouse: one torch thread per test)
