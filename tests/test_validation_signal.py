"""The validation loss says what it should, through train.py on the demo's coloured shapes (configs/shapes_sd3.toml:
the tiny SD3 model, the trained tiny VAE, 64 px): it falls while the model learns, and on a few images trained for
many steps it turns and rises while the training loss keeps falling (memorising). Tests of the signal, not of a
number: the shortened forms of bench/validation_signal.py (seed 0; the bench runs them, and longer ones, over
several seeds: docs/validation.md gives the spread)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import validation_signal as vs  # noqa: E402


@pytest.mark.slow
def test_validation_falls_while_the_model_learns(tmp_path):
    c = vs.run(str(tmp_path), "sd3", vs.SHORT["learn"], seed=0)
    assert [s for s, _ in c.val] == [15, 30, 45, 60]
    assert vs.falls(c), vs.describe("learn", c)
    assert all(b < a for a, b in zip([v for _, v in c.val], [v for _, v in c.val][1:])), vs.describe("learn", c)


@pytest.mark.slow
def test_overfitting_shows_as_validation_rising_while_training_falls(tmp_path):
    c = vs.run(str(tmp_path), "sd3", vs.SHORT["overfit"], seed=0)
    assert vs.turns_up(c), vs.describe("overfit", c)
    # a turn, not a curve that never fell: the model learnt before it memorised
    vals = [v for _, v in c.val]
    assert min(vals) < vals[0], vs.describe("overfit", c)
