"""Datasets: upstream readers, the prepared cache and the loaders that feed training."""
