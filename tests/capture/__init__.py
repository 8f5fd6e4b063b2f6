"""Tests of kvprobe.capture: the capture into the store and its backends."""
