"""The "triton" backend: implicit-GEMM convolution with a fused epilogue.

Four algorithms compute ``relu?(conv2d(x, w) + bias + residual?)``:

* ``implicit_gemm``: the whole op as one Triton launch (below);
* ``cudnn_epilogue``: cuDNN's conv, then bias + residual + ReLU as one Triton
  elementwise pass -- two passes over the output where eager runs four;
* ``gemm_tma``: 1x1 stride-1 convs on NHWC fp16/bf16 (two thirds of ResNet-50's
  convs) as the plain GEMM they are, ``(N*H*W, C) x (C, K)``, with whole tiles moved
  by TMA descriptors (Hopper+), the same fused epilogue;
* ``conv_tma``: stride-1 convs larger than 1x1 (ResNet's 3x3s but the three stride-2
  ones) and strided 1x1 convs (the downsamples) on NHWC fp16/bf16: each program owns a
  patch of output pixels and, per tap, loads the shifted patch of input pixels as one
  4-D TMA box, the zero padding being TMA's out-of-bounds fill; a strided 1x1 conv reads
  a strided view of the input (Hopper+).

On a GPU, the first call of each shape times every algorithm that takes it and keeps
the fastest (cached in
memory and in ``~/.cache/resnet_fused/triton_algorithms.json``, so a second process
does not time again); ``RESNET_FUSED_TRITON_ALGO`` forces one. Measured on an H100
(benchmarks/NOTES.md) our implicit GEMM still trails cuDNN's conv on ResNet-50's
layers, so today the choice is a real one.

The implicit GEMM, one launch per conv:

* GEMM view: M = N*P*Q output pixels, N_gemm = K output channels (per group),
  K_gemm = R*S*C reduction over taps and input channels (per group). Each program
  owns a BLOCK_M x BLOCK_N output tile; programs are ordered in groups of GROUP_M
  row-tiles so that neighbours share weight tiles in L2.
* The reduction walks (tap, channel chunk) pairs in one flat loop, so the software
  pipeline stays full even where C is small (layer1's 3x3 has C=64: one chunk per
  tap). Rows of A are gathered per tap with the padding masked to zero; with NHWC
  activations each row is a contiguous run of channels. Triton miscompiles this
  flat loop at num_warps=8 for kernels larger than 1x1 (triton-lang/triton#1254,
  pytorch#173068), so those configs are capped at 4 warps.
* Convs with very few channels per group (the 3-channel stem, ResNeXt's 4-channel
  groups) reduce over the flattened (s, c) run of each filter row instead, so an MMA
  tile is not 13/16 empty per tap. With one group (the stem) the operands are packed
  first (:func:`_pack_few_channels`): x NHWC with its padding written around it and
  its channels zero-padded to 4, the weight (R, S, C, K); each filter row is then one
  aligned run (the stem: 7 steps of 28 of 32 lanes) that loads as 8- or 16-byte
  cp.async vectors, where 3-channel pixels left the loads one element wide.
* Epilogue, while the accumulator is still fp32: + bias, + residual tile, ReLU,
  then one cast and one store.

Every pointer offset that can grow with the batch is computed in int64, so batch
256+ at 224x224 cannot overflow; offsets within one image and the output-pixel index
stay 32-bit (cheaper address math in the inner loop), and a call past those (2^31
output pixels, or a permuted view whose image spans 2^31 elements) is refused to
``cudnn_epilogue`` (:func:`implicit_gemm_refusal`). Strides are explicit, so any layout is correct;
NHWC activations and channels_last weights (what the fused modules pass on a GPU)
are the fast case.

Tile configs are autotuned per shape key (shared memory and tile count prune the
candidates) and the winners are kept on disk by Triton's autotuner cache, so a
second process pays no tuning; a table of what GPU sessions measured (algorithm per
shape, winning tiles) ships in the package for each GPU model it was measured on (see
"the tuning table" below). Under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors with one fixed config, for testing.

``torch.ops.resnet_fused.triton_conv_bias_act`` (a ``torch.library.triton_op``, at the
end of this module) is the backend as an op torch.compile traces into; the op front
calls it whenever the Triton backend is asked for.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import warnings
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from . import Backend, log, register, select
from .. import _env
from .._env import conv_allows_tf32
from .._layout import conv_output_size, output_memory_format, with_canonical_strides

import triton
import triton.language as tl
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Triton before 3.7 (3.6 is the device image's) emits code for two warpgroups in which
#: ptxas serializes every wgmma ("non wgmma instructions defining accumulator registers",
#: its C7515; the same with Triton 3.6's ptxas 12.8 and CUDA 13.0's): gemm_tma's 8-warp
#: tiles, implicit_gemm's 128x256 in 16 bits and 128x128 in float32. Triton 3.8's code
#: for the same kernels is pipelined, and 3.6's one-warpgroup code is too
#: (tests/offline_compile.py, benchmarks/NOTES.md). The autotuner still times the 8-warp
#: tiles (two warpgroups may still keep the tensor cores busy between them); the
#: heuristic tiles, launched unmeasured, keep to one warpgroup where it serializes.
TRITON_BEFORE_3_7 = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 7)


def _traced(t: Tensor) -> bool:
    """True for the fake tensors torch.compile and torch.export trace with."""
    return is_fake(t)


def _on_gpu(t: Tensor) -> bool:
    """Whether the kernels run on the GPU for ``t`` (else the interpreter, on the CPU).
    The one place this module asks; tests/offline_compile.py answers True for CPU
    tensors, so the GPU host code runs without a GPU and Triton compiles for one."""
    return t.is_cuda


def _strides(t: Tensor) -> tuple:
    """``t``'s strides as the kernels and the tuning keys see them: 0 on a dimension of
    size 1. Its stride addresses nothing and depends on how the tensor was made (a 1x1
    weight is (C, 1, 1, 1) after ``.contiguous(memory_format=channels_last)``, (C, 1, C, C)
    after ``.to(memory_format=channels_last)``, which a model's ``.to()`` does); Triton
    specializes each integer argument (== 1, multiple of 16), so without this one layout
    would compile its kernels twice and miss its tuned choices."""
    return tuple(0 if size == 1 else st for size, st in zip(t.shape, t.stride()))


def _launchable(kernel, x: Tensor):
    """``kernel`` as called on ``x``: wrapped for tracing (torch.compile sees the launch
    as a call of this very kernel) when x is a tracing tensor, else launched as is."""
    return torch.library.wrap_triton(kernel) if _traced(x) else kernel

@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program ``pid``'s (row tile, column tile), in groups of GROUP_M row tiles that sweep
    the column tiles together, so neighbouring programs share operand tiles in L2."""
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows


@triton.jit
def _conv_bias_act_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr,
    # sizes: batch, input and output spatial size, channels per group (in, out)
    N, H, W, P, Q, C, K,
    # strides in elements: x (n, c, h, w), weight (k, c, r, s), residual and y (n, k, p, q)
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, srk, srp, srq,
    syn, syk, syp, syq,
    # conv geometry
    R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # epilogue and mode switches
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    FLAT_SC: tl.constexpr,  # reduce over flattened (s, c) per filter row: few channels per group
    PACKED: tl.constexpr,  # FLAT_SC on packed operands (see _pack_few_channels): their channel count, else 0
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 inputs
    UPCAST: tl.constexpr,  # dot in fp32 (the interpreter's bf16 dot is wrong)
    GROUPS: tl.constexpr,  # the grid's second axis; a constexpr so the autotune key sees it
    # tile sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    M = N * P * Q
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    h0 = p * STRIDE_H - PAD_H
    w0 = q * STRIDE_W - PAD_W
    x_row = n.to(tl.int64) * sxn + (group * C).to(tl.int64) * sxc  # [BLOCK_M]
    k_out = group * K + offs_n  # output channel index in the whole tensor
    w_col = k_out.to(tl.int64) * swk  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACKED:
        # x NHWC with its zero padding in memory (the kernel gets PAD 0, no read falls
        # outside) and the weight (R, S, C, K) or (K, R, S, C), both with C = PACKED channels (zero
        # padded): a filter row's taps are one run of S*C elements in each, starting at a
        # multiple of C elements, and the only mask on it is the run's end, so loads are
        # C-wide vectors (cp.async on the GPU)
        SC: tl.constexpr = S * PACKED
        CHUNKS: tl.constexpr = (SC + BLOCK_K - 1) // BLOCK_K
        for i in range(0, R * CHUNKS):
            r = i // CHUNKS
            j = (i % CHUNKS) * BLOCK_K + offs_k
            if DIL_W == 1:
                col = j
            else:
                col = (j // PACKED) * (DIL_W * PACKED) + j % PACKED
            h = h0 + r * DIL_H
            a_ptrs = x_ptr + (n.to(tl.int64) * sxn + h * sxh + w0 * PACKED)[:, None] + col[None, :]
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (j < SC)[None, :], other=0.0)
            b_ptrs = w_ptr + w_col[None, :] + ((r * SC + j) * swc)[:, None]
            b = tl.load(b_ptrs, mask=(j < SC)[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    elif FLAT_SC:
        # per filter row r, reduce over the flattened (s, c) run: for the NHWC stem that is
        # 21 contiguous elements per output pixel, and index math is per column only
        sc = S * C
        chunks = tl.cdiv(sc, BLOCK_K)
        for i in range(0, R * chunks):
            r = i // chunks
            j = (i % chunks) * BLOCK_K + offs_k
            s = j // C
            c = j % C
            h = h0 + r * DIL_H
            row_ok = mask_m & (h >= 0) & (h < H)
            w = w0[:, None] + (s * DIL_W)[None, :]
            a_mask = row_ok[:, None] & (j < sc)[None, :] & (w >= 0) & (w < W)
            a_ptrs = x_ptr + (x_row + h * sxh + w0 * sxw)[:, None] + (s * DIL_W * sxw + c * sxc)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = w_ptr + w_col[None, :] + (r * swr + s * sws + c * swc)[:, None]
            b = tl.load(b_ptrs, mask=(j < sc)[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        chunks = tl.cdiv(C, BLOCK_K)
        for i in range(0, R * S * chunks):
            if R * S == 1:
                # 1x1: no tap. With one (i // chunks, 0 at run time but not to the compiler)
                # in the weight's address, Triton could not prove it aligned, loaded the
                # weight through registers and waited for each wgmma (benchmarks/NOTES.md)
                tap = 0
                c = i * BLOCK_K + offs_k
            else:
                tap = i // chunks
                c = (i % chunks) * BLOCK_K + offs_k
            r = tap // S
            s = tap % S
            h = h0 + r * DIL_H
            w = w0 + s * DIL_W
            row_ok = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_ptrs = x_ptr + (x_row + h * sxh + w * sxw)[:, None] + c[None, :] * sxc
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (c < C)[None, :], other=0.0)
            b_ptrs = w_ptr + w_col[None, :] + (r * swr + s * sws + c * swc)[:, None]
            b = tl.load(b_ptrs, mask=(c < C)[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # epilogue, in fp32
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_out, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_off = (n.to(tl.int64) * srn + p * srp + q * srq)[:, None] + (k_out * srk)[None, :]
        acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu (max() may drop it)
    y_off = (n.to(tl.int64) * syn + p * syp + q * syq)[:, None] + (k_out * syk)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------
# tile configs and their choice

def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


CONFIGS = [
    # 8 warps: 1x1 convs only (see the module docstring)
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    # 4 warps: every conv
    _config(128, 128, 64, 4, 4),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 5),
    _config(32, 64, 64, 4, 4),
    _config(64, 32, 64, 4, 4),
]
#: the one config the interpreter runs (it cannot autotune over several); large tiles
#: mean few simulated programs, which is what makes the interpreter fast enough
INTERPRETER_CONFIG = _config(64, 64, 32, 4, 1, group_m=4)
#: RESNET_FUSED_TRITON_AUTOTUNE=0 launches one heuristic config per shape instead of
#: autotuning (fast start, e.g. for test sessions that compile hundreds of shapes)
AUTOTUNE = _env.flag("RESNET_FUSED_TRITON_AUTOTUNE", True)
#: few channels per group: reduce over (s, c) flattened per filter row (the stem, ResNeXt groups)
FLAT_SC_MAX_CHANNELS = 16


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 101376
    return props.multi_processor_count, smem


def _operand_bytes(bm: int, bn: int, bk: int, stages: int, elem: int) -> int:
    """Shared memory of the operand tiles in flight: ``stages`` A and B tiles. Compiled
    for sm_90 (tests/offline_compile.py) this is exactly what Triton takes for float32
    and an upper bound for 16-bit types, where it keeps fewer buffers."""
    return stages * (bm * bk + bk * bn) * elem


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot run or cannot fill the GPU; never return none."""
    named_args = {**named_args, **kwargs}
    r, s = named_args["R"], named_args["S"]
    x = named_args["x_ptr"]
    elem = x.element_size()
    m = named_args["N"] * named_args["P"] * named_args["Q"]
    k, groups = named_args["K"], named_args.get("GROUPS", 1)
    sms, smem = _device_limits(x.device.index or 0)
    fits = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if (r * s > 1 or named_args["FLAT_SC"]) and cfg.num_warps > 4:
            continue  # triton#1254: the flat tap loop miscompiles at 8 warps
        if _operand_bytes(bm, bn, bk, cfg.num_stages, elem) > smem:
            continue
        if bn > 2 * triton.next_power_of_2(k):
            continue  # mostly empty columns
        if named_args["FLAT_SC"] and bk > max(32, triton.next_power_of_2(s * named_args["C"])):
            continue  # mostly empty K depth: a filter row's run is shorter
        fits.append((cfg, triton.cdiv(m, bm) * triton.cdiv(k, bn) * groups))
    if not fits:
        return [_config(32, 32, 32, 4, 2)]
    return _filling(fits, sms)


def _filling(fits: list, sms: int) -> list:
    """Of (config, tile count) pairs, the configs whose grid covers at least half the SMs;
    if none does, those with the most tiles."""
    filling = [cfg for cfg, tiles in fits if tiles >= sms // 2]
    if filling:
        return filling
    most = max(tiles for _, tiles in fits)
    return [cfg for cfg, tiles in fits if tiles == most]


#: what a tuned tile is kept per: the problem, and the layouts (x's channel stride, the
#: residual's and the output's channel strides: 1 for NHWC), whose loads differ in width
_AUTOTUNE_KEY = ["N", "H", "W", "P", "Q", "C", "K", "R", "S", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W",
                 "DIL_H", "DIL_W", "HAS_RESIDUAL", "FLAT_SC", "PACKED", "DOT_PRECISION", "GROUPS",
                 "sxc", "srk", "syk"]


def _make_tuned():
    kwargs = dict(configs=CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
    try:
        return triton.autotune(cache_results=True, **kwargs)(_conv_bias_act_kernel)
    except TypeError:  # a Triton without the on-disk autotune cache
        return triton.autotune(**kwargs)(_conv_bias_act_kernel)


_tuned = _make_tuned()

#: held around every call of a Triton autotuner: its run() keeps the call's arguments on
#: the autotuner object while it prunes, times and launches (``self.nargs``), so two
#: threads in it at once (one model served from several threads) could read each
#: other's, or None
_tuner_lock = threading.RLock()


# ---------------------------------------------------------------------------------
# host side

def implicit_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    config: Optional[triton.Config] = None,
    tune: bool = True,
) -> Tensor:
    """The whole fused conv as one implicit-GEMM launch (arguments checked by the op).
    ``config``: this tile (one of CONFIGS) rather than the autotuner's or the heuristic's.
    ``tune=False``: the heuristic tile, never the autotuner (no benchmarking: a CUDA
    graph being captured)."""
    n, c_total, h, w = x.shape
    k_total, c, r, s = weight.shape
    k = k_total // groups
    p, q = _output_hw(x, weight, stride, padding, dilation)
    y = torch.empty((n, k_total, p, q), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    original = (x, weight, bias, residual, stride, padding, dilation, groups, relu)
    merge = _group_merge(groups, c)
    if merge > 1:  # few channels a group: `merge` groups at a time, a block-diagonal weight
        weight = _merged_weight(weight, groups, merge)
        groups, c, k = groups // merge, c * merge, k * merge
    flat = c < FLAT_SC_MAX_CHANNELS and r * s > 1
    packed = 0
    if flat and groups == 1:
        x, weight = _pack_few_channels(x, weight, padding)
        packed = c = x.shape[1]
        h, w, padding = x.shape[2], x.shape[3], (0, 0)
    # absent operands get x as a stand-in pointer (never read): not y, which the kernel
    # writes, so a traced launch has no argument aliasing its output
    res = residual if residual is not None else x
    if x.dtype == torch.float32:
        allow_tf32 = conv_allows_tf32() and _on_gpu(x)
        precision = "tf32" if allow_tf32 else "ieee"
    else:
        precision = "ieee"
    common = dict(
        R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=relu, FLAT_SC=flat, PACKED=packed, DOT_PRECISION=precision,
    )
    args = (
        x, weight, bias if bias is not None else x, res, y, n, h, w, p, q, c, k,
        *_strides(x), *_strides(weight), *_strides(res), *_strides(y),
    )
    m = n * p * q
    if INTERPRET and not _on_gpu(x):
        cfg = (config or INTERPRETER_CONFIG).kwargs
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]), groups)
        _conv_bias_act_kernel[grid](*args, **common, UPCAST=True, GROUPS=groups, **cfg, num_warps=4, num_stages=1)
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]), groups)

    flags = dict(common, UPCAST=False, GROUPS=groups)
    with torch.cuda.device(x.device):
        cfg = config
        if cfg is None and AUTOTUNE and tune:
            key = _tile_memo_key(args, flags)
            cfg = _implicit_gemm_tiles.get(key)
            if cfg is None and not _traced(x):
                with _tuner_lock:
                    _tuned[grid](*args, **flags)
                    _implicit_gemm_tiles[key] = _tuned.best_config
                return y
            if cfg is None and key is not None:  # torch.compile: the autotuner's tile for these shapes, traced
                _tune_on_real_tensors(implicit_gemm, *original)
                cfg = _implicit_gemm_tiles.get(key)
        cfg = cfg or heuristic_config(m, k, c, r, s, groups, x.element_size(),
                                      _device_limits(x.device.index or 0)[1])
        # (not cfg.all_kwargs(): its num_ctas=1 is refused by torch.library.wrap_triton when traced)
        _launchable(_conv_bias_act_kernel, x)[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs,
                                                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


#: the autotuner's winner per implicit-GEMM launch (:func:`_tile_memo_key`), so a tuned
#: call launches its tile directly: past Triton's Autotuner.run (~30 us of host time a
#: call) and past ``_tuner_lock``, which one thread's first-call tuning (seconds of
#: compiles) holds while another thread's tuned calls go on. (Those calls may then run
#: on the GPU while the tuning thread times its candidates, as any other op of theirs
#: could before. Like the autotuner's own key, this one names no device: in a process
#: with two kinds of GPU, a tile tuned on one is launched on the other.)
_implicit_gemm_tiles: dict = {}


def _tile_memo_key(args: tuple, flags: dict) -> Optional[tuple]:
    """Every integer argument, tensor dtype and constexpr of one launch: finer than the
    autotuner's key (a subset of these), so one memo entry is one autotuner choice.
    None where a size is symbolic (a trace with dynamic shapes: nothing to tune)."""
    sizes = tuple(a for a in args if not isinstance(a, Tensor))
    if not all(type(a) is int for a in sizes):
        return None
    return sizes, tuple(a.dtype for a in args if isinstance(a, Tensor)), tuple(flags.items())


#: the implicit GEMM's output-pixel index and its element offsets within one image are
#: 32-bit (only the batch's part of an address is 64-bit: int64 everywhere would slow the
#: inner loop's address math); a call past this goes to ``cudnn_epilogue``
INT32_MAX = 2**31 - 1


def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    """The conv's output height and width (P, Q)."""
    (h, w), (r, s) = x.shape[2:], weight.shape[2:]
    return (conv_output_size(h, r, stride[0], padding[0], dilation[0]),
            conv_output_size(w, s, stride[1], padding[1], dilation[1]))


def _image_span(t: Tensor, pad: Sequence[int] = (0, 0)) -> int:
    """The largest element offset of ``t`` within one image (its dimensions but the batch),
    its rows and columns reaching ``pad`` further on each side (the padding's addresses,
    computed before the mask)."""
    (_, c, h, w), (_, sc, sh, sw) = t.shape, t.stride()
    return (c - 1) * abs(sc) + (h - 1 + 2 * pad[0]) * abs(sh) + (w - 1 + 2 * pad[1]) * abs(sw)


def implicit_gemm_refusal(x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
    """None when ``implicit_gemm``'s 32-bit indices hold this call, else why not: more
    output pixels than 2^31 (less a tile), or an image of x (its padding included), the
    weight, the residual or the output, or the packed or merged copies the kernel reads,
    spanning 2^31 elements or more -- a permuted view whose batch is not its outermost
    dimension can, at a size that fits in memory."""
    n, _, h, w = x.shape
    k_total, c, r, s = weight.shape
    p, q = _output_hw(x, weight, stride, padding, dilation)
    limit = INT32_MAX - 1024  # a row tile may start up to BLOCK_M - 1 past the last pixel
    if n * p * q > limit:
        return f"{n * p * q} output pixels (its 32-bit pixel index takes fewer than 2^31)"
    spans = {"x": _image_span(x, padding), "weight": _image_span(weight), "output": k_total * p * q}
    if residual is not None:
        spans["residual"] = _image_span(residual)
    merge = _group_merge(groups, c)  # as implicit_gemm merges and packs
    c_merged = c * merge
    spans["weight"] = max(spans["weight"], c_merged * r * s)
    if c_merged < FLAT_SC_MAX_CHANNELS and r * s > 1 and groups == merge:  # the packed copies, x's rows padded
        cp = -(-c_merged // PACK_MULTIPLE) * PACK_MULTIPLE
        spans["x"] = max(spans["x"], cp * (h + 2 * padding[0]) * (w + 2 * padding[1] + 16))
        spans["weight"] = max(spans["weight"], r * s * cp * k_total)
    over = [name for name, span in spans.items() if span > limit]
    if not over:
        return None
    strides = [f"{name} {tuple(t.stride())}" for name, t in (("x", x), ("weight", weight), ("residual", residual))
               if name in over]
    return (f"{' and '.join(over)} spanning 2^31 elements or more within one image"
            + (f" (strides {'; '.join(strides)})" if strides else "") + ": its offsets within an image are 32-bit")


#: a grouped conv with fewer input channels a group than this runs as one with fewer,
#: wider groups: ``merge`` neighbouring groups at a time (their channels are neighbours in
#: x, y and the weight) and a block-diagonal weight, zero between the merged groups.
#: ResNeXt's 4 and 8 channels a group then load as 32-channel (64-byte) runs by cp.async
#: into pipelined wgmma, where the flattened (s, c) loop loaded them through registers
#: and waited for every wgmma (tests/offline_compile.py); the zeros cost MMA work
#: (up to 8x for 4 channels), which these memory-bound convs have to spare.
MERGED_GROUP_CHANNELS = 32


def _group_merge(groups: int, c: int) -> int:
    """How many groups of ``c`` input channels each to merge: the most that divides
    ``groups`` and keeps a merged group within MERGED_GROUP_CHANNELS (1: none)."""
    if groups == 1 or c >= MERGED_GROUP_CHANNELS:
        return 1
    return max(f for f in range(1, MERGED_GROUP_CHANNELS // c + 1) if groups % f == 0)


def _merged_weight(weight: Tensor, groups: int, merge: int) -> Tensor:
    """A grouped conv's weight (K, C/groups, R, S) as that of ``groups // merge`` groups:
    (K, merge * C/groups, R, S), each output channel's own group's taps in place and zeros
    for the other groups merged with it; channels_last (the kernel's cp.async rows).
    Kept per weight like the packed ones (:func:`_cached_weight`)."""
    def make():
        k_total, c, r, s = weight.shape
        k = k_total // groups
        per = weight.view(groups // merge, merge, k, c, r, s)
        merged = weight.new_zeros((groups // merge, merge, k, merge, c, r, s))
        for t in range(merge):
            merged[:, t, :, t] = per[:, t]
        return merged.view(k_total, merge * c, r, s).contiguous(memory_format=torch.channels_last)

    return _cached_weight(weight, ("merged", groups, merge), make)


#: the channels of a one-group conv with few of them (the 3-channel stem) are zero-padded
#: to a multiple of this for the packed loop: a pixel is then 8 bytes of fp16 or bf16 (16
#: of fp32) and every filter row's run starts on that boundary, where 3-channel pixels
#: (6 bytes) left the loads one element wide (tests/offline_compile.py reads the SASS)
PACK_MULTIPLE = 4


def _pack_few_channels(x: Tensor, weight: Tensor, padding: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``x`` and ``weight`` of a one-group conv with few channels as the packed loop reads
    them: x NHWC with the conv's zero padding written around it, the weight laid out
    (R, S, C, K) (its K columns contiguous; float32: (K, R, S, C)), both zero-padded to a multiple of
    PACK_MULTIPLE channels, which add nothing to the sums. x's rows (and images) are
    spaced by a multiple of 16 elements, so that Triton, which specializes such strides,
    knows each filter row's run is aligned. One pass over the input; x is used as it is
    where it is that already; the weight's copy is kept (:func:`_packed_weight`)."""
    n, c, h, w = x.shape
    ph, pw = padding
    cp = -(-c // PACK_MULTIPLE) * PACK_MULTIPLE
    sn, sc, sh, sw = _strides(x)
    if cp != c or ph or pw or (sc, sw) != (1, cp) or sh % 16 or sn % 16:
        hp, wp = h + 2 * ph, w + 2 * pw
        row = wp
        while row * cp % 16:
            row += 1
        xp = x.new_zeros((n, hp, row, cp))
        xp[:, ph:ph + h, pw:pw + w, :c] = x.permute(0, 2, 3, 1)
        x = xp[:, :, :wp].permute(0, 3, 1, 2)
    return x, _packed_weight(weight, cp)


#: weight -> (its version counter, what was made of it, the copy): a folded weight is
#: packed (or merged) on its first call, not on every forward; an in-place write makes it
#: again, and refold() (the backend's clear_packed_weights) drops them all, for writes
#: through ``.data``
_packed_weights = WeakIdKeyDictionary()
#: ``checking``: this thread's calls come from a compiled graph, whose buffers are
#: rewritten without version bumps (:func:`resnet_fused.backends.packed_weights_checked`)
_calls = threading.local()


def _cached_weight(weight: Tensor, what, make) -> Tensor:
    """``make()``, a copy of ``weight`` laid out for a kernel (``what`` names the layout),
    cached where the weight is a plain tensor that keeps a version counter (not while
    tracing, not an inference tensor, not for a compiled graph's calls: made per call
    there, as the traced op makes it anyway; not while a CUDA graph is captured, where
    ``make()`` is only recorded: its copy holds the weight only once the graph replays)."""
    cacheable = type(weight) is Tensor and not weight.is_inference() and not getattr(_calls, "checking", False) \
        and not (weight.is_cuda and torch.cuda.is_current_stream_capturing())  # (a capture only records make())
    if cacheable:
        # (the data's address and layout too: ``weight.data = other`` keeps the tensor
        # and its version, and a larger other would be read through the old copy's sizes)
        state = (weight._version, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight.device)
        entry = _packed_weights.get(weight)
        if entry is not None and entry[0] == state and entry[1] == what:
            return entry[2]
    copy = make()
    if cacheable:
        _packed_weights[weight] = (state, what, copy)
    return copy


def _packed_weight(weight: Tensor, cp: int) -> Tensor:
    """The weight of :func:`_pack_few_channels` (kept: :func:`_cached_weight`)."""
    def make():
        k, c, r, s = weight.shape
        if weight.dtype == torch.float32:  # TF32 wgmma reads B K-major: (K, R, S, C), rows 16-aligned
            run = r * s * cp
            wp = weight.new_zeros((k, -(-run // 16) * 16))[:, :run].unflatten(1, (r, s, cp))
            wp[..., :c] = weight.permute(0, 2, 3, 1)
            return wp.permute(0, 3, 1, 2)
        wp = weight.new_zeros((r, s, cp, k))
        wp[:, :, :c] = weight.permute(2, 3, 1, 0)
        return wp.permute(3, 2, 0, 1)

    return _cached_weight(weight, ("packed", cp), make)


def _tune_on_real_tensors(algorithm, *args) -> None:
    """For a call being traced (fake tensors): run ``algorithm`` once on real tensors of
    the same shapes, so its autotuner picks (or recalls) the config and the algorithm
    keeps it; nothing for symbolic shapes. Inductor then gets one plain kernel with that
    tile instead of an autotuner to tune again."""
    with _disable_current_modes():
        real = _real_like(args)
        if real is not None:
            algorithm(*real)


@triton.jit
def _bias_residual_relu_kernel(
    y_ptr, bias_ptr, res_ptr,  # y is updated in place; residual has y's strides
    numel, K, HW,  # elements, channels, and H*W (to find an element's channel in NCHW)
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        channel = offs % K if CHANNELS_LAST else (offs // HW) % K
        acc += tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu (max() may drop it)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _stand_ins(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """bias and residual pointers for the epilogue kernel; an absent one gets a tensor that
    is never read and is not y (which the kernel writes: a traced launch must not alias it)."""
    spare = bias if bias is not None else residual
    if spare is None:
        spare = y.new_empty(1)
    return (bias if bias is not None else spare), (residual if residual is not None else spare)


def bias_residual_relu_(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], relu: bool) -> Tensor:
    """``y = relu?(y + bias + residual?)`` in place, one pass over memory (y dense NCHW or NHWC)."""
    fmt = output_memory_format(y)
    if not y.is_contiguous(memory_format=fmt):
        raise ValueError(f"y should be dense in {fmt}, got strides {y.stride()}")
    if residual is not None and _strides(residual) != _strides(y):
        residual = residual.contiguous(memory_format=fmt)
    if bias is not None:
        bias = bias.contiguous()
    numel = y.numel()
    block = 1024
    grid = (triton.cdiv(numel, block),)
    # Triton launches on the current device's stream: make that y's device.
    with torch.cuda.device(y.device) if _on_gpu(y) else contextlib.nullcontext():
        _launchable(_bias_residual_relu_kernel, y)[grid](
            y, *_stand_ins(y, bias, residual),
            numel, y.shape[1], y.shape[2] * y.shape[3],
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
            CHANNELS_LAST=fmt == torch.channels_last, BLOCK=block, num_warps=4,
        )
    return y


# ---------------------------------------------------------------------------------
# 1x1 stride-1 convs as a plain GEMM through TMA descriptors

@triton.jit
def _gemm_bias_act_kernel(
    a_desc, b_desc, r_desc, y_desc,  # x as [M, C], weight as [K, C], residual and y as [M, K]
    bias_ptr, M, K, C,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    OUT_BF16: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(C, BLOCK_K)):  # TMA zero-fills past the edges: no masks
        a = a_desc.load([off_m, k * BLOCK_K])
        b = b_desc.load([off_n, k * BLOCK_K])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc)

    if HAS_BIAS:
        cols = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += r_desc.load([off_m, off_n]).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN
    if OUT_BF16:
        y_desc.store([off_m, off_n], acc.to(tl.bfloat16))
    else:
        y_desc.store([off_m, off_n], acc.to(tl.float16))


def _set_gemm_blocks(nargs):
    """Autotune pre-hook: each config's tile sizes are the descriptors' box sizes."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    nargs["r_desc"].block_shape = [bm, bn]
    nargs["y_desc"].block_shape = [bm, bn]


def _gemm_config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages, pre_hook=_set_gemm_blocks)


GEMM_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(128, 128, 64, 4, 4),
    _gemm_config(128, 64, 64, 4, 4),
    _gemm_config(64, 128, 64, 4, 4),
    _gemm_config(64, 64, 64, 4, 4),
]
GEMM_INTERPRETER_CONFIG = _gemm_config(64, 64, 32, 4, 1, group_m=4)


def _gemm_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    """Shared memory of a TMA tile: operand stages plus the output tile, 2 bytes each
    (an upper bound: tests/offline_compile.py measures what Triton takes)."""
    return stages * (bm * bk + bk * bn) * 2 + bm * bn * 2


def _prune_gemm(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    m, k, c = named_args["M"], named_args["K"], named_args["C"]
    sms, smem = _device_limits(torch.cuda.current_device())
    fits = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if _gemm_bytes(bm, bn, bk, cfg.num_stages) > smem:
            continue
        if bn > 2 * triton.next_power_of_2(k) or bk > 2 * triton.next_power_of_2(c):
            continue
        fits.append((cfg, triton.cdiv(m, bm) * triton.cdiv(k, bn)))
    if not fits:  # the smallest footprint (a GPU with little shared memory, e.g. sm_120's 99 KiB)
        return [min(configs, key=lambda c: _gemm_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                       c.num_stages))]
    return _filling(fits, sms)


def _make_tuned_gemm():
    kwargs = dict(configs=GEMM_CONFIGS, key=["M", "K", "C", "HAS_RESIDUAL"],
                  prune_configs_by={"early_config_prune": _prune_gemm})
    try:
        return triton.autotune(cache_results=True, **kwargs)(_gemm_bias_act_kernel)
    except TypeError:
        return triton.autotune(**kwargs)(_gemm_bias_act_kernel)


_tuned_gemm = _make_tuned_gemm()


def gemm_tma_refusal(x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
    """None when ``gemm_tma`` takes this call, else why not."""
    if tuple(weight.shape[2:]) != (1, 1) or list(stride) != [1, 1] or list(padding) != [0, 0] or groups != 1:
        return "only 1x1 convs with stride 1, no padding, one group are plain GEMMs"
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    if rows > INT32_MAX - 1024:
        return f"{rows} rows (TMA coordinates are 32-bit: fewer than 2^31)"
    return _tma_refusal(x, weight, residual)


#: the TMA algorithms' tile per problem (:func:`_tile_key`) -> Config: kept by us, on disk
#: and in the shipped table, because Triton's autotuner does not cache configs that carry
#: a pre-hook (the TMA configs set their descriptors' boxes in one) on disk
_tma_tiles: dict = {}


def _tile_key(algorithm: str, x: Tensor, *problem) -> str:
    """Key of a TMA algorithm's tile: "device|triton|algorithm|problem...|dtype"."""
    return "|".join(str(v) for v in (_device_name(x.device.index or 0), triton.__version__, algorithm, *problem,
                                     x.dtype))


#: On Triton < 3.7 (see TRITON_BEFORE_3_7) the heuristic takes one warpgroup.
_TMA_HEURISTIC_WARPS = (4,) if TRITON_BEFORE_3_7 else (4, 8)


def heuristic_gemm_config(m: int, k: int, c: int):
    """The gemm_tma tile without measuring: the first config that fits and fills the GPU
    (on Triton < 3.7, the first of one warpgroup: see _TMA_HEURISTIC_WARPS)."""
    return _prune_gemm([cfg for cfg in GEMM_CONFIGS if cfg.num_warps in _TMA_HEURISTIC_WARPS],
                       {"M": m, "K": k, "C": c})[0]


def gemm_tma(x, weight, bias, residual, stride, padding, dilation, groups, relu, config=None, tune=True) -> Tensor:
    """A 1x1 stride-1 conv on NHWC activations is the GEMM ``(N*H*W, C) x (C, K)``: TMA
    loads of whole tiles (no per-row index math, no masks), the same fused epilogue.
    The tile: ``config`` if given (one of GEMM_CONFIGS), else the one measured for this
    problem before, else autotuned now (remembered on disk), else (``tune=False``, or
    RESNET_FUSED_TRITON_AUTOTUNE=0) a heuristic one."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, c, h, w = x.shape
    k = weight.shape[0]
    m = n * h * w
    y = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    a = _nhwc(x).view(m, c)  # x is channels_last-dense (gemm_tma_refusal): its rows are the pixels
    b = weight.reshape(k, c)
    if b.stride() != (c, 1):
        b = b.contiguous()
    y2 = _nhwc(y).view(m, k)
    r2 = _nhwc(residual).view(m, k) if residual is not None else y2  # never read without a residual
    cfg, key = _tma_tile("gemm_tma", x, (m, k, c, int(residual is not None)), config, tune,
                         GEMM_INTERPRETER_CONFIG, lambda: heuristic_gemm_config(m, k, c))
    box = (cfg or GEMM_CONFIGS[0]).kwargs  # autotuning: the pre-hook sets each config's
    descs = (
        TensorDescriptor.from_tensor(a, [box["BLOCK_M"], box["BLOCK_K"]]),
        TensorDescriptor.from_tensor(b, [box["BLOCK_N"], box["BLOCK_K"]]),
        TensorDescriptor.from_tensor(r2, [box["BLOCK_M"], box["BLOCK_N"]]),
        TensorDescriptor.from_tensor(y2, [box["BLOCK_M"], box["BLOCK_N"]]),
    )
    args = (*descs, bias if bias is not None else y2, m, k, c)
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
                 OUT_BF16=x.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)

    _tma_launch(_gemm_bias_act_kernel, _tuned_gemm, x, grid, args, flags, cfg, key)
    return y if output_memory_format(x) == torch.channels_last else y.contiguous()


def _tma_tile(name: str, x: Tensor, problem: tuple, config, tune: bool, interpreter_config, heuristic):
    """The tile config of a TMA algorithm's launch and its :func:`_tile_key`: ``config`` if
    given; the interpreter's one; the one measured for this problem before; None, meaning
    autotune now; or (``tune=False``, RESNET_FUSED_TRITON_AUTOTUNE=0) ``heuristic()``."""
    if config is not None:
        return config, None
    if INTERPRET and not _on_gpu(x):
        return interpreter_config, None
    key = _tile_key(name, x, *problem)
    _load_choices()
    cfg = _tma_tiles.get(key)
    if cfg is None and not (AUTOTUNE and tune):
        cfg = heuristic()
    return cfg, key


def _tma_launch(kernel, tuner, x: Tensor, grid, args: tuple, flags: dict, cfg, key: Optional[str]) -> None:
    """One launch of a TMA algorithm: with ``cfg``, or (None) autotuned, the winner kept
    under ``key`` in memory and on disk."""
    if INTERPRET and not _on_gpu(x):
        kernel[grid(cfg.kwargs)](*args, **flags, UPCAST=True, **cfg.kwargs, num_warps=4, num_stages=1)
        return
    with torch.cuda.device(x.device):
        if cfg is None:
            with _tuner_lock:
                tuner[grid](*args, **flags, UPCAST=False)
                _tma_tiles[key] = tuner.best_config
            _save_tma_tiles()
        else:
            kernel[grid(cfg.kwargs)](*args, **flags, UPCAST=False, **cfg.kwargs, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------
# stride-1 R x S convs with TMA: 4-D boxes of NHWC pixels, the padding as TMA's zero fill

@triton.jit
def _conv_tma_kernel(
    x_desc, w_desc, r_desc, y_desc,  # x (N, H, W, C); weight (K, R*S*C); residual and y (N, P, Q, K)
    bias_ptr, N, P, Q, K, C,
    R: tl.constexpr, S: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    OUT_BF16: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(P, BLOCK_H)
    tiles_w = tl.cdiv(Q, BLOCK_W)
    num_pid_m = N * tiles_h * tiles_w  # a row tile is a BLOCK_H x BLOCK_W patch of one image
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    n = pid_m // (tiles_h * tiles_w)
    patch = pid_m % (tiles_h * tiles_w)
    p0 = (patch // tiles_w) * BLOCK_H
    q0 = (patch % tiles_w) * BLOCK_W
    off_n = pid_n * BLOCK_N

    # The product is computed transposed, (channels x pixels) = weight tile x patch^T: the
    # patch is then wgmma's B operand, which Triton reshapes from the 4-D box in shared
    # memory (a memdesc reshape). As the A operand it would go through registers
    # (ldmatrix), and Hopper's wgmma with a register operand deeper than 16 is serialized
    # by ptxas (C7515: each wgmma waits for the one before); see benchmarks/NOTES.md.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    chunks = tl.cdiv(C, BLOCK_K)
    for i in range(0, R * S * chunks):
        tap = i // chunks
        c0 = (i % chunks) * BLOCK_K
        # the input patch this tap sees; rows and columns outside the image (the padding)
        # and channels past C come back as zeros, so the weight columns they meet (the
        # next tap's, past C) add nothing
        a = x_desc.load([n, p0 + (tap // S) * DIL_H - PAD_H, q0 + (tap % S) * DIL_W - PAD_W, c0])
        a = tl.reshape(a, (BLOCK_M, BLOCK_K))
        b = w_desc.load([off_n, tap * C + c0])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(b, a.T, acc)

    if HAS_BIAS:
        rows = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + rows, mask=rows < K, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        acc += tl.trans(tl.reshape(r_desc.load([n, p0, q0, off_n]), (BLOCK_M, BLOCK_N))).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN
    if OUT_BF16:
        out = acc.to(tl.bfloat16)
    else:
        out = acc.to(tl.float16)
    y_desc.store([n, p0, q0, off_n], tl.reshape(tl.trans(out), (1, BLOCK_H, BLOCK_W, BLOCK_N)))  # TMA clips


def _set_conv_blocks(nargs):
    """Autotune pre-hook: each config's tile sizes are the descriptors' box sizes."""
    bh, bw, bn, bk = nargs["BLOCK_H"], nargs["BLOCK_W"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [1, bh, bw, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["r_desc"].block_shape = [1, bh, bw, bn]
    nargs["y_desc"].block_shape = [1, bh, bw, bn]


def _conv_config(bh, bw, bn, bk, stages, group_m=8):
    return triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=4, num_stages=stages, pre_hook=_set_conv_blocks)


#: 4 warps only: the flat (tap, chunk) loop is the one triton#1254 miscompiled at 8 warps
#: with pointer loads; these patches fit ResNet's maps: 8x8 tiles 56 and 7 (one patch,
#: 49 of 64 pixels), 4x16 and 16x4 tile 28 and 14 with little waste
CONV_TMA_CONFIGS = [
    _conv_config(8, 16, 128, 64, 4),
    _conv_config(8, 8, 128, 64, 4),
    _conv_config(8, 8, 256, 64, 3),
    _conv_config(4, 16, 128, 64, 4),
    _conv_config(16, 4, 128, 64, 4),
    _conv_config(8, 8, 64, 64, 5),
]
CONV_TMA_INTERPRETER_CONFIG = _conv_config(4, 4, 32, 16, 1, group_m=4)


def _prune_conv_tma(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    n, p, q, k, c = (named_args[name] for name in ("N", "P", "Q", "K", "C"))
    sms, smem = _device_limits(torch.cuda.current_device())
    fits = []
    for cfg in configs:
        bh, bw, bn, bk = (cfg.kwargs[name] for name in ("BLOCK_H", "BLOCK_W", "BLOCK_N", "BLOCK_K"))
        if _gemm_bytes(bh * bw, bn, bk, cfg.num_stages) > smem:
            continue
        if bn > 2 * triton.next_power_of_2(k) or bh > 2 * triton.next_power_of_2(p) or \
                bw > 2 * triton.next_power_of_2(q):
            continue  # mostly empty tiles
        fits.append((cfg, n * triton.cdiv(p, bh) * triton.cdiv(q, bw) * triton.cdiv(k, bn)))
    if not fits:  # the smallest footprint
        return [min(configs, key=lambda c: _gemm_bytes(c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"], c.kwargs["BLOCK_N"],
                                                       c.kwargs["BLOCK_K"], c.num_stages))]
    return _filling(fits, sms)


def _make_tuned_conv_tma():
    kwargs = dict(configs=CONV_TMA_CONFIGS,
                  key=["N", "P", "Q", "K", "C", "R", "S", "PAD_H", "PAD_W", "DIL_H", "DIL_W", "HAS_RESIDUAL"],
                  prune_configs_by={"early_config_prune": _prune_conv_tma})
    return triton.autotune(**kwargs)(_conv_tma_kernel)  # pre-hooks: Triton would not cache on disk anyway


_tuned_conv_tma = _make_tuned_conv_tma()


def conv_tma_refusal(x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
    """None when ``conv_tma`` takes this call, else why not."""
    one_by_one = tuple(weight.shape[2:]) == (1, 1)
    strided_1x1 = one_by_one and list(stride) != [1, 1] and list(padding) == [0, 0]
    if groups != 1 or not (strided_1x1 or (list(stride) == [1, 1] and not one_by_one)):
        return ("takes stride-1 convs larger than 1x1 and strided 1x1 convs without padding, one group "
                "(1x1 stride 1 is gemm_tma's)")
    return _tma_refusal(x, weight, residual)


def _nhwc(t: Tensor) -> Tensor:
    """A channels_last-dense (N, C, H, W) tensor as the (N, H, W, C) tensor it is in memory,
    with the canonical strides even on size-1 dimensions (where any stride addresses the
    same elements, but TMA encodes every stride and wants 16-byte multiples)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).as_strided((n, h, w, c), (h * w * c, w * c, c, 1))


def _tma_refusal(x, weight, residual) -> Optional[str]:
    """What both TMA algorithms need of the tensors."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} (takes float16, bfloat16)"
    if _traced(x):
        return "not offered to torch.compile (descriptor arguments)"
    if _on_gpu(x) and _capability(x.device.index or 0) < (9, 0):
        return "TMA needs compute capability 9.0+"
    if not _on_gpu(x) and not INTERPRET:
        return "no GPU and no interpreter"
    c, k = x.shape[1], weight.shape[0]
    if c % 8 or k % 8:
        return f"TMA rows must be 16-byte multiples: C={c} and K={k} should be multiples of 8"
    if not x.is_contiguous(memory_format=torch.channels_last):  # then (N*H*W, C) is a row-major view
        return "x is not dense channels_last"
    if residual is not None and not residual.is_contiguous(memory_format=torch.channels_last):
        return "residual is not dense channels_last"
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.data_ptr() % 16:
            return f"{name} is not 16-byte aligned"
    return None


def heuristic_conv_tma_config(n: int, p: int, q: int, k: int, c: int):
    return _prune_conv_tma(CONV_TMA_CONFIGS, {"N": n, "P": p, "Q": q, "K": k, "C": c})[0]


def conv_tma(x, weight, bias, residual, stride, padding, dilation, groups, relu, config=None, tune=True) -> Tensor:
    """A stride-1 R x S conv on NHWC activations, each program a BLOCK_H x BLOCK_W patch of
    output pixels: per (tap, channel chunk) one TMA box of input pixels, shifted by the tap
    (the padding is TMA's zero fill), times the tap's weight columns; the same fused
    epilogue, stored as one box (clipped at the image edge). Tiles as in :func:`gemm_tma`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    xn = _nhwc(x)  # dense (N, H, W, C): what _tma_refusal let through
    if list(stride) != [1, 1]:  # a strided 1x1 conv is a stride-1 one over every stride-th pixel
        xn = xn[:, ::stride[0], ::stride[1], :]  # a strided view: TMA takes any 16-byte-multiple strides
        h, w = xn.shape[1], xn.shape[2]
    p = h + 2 * padding[0] - dilation[0] * (r - 1)
    q = w + 2 * padding[1] - dilation[1] * (s - 1)
    y = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    wm = weight.permute(0, 2, 3, 1).reshape(k, r * s * c)  # (K, R*S*C): a view for a channels_last weight
    if wm.stride() != (r * s * c, 1):
        wm = wm.contiguous()
    yn = _nhwc(y)
    rn = _nhwc(residual) if residual is not None else yn  # never read without a residual
    problem = (n, h, w, c, k, r, s, *padding, *dilation, int(residual is not None))
    cfg, key = _tma_tile("conv_tma", x, problem, config, tune, CONV_TMA_INTERPRETER_CONFIG,
                         lambda: heuristic_conv_tma_config(n, p, q, k, c))
    box = (cfg or CONV_TMA_CONFIGS[0]).kwargs  # autotuning: the pre-hook sets each config's
    bh, bw, bn, bk = box["BLOCK_H"], box["BLOCK_W"], box["BLOCK_N"], box["BLOCK_K"]
    descs = (
        TensorDescriptor.from_tensor(xn, [1, bh, bw, bk]), TensorDescriptor.from_tensor(wm, [bn, bk]),
        TensorDescriptor.from_tensor(rn, [1, bh, bw, bn]), TensorDescriptor.from_tensor(yn, [1, bh, bw, bn]),
    )
    args = (*descs, bias if bias is not None else x, n, p, q, k, c)
    flags = dict(R=r, S=s, PAD_H=padding[0], PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1],
                 HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
                 OUT_BF16=x.dtype == torch.bfloat16)

    def grid(meta):
        return (n * triton.cdiv(p, meta["BLOCK_H"]) * triton.cdiv(q, meta["BLOCK_W"])
                * triton.cdiv(k, meta["BLOCK_N"]),)

    _tma_launch(_conv_tma_kernel, _tuned_conv_tma, x, grid, args, flags, cfg, key)
    return y if output_memory_format(x) == torch.channels_last else y.contiguous()


def cudnn_with_epilogue(x, weight, bias, residual, stride, padding, dilation, groups, relu, tune=True) -> Tensor:
    """cuDNN's conv (the vendor kernel), then bias + residual + ReLU as one Triton pass:
    two passes over the output instead of eager's four."""
    y = F.conv2d(x, with_canonical_strides(weight), None, stride, padding, dilation, groups)
    y = y.contiguous(memory_format=output_memory_format(x))
    if bias is None and residual is None and not relu:
        return y
    return bias_residual_relu_(y, bias, residual, relu)


#: The ways this backend computes the op, by name.
ALGORITHMS = {"implicit_gemm": implicit_gemm, "cudnn_epilogue": cudnn_with_epilogue, "gemm_tma": gemm_tma,
              "conv_tma": conv_tma}
#: Algorithms that take only some calls: name -> function saying why not (None: takes it).
_REFUSALS = {"implicit_gemm": implicit_gemm_refusal, "gemm_tma": gemm_tma_refusal,
             "conv_tma": conv_tma_refusal}
#: RESNET_FUSED_TRITON_ALGO: "auto" (time the candidates once per shape on a GPU, keep
#: the fastest), or one name from ALGORITHMS for every call it takes.
_ALGO_ENV = "RESNET_FUSED_TRITON_ALGO"
_choices: dict[str, str] = {}
_choices_loaded = False


def _choices_path() -> str:
    root = os.environ.get("RESNET_FUSED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "resnet_fused")
    return os.path.join(root, "triton_algorithms.json")


def _load_choices() -> None:
    global _choices_loaded
    if _choices_loaded:
        return
    _choices_loaded = True
    try:
        with open(_choices_path()) as f:
            _choices.update(json.load(f))
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: time again
    try:
        with open(_tma_tiles_path()) as f:
            _tma_tiles.update({k: _config_from_json(k, v) for k, v in json.load(f).items()})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _apply_shipped_table()


# ---------------------------------------------------------------------------------
# the tuning table shipped in the package
#
# triton_tuned.json holds, per GPU model, what a GPU session measured: the algorithm
# chosen for each conv shape it ran and the autotuners' winning tile configs. On the
# first call on that GPU model (with the same Triton version, which fixes the
# autotuner's key format) these fill the in-memory caches, so a fresh machine pays no
# tuning for the shapes recorded. RESNET_FUSED_TRITON_RECORD=path writes this
# process's measurements in the same format at exit (benchmarks/gpu_session.sh does),
# to be merged into the package with benchmarks/ship_tuned.py.

SHIPPED_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tuned.json")
_RECORD_ENV = "RESNET_FUSED_TRITON_RECORD"
TABLE_FORMAT = 1


def _table_device() -> Optional[str]:
    """The GPU model whose entry the table serves here (the current device), or None."""
    return _device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None


def _tuners() -> dict:
    """The autotuners whose caches the table carries (gemm_tma's tiles are kept by us)."""
    return {"implicit_gemm": _tuned}


def _config_to_json(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_from_json(name: str, data: dict):
    """A Config from the table; ``name``: the algorithm, or a :func:`_tile_key`."""
    algorithm = name.split("|")[2] if "|" in name else name
    hook = {"gemm_tma": _set_gemm_blocks, "conv_tma": _set_conv_blocks}.get(algorithm)
    return triton.Config(dict(data["kwargs"]), num_warps=data["num_warps"], num_stages=data["num_stages"],
                         pre_hook=hook)


def read_table(path: str) -> dict:
    """A tuning table (the shipped one or a recorded one); an empty one if absent."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return {"format": TABLE_FORMAT, "devices": {}}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: a tuning table is a JSON object, got {type(table).__name__}")
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: tuning table format {table.get('format')!r}, expected {TABLE_FORMAT}")
    return table


def _apply_shipped_table(path: Optional[str] = None) -> int:
    """Fill the caches from the table for this GPU model; the number of entries taken."""
    device = _table_device()
    if device is None:
        return 0
    try:
        table = read_table(path or SHIPPED_TABLE)
    except (OSError, ValueError) as exc:
        log.warning("ignoring the Triton tuning table: %s", exc)
        return 0
    entry = table["devices"].get(device)
    if entry is None or entry.get("triton") != triton.__version__:
        log.info("the Triton tuning table has no entry for %s with Triton %s (has: %s): each shape is tuned on "
                 "its first call", device, triton.__version__,
                 ", ".join(f"{d} with Triton {e.get('triton')}" for d, e in table["devices"].items()) or "none")
        return 0
    taken = 0
    for key, name in entry.get("algorithms", {}).items():
        if name in ALGORITHMS and key not in _choices:
            _choices[key] = name
            taken += 1
    for key, cfg in entry.get("tma_tiles", {}).items():
        if key not in _tma_tiles:
            _tma_tiles[key] = _config_from_json(key, cfg)
            taken += 1
    for name, rows in entry.get("autotune", {}).items():
        tuner = _tuners().get(name)
        if tuner is None:
            continue
        for key, cfg in rows:
            key = tuple(key)
            if key not in tuner.cache:
                tuner.cache[key] = _config_from_json(name, cfg)
                taken += 1
    return taken


def measured_table() -> dict:
    """What this process measured on its GPU, as a tuning table (one device entry)."""
    device = _table_device()
    if device is None:
        return {"format": TABLE_FORMAT, "devices": {}}
    entry = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "algorithms": {k: v for k, v in sorted(_choices.items()) if k.startswith(device + "|")},
        "tma_tiles": {k: _config_to_json(v) for k, v in sorted(_tma_tiles.items()) if k.startswith(device + "|")},
        "autotune": {
            name: sorted([list(key), _config_to_json(cfg)] for key, cfg in tuner.cache.items())
            for name, tuner in _tuners().items()
        },
    }
    return {"format": TABLE_FORMAT, "devices": {device: entry}}


def merge_tables(base: dict, new: dict) -> dict:
    """``base`` with ``new``'s measurements added (``new`` wins where both have a key);
    a device entry recorded with another Triton version is replaced, not merged."""
    out = {"format": TABLE_FORMAT, "devices": dict(base.get("devices", {}))}
    for device, entry in new.get("devices", {}).items():
        old = out["devices"].get(device)
        if old is None or old.get("triton") != entry.get("triton"):
            out["devices"][device] = entry
            continue
        merged = {**old, **{k: v for k, v in entry.items() if k not in ("algorithms", "tma_tiles", "autotune")}}
        for part in ("algorithms", "tma_tiles"):
            merged[part] = {**old.get(part, {}), **entry.get(part, {})}
        merged["autotune"] = {}
        for name in sorted(set(old.get("autotune", {})) | set(entry.get("autotune", {}))):
            rows = {json.dumps(k): [k, c] for k, c in old.get("autotune", {}).get(name, [])}
            rows.update({json.dumps(k): [k, c] for k, c in entry.get("autotune", {}).get(name, [])})
            merged["autotune"][name] = sorted(rows.values())
        out["devices"][device] = merged
    return out


def write_table(path: str, table: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _record_at_exit() -> None:
    path = os.environ.get(_RECORD_ENV)
    if not path:
        return
    table = measured_table()
    if not table["devices"]:
        return
    try:
        write_table(path, merge_tables(read_table(path), table))
    except (OSError, ValueError) as exc:
        log.warning("could not record Triton tuning results to %s: %s", path, exc)


if os.environ.get(_RECORD_ENV):
    import atexit

    atexit.register(_record_at_exit)


def _tma_tiles_path() -> str:
    return os.path.join(os.path.dirname(_choices_path()), "triton_tma_tiles.json")


def _save_tma_tiles() -> None:
    _write_json(_tma_tiles_path(), {k: _config_to_json(cfg) for k, cfg in list(_tma_tiles.items())})


def _write_json(path: str, data: dict) -> None:
    data = dict(data)  # (one step under the GIL: another thread may be adding a choice)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # (each writer its own, then one atomic rename)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home still computes correctly; it just measures again
        log.debug("could not save Triton tuning to %s: %s", path, exc)


def _save_choices() -> None:
    _write_json(_choices_path(), _choices)


def _time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _shape_key(x, weight, residual, stride, padding, dilation, groups, relu) -> str:
    dev = _device_name(x.device.index or 0) if x.is_cuda else "cpu"
    key = "|".join(str(v) for v in (
        dev, torch.__version__, triton.__version__, x.dtype, tuple(x.shape), _strides(x), tuple(weight.shape),
        _strides(weight), residual is not None, tuple(stride), tuple(padding), tuple(dilation), groups, relu,
        AUTOTUNE,
    ))
    if x.dtype == torch.float32:  # float32 runs TF32 or IEEE as torch allows: a choice per mode
        key += f"|tf32={conv_allows_tf32()}"
    return key


#: RESNET_FUSED_TRITON_SKIP: algorithms (comma- or space-separated) never to time or run,
#: e.g. after one failed its GPU tests (benchmarks/gpu_session.sh sets it then)
_SKIP_ENV = "RESNET_FUSED_TRITON_SKIP"


def _skipped() -> str:
    return os.environ.get(_SKIP_ENV, "")


def algorithm_refusal(name: str, args: tuple) -> Optional[str]:
    """None when algorithm ``name`` takes the call ``args``, else why not."""
    skipped = _skipped()
    names = skipped.replace(",", " ").split()
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ValueError(f"{_SKIP_ENV}={skipped!r} names no algorithm {', '.join(map(repr, unknown))}; "
                         f"the algorithms are {', '.join(ALGORITHMS)}")
    if name in names:
        if name == "implicit_gemm":
            raise ValueError(f"{_SKIP_ENV}={skipped!r}: implicit_gemm is the algorithm calls fall back "
                             "to and cannot be skipped")
        return f"skipped by {_SKIP_ENV}"
    refusal = _REFUSALS.get(name)
    if refusal is None:
        return None
    x, weight, _, residual, stride, padding, dilation, groups, _ = args
    return refusal(x, weight, residual, stride, padding, dilation, groups)


def _fallback(names: Iterable[str]) -> str:
    """The algorithm a call goes to when nothing was measured for it, of those that take
    it (``names``): implicit_gemm, or where its 32-bit indices do not hold, cudnn_epilogue
    (which takes every call: even where RESNET_FUSED_TRITON_SKIP names it, when it is
    all that is left)."""
    return "implicit_gemm" if "implicit_gemm" in names else "cudnn_epilogue"


def _forced_algorithm() -> Optional[str]:
    forced = os.environ.get(_ALGO_ENV, "auto")
    if forced == "auto":
        return None
    if forced not in ALGORITHMS:
        raise ValueError(f"{_ALGO_ENV}={forced!r}; expected auto or one of {', '.join(ALGORITHMS)}")
    return forced


#: call signature -> the choice key of :func:`choose_algorithm` (which algorithms take the
#: call, and the shape): a small tuple is much cheaper to build than the key
_keys: dict[tuple, str] = {}


def _call_signature(args: tuple) -> tuple:
    """Everything the choice key and the algorithms' refusals depend on, cheaply."""
    x, weight, _, residual, stride, padding, dilation, groups, relu = args
    sig = (type(x), x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(), x.data_ptr() % 16,
           weight.data_ptr() % 16, tuple(stride), tuple(padding), tuple(dilation), groups, relu, _skipped())
    if x.dtype == torch.float32:
        sig += (conv_allows_tf32(),)
    if residual is None:
        return sig
    return sig + (residual.shape, residual.stride(), residual.data_ptr() % 16)


def choose_algorithm(args: tuple, timing: bool, call: Optional[tuple] = None) -> str:
    """Which of ALGORITHMS runs this call. With ``timing`` (a GPU, not capturing a graph),
    an unseen shape runs every algorithm that takes it, keeps the fastest, and remembers
    it on disk; without, a shape timed before keeps its choice, others take implicit_gemm.
    A forced algorithm (RESNET_FUSED_TRITON_ALGO) that does not take the call leaves it
    to implicit_gemm (:func:`_fallback`), as :meth:`TritonBackend.describe` says. ``call``: the call's
    :func:`_call_signature`, if the caller has it already."""
    _load_choices()
    forced = _forced_algorithm()
    if forced is not None:
        if algorithm_refusal(forced, args) is None:
            return forced
        # (a generator: `in` stops at implicit_gemm, the first, when it takes the call)
        return _fallback(name for name in ALGORITHMS if algorithm_refusal(name, args) is None)
    x, weight, _, residual, stride, padding, dilation, groups, relu = args
    plain = type(x) is Tensor  # not a tracing tensor: no data pointer to read there
    if plain and call is None:
        call = _call_signature(args)
    key = _keys.get(call) if plain else None
    if key is None:  # ~10 us of refusal checks and string building: once per call signature
        names = [name for name in ALGORITHMS if algorithm_refusal(name, args) is None]
        key = _shape_key(x, weight, residual, stride, padding, dilation, groups, relu) + "|" + ",".join(names)
        if plain:
            _keys[call] = key
    choice = _choices.get(key)
    if choice is not None:
        return choice
    names = [name for name in key.rsplit("|", 1)[1].split(",") if name]
    if not timing or not names:
        return _fallback(names)
    if _traced(x):  # torch.compile: choose now, on real tensors of the same shapes
        with _disable_current_modes():
            real = _real_like(args)
            if real is None:
                return _fallback(names)  # symbolic shapes: nothing to time
            times = _time_candidates(names, real)
    else:
        times = _time_candidates(names, args)
    _choices[key] = choice = min(times, key=times.get)
    log.debug("conv %s: %s -> %s", key, {n: round(t, 4) for n, t in times.items()}, choice)
    _save_choices()
    return choice


def _time_candidates(names: list, args: tuple) -> dict:
    """Each algorithm's time on ``args``. One that fails (a tile config the compiler or
    the GPU refuses) is left out with a warning, so it cannot take down the others;
    if every one fails, the first failure is raised."""
    times, failures = {}, []
    for name in names:
        try:
            times[name] = _time_ms(lambda fn=ALGORITHMS[name]: fn(*args))
        except Exception as exc:  # reported, and re-raised if nothing works
            log.warning("Triton algorithm %s failed on this conv and is skipped for it: %s: %s",
                        name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            failures.append(exc)
    if not times:
        raise failures[0]
    return times


def _real_like(args: tuple) -> Optional[tuple]:
    """``args`` with every (fake) tensor replaced by a real random one of the same shape,
    strides, dtype and device; None when a shape is symbolic."""
    out = []
    for a in args:
        if isinstance(a, Tensor):
            if not all(isinstance(v, int) for v in (*a.shape, *a.stride())):
                return None
            a = torch.empty_strided(tuple(a.shape), a.stride(), dtype=a.dtype, device=a.device).normal_()
        out.append(a)
    return tuple(out)


#: (call signature, algorithm) pairs that have run outside a graph capture, so their
#: tiles are tuned: a capture may replay them; anything else is captured untuned
_warm: set = set()


def conv_bias_act_triton(x, weight, bias, residual, stride, padding, dilation, groups, relu) -> Tensor:
    """The fused op on this backend: the algorithm :func:`choose_algorithm` picks.

    While a CUDA graph is captured nothing may be benchmarked: a call that was not run
    before the capture (the usual warm-up) takes its algorithm's heuristic tile."""
    if bias is not None:  # every kernel reads the bias at bias_ptr + k: a strided view is copied
        bias = bias.contiguous()
    args = (x, weight, bias, residual, stride, padding, dilation, groups, relu)
    if not x.is_cuda or type(x) is not Tensor:  # the interpreter, or a trace: nothing is captured
        return ALGORITHMS[choose_algorithm(args, timing=x.is_cuda and AUTOTUNE)](*args)
    if x.device.index != torch.cuda.current_device():
        # x's GPU for everything below, not only the launches: the timing of candidates,
        # the heuristic tiles (its SM count and shared memory), the tuning table's GPU name
        with torch.cuda.device(x.device):
            return conv_bias_act_triton(*args)
    capturing = torch.cuda.is_current_stream_capturing()
    call = _call_signature(args)
    name = choose_algorithm(args, timing=AUTOTUNE and not capturing, call=call)
    warm = (call, name)
    if capturing:
        try:
            return ALGORITHMS[name](*args, tune=warm in _warm)
        except RuntimeError as exc:
            if "stream is capturing" not in str(exc):
                raise
            # Triton loads a kernel's module on its first launch in a process, which a
            # CUDA graph capture in the default "global" mode forbids
            raise RuntimeError(
                f"resnet_fused: the Triton kernel of this conv (x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                f"{x.dtype}, {name}) had not run in this process before the CUDA graph capture, and loading it "
                "is not allowed while capturing: run the model once before capturing (the warm-up "
                "torch.cuda.graph asks for), or capture with capture_error_mode=\"relaxed\"") from exc
    out = ALGORITHMS[name](*args)
    _warm.add(warm)
    return out


def heuristic_config(m: int, k: int, c: int, r: int, s: int, groups: int, elem: int = 2,
                     smem: Optional[int] = None) -> triton.Config:
    """One reasonable config without measuring: large tiles for large GEMMs, small for
    small, no wider than K, a K tile no deeper than the reduction each loop step walks
    (C, or a filter row's S*C where channels are few); with fewer stages, then a shallower K tile, where
    the operand tiles of ``elem``-byte elements would not fit ``smem`` bytes of shared
    memory (float32's 128x128x64 tile in 4 stages needs 256 KiB: more than any GPU has)."""
    taps = r * s
    run = s * c if c < FLAT_SC_MAX_CHANNELS and taps > 1 else c
    bk = 64 if run >= 64 else 32
    if m * k * groups >= 2**22:
        two_warpgroups = taps == 1 and not (elem == 4 and TRITON_BEFORE_3_7)  # see TRITON_BEFORE_3_7
        bm, bn, warps, stages = 128, 128, 8 if two_warpgroups else 4, 3 if taps == 1 else 4
    elif m * k * groups >= 2**18:
        bm, bn, warps, stages = 64, 128 if k >= 128 else 64, 4, 4
    else:
        bm, bn, warps, stages = 32, 64 if k >= 64 else 32, 4, 3
    if bn > max(32, triton.next_power_of_2(k)):  # no columns past K (the stem and layer1 have 64)
        bn, warps = max(32, triton.next_power_of_2(k)), 4
    while smem is not None and _operand_bytes(bm, bn, bk, stages, elem) > smem and (stages > 2 or bk > 16):
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    return _config(bm, bn, bk, warps, stages)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels here, or None. Triton before 3.7
    turns a loop bound into a Python int by ``int()`` of a one-element array, which numpy
    2.4 refuses (triton-lang/triton#9171, fixed in Triton 3.7): every kernel here loops
    over a bound known at run time."""
    import numpy as np  # (the interpreter imported it with the kernels: it needs numpy)

    if not TRITON_BEFORE_3_7:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return (f"Triton {triton.__version__}'s interpreter cannot run with numpy {np.__version__} "
                "(triton-lang/triton#9171): install numpy<2.4 or Triton 3.7+")
    return None


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        if torch.cuda.is_available():
            return None
        if INTERPRET:
            return interpreter_problem()
        return "no CUDA device and TRITON_INTERPRET is not set"

    def runs_on(self, device_type: str, auto: bool = False) -> bool:
        if device_type == "cuda":
            return torch.cuda.is_available()
        return device_type == "cpu" and INTERPRET and not auto

    def refuses(self, x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
        if INTERPRET and not x.is_cuda:
            if _traced(x):
                return "torch.compile cannot trace a kernel that the Triton interpreter runs (TRITON_INTERPRET)"
            if (problem := interpreter_problem()) is not None:
                return problem
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {x.dtype} (takes float16, bfloat16, float32)"
        if x.is_cuda and _capability(x.device.index or 0) < (8, 0):
            return f"GPU compute capability {_capability(x.device.index or 0)} (needs 8.0+)"
        if x.numel() == 0:
            return "empty input"
        return None

    def describe(self, x, weight, residual, stride, padding, dilation, groups) -> str:
        args = (x, weight, None, residual, stride, padding, dilation, groups, False)
        names = [name for name in ALGORITHMS if algorithm_refusal(name, args) is None]
        forced = _forced_algorithm()
        if forced is not None:
            reason = algorithm_refusal(forced, args)
            if reason is not None:
                return f"{_fallback(names)}: {_ALGO_ENV} asks for {forced}, which does not take this call ({reason})"
            return f"{forced}, as {_ALGO_ENV} says"
        _load_choices()
        for relu in (True, False):  # explain() does not know the epilogue; the choice rarely differs
            key = _shape_key(x, weight, residual, stride, padding, dilation, groups, relu) + "|" + ",".join(names)
            if key in _choices:
                return f"{_choices[key]}: measured fastest of {', '.join(names)} for this shape"
        if x.is_cuda and AUTOTUNE:
            return f"the fastest of {', '.join(names)} for this shape, timed on its first call"
        if "implicit_gemm" not in names:
            return f"cudnn_epilogue (implicit_gemm refuses: {algorithm_refusal('implicit_gemm', args)})"
        return "implicit_gemm"

    def clear_packed_weights(self) -> int:
        dropped = len(_packed_weights)
        _packed_weights.clear()
        return dropped

    def check_packed_weights(self, check: bool) -> bool:
        previous = getattr(_calls, "checking", False)
        _calls.checking = check
        return previous

    def run(self, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> Tensor:
        return conv_bias_act_triton(x, weight, bias, residual, stride, padding, dilation, groups, relu)


# ---------------------------------------------------------------------------------
# the op torch.compile traces into

@torch.library.triton_op("resnet_fused::triton_conv_bias_act", mutates_args=())
def triton_conv_bias_act(
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
    """The fused op on the Triton backend, as a ``torch.library.triton_op``.

    Eagerly it is the backend's ``run``. Under ``torch.compile`` AOTAutograd traces this
    body: the algorithm is chosen then (timed on real tensors of the traced shapes),
    and the Triton launches are recorded through ``wrap_triton`` so Inductor calls
    the kernels itself. ``torch.export`` keeps the op as one node. A call the backend
    refuses goes down the fallback chain here too, as the generic op would.
    """
    from ..ops import check_conv_bias_act_args  # (the op is public: called directly, it checks too)

    check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
    impl, _ = select("triton", x, weight, residual, stride, padding, dilation, groups)
    return impl.run(x, weight, bias, residual, stride, padding, dilation, groups, relu)


def _register_op_rules() -> None:
    from ..ops import register_fake_and_autograd

    # the body would also serve as the fake kernel, but not for kernels the CPU
    # interpreter runs, so the op shares the generic op's fake kernel
    register_fake_and_autograd(triton_conv_bias_act)


_register_op_rules()
TritonBackend.op = torch.ops.resnet_fused.triton_conv_bias_act
register(TritonBackend())
