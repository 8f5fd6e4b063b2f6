"""Tests of kvprobe.probes: the batched probes, the solver, the strength selection."""
