"""train.py with tests.evaluation_helpers.mean_distance standing in for the Fréchet distance: the
script tests/test_train_evaluate.py launches (never imported)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dit_fast.evaluation.suite as suite  # noqa: E402
from dit_fast.train.cli import cli  # noqa: E402
from tests.evaluation_helpers import mean_distance  # noqa: E402

suite.frechet_distance = mean_distance
cli()
