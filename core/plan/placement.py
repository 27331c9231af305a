"""Where every denoiser weight lives: the placement, and the storage formats it is made of.

The one module that knows what a storage code means. Everything else asks a `Store` (is it
resident? streamed? stored as fp8?) or the `Placement` (does anything stream?), so a new storage
format (4-bit, say) is a new `Store` here, not new string tests across the code.

A placement string has one code per unit (readable in logs, tests and the plan's JSON):

  B  resident in the compute dtype (no cost per step)
  F  resident as fp8, cast into a compute-dtype work slot before use (half the memory)
  S  streamed: compute-dtype copy in pinned host RAM, copied into the ring and used there
  Q  streamed as fp8: half the bus bytes and half the host RAM, cast from the ring into a work slot
  R  resident as 4-bit (GGUF Q4_0 blocks, core.stream.q4), dequantized into a work slot before use
  N  streamed as 4-bit: 0.28x the bus bytes and host RAM of S, dequantized from the ring

The precision a user picks limits the formats: "exact" keeps weights in the compute dtype or fp8
(B F S Q), "4bit" allows every format, "auto" is exact where that fits and 4-bit where not.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.limits import PRECISIONS


@dataclass(frozen=True)
class Store:
    """How one unit's weights are kept."""

    code: str
    resident: bool  # on the GPU between steps (else in pinned host RAM, copied in per use)
    fmt: str = "exact"  # Linear weights: "exact" (compute dtype), "fp8" or "q4", one of FORMATS

    @property
    def streamed(self) -> bool:
        return not self.resident

    @property
    def fp8(self) -> bool:
        return self.fmt == "fp8"

    @property
    def q4(self) -> bool:
        return self.fmt == "q4"

    @property
    def cast(self) -> bool:
        """Its Linear weights are stored compressed and cast into a compute-dtype work slot before use."""
        return self.fmt != "exact"

    @property
    def managed(self) -> bool:
        """Hooks prepare it before every use (everything but plain resident weights)."""
        return self.streamed or self.cast

    def lossy(self) -> bool:
        """Storing a unit this way rounds its weights (going back needs the source weights)."""
        return self.cast


FORMATS = ("exact", "fp8", "q4")
RESIDENT = Store("B", resident=True)
RESIDENT_FP8 = Store("F", resident=True, fmt="fp8")
STREAMED = Store("S", resident=False)
STREAMED_FP8 = Store("Q", resident=False, fmt="fp8")
RESIDENT_Q4 = Store("R", resident=True, fmt="q4")
STREAMED_Q4 = Store("N", resident=False, fmt="q4")
STORES: dict[str, Store] = {
    s.code: s for s in (RESIDENT, RESIDENT_FP8, STREAMED, STREAMED_FP8, RESIDENT_Q4, STREAMED_Q4)
}
CODES = "".join(STORES)
TEXT_ENCODERS = ("gpu", "stream", "cpu")  # T5's layers: resident, streamed through the ring, or on the CPU
EXACT_CODES = "BFSQ"  # what "exact" allows: the compute dtype and fp8
T5_CODES = "SQN"  # how streamed T5 layers are stored, most exact first


def allowed_codes(precision: str) -> str:
    """Storage codes a precision allows ("auto" allows all: the planner tries exact first)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    return EXACT_CODES if precision == "exact" else CODES


def store(code: str) -> Store:
    try:
        return STORES[code]
    except KeyError:
        raise ValueError(f"unknown storage code {code!r}; the codes are {', '.join(STORES)}.") from None


def check_codes(codes: str, n: int | None = None) -> str:
    if not isinstance(codes, str) or (n is not None and len(codes) != n) or set(codes) - set(CODES):
        want = f"{n} " if n is not None else ""
        raise ValueError(f"a placement needs {want}codes from {CODES} (one per unit), got {codes!r:.40}.")
    return codes


def needs_reload(old: str, new: str) -> bool:
    """A unit that was stored lossily and is to be kept exactly again must come from the source."""
    return any(store(o).lossy() and not store(n).lossy() for o, n in zip(old, new))


def rounded(old: str, new: str) -> str:
    """What the weights hold after `new` was placed on weights stored under `old`: a unit rounded
    once stays rounded (its lossy code is kept) until the weights are loaded again."""
    if len(old) != len(new):
        return new
    return "".join(o if store(o).lossy() else n for o, n in zip(old, new))


@dataclass(frozen=True)
class Placement:
    """The whole placement of a plan: how each denoiser unit is stored, where T5 runs, and the
    streaming buffers. Two plans with equal placements put the same bytes in the same places, so
    the engine keeps one on the GPU for the other."""

    units: str  # one Store code per denoiser unit, in execution order (ControlNet first)
    dtype: str = "bfloat16"  # compute dtype
    text_encoders: str = "gpu"  # one of TEXT_ENCODERS
    slots: int = 0  # compute-dtype work slots for cast units (one in use, the rest cast ahead)
    ring: int = 0  # copy ring, in units of the largest streamed pack (0: nothing streams)
    t5: str = "S"  # the Store code of T5's layers when they stream (one of T5_CODES)

    def __post_init__(self):
        check_codes(self.units)
        if self.text_encoders not in TEXT_ENCODERS:
            raise ValueError(f"text_encoders must be one of {', '.join(TEXT_ENCODERS)}, got {self.text_encoders!r}.")
        if self.t5 not in T5_CODES:
            raise ValueError(f"streamed T5 layers are stored as one of {T5_CODES}, got {self.t5!r}.")

    @classmethod
    def uniform(cls, n: int, code: str, **kw) -> Placement:
        return cls(code * n, **kw)

    def store(self, i: int) -> Store:
        return store(self.units[i])

    @property
    def stores(self) -> list[Store]:
        return [store(c) for c in self.units]

    @property
    def all_resident(self) -> bool:
        """Every unit resident in the compute dtype: the fast path (core.speed) may apply."""
        return bool(self.units) and set(self.units) == {RESIDENT.code}

    @property
    def any_cast(self) -> bool:
        """Some unit (or streamed T5 layer) is cast into work slots before use."""
        return any(s.cast for s in self.stores) or (self.text_encoders == "stream" and store(self.t5).cast)

    @property
    def any_q4(self) -> bool:
        return any(s.q4 for s in self.stores) or (self.text_encoders == "stream" and self.t5 == STREAMED_Q4.code)

    def formats(self) -> dict[str, str]:
        """The storage format of each component, as the plan shows it."""
        fmts = sorted({s.fmt for s in self.stores}, key=FORMATS.index)
        t5 = {"gpu": "exact (resident)", "cpu": "exact (on the CPU)"}.get(self.text_encoders)
        return {"denoiser": "+".join(fmts), "t5": t5 or f"{store(self.t5).fmt} (streamed)"}

    @property
    def streams(self) -> bool:
        """Anything goes through the copy ring (denoiser units or T5's layers)."""
        return self.text_encoders == "stream" or any(s.streamed for s in self.stores)

    def counts(self) -> dict[str, int]:
        return {c: self.units.count(c) for c in CODES}

    def with_text_encoders(self, n_t5: int) -> str:
        """Codes for T5's streamable layers followed by the denoiser's: what the residency places."""
        t5 = self.t5 if self.text_encoders == "stream" else RESIDENT.code  # on the GPU or the CPU: as they are
        return t5 * n_t5 + self.units
