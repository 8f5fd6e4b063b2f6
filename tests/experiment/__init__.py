"""Tests of kvprobe.experiment: the pipeline's stages, the run directory, scale-out paths."""
