"""Tests of kvprobe.training: the two-stage Memento SFT and its launch configs."""
