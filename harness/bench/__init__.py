"""``python -m harness.bench``: throughput, step time and memory figures of the harness
(:mod:`harness.bench.cli` has the options). One module per section: :mod:`.sampler`,
:mod:`.steps` (every registered stage, built through :meth:`harness.stage.Stage.build`) and
:mod:`.memory`; :mod:`.common` holds what they share."""

from harness.bench.cli import main, parse_args, run_bench
from harness.bench.common import format_table, model_config

__all__ = ["format_table", "main", "model_config", "parse_args", "run_bench"]
