"""Raising the open-files limit at start-up.

Most systems start processes with a soft ``RLIMIT_NOFILE`` of 1,024 while allowing far more (the
hard limit). Every connection the admin/ingress server holds, every broker and function
connection, costs a file descriptor, so 1,024 is a ceiling a burst of clients reaches quickly;
the soft limit may be raised up to the hard limit without privileges.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["raise_open_files_limit"]

log = logging.getLogger("fastconn.daemon")


def raise_open_files_limit() -> int:
    """Raises the soft open-files limit to the hard one (logged); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard in (resource.RLIM_INFINITY, soft):
        # "unlimited" cannot be a soft limit on Linux (it is capped by fs.nr_open): leave it.
        log.info("open files limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays at %d: cannot raise it to %d (%s)", soft, hard, exc)
        return soft
    log.info("open files limit raised from %d to %d", soft, hard)
    return hard
