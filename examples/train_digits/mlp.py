"""A multilayer perceptron in NumPy around numba_bn.BatchNorm, with hand-written gradients.

The network of the digits example (train_digits.py, beside this file): Linear layers as matmuls,
ReLU, softmax cross-entropy and SGD with momentum, each a few lines of NumPy; BatchNorm is the
library's layer. Every layer has ``forward(x)`` and ``backward(dy) -> dx``; learnable arrays are
``weight``/``bias`` with gradients ``grad_weight``/``grad_bias`` as BatchNorm names them.
tests/test_train_demo.py checks the whole network's gradient against finite differences.
"""

from itertools import pairwise

import numpy as np

from numba_bn import BatchNorm


# ----------------------------------------------------------------------------------- layers
class Linear:
    """``y = x @ weight.T + bias``, ``weight`` of shape (out, in) as torch.nn.Linear keeps it."""

    def __init__(self, n_in, n_out, bias, rng, dtype):
        # He initialisation: keeps the activation scale through ReLU layers
        self.weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.bias = np.zeros(n_out, dtype) if bias else None
        self.grad_weight = self.grad_bias = None
        self._x = None

    def forward(self, x):
        self._x = x
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy):
        self.grad_weight = dy.T @ self._x
        if self.bias is not None:
            self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight

    def state_dict(self):
        return {
            k: getattr(self, k).copy() for k in ("weight", "bias") if getattr(self, k) is not None
        }

    def load_state_dict(self, state):
        keys = [k for k in ("weight", "bias") if getattr(self, k) is not None]
        if sorted(state) != sorted(keys):
            raise KeyError(f"Linear state must have keys {keys}, got {sorted(state)}")
        for key in keys:
            value = np.asarray(state[key])
            if value.shape != getattr(self, key).shape:
                raise ValueError(
                    f"{key} must have shape {getattr(self, key).shape}, got {value.shape}"
                )
        for key in keys:
            setattr(self, key, np.asarray(state[key]).astype(self.weight.dtype))


class ReLU:
    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class MLP:
    """``Linear -> [BatchNorm] -> ReLU`` for each hidden size, then a Linear to the classes.

    With ``batch_norm`` the hidden Linear layers have no bias: the mean subtraction would cancel
    it, and BatchNorm's own bias takes its place. Layers are named ``fc1, bn1, relu1, ...`` and
    the state_dict keys are ``"fc1.weight"``, ``"bn1.running_mean"``, ...
    """

    def __init__(self, sizes, batch_norm, seed=0, dtype=np.float32):
        self.sizes, self.batch_norm, self.dtype = tuple(sizes), bool(batch_norm), np.dtype(dtype)
        rng = np.random.default_rng(seed)  # draws only Linear weights: same init with/without BN
        self.layers = {}
        last = len(sizes) - 1
        for i, (n_in, n_out) in enumerate(pairwise(sizes), start=1):
            self.layers[f"fc{i}"] = Linear(n_in, n_out, i == last or not batch_norm, rng, dtype)
            if i < last:
                if batch_norm:
                    self.layers[f"bn{i}"] = BatchNorm(n_out, dtype=dtype)
                self.layers[f"relu{i}"] = ReLU()

    def forward(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def backward(self, dlogits):
        """Back-propagate; every layer keeps its ``grad_weight``/``grad_bias``."""
        grad = dlogits
        for layer in reversed(self.layers.values()):
            grad = layer.backward(grad)
        return grad

    def train(self, mode=True):
        for layer in self.layers.values():
            if isinstance(layer, BatchNorm):
                layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """(name, layer, attribute) for every learnable array; its gradient is grad_<attribute>."""
        for name, layer in self.layers.items():
            for key in ("weight", "bias"):
                if getattr(layer, key, None) is not None:
                    yield f"{name}.{key}", layer, key

    def state_dict(self):
        return {
            f"{name}.{key}": value
            for name, layer in self.layers.items()
            if hasattr(layer, "state_dict")
            for key, value in layer.state_dict().items()
        }

    def load_state_dict(self, state):
        """Load a state_dict of the same architecture; the keys are checked before any load."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}"
            )
        grouped = {}
        for full_key, value in state.items():
            name, _, key = full_key.partition(".")
            grouped.setdefault(name, {})[key] = value
        for name, layer_state in grouped.items():
            self.layers[name].load_state_dict(layer_state)
        return self


# -------------------------------------------------------------------------- loss, optimiser
def cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the batch and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probs[rows, labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1.0
    dlogits /= len(labels)
    return float(loss), dlogits.astype(logits.dtype)


class SGD:
    """SGD with momentum as torch.optim.SGD: ``v = momentum * v + grad; param -= lr * v``."""

    def __init__(self, model, lr, momentum=0.9):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.velocity = {
            name: np.zeros_like(getattr(layer, key)) for name, layer, key in model.parameters()
        }

    def step(self):
        for name, layer, key in self.model.parameters():
            velocity = self.velocity[name]
            velocity *= self.momentum
            velocity += getattr(layer, f"grad_{key}")
            param = getattr(layer, key)
            param -= self.lr * velocity  # in place: BatchNorm keeps its own arrays


def accuracy(model, x, labels):
    """Fraction classified correctly in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged model holds NaN
        return float(np.mean(model.forward(x).argmax(axis=1) == labels))
