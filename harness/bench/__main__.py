"""``python -m harness.bench``."""

from harness.bench.cli import main

main()
