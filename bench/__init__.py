"""`make bench`: our ensemble beside the Merlin reference, Triton's floor and the in-process path."""
