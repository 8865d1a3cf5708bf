"""The implementations of ``conv_bias_act`` and the choice among them.

Every implementation ("backend") computes the same function,
``relu?(conv2d(x, weight) + bias + residual?)``, and says up front which calls it
can take. The op asks :func:`select` for one; a backend that refuses a call (no GPU,
a dtype or an alignment it does not handle, ...) hands it to the next one in the
fallback chain, and the reason is logged (logger ``resnet_fused``) and reported by
:func:`resnet_fused.ops.explain`. The chain always ends in "torch", which takes
every call on every device.
"""
from __future__ import annotations

import abc
import collections
import contextlib
import logging
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("resnet_fused")

#: Every backend name the package knows, whether or not this machine can run it.
BACKEND_NAMES = ("torch", "triton", "native")

#: What backend="auto" tries, fastest first, by device type. On CUDA the Triton
#: backend leads: it is the one measured on a GPU (benchmarks/NOTES.md); the native
#: CUTLASS kernels compile for sm_80/sm_90 but have not run on one yet, and take the
#: lead when a GPU session shows them right and faster.
AUTO_ORDER = {
    "cuda": ("triton", "native", "torch"),
    "cpu": ("native", "torch"),
}


class Backend(abc.ABC):
    """One implementation of the fused op: ``run`` it, and say up front what it refuses."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when this machine can run the backend at all, else why not."""
        return None

    def runs_on(self, device_type: str, auto: bool = False) -> bool:
        """Whether the backend runs tensors of this device type at all. ``auto``:
        whether backend="auto" should pick it there (it may run somewhere only
        for testing, like Triton's CPU interpreter)."""
        return True

    def refuses(
        self,
        x: Tensor,
        weight: Tensor,
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Optional[str]:
        """None when the backend takes this call, else the reason it does not."""
        return None

    def describe(
        self,
        x: Tensor,
        weight: Tensor,
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Optional[str]:
        """How the backend will compute this call, for explain(); None: nothing to add."""
        return None

    #: An op of the backend's own with the signature ``(x, weight, bias, residual,
    #: stride, padding, dilation, groups, relu)`` that the compiler can trace into
    #: (a ``torch.library.triton_op``), or None. It must take every call, handing
    #: what the backend refuses down the fallback chain itself.
    op = None

    @abc.abstractmethod
    def run(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        relu: bool,
    ) -> Tensor:
        """``relu?(conv2d(x, weight) + bias + residual?)``; arguments already checked."""

    def clear_packed_weights(self) -> int:
        """Drop the copies of weights the backend keeps in a layout of its own (see
        :func:`resnet_fused.refold`); returns how many."""
        return 0

    def check_packed_weights(self, check: bool) -> bool:
        """Whether this thread's calls must check a kept copy of a weight against the
        weight's values before using it, not trust its version counter (the calls of a
        compiled graph: :func:`packed_weights_checked`); returns the previous setting."""
        return False

    #: Device types on which :meth:`writes_out_in_place` can answer True at all: the
    #: callers skip the per-call question (and the choice of backend) everywhere else.
    out_in_place_devices: tuple[str, ...] = ()

    def writes_out_in_place(
        self,
        x: Tensor,
        weight: Tensor,
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> bool:
        """Whether :meth:`run_out` writes such a call into ``out`` without computing a new
        output first, ``out`` being ``residual`` itself (or, asked with ``residual=None``,
        a tensor of its own): where a residual block gains by handing its dead identity
        over as the output (see resnet_fused.modules)."""
        return False

    def run_out(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        relu: bool,
        out: Tensor,
    ) -> None:
        """:meth:`run` written into ``out`` (checked: the output's shape, dtype, device and
        layout; it may be the residual itself). This default computes, then copies."""
        out.copy_(self.run(x, weight, bias, residual, stride, padding, dilation, groups, relu))


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _REGISTRY[backend.name] = backend
    return backend


_loaded = False
_loading = False
_load_lock = threading.RLock()


@torch.compiler.assume_constant_result  # run, not traced, when a compiled call loads first
def _load_all() -> None:
    # Import for the side effect of registration; each module registers itself. Loaded
    # only once every import has come through: an error (a misspelt environment knob)
    # is raised again on the next call, not left behind as a backend silently missing.
    # (a lock: a second thread's first call waits for the first's imports rather than
    # finding backends missing; reentrant: an import that calls back returns at once)
    global _loaded, _loading
    if _loaded:
        return
    with _load_lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            from . import reference  # noqa: F401

            for optional in ("triton", "native"):
                try:
                    __import__(f"{__name__}.{optional}_backend")
                except ImportError as exc:  # the package works without either
                    log.debug("backend %r not importable: %s", optional, exc)
            _loaded = True
        finally:
            _loading = False


def clear_packed_weights() -> int:
    """:meth:`Backend.clear_packed_weights` of every backend loaded; how many copies went."""
    return sum(backend.clear_packed_weights() for backend in _REGISTRY.values())


@contextlib.contextmanager
def packed_weights_checked(backend: Backend, check: bool = True):
    """Inside, ``backend`` checks a weight's packed copy against the weight's values.

    A backend keeps a copy of a weight in its own layout, served while the weight's
    TensorImpl, version counter, address and strides are unchanged. Inside a
    ``torch.compile`` graph that is not enough: Inductor reuses a dead buffer for a later
    tensor of the same size and writes it from its own kernels without a version bump,
    so the buffer that held one conv's folded weight can hold the next one's. The op
    runs the backend it selected in here (its ``check_packed`` argument).
    """
    if not check:
        yield
        return
    was = backend.check_packed_weights(True)
    try:
        yield
    finally:
        backend.check_packed_weights(was)


def check_name(name: Optional[str]) -> str:
    """Normalise a user-given backend name; ValueError naming the valid ones.

    Also loads the backends (once): the fused modules check their backend name when
    built, so loading -- the extension's library, Triton's op -- happens then and
    never inside a torch.compile or torch.export trace.
    """
    _load_all()
    if name is None:
        return "auto"
    if not isinstance(name, str) or (name != "auto" and name not in BACKEND_NAMES):
        valid = ", ".join(repr(n) for n in ("auto",) + BACKEND_NAMES)
        raise ValueError(f"unknown backend {name!r}; valid backends are {valid}")
    return name


def get(name: str) -> Backend:
    check_name(name)
    if name not in _REGISTRY:
        _load_all()
    backend = _REGISTRY.get(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} is not installed in this build of resnet_fused")
    return backend


@torch.compiler.assume_constant_result  # fixed per process: run, not traced, by torch.compile
def unavailable_reason(name: str) -> Optional[str]:
    """None if this machine can run backend ``name``, else why it cannot."""
    check_name(name)
    if name not in _REGISTRY:
        _load_all()
    backend = _REGISTRY.get(name)
    if backend is None:
        return "not installed in this build"
    return backend.unavailable_reason()


def traceable_op(name: str):
    """The op of backend ``name`` that torch.compile traces into, or None when the
    backend has none or cannot run on this machine (then the generic op serves)."""
    if unavailable_reason(name) is not None:
        return None
    return _REGISTRY[name].op


def available_backends(device: Optional[str | torch.device] = None) -> list[str]:
    """The backends this machine can run, optionally only those for ``device``.

    ``device`` is a device or device type ("cpu", "cuda"); None lists every backend
    that can run on some device here.
    """
    dev_type = None if device is None else torch.device(device).type
    names = []
    for name in BACKEND_NAMES:
        if unavailable_reason(name) is not None:
            continue
        if dev_type is not None and not _REGISTRY[name].runs_on(dev_type):
            continue
        names.append(name)
    return names


def default_backends(device: str | torch.device) -> list[str]:
    """The available backends that really run on ``device`` (not Triton's CPU interpreter,
    which is there for testing): what validate and bench visit unless told otherwise."""
    dev_type = torch.device(device).type
    return [n for n in available_backends(dev_type) if _REGISTRY[n].runs_on(dev_type, auto=True)]


def resolve(name: Optional[str], device: torch.device) -> str:
    """Turn "auto" (or None) into the fastest backend available for ``device``."""
    name = check_name(name)
    if name != "auto":
        return name
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(candidate) is None and _REGISTRY[candidate].runs_on(device.type, auto=True):
            return candidate
    return "torch"


def passed_over_by_auto(device: torch.device) -> list[tuple[str, str]]:
    """The backends "auto" passes over on ``device`` before the one it picks, and why
    (:func:`resolve`'s order; for explain)."""
    chosen = resolve("auto", device)
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if candidate == chosen:
            break
        reason = unavailable_reason(candidate)
        if reason is None:
            reason = f"not picked by backend='auto' for {device.type} tensors" + (
                " (it runs them when asked for by name)" if _REGISTRY[candidate].runs_on(device.type) else "")
        skipped.append((candidate, reason))
    return skipped


_tally: Optional[collections.Counter] = None


@contextlib.contextmanager
def tally_runs():
    """Count, by backend name, the calls :func:`select` hands to a backend to run while
    inside (``resnet-fused validate`` reports the calls that fell back with it)."""
    global _tally
    previous, _tally = _tally, collections.Counter()
    try:
        yield _tally
    finally:
        _tally = previous


def select(
    name: str,
    x: Tensor,
    weight: Tensor,
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    running: bool = True,
) -> tuple[Backend, list[tuple[str, str]]]:
    """The backend that will run this call and, for each one passed over, why.
    ``running=False``: only asking (explain), not counted by :func:`tally_runs`."""
    dev_type = x.device.type
    chain = _fallback_chain(resolve(name, x.device) if name == "auto" or name is None else name, dev_type)
    skipped: list[tuple[str, str]] = []
    for candidate in chain:
        reason = unavailable_reason(candidate)
        if reason is None and not _REGISTRY[candidate].runs_on(dev_type):
            reason = f"does not run on {dev_type} tensors"
        if reason is None:
            reason = _REGISTRY[candidate].refuses(x, weight, residual, stride, padding, dilation, groups)
        if reason is None:
            if skipped and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "conv_bias_act(x=%s %s, weight=%s): %s; running %r",
                    tuple(x.shape), x.dtype, tuple(weight.shape),
                    "; ".join(f"{n} skipped: {r}" for n, r in skipped), candidate,
                )
            if running and _tally is not None:
                _tally[candidate] += 1
            return _REGISTRY[candidate], skipped
        skipped.append((candidate, reason))
    raise AssertionError("the torch backend takes every call")  # pragma: no cover


def _fallback_chain(first: str, dev_type: str) -> tuple[str, ...]:
    """The asked-for backend, then the slower ones after it in the auto order; torch last."""
    chain = _CHAINS.get((first, dev_type))
    if chain is None:
        check_name(first)  # (a misspelt name is an error, never a chain of its own)
        order = list(AUTO_ORDER.get(dev_type, ("torch",)))
        chain = tuple(order[order.index(first):]) if first in order else (first, "torch")
        _CHAINS[(first, dev_type)] = chain
    return chain


_CHAINS: dict[tuple[str, str], tuple[str, ...]] = {}  # (fixed per process, as AUTO_ORDER is)
