"""Tests of kvprobe.data: traces, passcode injection, chat templates, OpenMementos, trace quality."""
