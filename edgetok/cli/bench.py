"""`edgetok bench`: edgetok and peer runtimes, each in its own process, on the same prompts."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.argument("model")
@click.option("--contexts", default="1024,4096,8192", show_default=True,
              help="context lengths (tokens, or 8K); the prompt leaves room for the new tokens")
@click.option("--new-tokens", "-n", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--kv-budget", "kv_budgets", default="100%,25%", show_default=True,
              help="edgetok's tiered KV budgets to sweep (100% is the exact run)")
@click.option("--peers", default="llamacpp,ortgenai,transformers", show_default=True,
              help="other runtimes on the same model (llamacpp, ortgenai, transformers, optimum: `make optimum-env` "
                   "builds its environment), or none")
@click.option("--system", "extra_systems", multiple=True, metavar="NAME=OPTIONS",
              help="one more edgetok system: `edgetok run` options, e.g. 'int8=--weights int8 --kv-budget 25%'")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads of every system (default: all cores)")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="rounds; speeds are their median")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("edgetok-bench"), show_default=True,
              help="folder for results.json and the plots")
@click.option("--onnx", "onnx_weights", multiple=True, metavar="'W [EXPORT OPTIONS]'",
              help="also edgetok's ONNX export at weights W (fp32, fp16, int8, int4), with any more `edgetok export` "
                   "options (e.g. 'int4 --attention standard'), on its onnxruntime backend (exact and at each KV budget)")
def command(model, contexts, new_tokens, kv_budgets, peers, extra_systems, threads, repeat, out, onnx_weights):
    """Speed, memory and quality of edgetok and peer runtimes on MODEL, each run in its own process."""
    import os
    import shlex

    from edgetok.bench import harness, plots, report

    threads = threads or os.cpu_count() or 1
    command = ["edgetok", "bench", model, "--contexts", contexts, "--new-tokens", str(new_tokens), "--kv-budget", kv_budgets,
               "--peers", peers, *(a for s in extra_systems for a in ("--system", s)),
               *(a for w in onnx_weights for a in ("--onnx", w)), "--threads", str(threads),
               "--repeat", str(repeat), "--out", str(out)]
    results = {"command": shlex.join(command), "machine": report.machine(), "versions": report.versions()}
    results |= harness.run_bench(
        model, harness.parse_contexts(contexts), new_tokens, [b.strip() for b in kv_budgets.split(",") if b.strip()],
        peers, threads, repeat, extra_systems, onnx=onnx_weights,
        on_update=lambda partial: report.write_results(results | partial, out),
    )
    report.write_results(results, out)
    pngs = plots.write_plots(results, out)
    click.echo(report.results_table(results))
    if ratios := report.ratios_table(results):
        click.echo("\nedgetok ÷ peer (median tokens/s)\n" + ratios)
    if disk := report.disk_table(results):
        click.echo("\nthe disk tier's reads during decode\n" + disk)
    click.echo(f"\nwrote {out / 'results.json'}" + "".join(f", {p}" for p in pngs))
