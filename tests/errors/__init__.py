"""Tests of kvprobe.errors."""
