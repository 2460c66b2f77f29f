"""Declarative search spaces (YAML), read by tuner.space.search_space."""
