"""Which transformers releases this library was tested with, and what it says about any other."""

from __future__ import annotations

import re

# The transformers releases whose MoE code the tests verify: (first, last) minor versions, inclusive.
TESTED_TRANSFORMERS = ((5, 23), (5, 25))


def transformers_version() -> tuple[int, int] | None:
    try:
        import transformers
    except ImportError:
        return None
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else None


def tested_range_text() -> str:
    (a, b), (c, d) = TESTED_TRANSFORMERS
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b}-{c}.{d}"


def untested_transformers() -> str:
    """"" for a tested transformers release; else a sentence naming the installed and tested ones."""
    version = transformers_version()
    if version is None or TESTED_TRANSFORMERS[0] <= version <= TESTED_TRANSFORMERS[1]:
        return ""
    import transformers

    return (f"transformers {transformers.__version__} is not a release megamoe-compile was tested with "
            f"({tested_range_text()}); MoE layers whose traced code differs from the tested releases' are "
            "reported 'not recognised' and left unfused, never rewritten")
