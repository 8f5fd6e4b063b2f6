"""Tests of kvprobe.reporting: tables, summaries and figures."""
