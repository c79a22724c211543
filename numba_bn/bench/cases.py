"""The benchmark's shapes and inputs, with their float64 reference results.

Byte model (napkin math; per-channel vectors ignored): memcpy, forward-train and eval move
1 read + 1 write of the tensor (2 x nbytes), backward 2 reads + 1 write (3 x nbytes).
"""

import math

import numpy as np

from .. import reference

OPS = ("forward-train", "eval", "backward")
BYTES_PER_ELEMENT_MOVED = {"memcpy": 2, "forward-train": 2, "eval": 2, "backward": 3}


class Shape:
    """A named benchmark shape; ``small`` ones are where per-call overhead dominates."""

    def __init__(self, name, dims, axis, layout, small=False):
        self.name, self.dims, self.axis, self.layout, self.small = name, dims, axis, layout, small

    def __str__(self):
        return f"{self.name} {self.dims} axis {self.axis}, {self.layout}"

    @property
    def elements(self):
        return math.prod(self.dims)


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("A", (32, 64, 56, 56), 1, "NCHW planes"),
        Shape("B", (64, 256, 14, 14), 1, "NCHW planes"),
        Shape("C", (4096, 1024), 1, "(N, C) rows"),
        Shape("D", (32, 56, 56, 64), -1, "channels-last rows"),
        Shape("small-nchw", (8, 16, 8, 8), 1, "NCHW planes", small=True),
        Shape("small-nc", (64, 32), 1, "(N, C) rows", small=True),
        Shape("small-nhwc", (4, 8, 8, 16), -1, "channels-last rows", small=True),
        # the sizes between, for --sweep
        Shape("64x256", (64, 256), 1, "(N, C) rows"),
        Shape("256x512", (256, 512), 1, "(N, C) rows"),
        Shape("1024x1024", (1024, 1024), 1, "(N, C) rows"),
        Shape("16x32x16x16", (16, 32, 16, 16), 1, "NCHW planes"),
        Shape("32x64x28x28", (32, 64, 28, 28), 1, "NCHW planes"),
    )
}
DEFAULT_SHAPES = ("A", "B", "C", "D", "small-nchw", "small-nc")  # the shapes
# the speed issue's table: (N, C) rows, NCHW planes, channels-last, each from small to large
SWEEP_SHAPES = (
    *("small-nc", "64x256", "256x512", "1024x1024", "C"),
    *("small-nchw", "16x32x16x16", "32x64x28x28", "B"),
    "D",
)
SHAPE_SETS = {
    "default": DEFAULT_SHAPES,
    "small": ("small-nchw", "small-nc", "small-nhwc"),
    "sweep": SWEEP_SHAPES,
}


def parse_shapes(text):
    """Shape names from ``"A,B"``, ``"default"``, ``"small"``, ``"sweep"`` or ``"all"``;
    ValueError for an unknown name."""
    names = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == "all":
            names += list(SHAPES)
        elif item in SHAPE_SETS:
            names += SHAPE_SETS[item]
        elif item in SHAPES:
            names.append(item)
        else:
            known = ", ".join([*SHAPES, *SHAPE_SETS, "all"])
            raise ValueError(f"unknown shape {item!r} in --shapes; known: {known}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------- inputs
class Case:
    """Inputs of one shape: per-channel means and scales that differ, and their float64 results.

    Backward gets the reference's saved statistics (rounded to the dtype), so that every
    implementation differentiates the same forward.
    """

    def __init__(self, shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.dtype, self.eps = shape, np.dtype(dtype), 1e-5
        self.axis = shape.axis % len(shape.dims)
        channels = shape.dims[self.axis]
        broadcast = [1] * len(shape.dims)
        broadcast[self.axis] = channels
        shift = rng.uniform(-5.0, 5.0, channels)
        scale = 10.0 ** rng.uniform(-1.0, 0.5, channels)
        noise = rng.standard_normal(shape.dims)
        self.x = (noise * scale.reshape(broadcast) + shift.reshape(broadcast)).astype(dtype)
        self.dy = rng.standard_normal(shape.dims).astype(dtype)
        self.weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
        self.bias = rng.standard_normal(channels).astype(dtype)
        self.running_mean = (shift + 0.1 * rng.standard_normal(channels)).astype(dtype)
        self.running_var = (scale**2 * rng.uniform(0.5, 1.5, channels)).astype(dtype)

        x64, dy64 = self.x.astype(np.float64), self.dy.astype(np.float64)
        w64, b64 = self.weight.astype(np.float64), self.bias.astype(np.float64)
        y, mean, invstd = reference.forward_train(x64, w64, b64, self.eps, self.axis)
        self.saved_mean, self.saved_invstd = mean.astype(dtype), invstd.astype(dtype)
        mean64, invstd64 = self.saved_mean.astype(np.float64), self.saved_invstd.astype(np.float64)
        rm64, rv64 = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
        self.expected = {
            "forward-train": (y, mean, invstd),
            "eval": (reference.forward_eval(x64, rm64, rv64, w64, b64, self.eps, self.axis),),
            "backward": reference.backward(dy64, x64, mean64, invstd64, w64, self.axis),
            "memcpy": (self.x,),
        }

    @property
    def channels(self):
        return self.x.shape[self.axis]
