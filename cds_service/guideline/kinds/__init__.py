"""Criterion kinds: each module registers its evaluators with `register_kind`."""
