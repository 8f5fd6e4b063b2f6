"""Tests of kvprobe.causal."""
