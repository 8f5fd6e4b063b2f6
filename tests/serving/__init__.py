"""Tests of kvprobe.serving: the served-model client, the fork's config, offline vLLM, several servers."""
