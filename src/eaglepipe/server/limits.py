"""Process limits that high request concurrency runs into."""
from __future__ import annotations

import contextlib


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit (each connection is a file descriptor); returns it."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft
