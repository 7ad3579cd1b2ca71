"""The bit-budget allocator: each weight matrix's type chosen from its measured sensitivity, for a
size (--target-bits B: at most B bits per weight over the matrices) or a quality (--max-kl X: the
mix's KL against fp32 on the calibration text at most X). Shared by both formats: a format says
which types each matrix can take, what each costs in bits and how it rounds (exporters/gguf.py,
exporters/onnx.py); the sensitivity is exporters/sensitivity.py's measurement.

The model: a mix's KL is about the sum of its matrices' KLs, each measured alone (HAWQ-style
additivity). For each matrix, the types on the lower convex hull of (bits, KL) are its ladder (a
type that costs more and removes less is never taken); every step up a ladder is an upgrade that
removes some KL for some bits. Upgrades are taken in order of KL removed per bit, steepest first:

- by bits: the upgrades in that order, each taken while it fits the budget left; one that does not
  fit is passed over (with the rungs above it on its ladder, which need it) and the cheaper ones
  after it are still taken, so no next rung that fits is left out (a greedy knapsack). Stopping at
  the first that does not fit left a budget unused behind one large step (Gemma 3 270M's
  embedding: q5_0 → q8_0 is 1.88 bits per weight of the whole model). The mix takes every upgrade
  the longest fitting run takes, and more: its predicted KL is never higher. (A larger budget can
  now give some matrix a smaller type: a large step that starts to fit can crowd out small ones.)
  The fill is also run after each rung of each ladder taken first: greedy can spend the budget
  on small steps that together remove less than one large step they crowd out. The mixes predicted
  lowest, and those the format suggests (a GGUF source's own types), are measured whole on the
  calibration text; the lowest measured is kept.
- by KL: the smallest budget whose mix, chosen by the greedy fill, is predicted under the limit; the mix is
  then measured whole (additivity is only approximate) and the budget raised while the
  measurement exceeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgetok.errors import EdgetokError
from edgetok.exporters.sensitivity import InputRounding, Matrix, Mix, Rounded, RoundTrip, tensor_kl

BitsOf = Callable[[Matrix, str], float]  # a matrix at a type → its bits per weight, as stored
MAX_KL_ROUNDS = 8  # measurements of the whole mix while --max-kl is not met
# --target-bits: the mixes predicted lowest that are measured whole, the lowest measured kept. The
# sum of KLs alone is a rough guide near the top: on Gemma 3 at Q4_K_M's size, two mixes predicted
# 0.0424 and 0.0429 measured 0.0088 and 0.0065 in llama.cpp.
WHOLE_MIXES = 4
# ... on this many tokens of the calibration text (where it and the model's context have them),
# more than the sensitivity's: a few runs, not one per matrix and type. On 256 tokens SmolLM2's
# candidates at Q4_1's size put the source's own types last (by 24 %), and the mix written lost
# to them on four held-out texts (0.003663 against 0.003633); on 1024 and 4096 tokens the source's
# own types came first (one model, one point: BENCHMARKS.md, session 11).
WHOLE_MIX_TOKENS = 1024


@dataclass(frozen=True)
class Upgrade:
    matrix: str
    below: str  # the rung it starts from
    to: str
    bits: float  # bits the step adds (the matrix's weights × the change in bits per weight)
    gain: float  # KL the step removes (predicted)

    @property
    def efficiency(self) -> float:
        return self.gain / self.bits


@dataclass(frozen=True)
class Tried:
    """A mix measured whole for --target-bits: where it came from ("predicted": of the lowest
    predicted; or the name the format gave it), its size and its KL predicted and measured."""

    origin: str
    bits_per_weight: float
    predicted_kl: float
    calibration_kl: float
    types: dict[str, str] = field(repr=False)

    def to_json(self) -> dict:
        return {"origin": self.origin, "bits_per_weight": round(self.bits_per_weight, 4),
                "predicted_kl": round(self.predicted_kl, 6), "calibration_kl": round(self.calibration_kl, 6)}


@dataclass
class Allocation:
    """The types chosen, and what they were chosen from: the report keeps it all."""

    types: dict[str, str]  # matrix name → type
    bits_per_weight: float  # realised, over the allocated matrices
    predicted_kl: float  # the sum of the chosen types' KLs, each measured alone
    calibration_kl: float  # the whole mix, measured on the calibration text
    target_bits: float | None = None
    max_kl: float | None = None
    calibration_tokens: int = 0  # of the whole mix's measurement
    sensitivity_tokens: int = 0
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)  # matrix → type → KL alone
    tried: list[Tried] = field(default_factory=list)  # --target-bits: the mixes measured whole, the lowest kept

    def to_json(self) -> dict:
        return {"summary": self.summary(), "target_bits": self.target_bits, "max_kl": self.max_kl,
                "bits_per_weight": round(self.bits_per_weight, 4), "predicted_kl": round(self.predicted_kl, 6),
                "calibration_kl": round(self.calibration_kl, 6), "calibration_tokens": self.calibration_tokens,
                "sensitivity_tokens": self.sensitivity_tokens,
                "tried": [t.to_json() for t in self.tried], "chosen": self.chosen, "types": self.types,
                "sensitivity": {m: {k: round(v, 6) for k, v in kl.items()} for m, kl in self.sensitivity.items()}}

    @property
    def chosen(self) -> str | None:
        """Where the written mix came from (Tried.origin), when mixes were tried."""
        return next((t.origin for t in self.tried if t.types == self.types), None)

    def summary(self) -> str:
        goal = f"--target-bits {self.target_bits:g}" if self.target_bits is not None else f"--max-kl {self.max_kl:g}"
        if self.chosen not in (None, "predicted"):
            goal += f", {self.chosen} measured lowest"
        return (f"allocated for {goal}: {self.bits_per_weight:.3f} bits per weight, KL on the calibration text "
                f"{self.calibration_kl:.4f} (predicted from each matrix alone {self.predicted_kl:.4f})")


def ladder(m: Matrix, kl: dict[str, float], bits_of: BitsOf) -> list[str]:
    """m's types on the lower convex hull of (bits per weight, KL), cheapest first, each removing KL."""
    best: dict[float, str] = {}  # bits → the type of least KL at that size
    for kind in m.types:
        b = bits_of(m, kind)
        if b not in best or kl[kind] < kl[best[b]]:
            best[b] = kind
    hull: list[str] = []
    for b in sorted(best):
        kind = best[b]
        if hull and kl[kind] >= kl[hull[-1]]:
            continue  # costs more, removes nothing
        # drop the previous point while it lies on or above the line from the one before it to this
        while len(hull) >= 2:
            (b0, k0), (b1, k1) = ((bits_of(m, t), kl[t]) for t in hull[-2:])
            if (k1 - k0) * (b - b0) >= (kl[kind] - k0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(kind)
    return hull


def upgrades(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf) -> tuple[dict[str, str], list[Upgrade]]:
    """Every matrix's cheapest type, and every step up the ladders, steepest first (ties: by name)."""
    start, steps = {}, []
    for m in matrices:
        rungs = ladder(m, kl[m.name], bits_of)
        start[m.name] = rungs[0]
        for lo, hi in zip(rungs, rungs[1:]):
            steps.append(Upgrade(m.name, lo, hi, (bits_of(m, hi) - bits_of(m, lo)) * m.size, kl[m.name][lo] - kl[m.name][hi]))
    steps.sort(key=lambda u: (-u.efficiency, u.matrix, u.bits))
    return start, steps


def _fill(start: dict[str, str], steps: list[Upgrade], budget: float) -> tuple[dict[str, str], float]:
    """`steps` in order, each taken if its matrix is at the rung it starts from and it fits the
    `budget` bits left → (types, the bits taken). A step that does not fit leaves its matrix where it
    is, so the rungs above are passed over too; the steps after it are still tried."""
    types, used = dict(start), 0.0
    for u in steps:
        if types[u.matrix] == u.below and used + u.bits <= budget + 1e-9:
            types[u.matrix] = u.to
            used += u.bits
    return types, used


def bits_per_weight(matrices: list[Matrix], types: dict[str, str], bits_of: BitsOf) -> float:
    return sum(bits_of(m, types[m.name]) * m.size for m in matrices) / sum(m.size for m in matrices)


def _start(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf):
    """→ (every matrix's cheapest type, the upgrades steepest first, the bits of the cheapest mix)."""
    start, steps = upgrades(matrices, kl, bits_of)
    return start, steps, sum(bits_of(m, start[m.name]) * m.size for m in matrices)


def greedy_by_bits(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf, target: float) -> dict[str, str]:
    """The upgrades steepest first, each taken while it fits at most `target` bits per weight."""
    start, steps, budget = _budget(matrices, kl, bits_of, target)
    return _fill(start, steps, budget)[0]


def candidates(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf, target: float) -> list[dict[str, str]]:
    """Mixes of at most `target` bits per weight over `matrices`, predicted lowest first, no two
    alike: the greedy fill, and a fill after each rung taken first. Greedy by KL per bit can spend
    the budget on many small steps and leave out one large step worth more (Gemma 3's embedding,
    63 % of the weights: q5_1 → q8_0 halves the predicted KL at Q4_K_M's size)."""
    start, steps, budget = _budget(matrices, kl, bits_of, target)
    mixes = {}
    by_name = {m.name: m for m in matrices}
    for first in (None, *steps):
        types, left = start, budget
        if first is not None:
            m = by_name[first.matrix]
            left -= (bits_of(m, first.to) - bits_of(m, start[m.name])) * m.size
            types = start | {m.name: first.to}
        if left >= -1e-9:
            mix = _fill(types, steps, left)[0]
            mixes.setdefault(tuple(sorted(mix.items())), mix)
    return sorted(mixes.values(), key=lambda t: _predicted(kl, t))  # stable: the greedy fill first among equals


def by_bits(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf, target: float) -> dict[str, str]:
    """The mix of at most `target` bits per weight predicted lowest (of `candidates`)."""
    return candidates(matrices, kl, bits_of, target)[0]


def _budget(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf, target: float):
    """→ (every matrix's cheapest type, the upgrades steepest first, the bits `target` leaves for them)."""
    start, steps, used = _start(matrices, kl, bits_of)
    total = sum(m.size for m in matrices)
    if used > target * total + 1e-9:
        raise EdgetokError(f"--target-bits {target:g} is below the smallest mix of this model's types "
                           f"({used / total:.3f} bits per weight, every matrix at its smallest type)")
    return start, steps, target * total - used


def _predicted(kl: dict[str, dict[str, float]], types: dict[str, str]) -> float:
    return sum(kl[name][kind] for name, kind in types.items())


def _least_budget(start: dict[str, str], steps: list[Upgrade], kl: dict[str, dict[str, float]], aim: float,
                  floor: float) -> float:
    """The least budget of added bits, at least `floor`, whose mix (as _fill chooses it) is predicted
    at most `aim` (bisected: the prediction falls with the budget almost everywhere); every step's
    bits when none is."""
    hi = sum(u.bits for u in steps)
    lo = floor
    if lo >= hi or _predicted(kl, _fill(start, steps, lo)[0]) <= aim:
        return min(lo, hi)
    if _predicted(kl, _fill(start, steps, hi)[0]) > aim:
        return hi
    for _ in range(60):  # to the nearest fraction of a bit of the model
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _predicted(kl, _fill(start, steps, mid)[0]) <= aim else (mid, hi)
    return hi


def by_kl(matrices: list[Matrix], kl: dict[str, dict[str, float]], bits_of: BitsOf, max_kl: float,
          measure: Callable[[dict[str, str]], float]) -> tuple[dict[str, str], float]:
    """The cheapest mix, chosen as greedy_by_bits chooses one (by_bits' rung-first tries, inside a
    bisection, would cost a fill per step per probe), whose whole measures at most `max_kl` →
    (types, its KL)."""
    start, steps, _ = _start(matrices, kl, bits_of)
    everything = sum(u.bits for u in steps)
    smallest = min((u.bits for u in steps), default=0.0)
    aim, floor = max_kl, 0.0
    for _ in range(MAX_KL_ROUNDS):
        budget = _least_budget(start, steps, kl, aim, floor)
        types, used = _fill(start, steps, budget)
        measured = measure(types)
        if measured <= max_kl:
            return types, measured
        if used >= everything - 1e-9:
            break
        aim *= max_kl / measured  # additivity was optimistic by about this much
        floor = used + smallest  # at least one more step's worth of bits: the next mix differs
    raise EdgetokError(f"no mix of this model's types meets --max-kl {max_kl:g} on the calibration text "
                       f"(the closest measured {measured:.4f}); raise it or choose a type with --quant / --weights")


def calibration_rounded(source, options, inputs: InputRounding | None = None) -> tuple[Rounded, Rounded]:
    """The reference model on the calibration text (--calib; default: the end of the built-in
    essays, which the parity report never reads) → (on options.allocation_tokens tokens, for the
    sensitivity; on WHOLE_MIX_TOKENS or as many as the text and the model's context hold, for the
    mixes measured whole). `inputs`: how the format's runtime rounds its matrices' inputs."""
    from edgetok.exporters.calibration import calibration_tokens
    from edgetok.texts import read_text

    text = read_text(options.calib, 0) if options.calib is not None else None
    n = options.allocation_tokens
    rounded = Rounded(source, calibration_tokens(source.tokenizer, text, n, n)[0].tolist(), inputs)
    held = len(source.tokenizer.encode(text)) if text is not None else WHOLE_MIX_TOKENS
    whole = min(WHOLE_MIX_TOKENS, held, source.config.max_context)
    if whole <= n:
        return rounded, rounded
    return rounded, rounded.on(calibration_tokens(source.tokenizer, text, whole, whole)[0].tolist())


def allocate(calibration: tuple[Rounded, Rounded], matrices: list[Matrix], round_trip: RoundTrip, bits_of: BitsOf, *,
             target_bits: float | None = None, max_kl: float | None = None, fixed: Mix | None = None,
             suggested: dict[str, dict[str, str]] | None = None, sensitivity: dict[str, dict[str, float]] | None = None,
             progress=None) -> Allocation:
    """Each of `matrices`' type for --target-bits or --max-kl: the sensitivity measured on
    calibration[0]'s tokens, the mixes measured whole on calibration[1]'s (calibration_rounded's pair).
    fixed: HF tensors whose rounding another option decided (--tensor-type): in every measurement.
    suggested: named mixes the format offers (a GGUF source's own types), measured with the
    allocator's own where they fit --target-bits. sensitivity: tensor_kl's result, when measured before."""
    assert (target_bits is None) != (max_kl is None)
    rounded, judge = calibration
    fixed = fixed or Mix()
    by_name = {m.name: m for m in matrices}
    pieces: dict[tuple[str, str], Mix] = {}  # (matrix, type) → its rounding: the mixes share most

    def measure(types: dict[str, str]) -> float:
        mix = fixed
        for name, kind in types.items():
            if (name, kind) not in pieces:
                pieces[name, kind] = rounded.rounded(by_name[name], kind, round_trip)
            mix |= pieces[name, kind]
        return judge.kl(mix)

    kl = sensitivity if sensitivity is not None else tensor_kl(rounded, matrices, round_trip, progress)
    tried = []
    if target_bits is not None:
        offered = [("predicted", t) for t in candidates(matrices, kl, bits_of, target_bits)[:WHOLE_MIXES]]
        offered += [(name, t) for name, t in (suggested or {}).items()
                    if bits_per_weight(matrices, t, bits_of) <= target_bits + 1e-9]
        tried = [Tried(origin, bits_per_weight(matrices, t, bits_of), _predicted(kl, t), measure(t), t) for origin, t in offered]
        best = min(tried, key=lambda c: c.calibration_kl)
        types, measured = best.types, best.calibration_kl
    else:
        types, measured = by_kl(matrices, kl, bits_of, max_kl, measure)
    return Allocation(types, bits_per_weight(matrices, types, bits_of), _predicted(kl, types),
                      measured, target_bits, max_kl, len(judge.tokens), len(rounded.tokens), kl, tried)
