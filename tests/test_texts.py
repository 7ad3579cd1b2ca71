"""The built-in texts: every kind is real, fixed, named, and as long as asked."""

from __future__ import annotations

import pytest

from edgetok.errors import EdgetokError
from edgetok.texts import KINDS, corpus, essays


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_deterministic_and_long_enough(kind):
    text = corpus(kind, 30000)
    assert len(text) >= 30000
    assert corpus(kind, 30000) == text
    assert KINDS[kind].source  # named in BENCHMARKS.md
    assert len(set(text.split())) > 500  # real text, not a repeated line


def test_kinds_differ():
    starts = {corpus(kind, 5000)[:2000] for kind in KINDS}
    assert len(starts) == len(KINDS) >= 7


def test_kinds_look_like_what_they_are_called():
    assert "def " in corpus("code", 20000) and "import " in corpus("code", 20000)
    assert "License" in corpus("legal", 20000)
    assert "urgency=" in corpus("changelog", 20000)  # Debian changelog entries
    structured = corpus("structured", 20000)
    assert '": ' in structured and "Date," in structured  # JSON and CSV
    assert corpus("dialogue", 20000).count("**") > 100  # speakers' names in bold


def test_essays_are_the_first_kind():
    assert essays(20000) == corpus("essays", 20000)


def test_unknown_kind_is_one_sentence():
    with pytest.raises(EdgetokError, match="no text kind 'poems'"):
        corpus("poems", 100)
