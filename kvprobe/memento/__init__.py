"""The Memento format and its attention: layout parsing, the memento mask, the masked
forward pass, and reference generation with physical KV compaction (SPEC section 2).

The first stage of kvprobe's pipeline: format -> data -> capture -> store -> probes ->
analysis -> reporting. Nothing here knows about passcodes or probes.
"""
