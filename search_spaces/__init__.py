"""Declarative search spaces (YAML), read by tuner.spaces."""
