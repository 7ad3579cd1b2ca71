"""What `edgetok bench` compares: systems, each a process that prints `edgetok run --json`.

An edgetok system is a list of `edgetok run` options on a model, run by edgetok.bench.forced (so a
new backend, e.g. `--backend onnxruntime` on an exported ONNX folder, is one more System). A peer
is another runtime on the same model: llama.cpp is `--backend llamacpp` on the matching GGUF;
transformers and onnxruntime-genai run in edgetok.bench.peers, and so does optimum, under the
interpreter of its own environment (optimum_env.py).
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from edgetok.bench import artifacts, optimum_env
from edgetok.errors import EdgetokError
from edgetok.models.sources import Source
from edgetok.runtimes.kv import KVConfig

REFERENCE = "edgetok fp32"  # the exact run: its greedy tokens and logits are what the others are compared with
DEFAULT = "edgetok default"  # `edgetok run MODEL` with no engine options: the default export on ONNX Runtime
TORCH = ("--backend", "torch")


@dataclass(frozen=True)
class System:
    name: str  # in tables, plots and results.json
    runner: str  # "edgetok" (`edgetok run` options) | "transformers" | "ortgenai" | "optimum"
    model: str  # a model reference for edgetok systems; the peer's model folder otherwise
    options: tuple[str, ...] = ()  # `edgetok run` options
    budget: str | None = None  # the --kv-budget of a budget sweep system
    peer: str | None = None  # the key in PEERS; None for edgetok's own systems
    python: str | None = None  # the interpreter of a peer with an environment of its own; None: this one

    def command(self, prompt_ids: Path, new_tokens: int, threads: int,
                follow: Path | None = None, logits_out: Path | None = None) -> list[str]:
        if self.runner == "edgetok":
            cmd = [sys.executable, "-m", "edgetok.bench.forced", self.model, *self.options]
        else:
            cmd = [self.python or sys.executable, "-m", "edgetok.bench.peers", self.runner, self.model]
        cmd += ["--prompt-ids", str(prompt_ids), "-n", str(new_tokens), "--threads", str(threads)]
        if follow is not None:
            cmd += ["--follow", str(follow)]
        if logits_out is not None:
            cmd += ["--logits-out", str(logits_out)]
        return cmd


@dataclass(frozen=True)
class Peer:
    label: str
    module: str  # what must be importable (in its own environment, for a peer with one)
    install: str  # the command that installs it
    own_env: bool = False  # runs under optimum_env's interpreter, not this one


PEERS = {
    "llamacpp": Peer("llama.cpp", "llama_cpp", "make install (it builds llama-cpp-python with the flags this machine needs)"),
    "ortgenai": Peer("onnxruntime-genai", "onnxruntime_genai", "pip install 'edgetok[peers]'"),
    "transformers": Peer("transformers", "transformers", "pip install transformers"),
    "optimum": Peer("optimum-onnx", "optimum.onnxruntime", optimum_env.MAKE_TARGET, own_env=True),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available(key: str) -> bool:
    """Whether the peer can run: its module here, or its own environment built."""
    peer = PEERS[key]
    return optimum_env.ready() if peer.own_env else installed(peer.module)


def parse_peers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for n in names:
        if n not in PEERS:
            raise EdgetokError(f"unknown peer '{n}' in --peers (choose from {', '.join(PEERS)}, or none)")
    return list(dict.fromkeys(names))


def edgetok_systems(model: str, budgets: list[str], extra: list[str]) -> list[System]:
    """The exact reference (torch, fp32) first, edgetok's default engine (no options), one torch system
    per KV budget below 100 %, then NAME=OPTIONS extras."""
    systems = [System(REFERENCE, "edgetok", model, TORCH), System(DEFAULT, "edgetok", model)]
    for b in budgets:
        if KVConfig(budget=b).full_budget:  # KVConfig says what is wrong with a bad budget
            continue  # 100 % is exact: the reference is that run
        systems.append(System(f"edgetok KV {b}", "edgetok", model, (*TORCH, "--kv-budget", b), budget=b))
    for spec in extra:
        name, sep, options = spec.partition("=")
        if not sep or not name.strip():
            raise EdgetokError(f"--system '{spec}' must be NAME=OPTIONS, e.g. 'int8=--weights int8 --kv-budget 25%'")
        systems.append(System(name.strip(), "edgetok", model, tuple(shlex.split(options))))
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise EdgetokError(f"two systems share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return systems


def skipped_peers(peers: list[str]) -> dict[str, str]:
    """Peers that are not installed → the sentence that says how to install them."""
    return {PEERS[k].label: optimum_env.missing() if PEERS[k].own_env else f"{PEERS[k].label} is not installed; run: {PEERS[k].install}"
            for k in peers if not available(k)}


def onnx_systems(model: str, source: Source, weights: list[str], budgets: list[str]) -> list[System]:
    """edgetok's ONNX exports ("W [export options]") run by its onnxruntime backend: exact, and at
    each budget below 100 %."""
    systems = []
    for spec in weights:
        folder = str(artifacts.onnx_folder(model, source, spec))
        name = f"edgetok onnx {spec}"  # e.g. "edgetok onnx int4 --attention standard"
        systems.append(System(name, "edgetok", folder))
        systems += [System(f"{name} KV {b}", "edgetok", folder, ("--kv-budget", b))
                    for b in budgets if not KVConfig(budget=b).full_budget]
    return systems


def peer_systems(model: str, source: Source, peers: list[str]) -> list[System]:
    """The installed peers, with their model files built (or found in the cache)."""
    systems = []
    for key in peers:
        peer = PEERS[key]
        if not available(key):
            continue
        if key == "llamacpp":
            gguf = artifacts.gguf_file(model, source)
            systems.append(System(peer.label, "edgetok", str(gguf), ("--backend", "llamacpp"), peer=key))
        elif key == "transformers":
            systems.append(System(f"{peer.label} fp32", "transformers", str(artifacts.hf_folder(model, source)), peer=key))
        elif key == "optimum":
            systems.append(System(f"{peer.label} fp32", "optimum", str(artifacts.optimum_folder(model, source)), peer=key,
                                  python=str(optimum_env.python())))
        else:
            systems.append(System(f"{peer.label} int4", "ortgenai", str(artifacts.ortgenai_folder(model, source)), peer=key))
    return systems
