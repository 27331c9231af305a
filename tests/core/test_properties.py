"""Property-based: any Job parameters either give a Job inside the documented ranges or a ValueError."""

import json
import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.job import MAX_CONTROLS, MAX_PROMPT_CHARS, MAX_SIDE, MAX_UPSCALE, TIERS, ControlSpec, Job
from core.plan.stages import stage_factors, stage_sizes
from preprocessors.registry import CONTROLS

IMG = Image.new("RGB", (64, 64))


def mostly(valid, invalid):
    """Valid nine times in ten: about a fifth of the drawn jobs are valid in every field."""
    return st.integers(0, 9).flatmap(lambda r: valid if r else invalid)


# Bad values as a form, a JSON API or a script may send them: ints (bounded: see test_job.py for the
# huge-int bug), floats with NaN and infinities, bools, numeric strings, None.
ints = st.integers(min_value=-(2**70), max_value=2**70)
anything = st.one_of(
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.sampled_from(["3", "2.5", "", "nan", "x"]),
    st.sampled_from([0, 1, 2, 4, 16, 64, 100, 101, 1024, 2048, 2**63 - 1, 2**63]),
)
unit = st.floats(0, 1)
kinds = mostly(
    st.sampled_from(list(CONTROLS)),
    st.one_of(st.sampled_from(["scribble", "Canny", "", "none"]), st.none(), st.integers()),
)
control_args = mostly(
    st.tuples(st.sampled_from(list(CONTROLS)), st.none() | st.floats(0, 2), st.floats(0, 0.5), st.floats(0.5, 1)),
    st.tuples(kinds, mostly(st.none() | st.floats(0, 2), anything), mostly(unit, anything), mostly(unit, anything)),
)
sizes = mostly(
    st.integers(4, MAX_SIDE // 16).map(lambda k: 16 * k), st.one_of(st.integers(-64, MAX_SIDE + 64), anything)
)
prompts = mostly(
    st.text(max_size=80).map(lambda t: t + "a"),
    st.one_of(
        st.text(max_size=3),
        st.none(),
        st.integers(),
        st.integers(MAX_PROMPT_CHARS - 2, MAX_PROMPT_CHARS + 2).map(lambda n: "a" * n),
    ),
)
tiers = mostly(
    st.sampled_from(TIERS + ("AUTO", "Cpu")),
    st.one_of(st.sampled_from(["7", "gpu", ""]), st.integers(0, 64), st.none()),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts,
    image=mostly(st.just(IMG), st.sampled_from([None, "photo.png"])),
    controls=mostly(
        st.lists(control_args, min_size=1, max_size=MAX_CONTROLS),
        st.lists(control_args, min_size=MAX_CONTROLS + 1, max_size=MAX_CONTROLS + 2) | st.just([]),
    ),
    width=sizes,
    height=sizes,
    steps=mostly(st.integers(1, 100), st.one_of(st.integers(-2, 103), anything)),
    guidance=mostly(st.floats(0, 30), anything),
    seed=mostly(st.integers(0, 2**63 - 1), st.one_of(st.integers(-(2**64), 2**64), anything)),
    upscale=mostly(st.floats(1, 4), st.one_of(st.floats(0.5, 4.5), anything)),
    tier=tiers,
    upscale_strength=mostly(unit, st.one_of(st.floats(-0.5, 1.5), anything)),
    upscale_steps=mostly(st.none() | st.integers(1, 100), st.one_of(st.integers(-2, 103), anything)),
)
def test_job_is_valid_or_a_value_error(
    prompt, image, controls, width, height, steps, guidance, seed, upscale, tier, upscale_strength, upscale_steps
):
    try:
        specs = tuple(ControlSpec(k, scale=s, start=a, end=b) for k, s, a, b in controls)
        job = Job(
            prompt=prompt,
            image=image,
            controls=specs,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seed=seed,
            upscale=upscale,
            tier=tier,
            upscale_strength=upscale_strength,
            upscale_steps=upscale_steps,
        )
    except ValueError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        event("ValueError")
        return
    event("valid Job")
    assert isinstance(job.prompt, str) and job.prompt.strip() and len(job.prompt) <= MAX_PROMPT_CHARS
    assert isinstance(job.image, Image.Image)
    assert isinstance(job.controls, tuple) and 1 <= len(job.controls) <= MAX_CONTROLS
    for c in job.controls:
        assert c.kind in CONTROLS
        assert isinstance(c.scale, float) and 0.0 <= c.scale <= 2.0
        assert 0.0 <= c.start < c.end <= 1.0
    for v in (job.width, job.height):
        assert type(v) is int and 64 <= v <= MAX_SIDE and v % 16 == 0
    assert isinstance(job.steps, int) and 1 <= job.steps <= 100
    assert isinstance(job.guidance, float) and math.isfinite(job.guidance) and 0.0 <= job.guidance <= 30.0
    assert type(job.seed) is int and 0 <= job.seed < 2**63
    assert isinstance(job.upscale, float) and 1.0 <= job.upscale <= MAX_UPSCALE
    assert job.tier in TIERS
    assert isinstance(job.upscale_strength, float) and 0.0 <= job.upscale_strength <= 1.0
    assert job.upscale_steps is None or (isinstance(job.upscale_steps, int) and 1 <= job.upscale_steps <= 100)
    ow, oh = job.out_size
    assert ow % 16 == 0 and oh % 16 == 0 and ow >= job.width and oh >= job.height
    assert abs(ow - job.width * job.upscale) <= 8 and abs(oh - job.height * job.upscale) <= 8
    d = json.loads(json.dumps(job.describe(), allow_nan=False))
    assert d["width"] == job.width and len(d["controls"]) == len(job.controls)


@settings(max_examples=100, deadline=None)
@given(
    w=st.integers(4, 128).map(lambda k: 16 * k),
    h=st.integers(4, 128).map(lambda k: 16 * k),
    hundredths=st.integers(100, 400),
)
def test_upscale_stages_end_at_the_out_size(w, h, hundredths):
    factor = hundredths / 100  # factors as people type them (two decimals)
    job = Job("p", IMG, (ControlSpec("canny"),), w, h, upscale=factor)
    fs = stage_factors(factor)
    assert all(1.0 < f <= 2.0 for f in fs) and math.isclose(math.prod(fs) if fs else 1.0, factor)
    st_sizes = stage_sizes(w, h, factor)
    assert (st_sizes[-1] if st_sizes else (w, h)) == job.out_size
