"""Training: optimizers and steppers, EMA, the trained set, resume states, crash saves, step logs, summaries, run metadata, speed settings."""
