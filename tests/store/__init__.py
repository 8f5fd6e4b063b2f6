"""Tests of kvprobe.store: the sharded HDF5 store, its resume and its integrity checks."""
