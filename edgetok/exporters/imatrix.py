"""llama.cpp's importance matrix (imatrix): per weight matrix, the sum of squares of each input
column over the calibration tokens, and how many tokens (llama.cpp's tools/imatrix).

edgetok calibrates the same statistic: the diagonal of GPTQ's Hessian (H = 2/n Σ x xᵀ, so
Σ x² = n · diag(H) / 2) of every decoder linear, measured on the fp32 model over calibration text.
It is written in either of llama.cpp's layouts, chosen by the file's suffix, and read back from
either (a llama.cpp-made file too), keyed by llama.cpp's tensor names:

- GGUF (llama.cpp's default since 2025): general.type = "imatrix", imatrix.datasets (strings),
  imatrix.chunk_count and imatrix.chunk_size (u32); per matrix NAME two f32 tensors, NAME.in_sum2
  (Σ x² per input column, shape (1, K) as ggml's (K, 1)) and NAME.counts (tokens seen, (1,)).
- legacy .dat: int32 entries, then per entry: int32 name length, the name, int32 ncall, int32
  nval, nval float32 = Σx² / count · ncall (ncall = tokens / chunk size, rounded up); then int32
  chunk count, int32 dataset length, the dataset name. All little-endian.

The values a quantizer weights rounding with are the mean squares, Σ x² / count (llama.cpp's
quantize computes the same from either layout).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError

SUMS, COUNTS = ".in_sum2", ".counts"
DEFAULT_CHUNK = 512  # llama-imatrix's default context: the chunk the counts are measured in


@dataclass
class Imatrix:
    """Per llama.cpp tensor name: Σ x² of each input column (K,) float64, and the tokens counted."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if set(self.sums) != set(self.counts):
            raise EdgetokError("an imatrix needs both sums and counts for every tensor")
        if not self.sums:
            raise EdgetokError("the imatrix holds no tensors")

    def values(self, name: str) -> torch.Tensor | None:
        """The mean square of each input column of tensor `name` (K,), or None if it has none."""
        if name not in self.sums:
            return None
        return torch.from_numpy(self.sums[name] / max(self.counts[name], 1)).float()

    @property
    def chunk_count(self) -> int:
        return max(self.counts.values()) // self.chunk_size

    # -- writing ----------------------------------------------------------------------------------
    def write(self, path: Path) -> None:
        """At `path` (a temporary name: the caller renames it); .dat: the legacy layout, else GGUF."""
        if Path(path).suffix == ".dat":
            self._write_legacy(path)
        else:
            self._write_gguf(path)

    def _write_gguf(self, path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, "imatrix")  # the architecture key is ignored by llama.cpp's reader
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", list(self.datasets))
        writer.add_uint32("imatrix.chunk_count", self.chunk_count)
        writer.add_uint32("imatrix.chunk_size", self.chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(name + SUMS, self.sums[name].astype(np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNTS, np.array([[self.counts[name]]], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def _write_legacy(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(struct.pack("<i", len(self.sums)))
            for name in sorted(self.sums):
                count = self.counts[name]
                ncall = -(-count // self.chunk_size)
                f.write(struct.pack("<i", len(name.encode())) + name.encode())
                f.write(struct.pack("<ii", ncall, len(self.sums[name])))
                f.write((self.sums[name] / max(count, 1) * ncall).astype("<f4").tobytes())
            dataset = (self.datasets[-1] if self.datasets else "").encode()
            f.write(struct.pack("<ii", self.chunk_count, len(dataset)) + dataset)


def read_imatrix(path: Path, chunk_size: int = DEFAULT_CHUNK) -> Imatrix:
    """An imatrix file in either layout (GGUF by its magic). A legacy file stores no chunk size:
    `chunk_size` is assumed, as llama.cpp assumes its context size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise EdgetokError(f"cannot read the imatrix {path}: {e.strerror or e}") from None
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path, chunk_size)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as e:
        raise EdgetokError(f"{path} is not an imatrix file llama.cpp writes ({e})") from None


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    kind = fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise ValueError("its general.type is not imatrix")
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    names = [n[: -len(SUMS)] for n in tensors if n.endswith(SUMS)]
    datasets = list(fields["imatrix.datasets"].contents()) if "imatrix.datasets" in fields else []
    chunk = int(fields["imatrix.chunk_size"].contents()) if "imatrix.chunk_size" in fields else DEFAULT_CHUNK
    return Imatrix({n: tensors[n + SUMS] for n in names}, {n: int(round(tensors[n + COUNTS].max())) for n in names},
                   datasets, chunk)


def _read_legacy(path: Path, chunk_size: int) -> Imatrix:
    data = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        values = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return values

    (n,) = take("<i")
    if n < 1:
        raise ValueError("no entries")
    sums, counts = {}, {}
    for _ in range(n):
        (length,) = take("<i")
        name = data[at : at + length].decode()
        at += length
        ncall, nval = take("<ii")
        values = np.frombuffer(data, "<f4", nval, at).astype(np.float64)
        at += 4 * nval
        counts[name] = ncall * chunk_size  # as llama.cpp reads it: the mean square · ncall, over ncall chunks
        sums[name] = values * chunk_size
    datasets = []
    if at + 8 <= len(data):
        _, length = take("<ii")
        datasets = [data[at : at + length].decode()]
    return Imatrix(sums, counts, datasets, chunk_size)


def collect(source, tokens: torch.Tensor, gguf_names: dict[str, str], dataset: str) -> Imatrix:
    """Σ x² of the inputs of every linear whose HF weight name is in `gguf_names` (HF → llama.cpp
    name), running the fp32 model over tokens (S, T) one sequence at a time."""
    from edgetok.exporters.verify import model_logits
    from edgetok.models.llama import LlamaModel

    model = LlamaModel.from_state_dict(source.config, source.weights)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        gg = gguf_names.get(f"{module_name}.weight")
        if gg is None or not isinstance(module, torch.nn.Linear):
            continue

        def record(mod, inputs, output, gg=gg):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (tokens, K)
            sums[gg] = sums.get(gg, 0) + x.pow(2).sum(0)
            counts[gg] = counts.get(gg, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(record))
    try:
        for row in tokens:
            model_logits(model, row.tolist())
    finally:
        for h in hooks:
            h.remove()
    return Imatrix({n: s.numpy() for n, s in sums.items()}, counts, [dataset], tokens.shape[1])
