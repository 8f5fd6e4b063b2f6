"""Helpers shared by the tests: tiny models, stores, CLI runs, reference masks, fake servers."""
