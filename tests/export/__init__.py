"""Tests of kvprobe.export: a store as a `datasets` dataset or safetensors files, and read back."""
