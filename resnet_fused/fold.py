"""BatchNorm folding: eval-mode ``bn(conv(x))`` as ``conv(x, w') + b'``.

With ``scale = gamma / sqrt(running_var + eps)``:
``w' = w * scale`` (per output channel) and ``b' = beta + (conv_bias - running_mean) * scale``.
The arithmetic runs in float32 (float64 for float64 parameters) and the result is cast
to the conv weight's dtype, so a float16 model gets the rounding of one cast, not of
four float16 operations.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["fold_batchnorm", "foldable_batchnorm", "FoldCache", "refold"]


def fold_batchnorm(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it; returns (weight, bias)."""
    compute = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute)
    if conv_bias is not None:
        shift = shift + conv_bias.to(compute)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(compute)
    weight = conv_weight.to(compute) * scale.reshape(-1, 1, 1, 1)
    return weight.to(conv_weight.dtype), shift.to(conv_weight.dtype)


#: the forwards whose eval-mode function the fold computes: a subclass of these
#: BatchNorms that only changes construction (a ``norm_layer`` with other defaults) folds
_FOLDED_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, FrozenBatchNorm2d.forward)


def foldable_batchnorm(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """None when ``bn`` can be folded into ``conv`` in eval mode, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"conv padding {conv.padding!r} with padding_mode={conv.padding_mode!r} (needs explicit zero padding)"
    if isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)) and type(bn).forward not in _FOLDED_FORWARDS:
        # (a subclass computing something else: folding would replace its forward with BatchNorm's)
        return f"{type(bn).__name__} overrides its BatchNorm forward"
    if isinstance(bn, FrozenBatchNorm2d):
        channels = bn.weight.shape[0]
    elif isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if bn.running_mean is None or bn.running_var is None:
            return f"{type(bn).__name__} without running statistics uses batch statistics in eval mode"
        channels = bn.num_features
    else:
        return f"{type(bn).__name__} is not BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d"
    if channels != conv.out_channels:
        return f"BatchNorm has {channels} channels, conv has {conv.out_channels} outputs"
    return None


def uses_batch_statistics(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with the batch's own statistics right now: a BatchNorm
    (of any kind, SyncBatchNorm included) in train mode, or one without running
    statistics, as torch's own BatchNorm decides."""
    return isinstance(bn, _BatchNorm) and (bn.training or (bn.running_mean is None and bn.running_var is None))


_NONE = object()


def _tensor(module: nn.Module, name: str):
    """``getattr(module, name, None)`` for a parameter or buffer, read from the module's own
    tables first (nn.Module's ``__getattr__`` fallback costs ~0.6 us, paid 7 times a call)."""
    d = module.__dict__
    t = d["_parameters"].get(name, _NONE)
    if t is _NONE:
        t = d["_buffers"].get(name, _NONE)
    return getattr(module, name, None) if t is _NONE else t


def _bn_tensors(conv: nn.Conv2d, bn: nn.Module) -> tuple:
    return (_tensor(conv, "weight"), _tensor(conv, "bias"), _tensor(bn, "weight"), _tensor(bn, "bias"),
            _tensor(bn, "running_mean"), _tensor(bn, "running_var"))


def _fold_state(conv: nn.Conv2d, bn: nn.Module) -> tuple:
    """What a fold reads: :func:`_bn_tensors` and ``num_batches_tracked`` (see FoldCache)."""
    return _bn_tensors(conv, bn) + (_tensor(bn, "num_batches_tracked"),)


def fold_modules(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """:func:`fold_batchnorm` on the tensors of a conv and its BatchNorm module."""
    return fold_batchnorm(*_bn_tensors(conv, bn), bn.eps)


#: how many optimizer steps this process has taken: fused optimizers (``fused=True`` for
#: SGD, Adam, AdamW, Adagrad) write parameters without bumping their version counters,
#: so every step, of any optimizer, makes the folds and the backends' packed weights stale
_optimizer_steps = 0


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1
    from . import backends

    backends.clear_packed_weights()


_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class FoldCache:
    """Holds the folded (weight, bias) of one conv+BatchNorm pair.

    :meth:`get` refolds whenever any of the six tensors changed: a new storage
    (``.to()``, ``.half()``, assignment) changes its data pointer or dtype, and every
    in-place write through the tensor (``load_state_dict``, edits under no_grad) bumps
    its version counter. Two kinds of write that do not bump it are seen another way: a
    train-mode forward updates the running statistics in place, unversioned, but bumps
    ``num_batches_tracked``, which the key holds too; a fused optimizer's step
    (``torch.optim.Adam(..., fused=True)``) writes the parameters unversioned, and every
    optimizer step is counted (a global step hook) into the key. It holds on to the
    storages it folded from, so no new tensor can reuse their addresses while the key
    still names them. Two writes it cannot see: through ``.data``
    (``conv.weight.data.mul_(2)``), a detached alias with a version counter of its own;
    and ``DistributedDataParallel``'s buffer broadcast at the start of each forward
    (``broadcast_buffers=True``), which copies rank 0's running statistics into the other
    ranks' unversioned in torch 2.14 (2.11 bumps the version): a rank that folded its own
    (an eval forward of the module itself) would keep them. Call :func:`refold` after the
    first, before a DDP forward on such a rank (tests/test_models.py shows both).
    """

    # One (key, (weight, bias), the source tensors) entry per weight layout, (NCHW, NHWC),
    # in one attribute: threads running the same model read and replace it whole, never a
    # new key beside an old value. A module fed both layouts in turn (the CPU fold follows
    # the layout aten reads from x) keeps both folds instead of refolding at each switch.
    __slots__ = ("_entries", "_checked")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._entries, self._checked = (None, None), None

    def held(self) -> int:
        """How many folds it holds (0, 1, or 2: one per weight layout)."""
        return sum(entry is not None for entry in self._entries)

    def foldable(self, conv: nn.Module, bn: nn.Module) -> bool:
        """Whether ``bn`` can be folded into ``conv`` (:func:`foldable_batchnorm`), asked
        again whenever either module is another object: a model edited after fusing
        (``model.bn1 = nn.Identity()``) runs those modules as they are."""
        checked = self._checked
        # what foldable_batchnorm reads that may change on the same modules (padding)
        state = (getattr(conv, "padding_mode", None), getattr(conv, "padding", None),
                 getattr(bn, "running_mean", 0) is None, getattr(bn, "running_var", 0) is None)
        if checked is None or checked[0] is not conv or checked[1] is not bn or checked[2] != state:
            # (holding the modules: their ids cannot be reused while they are compared)
            self._checked = checked = (conv, bn, state, foldable_batchnorm(conv, bn) is None)
        return checked[3]

    def get(self, conv: nn.Conv2d, bn: nn.Module, channels_last: bool) -> tuple[Tensor, Tensor]:
        tensors = _fold_state(conv, bn)
        key = _state_key(tensors, bn.eps)  # (the layout is the entry's slot)
        entries = self._entries
        entry = entries[channels_last]
        if key is not None and entry is not None and key == entry[0]:
            return entry[1]
        # Outside inference mode even when called inside it: the folded tensors are then
        # ordinary tensors with version counters, which kernels caching a packed copy
        # of the weight (the native CPU backend) key on.
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = fold_modules(conv, bn)
            if channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
        if key is not None:
            new = (key, (weight, bias), tuple(None if t is None else t.detach() for t in tensors))
            # the other layout's fold stays only while it was folded from the same state
            other = entries[not channels_last]
            if other is not None and other[0] != key:
                other = None
            self._entries = (other, new) if channels_last else (new, other)
        return weight, bias

    def __deepcopy__(self, memo):
        # A copy's tensors live elsewhere: it starts empty and folds on first use.
        return FoldCache()

    def __reduce__(self):
        # Pickled (torch.save of a whole model) as an empty cache, for the same reason.
        return (FoldCache, ())


def _state_key(tensors, eps: float):
    # (a new tensor has a new address: the entry holds the tensors it folded, so no other
    # can take theirs; the device, of the weight only, for address spaces that could meet)
    key = [eps, _optimizer_steps, tensors[0].device]
    try:
        for t in tensors:
            key.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.shape))
    except RuntimeError:  # inference tensors keep no version counter: never cache
        return None
    return tuple(key)


def refold(model: Optional[nn.Module] = None) -> int:
    """Forget folded and packed weights, so the next forward folds the parameters as they are now.

    The caches follow every change PyTorch can see on their own (see :class:`FoldCache`;
    the backends' packed weights, the native CPU kernels' and the Triton stem's, keep the
    same rule). An edit through ``.data`` is the one they cannot see: call
    ``refold(model)`` after one. Without ``model`` (the op called on your own weights)
    only the backends' packed weights are dropped. Returns the number of cached entries dropped.
    """
    from . import backends

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model should be an nn.Module or None, got {type(model).__name__}")
    dropped = 0
    for module in () if model is None else model.modules():
        for value in vars(module).values():
            caches = value.values() if isinstance(value, dict) else (value,)
            for cache in caches:
                if isinstance(cache, FoldCache):
                    dropped += cache.held()
                    cache.clear()  # (and whether the modules fold: asked again)
    return dropped + backends.clear_packed_weights()
