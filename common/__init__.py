"""Shared pieces of every stage: configuration, names, manifest, errors and logging."""
