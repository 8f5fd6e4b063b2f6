"""Tests of kvprobe.cli: every command in-process, bad input and recovery."""
