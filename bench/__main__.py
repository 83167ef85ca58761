"""``python -m bench [SCENARIO [ARGS...]]``: run one benchmark scenario, or all of them.

Each scenario is a module with ``main(argv) -> int`` that prints its table and writes
``bench/results/<scenario>.json``; add new ones to ``SCENARIOS``. Without a scenario name every
scenario runs with its defaults, one after the other (about ten minutes on a 2-core machine); a
scenario that draws no chart of its own gets a generic one of its JSON (``bench.chart``). The
exit status is the highest any scenario returned; a scenario that crashes is reported and the
others still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bench.chart import available, chart_from_json
from bench.common import RESULTS_DIR

_CANDIDATES: dict[str, str] = {
    "fanout": "bench.fanout",
    "latency": "bench.latency",
    "connections": "bench.connections",
    "jobs": "bench.jobs",
    "pipeline": "bench.pipeline",
    "cluster": "bench.cluster",
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


SCENARIOS: dict[str, str] = {name: mod for name, mod in _CANDIDATES.items() if _exists(mod)}
"""Scenario name to the module that holds its ``main(argv)``; imported only when it runs.
Only modules present in this checkout are listed."""


def scenario_main(name: str) -> Callable[[Sequence[str]], int]:
    """The ``main`` of scenario ``name``; KeyError for an unknown name."""
    module = importlib.import_module(SCENARIOS[name])
    entry: Callable[[Sequence[str]], int] = module.main
    return entry


def _usage() -> str:
    return (
        "usage: python -m bench [SCENARIO [ARGS...]]\n"
        f"scenarios: {', '.join(SCENARIOS)}\n"
        "python -m bench SCENARIO --help shows a scenario's options; "
        "with no scenario, all run with their defaults."
    )


def _mtime(name: str, suffix: str) -> float | None:
    try:
        return (RESULTS_DIR / f"{name}{suffix}").stat().st_mtime
    except OSError:
        return None


def _run_all() -> int:
    status = 0
    summary: list[str] = []
    began = time.monotonic()
    if not available():
        print("note: matplotlib is not installed, so no PNG charts (pip install -e '.[bench]')")
    for name in SCENARIOS:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        json_before, png_before = _mtime(name, ".json"), _mtime(name, ".png")
        try:
            code = scenario_main(name)([])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            print(f"{name}: the scenario crashed; going on with the next", flush=True)
            code = 1
        json_after, png_after = _mtime(name, ".json"), _mtime(name, ".png")
        if json_after is not None and json_after != json_before and png_after == png_before:
            print(chart_from_json(RESULTS_DIR / f"{name}.json"))
        seconds = time.monotonic() - started
        summary.append(f"  {name:<12} exit {code}  {seconds:6.0f} s")
        status = max(status, code)
    print("\n=== summary ===")
    print("\n".join(summary))
    print(f"  {'total':<12}         {time.monotonic() - began:6.0f} s; results in {RESULTS_DIR}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args and not args[0].startswith("-"):
        name, rest = args[0], args[1:]
        if name not in SCENARIOS:
            print(f"unknown scenario {name!r}\n{_usage()}", file=sys.stderr)
            return 2
        return scenario_main(name)(rest)
    if args:
        print(f"options need a scenario name first\n{_usage()}", file=sys.stderr)
        return 2
    return _run_all()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
