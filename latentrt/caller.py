"""Warnings shown at the user's line: the call into latentrt that led to them (``generate(...)``, ``load(...)``).

A hand-counted ``stacklevel`` names the right frame only from one call path: the same option check runs under
``generate()``, ``evaluate()``, the CLI and the server, at different depths, and the count goes stale when a
function is split (a warning of ``generate()`` pointed into latentrt/engine.py). Python 3.12's
``skip_file_prefixes`` does this, but latentrt runs on 3.11 too.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the frame that called into latentrt: the caller of the
    outermost latentrt frame on the stack (frames of other libraries in between, e.g. torch's ``no_grad``
    wrapper, do not end the search)."""
    frame, level, outermost = sys._getframe(1), 2, 1
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=outermost + 1)
