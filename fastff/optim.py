"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules for fastff modules.

An optimizer walks ``model.named_parameters()`` and updates each parameter view in place: the
views write through to the layers' kernel storage, whatever its internal layout. Its state
(momentum, Adam moments) is kept per parameter name. After updating, ``step()`` calls
``model.mark_updated()``, so a backprop left over from before the step raises instead of
using the new weights with old activations. The update rules themselves are backend ops
(``Ops.sgd_update`` / ``Ops.adam_update`` in fastff/ops.py): array expressions, which the CPU
backend runs as one fused OpenMP pass per parameter with the same arithmetic.

Typical loop::

    opt = Adam(model, lr=1e-3)
    sched = CosineLR(opt, total_steps=n_steps, warmup_steps=100)
    for x, labels in batches:
        opt.zero_grad()
        logits, backprop = model.forward_train(x, input_grad=False)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        backprop(dlogits)
        opt.step()
        sched.step()
"""

from __future__ import annotations

import math
import numbers

from ._threads import effective_n_threads
from ._validation import check_int
from .backends import ops_of
from .module import Module
from .ops import get_array_module, to_host

FLOAT32_TINY = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny


def _check_real(value, name, minimum=0.0, *, below=None, strict=False):
    """A finite real number >= minimum (> with strict), and < below if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value}"
        )
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


