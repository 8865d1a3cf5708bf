"""fuse(model) / unfuse(model): swap fused modules into any nn.Module and back.

What :func:`fuse` replaces, walking the module tree:

* a torchvision ``ResNet`` (exactly that class) -> :class:`resnet_fused.models.ResNet`;
* torchvision ``BasicBlock`` / ``Bottleneck`` -> :class:`FusedBasicBlock` /
  :class:`FusedBottleneck` (BatchNorm2d or FrozenBatchNorm2d, ReLU activation);
* a conv -> BatchNorm (-> ReLU) run inside a container whose forward calls its
  children in order (``nn.Sequential`` and subclasses that keep its forward,
  torchvision's ``IntermediateLayerGetter``) -> :class:`FusedConvBNAct`.

All of these keep the original submodules; blocks and models keep their names too.
A conv is fused only where its output feeds its BatchNorm and nothing else: not when
a container returns it as an intermediate output, and not when a hook watches it.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter

from . import backends
from .fold import foldable_batchnorm
from .models import ResNet
from .modules import FoldedAway, FusedBasicBlock, FusedBottleneck, FusedConvBNAct

__all__ = ["fuse", "unfuse"]

_BLOCKS = {tv_resnet.BasicBlock: FusedBasicBlock, tv_resnet.Bottleneck: FusedBottleneck}
_FUSED = (ResNet, FusedBasicBlock, FusedBottleneck, FusedConvBNAct)


def fuse(module: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return ``module`` with its ResNet blocks and conv->BN(->ReLU) runs fused.

    Args:
        module: any nn.Module (a torchvision ResNet, a detection model, your own).
        backend: the fused op's backend for every fused module ("auto", "torch",
            "triton", "native"); ValueError for any other name.
        inplace: modify ``module`` itself instead of a deep copy of it (``module`` is
            then returned, turned into its fused twin if it is a ResNet or a block).

    Outputs match the unfused module in eval mode (within floating-point rounding)
    and exactly in train mode.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(module).__name__}")
    backend = backends.check_name(backend)
    if not inplace:
        return _fuse(copy.deepcopy(module), backend)
    return _in_place(module, _fuse(module, backend))


def _fuse(module: nn.Module, backend: str) -> nn.Module:
    if type(module) is tv_resnet.ResNet:
        module = ResNet.from_torchvision(module, backend)
    elif type(module) in _BLOCKS and _BLOCKS[type(module)].fusable(module) is None and not _hooked(module):
        return _BLOCKS[type(module)].from_torchvision(module, backend)
    elif isinstance(module, (FusedBasicBlock, FusedBottleneck, FusedConvBNAct)):
        module.backend = backend  # fused already: it takes the backend asked for now
        return module
    elif isinstance(module, ResNet):
        module.backend = backend  # (its blocks take it below)
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _fuse(child, backend)
            if new is not child:
                module._modules[name] = new
    if _runs_children_in_order(module):
        _fuse_runs(module, backend)
    return module


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _runs_children_in_order(module: nn.Module) -> bool:
    if isinstance(module, IntermediateLayerGetter):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_runs(container: nn.Module, backend: str) -> None:
    """Fuse conv->BN(->ReLU) runs among the children of a sequential container."""
    returned = set(getattr(container, "return_layers", {}))  # IntermediateLayerGetter outputs
    names = list(container._modules)
    i = 0
    while i + 1 < len(names):
        conv, bn = container._modules[names[i]], container._modules[names[i + 1]]
        if (
            names[i] in returned
            or foldable_batchnorm(conv, bn) is not None
            or _hooked(conv)
            or _hooked(bn)
        ):
            i += 1
            continue
        act = None
        if i + 2 < len(names) and names[i + 1] not in returned:
            candidate = container._modules[names[i + 2]]
            if type(candidate) is nn.ReLU and not _hooked(candidate):
                act = candidate
        fused = FusedConvBNAct(conv, bn, act, backend)
        fused._bn_name = names[i + 1]
        fused._act_name = names[i + 2] if act is not None else None
        container._modules[names[i]] = fused
        container._modules[names[i + 1]] = FoldedAway()
        if act is not None:
            container._modules[names[i + 2]] = FoldedAway()
        _keep_state_dict_keys(container)
        i += 3 if act is not None else 2


# ---------------------------------------------------------------------------------
# state_dict keys of a container with fused runs: the unfused ones

def _keep_state_dict_keys(container: nn.Module) -> None:
    """Make ``container``'s state_dict keys those it had before its conv -> BN runs were
    regrouped (``0.conv.weight`` -> ``0.weight``, ``0.bn.running_var`` ->
    ``1.running_var``) and let it load those keys (and the regrouped ones), naming
    missing and unexpected keys the unfused way, so checkpoints of the unfused model
    load unchanged. The hooks do nothing once the container holds no fused run (after
    :func:`unfuse`)."""
    if container.__dict__.get("_resnet_fused_keys"):
        return
    container._resnet_fused_keys = True
    container.register_state_dict_post_hook(_unfused_keys_out)
    container.register_load_state_dict_pre_hook(_unfused_keys_in)
    container.register_load_state_dict_post_hook(_unfused_key_report)


def _renames(container: nn.Module, prefix: str) -> dict[str, str]:
    """Regrouped key prefix -> unfused key prefix, for each run :func:`fuse` regrouped in
    ``container`` (whose own keys start with ``prefix``)."""
    renames = {}
    for name, child in container._modules.items():
        if isinstance(child, FusedConvBNAct) and getattr(child, "_bn_name", None):
            renames[f"{prefix}{name}.conv."] = f"{prefix}{name}."
            renames[f"{prefix}{name}.bn."] = f"{prefix}{child._bn_name}."
            if getattr(child, "_act_name", None):
                renames[f"{prefix}{name}.act."] = f"{prefix}{child._act_name}."
    return renames


def _unfused(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _unfused_keys_out(container, state_dict, prefix, local_metadata) -> None:
    renames = _renames(container, prefix)
    if not renames:
        return
    # this container's keys are the last ones in state_dict: rewritten in their order, so
    # the order is the unfused module's too
    for key in [key for key in state_dict if key.startswith(prefix)]:
        value = state_dict.pop(key)
        state_dict[_unfused(key, renames)] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # the modules' versions (BatchNorm's matters to its loading)
        for old, new in renames.items():
            if old[:-1] in metadata:
                metadata[new[:-1]] = metadata.pop(old[:-1])


def _unfused_keys_in(container, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
    renames = _renames(container, prefix)
    container.__dict__["_resnet_fused_load_renames"] = renames  # for the report after loading
    _note_missing_batch_counts(container, state_dict, prefix)
    regrouped = {new: old for old, new in renames.items()}
    for key in list(state_dict):
        # every key under the BatchNorm's (or the act's) old name goes to it (also those it
        # drops itself: FrozenBatchNorm2d's num_batches_tracked); the conv's keys are its
        # old name's, but the regrouped children's
        if any(key.startswith(old) for old in renames):
            continue  # regrouped already
        for new, old in regrouped.items():
            if key.startswith(new):
                state_dict[old + key[len(new):]] = state_dict.pop(key)
                break


def _note_missing_batch_counts(container, state_dict, prefix: str) -> None:
    """Tell the marker in each absorbed BatchNorm's place the key to report missing where
    the checkpoint lacks that BatchNorm's ``num_batches_tracked``: the marker receives the
    BatchNorm's metadata and reports it when that says version 2, as BatchNorm itself
    would (an older or unversioned checkpoint keeps the count it has, silently)."""
    for name, child in container._modules.items():
        bn_name = getattr(child, "_bn_name", None) if isinstance(child, FusedConvBNAct) else None
        marker = container._modules.get(bn_name) if bn_name else None
        if not isinstance(marker, FoldedAway):
            continue
        marker.__dict__.pop("_missing_unless_old", None)
        bn = child.bn
        if isinstance(bn, _NormBase) and bn.track_running_stats:
            key = f"{prefix}{bn_name}.num_batches_tracked"
            if key not in state_dict and f"{prefix}{name}.bn.num_batches_tracked" not in state_dict:
                marker._missing_unless_old = key


def _unfused_key_report(container, incompatible_keys) -> None:
    renames = container.__dict__.pop("_resnet_fused_load_renames", None)
    if renames:
        for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
            keys[:] = [_unfused(key, renames) for key in keys]


def unfuse(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`fuse`: plain torchvision modules with the same parameters and buffers.

    Parameters and buffers come back bit-identical (they are the same tensors when
    ``inplace=True``, exact copies otherwise); fold caches are dropped.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"unfuse expects an nn.Module, got {type(module).__name__}")
    if not inplace:
        return _unfuse(copy.deepcopy(module))
    return _in_place(module, _unfuse(module))


def _in_place(module: nn.Module, result: nn.Module) -> nn.Module:
    """``module`` turned into ``result`` where the top-level module itself was replaced
    (a ResNet or a block): the same object, so ``inplace=True`` needs no return value."""
    if result is not module:
        module.__dict__.clear()
        module.__dict__.update(result.__dict__)
        module.__class__ = result.__class__
    return module


def _unfuse(module: nn.Module) -> nn.Module:
    if isinstance(module, (ResNet, FusedBasicBlock, FusedBottleneck)):
        module = module.to_torchvision()
    elif isinstance(module, FusedConvBNAct):
        return _as_sequential(module)
    for name, child in list(module._modules.items()):
        if isinstance(child, FusedConvBNAct):
            places = _places(module, child)
            if places is None:
                module._modules[name] = _as_sequential(child)
            else:  # a run fuse() made: each module back into its own place
                for place, part in zip((name, *places), (child.conv, child.bn, child.act)):
                    module._modules[place] = part
        elif child is not None and not isinstance(child, FoldedAway):
            module._modules[name] = _unfuse(child)
    return module


def _places(container: nn.Module, fused: FusedConvBNAct):
    """The names of the places ``fuse`` took the BatchNorm (and ReLU) of ``fused`` from in
    ``container``, where they still hold its FoldedAway markers; else None."""
    names = (getattr(fused, "_bn_name", None),)
    if fused.act is not None:
        names += (getattr(fused, "_act_name", None),)
    if not all(n and isinstance(container._modules.get(n), FoldedAway) for n in names):
        return None
    return names


def _as_sequential(fused: FusedConvBNAct) -> nn.Sequential:
    """A FusedConvBNAct built by hand (or moved) as plain modules: an nn.Sequential of its
    conv, bn (and act) under the same names, so its state_dict keys stay the same."""
    parts = {"conv": fused.conv, "bn": fused.bn}
    if fused.act is not None:
        parts["act"] = fused.act
    return nn.Sequential(OrderedDict(parts))
