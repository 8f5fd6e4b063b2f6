"""Tests of kvprobe.stats."""
