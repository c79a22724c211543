"""Momentum, variance and eps presets of the frameworks users come from.

PyTorch's momentum weights the *new* batch; Keras, Flax and ONNX weight the *old* running value:

    torch:  r = (1 - m) * r + m * batch          (m = 0.1 by default)
    others: r = m * r + (1 - m) * batch          (Keras/Flax m = 0.99, ONNX m = 0.9)

So PyTorch's 0.1 equals Keras' 0.9, not 0.99. PyTorch feeds the unbiased batch variance into
the running variance; Keras, Flax and ONNX the biased one. Presets are explicit; nothing is
guessed from the value of ``momentum``.
"""

from dataclasses import dataclass

from .annotations import ConventionName


@dataclass(frozen=True)
class Convention:
    name: str
    momentum: float  # default, in this convention's own meaning
    momentum_weights_new: bool  # True: momentum is the weight of the new batch (PyTorch)
    eps: float
    axis: int
    unbiased_running_var: bool

    def new_batch_weight(self, momentum: float | None, num_batches_tracked: int) -> float:
        """The weight of the new batch in the running update (what the kernels take).

        ``momentum=None`` (PyTorch only) is the cumulative average over the batches seen,
        ``num_batches_tracked`` counting the current one.
        """
        if momentum is None:
            if not self.momentum_weights_new:
                raise ValueError(
                    f"momentum=None (cumulative average) is a PyTorch convention; "
                    f"convention={self.name!r} needs a number"
                )
            return 1.0 / num_batches_tracked
        return momentum if self.momentum_weights_new else 1.0 - momentum


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", 0.1, True, 1e-5, 1, True),
    "keras": Convention("keras", 0.99, False, 1e-3, -1, False),
    "flax": Convention("flax", 0.99, False, 1e-5, -1, False),
    "onnx": Convention("onnx", 0.9, False, 1e-5, 1, False),
}


def get(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        known = ", ".join(CONVENTIONS)
        raise ValueError(f"convention must be one of {known}, got {name!r}") from None


def torch_momentum(momentum: float | None, convention: ConventionName) -> float:
    """A momentum of ``convention`` expressed as PyTorch's (the weight of the new batch)."""
    return get(convention).new_batch_weight(momentum, 1)
