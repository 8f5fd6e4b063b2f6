"""Whole-project checks: architecture, README, published numbers, notebook, GPU paths and check."""
