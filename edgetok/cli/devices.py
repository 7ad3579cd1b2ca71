"""`edgetok devices`: this machine as edgetok sees it, and the device profiles it can plan for."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("devices")
@click.option("--kv-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the folder whose disk read speed to measure: where --kv-disk will put chunks (default: the temp dir)")
@click.option("--probe-mb", type=click.IntRange(min=0), default=64, show_default=True,
              help="size of the disk probe file (memory is measured on 4× that); 0 measures nothing")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(kv_dir, probe_mb, as_json):
    """This machine (cores, ISA, memory, disk, runtimes' accelerators) and the device profile catalog."""
    from edgetok.devices import catalog, detect
    from edgetok.devices.catalog import profile_of

    local = detect(kv_dir, probe_mb)
    # this machine as the profile `edgetok plan --device local` plans for (its speeds need the probes)
    mine = [profile_of(local)] if probe_mb else []
    if as_json:
        click.echo(json.dumps({"local": local.to_dict(), "catalog": [p.to_dict() for p in mine + list(catalog())]},
                              indent=2))
        return
    gb = 1e9
    speed = local.disk_read_bytes_per_s
    bandwidth = local.memory_bandwidth_bytes_per_s
    rows = [
        ("cpu", f"{local.cpu}, {local.physical_cores} cores ({local.logical_cores} threads)"),
        ("isa", ", ".join(local.isa) or "-"),
        ("memory", f"{local.ram_total_bytes / gb:.1f} GB, {local.ram_available_bytes / gb:.1f} GB available"
                   + (f", copy {bandwidth / gb:.1f} GB/s" if bandwidth else "")),
        ("kv dir", f"{local.kv_dir}: {local.disk_free_bytes / gb:.1f} GB free"
                   + (f", reads {speed / gb:.2f} GB/s" if speed else "")),
        ("onnxruntime", ", ".join(local.onnxruntime_providers)
                        + f"; edgetok's operators: {local.edgetok_kernels or 'not built'}"),
        ("torch", ", ".join(local.torch_accelerators) or "CPU only"),
    ]
    for name, value in rows:
        click.echo(f"{name:<13}{value}")
    for note in local.notes:
        click.echo(f"note: {note}", err=True)
    click.echo("\ndevice profiles (the catalog plans are made for; `local` is this machine, measured):")
    for p in mine + list(catalog()):
        click.echo(f"  {p.name:<22}{p.device_memory_gb:g} GB at {p.device_bandwidth_gb_s:g} GB/s, disk {p.disk_read_gb_s:g} GB/s, "
                   f"{p.execution_provider}; "
                   f"{p.description}")
