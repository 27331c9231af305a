"""FLUX.1-dev + ControlNet-Union on any GPU: jobs, plans, residency, generation, upscaling."""

import os

# Many differently sized weight packs and activations: expandable segments keep the caching
# allocator from fragmenting, so reserved memory stays close to allocated (the tier budget counts
# reserved). Must be set before CUDA initialises.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
