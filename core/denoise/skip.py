"""Skip ControlNet passes that cannot change the result.

Outside `control_guidance_start/end` diffusers still runs the ControlNet and multiplies its output
by 0. While this context is active, a control whose scale is 0 at this step is left out, and when
every control is idle the pass is skipped entirely (the transformer takes `None` residuals, which is
the same as adding zeros). With `control_guidance_end=0.8` that is a fifth of the ControlNet work.
"""

from __future__ import annotations

import contextlib

from core.patch import patched_forwards


@contextlib.contextmanager
def skip_idle_controls(pipe):
    net = pipe.controlnet
    inner = net.forward
    stats = {"ran": 0, "skipped": 0}

    def forward(*args, controlnet_cond=None, controlnet_mode=None, conditioning_scale=None, **kwargs):
        scales = list(conditioning_scale) if isinstance(conditioning_scale, (list, tuple)) else None
        if scales is None:  # a single ControlNet: nothing to select
            return inner(
                *args,
                controlnet_cond=controlnet_cond,
                controlnet_mode=controlnet_mode,
                conditioning_scale=conditioning_scale,
                **kwargs,
            )
        keep = [i for i, s in enumerate(scales) if float(s) != 0.0]
        stats["ran"] += len(keep)
        stats["skipped"] += len(scales) - len(keep)
        if not keep:
            return None, None
        return inner(
            *args,
            controlnet_cond=[controlnet_cond[i] for i in keep],
            controlnet_mode=[controlnet_mode[i] for i in keep],
            conditioning_scale=[scales[i] for i in keep],
            **kwargs,
        )

    with patched_forwards((net, forward)):
        yield stats
