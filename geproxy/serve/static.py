"""``docroot``: static files for origin-form requests on the proxy port, safely.

Only what lies under the directory is served, whatever the path says (``..``, encoded
slashes, symbolic links out of it); a directory serves its ``index.html``.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Iterable, Optional
from urllib.parse import unquote

__all__ = ["find_file", "content_type", "docroot_file"]


def docroot_file(docroot: str, local_paths: Iterable[str], method: str,
                 path: str) -> Optional[str]:
    """The file of ``docroot`` that answers a request (without a body) for the proxy itself,
    or None: GET and HEAD only, and never for a path of ``local_paths``, the proxy's own
    pages, which come first."""
    if not docroot or method not in ("GET", "HEAD"):
        return None
    if path.partition("?")[0] in local_paths:
        return None
    return find_file(docroot, path)


def find_file(docroot: str, path: str) -> Optional[str]:
    """The file ``path`` names under ``docroot``, or None (not there, or outside it)."""
    relative = unquote(path.partition("?")[0]).lstrip("/")
    if "\x00" in relative:
        return None
    root = os.path.realpath(docroot)
    candidate = os.path.realpath(os.path.join(root, relative))
    if candidate != root and not candidate.startswith(root + os.sep):
        return None  # a path (or a link) that leads out of the directory
    if os.path.isdir(candidate):
        candidate = os.path.join(candidate, "index.html")
        if os.path.realpath(candidate) != candidate and not os.path.realpath(
                candidate).startswith(root + os.sep):
            return None
    return candidate if os.path.isfile(candidate) else None


def content_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename)
    if guessed is None:
        return "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