class Optimizer:
    """Base class: learning rate, weight decay, per-parameter state, step bookkeeping.

    ``local_batch_size`` (every optimizer): the `fastfeedforward` package's LocalSGD/LocalAdam
    rule for router-leaf FFFs that track usage (``usage_mode`` "soft" or "hard"). A node's or
    leaf's parameters are updated only once its usage counter reached ``local_batch_size``,
    with its accumulated gradient scaled by ``local_batch_size / usage``; until then its
    gradient keeps accumulating across steps and its optimizer state is left as is.
    ``zero_grad()`` then clears only the updated rows and their usage. Other parameters are
    updated every step. (Adam's bias correction counts the optimizer's steps, not each row's.)
    """

    def __init__(self, model, lr, weight_decay=0.0, *, local_batch_size=None):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a fastff Module, got {type(model).__name__}")
        # float16 Adam state would underflow eps to 0 and divide 0 by 0
        model._check_trainable(type(self).__name__)
        self.model = model
        self.lr = lr
        self.weight_decay = _check_real(weight_decay, "weight_decay")
        self.local_batch_size = (
            None if local_batch_size is None else check_int(local_batch_size, "local_batch_size", 1)
        )
        self.state = {}  # parameter name -> {buffer name: array shaped like the parameter}
        self.step_count = 0

    def _local_groups(self):
        """[(param names, usage array)] of the usage-tracking FFF layers (empty without
        local_batch_size)."""
        if self.local_batch_size is None:
            return []
        groups = []
        for prefix, m in self.model._prefixed_modules():
            if getattr(m, "usage_mode", "none") == "none" or not hasattr(m, "get_leaf_param_group"):
                continue
            for group in (m.get_node_param_group(), m.get_leaf_param_group()):
                groups.append(([prefix + key for key in group["params"]], group["usage"]))
        return groups

    def _local_rows(self):
        """param name -> (ready rows (bool, axis 0), gradient scale per row)."""
        rows = {}
        lbs = self.local_batch_size
        for names, usage in self._local_groups():
            xp = get_array_module(usage)
            ready = usage >= lbs
            scale = xp.where(ready, lbs / xp.maximum(usage, 1e-30), 0.0)
            for name in names:
                rows[name] = (ready, scale)
        return rows

    @property
    def lr(self) -> float:
        """The learning rate of the next step (schedules set it)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_real(value, "lr")

    def zero_grad(self) -> None:
        """Set every gradient of the model to zero (gradients accumulate otherwise). With
        local_batch_size, only the rows just updated (and their usage counters)."""
        local = self._local_rows()
        if not local:
            self.model.zero_grad()
            return
        for name, _, grad in self.model.named_parameters():
            if name in local:
                grad[local[name][0]] = 0
            else:
                grad.fill(0)
        for _, usage in self._local_groups():
            usage[usage >= self.local_batch_size] = 0

    def step(self) -> None:
        """Update every parameter in place from its gradient, then mark the model updated."""
        self.step_count += 1
        local = self._local_rows()
        for name, param, grad in self.model.named_parameters():
            if name not in local:
                self._update(name, param, grad)
                continue
            ready, scale = local[name]
            if not bool(ready.any()):
                continue
            waiting = ~ready
            # update every row, then put back the rows (and their optimizer state) not ready yet
            kept = param[waiting].copy()
            kept_state = {k: b[waiting].copy() for k, b in self.state.get(name, {}).items()}
            self._update(
                name,
                param,
                grad * scale.reshape((-1,) + (1,) * (grad.ndim - 1)).astype(grad.dtype),
            )
            param[waiting] = kept
            for k, b in kept_state.items():
                self.state[name][k][waiting] = b
        self.model.mark_updated()

    def _buffers(self, name, param, keys):
        """This parameter's state arrays (zeros at first), on the parameter's device."""
        xp = get_array_module(param)
        state = self.state.setdefault(name, {})
        for key in keys:
            buf = state.get(key)
            if buf is None:
                state[key] = xp.zeros_like(param)  # same strides as the (maybe transposed) view
            elif get_array_module(buf) is not xp:  # the model moved to another device
                state[key] = xp.asarray(to_host(buf))
        return [state[key] for key in keys]

    def _update(self, name, param, grad):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's semantics:

    g = grad + weight_decay * p; with momentum: buf = momentum * buf + g (buf starts at 0),
    g = g + momentum * buf if nesterov else buf; then p -= lr * g.
    """

    def __init__(
        self, model, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *, local_batch_size=None
    ):
        super().__init__(model, lr, weight_decay, local_batch_size=local_batch_size)
        self.momentum = _check_real(momentum, "momentum", below=1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov

    def _update(self, name, param, grad):
        buf = self._buffers(name, param, ("momentum",))[0] if self.momentum else None
        ops_of(param).sgd_update(
            param,
            grad,
            buf,
            self.lr,
            self.weight_decay,
            self.momentum,
            self.nesterov,
            effective_n_threads(),
        )


class Adam(Optimizer):
    """Adam with bias correction (PyTorch's semantics). weight_decay adds weight_decay * p to
    the gradient (L2 regularisation); see AdamW for the decoupled form.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * (m / (1-b1^t)) /
    (sqrt(v / (1-b2^t)) + eps), with t the step number (1 for the first step).
    """

    decoupled = False

    def __init__(
        self,
        model,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        *,
        local_batch_size=None,
    ):
        super().__init__(model, lr, weight_decay, local_batch_size=local_batch_size)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_real(betas[0], "betas[0]", below=1.0),
            _check_real(betas[1], "betas[1]", below=1.0),
        )
        self.eps = _check_real(eps, "eps", strict=True)
        if self.eps < FLOAT32_TINY:  # it would be 0 in a float32 update: 0/0 for a zero gradient
            raise ValueError(
                f"eps must be >= {FLOAT32_TINY} (float32's smallest normal number; "
                f"a smaller eps is 0 in float32 arithmetic), got {self.eps}"
            )

    def _update(self, name, param, grad):
        m, v = self._buffers(name, param, ("exp_avg", "exp_avg_sq"))
        ops_of(param).adam_update(
            param,
            grad,
            m,
            v,
            self.lr,
            self.betas,
            self.eps,
            self.weight_decay,
            self.decoupled,
            self.step_count,
            effective_n_threads(),
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay before
    the Adam update, which itself sees the plain gradient. Default weight_decay 0.01 as in
    PyTorch."""

    decoupled = True

    def __init__(
        self,
        model,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        *,
        local_batch_size=None,
    ):
        super().__init__(model, lr, betas, eps, weight_decay, local_batch_size=local_batch_size)


# ---- learning-rate schedules ---------------------------------------------------------------


class LRSchedule:
    """Sets ``optimizer.lr`` from the number of updates done. The optimizer's lr when the
    schedule is built is the base (peak) rate. Call ``step()`` after each ``optimizer.step()``;
    ``lr_at(s)`` is the rate of the update that follows s updates."""

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a fastff.optim Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.step_count = 0

    def _start(self):
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that follows `step` updates."""
        raise NotImplementedError

    def step(self) -> None:
        """Count one optimizer update and set the optimizer's lr for the next one."""
        self.step_count += 1
        self.optimizer.lr = self.lr_at(self.step_count)


class StepLR(LRSchedule):
    """lr = base * gamma ** (step // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer)
        self.step_size = check_int(step_size, "step_size", 1)
        self.gamma = _check_real(gamma, "gamma", strict=True)
        self._start()

    def lr_at(self, step):
        if self.base_lr == 0:
            return 0.0
        try:
            return self.base_lr * self.gamma ** (step // self.step_size)
        except OverflowError:  # float ** raises instead of returning inf
            raise ValueError(
                f"StepLR: the learning rate overflows after {step} steps "
                f"(lr {self.base_lr} * gamma {self.gamma} ** "
                f"{step // self.step_size})"
            ) from None


class CosineLR(LRSchedule):
    """Optional linear warm-up, then cosine decay from base to min_lr over the remaining steps.

    step < warmup_steps: base * (step + 1) / warmup_steps (so no update is wasted at lr 0);
    after: min_lr + (base - min_lr) * (1 + cos(pi * progress)) / 2 with
    progress = (step - warmup_steps) / (total_steps - warmup_steps), held at min_lr past the end.
    """

    def __init__(self, optimizer, total_steps, warmup_steps=0, min_lr=0.0):
        super().__init__(optimizer)
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})"
            )
        self.min_lr = _check_real(min_lr, "min_lr")
        if self.min_lr > self.base_lr:
            raise ValueError(
                f"min_lr ({self.min_lr}) must not exceed the optimizer's lr ({self.base_lr})"
            )
        self._start()

    def lr_at(self, step):
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class OneCycleLR(LRSchedule):
    """The triangular one-cycle schedule of the cramming recipe that UltraFastBERT was trained
    with: linear from 0 up to the base (maximal) rate at peak = peak_fraction * total_steps,
    then linear down to 0 at total_steps (and 0 after). peak_fraction=0.5 is cramming's
    ``get_one_cycle``: factor s / (N/2) before the middle, 2 - s / (N/2) after it."""

    def __init__(self, optimizer, total_steps, peak_fraction=0.5):
        super().__init__(optimizer)
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.peak_fraction = _check_real(peak_fraction, "peak_fraction", strict=True, below=1.0)
        self._start()

    def lr_at(self, step):
        peak = self.peak_fraction * self.total_steps
        if step < peak:
            return self.base_lr * step / peak
        return self.base_lr * max(0.0, (self.total_steps - step) / (self.total_steps - peak))
