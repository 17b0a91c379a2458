"""The library and the prepare, train and stage commands of the reproduction suite (python -m reproduce)."""
