"""The toy world: a corpus with planted memorization, a tiny model trained on it, and the demo."""
