"""This machine's detection, the device profile catalog, and bad profiles refused in one sentence."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from edgetok.devices import DeviceProfile, catalog, detect, load_profile
from edgetok.devices.catalog import RANGES
from edgetok.errors import EdgetokError


def test_detect_reads_this_machine_and_measures_its_disk(tmp_path):
    d = detect(tmp_path, probe_mb=4)
    assert 1 <= d.physical_cores <= d.logical_cores
    assert 0 < d.ram_available_bytes <= d.ram_total_bytes
    assert d.disk_free_bytes > 0 and d.kv_dir == str(tmp_path)
    assert d.disk_read_bytes_per_s > 1e6 and d.memory_bandwidth_bytes_per_s > 1e8  # any disk, any RAM
    assert "CPUExecutionProvider" in d.onnxruntime_providers
    # the loops MatMulQ4 chose: the widest the CPU has (make install builds the library)
    widest = "avx512" if "avx512f" in d.isa else "avx2" if {"avx2", "fma"} <= set(d.isa) else "scalar"
    assert d.edgetok_kernels == widest
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert detect(tmp_path, probe_mb=0).disk_read_bytes_per_s is None


def test_every_catalog_number_has_a_source_and_a_plausible_value():
    profiles = catalog()
    assert {"rtx4060-laptop", "rtx4090", "apple-m2-16gb", "snapdragon-x-elite", "intel-core-ultra-npu",
            "raspberry-pi-5-8gb"} <= {p.name for p in profiles}
    for p in profiles:
        for name, (low, high) in RANGES.items():
            assert low <= getattr(p, name) <= high and p.sources[name].strip()
        assert load_profile(p.name) == p


def test_the_local_profile_is_measured(tmp_path):
    p = load_profile("local", kv_dir=tmp_path)
    assert p.kind == "cpu" and p.execution_provider == "cpu"
    assert 0 < p.device_memory_gb <= p.host_memory_gb and p.device_bandwidth_gb_s >= 1


def good_profile() -> dict:
    return catalog()[0].to_dict() | {"name": "mine"}


@pytest.mark.parametrize("change, words", [
    ({"device_memory_gb": 8192}, "device_memory_gb = 8192 is absurd"),
    ({"device_bandwidth_gb_s": float("nan")}, "device_bandwidth_gb_s must be a number"),
    ({"disk_read_gb_s": "fast"}, "disk_read_gb_s must be a number"),
    ({"kind": "tpu"}, "kind must be one of"),
    ({"execution_provider": "rocm"}, "execution_provider must be one of"),
    ({"sources": {}}, "has no source"),
    ({"colour": "red"}, "unknown fields colour"),
])
def test_a_bad_profile_is_refused_in_one_sentence(tmp_path, change, words):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(good_profile() | change))
    with pytest.raises(EdgetokError, match=words):
        load_profile(str(path))


def test_missing_fields_unknown_devices_and_unreadable_files(tmp_path):
    data = good_profile()
    del data["host_memory_gb"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(EdgetokError, match="missing host_memory_gb"):
        load_profile(str(tmp_path / "short.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EdgetokError, match="not a readable JSON device profile"):
        load_profile(str(tmp_path / "broken.json"))
    with pytest.raises(EdgetokError, match="does not exist"):
        load_profile(str(tmp_path / "absent.json"))
    with pytest.raises(EdgetokError, match="unknown device 'rtx9090'.*rtx4090"):
        load_profile("rtx9090")
    assert DeviceProfile.from_dict(good_profile(), "x").name == "mine"


def test_devices_command(tmp_path):
    r = run_cli("devices", "--kv-dir", tmp_path, "--probe-mb", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["local"]["kv_dir"] == str(tmp_path) and len(out["catalog"]) >= 7
    local = out["catalog"][0]  # this machine as a profile, its disk's measured read speed in it
    assert local["name"] == "local" and local["disk_read_gb_s"] == round(out["local"]["disk_read_bytes_per_s"] / 1e9, 3)
    r = run_cli("devices", "--kv-dir", tmp_path, "--probe-mb", "2")
    assert r.exit_code == 0 and "rtx4090" in r.stdout and "onnxruntime" in r.stdout
    assert "reads " in r.stdout and "\n  local " in r.stdout and "disk " in r.stdout
    r = run_cli("devices", "--kv-dir", tmp_path / "nope")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "is not a folder" in r.stderr
