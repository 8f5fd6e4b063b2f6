"""Tests of kvprobe.config and the example configs."""
