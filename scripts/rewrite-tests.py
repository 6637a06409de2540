"""
Write pytest's rewritten test modules (the ``-pytest-`` bytecode caches)
once, before the test workers start.

Each pytest-xdist worker imports every test module and, finding no cache,
rewrites its asserts: on a fresh clone six workers would each spend seconds
of CPU doing the same work at once. pytest itself then reads these caches
(hash-checked, so a fresh clone's timestamps do not matter). This uses
pytest's own rewriter; if its internals ever move, nothing is written and the
workers rewrite as before.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def rewrite(path: str) -> None:
    from _pytest.assertion.rewrite import PYC_TAIL, _rewrite_test, _write_pyc_fp, get_cache_dir

    source = Path(path)
    sourceHash, code = _rewrite_test(source, None)  # type: ignore[arg-type]
    cache = get_cache_dir(source)
    cache.mkdir(exist_ok=True)
    target = cache / (source.name[:-3] + PYC_TAIL)
    partial = target.with_name(f"{target.name}.{os.getpid()}")
    with open(partial, "wb") as f:
        _write_pyc_fp(f, sourceHash, code)
    os.replace(partial, target)


def main(root: str) -> None:
    try:
        import _pytest.assertion.rewrite as rewriter

        for name in ("PYC_TAIL", "_rewrite_test", "_write_pyc_fp", "get_cache_dir"):
            getattr(rewriter, name)
    except (ImportError, AttributeError):
        return
    paths = sorted(str(p) for pattern in ("test_*.py", "conftest.py") for p in Path(root).rglob(pattern))
    with ProcessPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        list(pool.map(rewrite, paths, chunksize=8))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests")
