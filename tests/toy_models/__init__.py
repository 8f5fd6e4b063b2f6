"""Tests of the toy_models plugin: the toy model, its training, its shipped results."""
