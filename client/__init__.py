"""Client for the retrieval server: library, CLI and load tests."""
