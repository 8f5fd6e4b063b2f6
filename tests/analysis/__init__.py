"""Tests of kvprobe.analysis: probing a store, grids saved, merged and Holm-corrected."""
