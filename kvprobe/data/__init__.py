"""Samples for a capture: passcodes and the label-unique split, Memento traces (read,
written, tokenized), text-level passcode injection with verification, and the trace
passcode source (the toy's own source lives with the toy, `toy_models.source`).
"""
