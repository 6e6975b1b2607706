"""Faithful re-implementations of the two public distillation steps sfmkern is compared against.

`lgm.lgm_forward_backward`: one Linear Gradient Matching step as its public code runs it.
`public_sfm.public_sfm_forward_backward`: one step of the public SFM code (all views in one autograd batch).
Both run on a `sfmkern.distillation.Distiller`'s own images, views and optimiser, so that only the way the step is
computed differs from sfmkern's. Imported by benchmarks/memory.py, benchmarks/runtime.py and
tests/test_benchmark_baselines.py (with benchmarks/ on sys.path).
"""

from baselines.lgm import AMP_SCALE, head_gradient_cosine, lgm_forward_backward, new_head
from baselines.public_sfm import public_sfm_forward_backward

__all__ = ["AMP_SCALE", "head_gradient_cosine", "lgm_forward_backward", "new_head", "public_sfm_forward_backward"]
