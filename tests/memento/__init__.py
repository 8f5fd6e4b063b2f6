"""Tests of kvprobe.memento: layout, masks, the masked forward, generation with compaction."""
