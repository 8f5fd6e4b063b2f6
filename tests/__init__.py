"""kvprobe's tests, laid out like the package: tests/<area>/ holds the tests of kvprobe/<area>
(a subpackage kvprobe/P/ or a top-level module kvprobe/P.py), tests/toy_models/ the toy plugin's,
tests/project/ the whole project's (architecture, README, published numbers, notebook, GPU check),
tests/helpers/ the shared helpers (imported as `tests.helpers.X`), tests/fixtures/ the data files."""
