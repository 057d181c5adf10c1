"""``python -m benchmarks.safety_contamination``: see the package's docstring."""

from benchmarks.safety_contamination.cli import main

main()
