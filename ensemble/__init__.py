"""Serving: merlin-systems operators, the Triton model repository build, and the server launcher."""
