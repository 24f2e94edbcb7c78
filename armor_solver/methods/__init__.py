"""Pruning methods: (weight, statistics, config) -> ArmorWeights."""
