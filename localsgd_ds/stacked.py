"""K replicas of a network as one wide network: K virtual workers in one process, at the cost of one model.

Every ``Conv2d`` becomes a grouped convolution over K times the channels (run as K convolutions or tap by
tap as batched matrix products where that is faster: ``StackedConv2d``), every ``BatchNorm2d`` normalizes
K times the channels, every ``Linear`` becomes a batched matrix product: replica r owns the r-th block of
every tensor, so its arithmetic (BatchNorm statistics included, over its own batch only) is that of a
separate model, while one kernel call serves all K replicas. Parameter-free modules (ReLU, pooling,
flatten, residual additions) work unchanged on the wider tensors. Every parameter and buffer is
replica-major: ``t.view(K, -1)[r]`` is replica r's copy (on CPU a convolution's weight is held OHWI,
``[K x out, kh, kw, in]``; its state dict keeps the usual layout)::

    stacked = stack_replicas(model, K=16)           # 16 identical copies of model's weights
    logits = stacked(images)                        # images [K, B, C, H, W] -> logits [K, B, classes]
    replica_view(stacked.fc.weight, 16)[3]          # replica 3's classifier weights, flattened

Modules with parameters other than these three (and models that tie parameters) are refused by name.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from localsgd_ds.config import ConfigError


class StackedLinear(nn.Module):
    """K independent ``Linear`` layers on replica-major features ``[B, K * in] -> [B, K * out]``."""

    def __init__(self, linear: nn.Linear, K: int) -> None:
        super().__init__()
        self.K, self.in_features, self.out_features = K, linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().unsqueeze(0).repeat(K, 1, 1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().repeat(K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.K, self.in_features).transpose(0, 1)  # [K, N, in]
        y = torch.bmm(x, self.weight.transpose(1, 2)).transpose(0, 1)  # [N, K, out]
        if self.bias is not None:
            y = y + self.bias.view(self.K, self.out_features)
        return y.reshape(*lead, self.K * self.out_features)


def _per_replica(weight: torch.Tensor, K: int) -> torch.Tensor:
    """``[K, out, kh, kw, in]`` view of an OHWI ``[K x out, kh, kw, in]`` weight (a copy if not contiguous)."""
    return weight.contiguous().view(K, -1, *weight.shape[1:])


def _zero_taps(weight: torch.Tensor, K: int, taps) -> None:
    """Zero kernel taps ``(a, b)`` of an OHWI ``[K x out, kh, kw, in]`` tensor, in place."""
    per_tap = weight.view(K, -1, *weight.shape[1:])
    for a, b in taps:
        per_tap[:, :, a, b].zero_()


class _TapConv(torch.autograd.Function):
    """K convolutions on a small map as one batched matrix product per live kernel tap.

    On a map of a few positions most taps of a kernel see padding at most output positions (a 3x3 kernel
    on a 2x2 map: 16 of its 36 position-tap pairs touch the image; on a 1x1 map only the centre tap does).
    Tap (a, b) maps a rectangle of input positions to a rectangle of output positions: one ``[K, out, in]
    x [K, in, B x positions]`` product, its weight read in place from the OHWI weight ``[K x out, kh, kw,
    in]`` (a ``[K, out, in]`` view with a row stride of ``kh x kw x in``). So the products are exactly those
    that touch the image (no unfold, no multiplication by padding), each weight is read once per pass,
    and the weight's gradient is written once, tap by tap, zeros for the taps that never touch the image.
    Activations go replica-major (``[K, channels, B, H, W]``) once each way. With an ``owner`` (the
    ``StackedConv2d`` whose ``weight`` parameter this is), the weight's gradient is not returned to autograd
    but written into ``owner.weight.grad``, its persistent ``gradient_buffer`` (added to it if a gradient
    is there), so hooks on that parameter do not see it.
    ``taps``: ``(a, b, output rows, output columns, input rows, input columns)`` (``StackedConv2d.taps``),
    those whose output rectangle is the whole map first."""

    @staticmethod
    def _rect(t: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """``[K, C, B, H, W]`` -> ``[K, C, B x positions]`` of the rectangle (a view when it is the whole map)."""
        return t[:, :, :, rows, cols].reshape(t.shape[0], t.shape[1], -1)

    @staticmethod
    def _accumulate(total, part: torch.Tensor, rows: slice, cols: slice, shape) -> torch.Tensor:
        """Add ``part`` (``[K, C, B x positions]``) into the rectangle of ``total`` (``[K, C, B, H, W]``),
        which starts as the first part when that covers the whole map, else as zeros."""
        if total is None:
            if part.numel() == shape.numel():
                return part.view(shape)
            total = part.new_zeros(shape)
        target = total[:, :, :, rows, cols]
        target += part.view(target.shape)
        return total

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, K: int, taps, out_size, owner=None
    ) -> torch.Tensor:
        B, cin = x.shape[0], x.shape[1] // K
        xk = x.view(B, K, cin, *x.shape[2:]).permute(1, 2, 0, 3, 4).contiguous()  # [K, in, B, H, W]
        w5 = _per_replica(weight, K)
        ctx.K, ctx.taps, ctx.x_shape, ctx.owner = K, taps, x.shape, owner
        ctx.save_for_backward(xk, weight)
        shape = torch.Size((K, w5.shape[1], B, *out_size))
        y = None
        for a, b, out_rows, out_cols, in_rows, in_cols in taps:
            part = torch.bmm(w5[:, :, a, b], _TapConv._rect(xk, in_rows, in_cols))  # [K, out, B x n]
            y = _TapConv._accumulate(y, part, out_rows, out_cols, shape)
        return y.permute(2, 0, 1, 3, 4).reshape(B, -1, *out_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xk, weight = ctx.saved_tensors
        K, taps = ctx.K, ctx.taps
        B, w5 = grad.shape[0], _per_replica(weight, K)
        gk = grad.reshape(B, K, -1, *grad.shape[2:]).permute(1, 2, 0, 3, 4).contiguous()  # [K, out, B, H, W]
        grad_x = grad_weight = None
        live = frozenset((a, b) for a, b, *_ in taps)
        into, accumulate = None, False
        if ctx.needs_input_grad[1]:
            if ctx.owner is None:  # the gradient goes to autograd: every tap written, dead ones as zeros
                into = grad_weight = weight.new_empty(weight.shape)
                every = {(a, b) for a in range(weight.shape[1]) for b in range(weight.shape[2])}
                _zero_taps(into, K, every - live)
            elif ctx.owner.weight.grad is None:  # straight into the owner's persistent .grad
                into = ctx.owner.gradient_buffer(live)
            else:  # a later micro-batch, or zero_grad(set_to_none=False): add to what is there
                into, accumulate = ctx.owner.weight.grad, True
            per_tap = into.view(K, -1, *weight.shape[1:])
        for a, b, out_rows, out_cols, in_rows, in_cols in taps:
            g = _TapConv._rect(gk, out_rows, out_cols)  # [K, out, B x n]
            if into is not None:
                x_t = _TapConv._rect(xk, in_rows, in_cols).transpose(1, 2)
                if accumulate:
                    per_tap[:, :, a, b].baddbmm_(g, x_t)
                else:
                    torch.bmm(g, x_t, out=per_tap[:, :, a, b])
            if ctx.needs_input_grad[0]:
                part = torch.bmm(w5[:, :, a, b].transpose(1, 2), g)  # [K, in, B x n]
                grad_x = _TapConv._accumulate(grad_x, part, in_rows, in_cols, xk.shape)
        if into is not None and ctx.owner is not None and ctx.owner.weight.grad is None:
            ctx.owner.weight.grad = into
        if grad_x is not None:
            grad_x = grad_x.permute(2, 0, 1, 3, 4).reshape(ctx.x_shape)
        return grad_x, grad_weight, None, None, None, None


class StackedConv2d(nn.Conv2d):
    """K independent ``Conv2d`` layers on replica-major channels, with a grouped convolution's weight and bias
    (``groups = K x`` the layer's own; replica-major like every stacked tensor). How the K products run
    depends on the shapes only, so a run takes the same path every time (``path``); on CPU the grouped
    convolution is slow at both ends of a ResNet (``benchmarks/bench_virtual.py``, K = 16, ResNet-18):

    - ``"loop"``: the stem, whose replicas see 3 channels each (grouped: 2-3x one model's time at 112 px):
      one ordinary convolution per replica on its own channels, concatenated.
    - ``"taps"``: one batched matrix product per kernel tap that touches the image (``_TapConv``), from
      the weight held OHWI, where that measured faster than grouped (ResNet-18 layers at 32 and 112 px):
      maps of at most 4 output positions (grouped: 1.5-10x slower), 1x1 kernels on at most 64 positions
      or, strided, 196 (grouped 1.6-2x slower; unstrided on 196 grouped is 1.4x faster), and weights of
      at least 2^20 elements per replica (layer 4 of ResNet-18 on 4x4 to 7x7 maps: grouped 1.1-1.5x
      slower; on layer 3's 256 x 256 x 3 x 3 grouped is 1.05-1.15x faster; on 16 positions of 128
      channels, 1.4x).
    - ``"grouped"``: everything else, and everything on a GPU (where the other paths are not measured).

    Every path is the same arithmetic up to the order of the sums."""

    TAPS_MAX_POSITIONS = 4
    TAPS_MAX_POSITIONS_1X1 = 64
    TAPS_MAX_POSITIONS_1X1_STRIDED = 196
    TAPS_MIN_WEIGHT = 2**20
    LOOP_MAX_CHANNELS = 4

    def __init__(self, conv: nn.Conv2d, K: int, input_size: tuple[int, int] | None = None) -> None:
        if conv.padding_mode != "zeros":
            raise ConfigError(
                f"virtual workers: Conv2d with padding_mode={conv.padding_mode!r} is not supported"
            )
        if isinstance(conv.padding, str):
            raise ConfigError(f"virtual workers: Conv2d with padding={conv.padding!r} is not supported")
        super().__init__(
            K * conv.in_channels,
            K * conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=K * conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.K, self.replica_groups = K, conv.groups
        with torch.no_grad():
            self.weight.copy_(conv.weight.repeat(K, 1, 1, 1))
            if conv.bias is not None:
                self.bias.copy_(conv.bias.repeat(K))
        # Where it takes the "taps" path (on CPU; at input_size when given, else wherever it may), the weight
        # is held OHWI, [K x out, kh, kw, in] (still replica-major and contiguous, as the fused optimizer
        # needs), so each tap is read in place; any other path takes a copy in the usual layout. State
        # dicts keep the usual [K x out, in, kh, kw] layout either way.
        device = self.weight.device.type
        self.ohwi = self._path(device, input_size or (1, 1)) == "taps"  # (1, 1): the smallest map
        self._grad_buffer: torch.Tensor | None = None  # see gradient_buffer
        self._grad_taps: frozenset[tuple[int, int]] = frozenset()
        if self.ohwi:
            self.weight = nn.Parameter(self.weight.detach().permute(0, 2, 3, 1).contiguous())

    @property
    def conv_weight(self) -> torch.Tensor:
        """The weight as a grouped convolution takes it, ``[K x out, in, kh, kw]`` (a view)."""
        return self.weight.permute(0, 3, 1, 2) if self.ohwi else self.weight

    def gradient_buffer(self, live: frozenset[tuple[int, int]]) -> torch.Tensor:
        """The tensor the "taps" path makes the weight's ``.grad``, kept from step to step (with the weight
        OHWI): a fresh gradient of K times a layer 4 weight is a fresh mapping of 151 MB, zeroed by the
        kernel page by page and then again, 8 taps in 9, by its dead taps. Here the taps that never touch
        the image (not in ``live``) hold zeros written once; only the live ones are written each step.
        Clipping, averaging and ``zero_grad`` act on it in place, which keeps those zeros."""
        buf, weight = self._grad_buffer, self.weight
        if (
            buf is None
            or buf.shape != weight.shape
            or buf.device != weight.device
            or buf.dtype != weight.dtype
        ):
            buf, self._grad_taps = torch.zeros_like(weight), frozenset()
        _zero_taps(buf, self.K, self._grad_taps - live)  # live before, dead at this input size
        self._grad_buffer, self._grad_taps = buf, live
        return buf

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.ohwi:
            destination[prefix + "weight"] = destination[prefix + "weight"].detach().permute(0, 3, 1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        weight = state_dict.get(prefix + "weight")  # in the usual layout, as _save_to_state_dict writes it
        if self.ohwi and isinstance(weight, torch.Tensor) and weight.dim() == 4:
            state_dict[prefix + "weight"] = weight.permute(0, 2, 3, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _out_size(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        size = x.shape[-2:] if isinstance(x, torch.Tensor) else x
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(size, self.padding, self.dilation, self.kernel_size, self.stride)
        )

    def taps(self, x: torch.Tensor) -> list[tuple[int, int, slice, slice, slice, slice]]:
        """The kernel taps that touch input ``x`` at some output position, each as ``(a, b, output rows,
        output columns, input rows, input columns)``: tap (a, b) multiplies the input rectangle into the
        output rectangle (``_TapConv``). A 3x3 convolution on a 1x1 map has one, its centre."""
        spans, out_size = [], self._out_size(x)
        for n, p, k, s, d, o in zip(
            x.shape[-2:], self.padding, self.kernel_size, self.stride, self.dilation, out_size
        ):
            per_tap = {}
            for t in range(k):
                live = [i for i in range(o) if 0 <= i * s - p + t * d < n]
                if live:
                    first, last = live[0], live[-1]
                    start = first * s - p + t * d
                    per_tap[t] = (slice(first, last + 1), slice(start, start + (last - first) * s + 1, s))
            spans.append(per_tap)
        taps = [
            (a, b, out_rows, out_cols, in_rows, in_cols)
            for a, (out_rows, in_rows) in spans[0].items()
            for b, (out_cols, in_cols) in spans[1].items()
        ]
        whole = (slice(0, out_size[0]), slice(0, out_size[1]))
        return sorted(taps, key=lambda tap: (tap[2], tap[3]) != whole)  # whole-map taps first (stable)

    def path(self, x: torch.Tensor) -> str:
        """``"loop"``, ``"taps"`` or ``"grouped"``: how input ``x`` is convolved (see the class)."""
        return self._path(x.device.type, x.shape[-2:])

    def _path(self, device_type: str, size: tuple[int, int]) -> str:
        if device_type != "cpu" or self.replica_groups != 1:
            return "grouped"
        if self.in_channels // self.K <= self.LOOP_MAX_CHANNELS:
            return "loop"
        height, width = self._out_size(size)
        positions, limit = height * width, self.TAPS_MAX_POSITIONS
        if tuple(self.kernel_size) == (1, 1):
            strided = max(self.stride) > 1
            limit = self.TAPS_MAX_POSITIONS_1X1_STRIDED if strided else self.TAPS_MAX_POSITIONS_1X1
        if positions <= limit or self.weight.numel() // self.K >= self.TAPS_MIN_WEIGHT:
            return "taps"
        return "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "grouped":
            return self._conv_forward(x, self.conv_weight.contiguous(), self.bias)
        if path == "loop":
            cin, cout = self.in_channels // self.K, self.out_channels // self.K
            return torch.cat(
                [
                    F.conv2d(
                        x[:, r * cin : (r + 1) * cin],
                        self.conv_weight[r * cout : (r + 1) * cout],
                        None if self.bias is None else self.bias[r * cout : (r + 1) * cout],
                        self.stride,
                        self.padding,
                        self.dilation,
                    )
                    for r in range(self.K)
                ],
                dim=1,
            )
        weight = self.weight if self.ohwi else self.weight.permute(0, 2, 3, 1)
        y = _TapConv.apply(x, weight, self.K, self.taps(x), self._out_size(x), self if self.ohwi else None)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _stack_bn(bn: nn.BatchNorm2d, K: int) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(
        K * bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=bn.weight.device if bn.affine else None,
    )
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight.repeat(K))
            out.bias.copy_(bn.bias.repeat(K))
        if bn.track_running_stats:
            out.running_mean.copy_(bn.running_mean.repeat(K))
            out.running_var.copy_(bn.running_var.repeat(K))
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
    return out


def _stack_children(module: nn.Module, K: int, path: str, sizes: dict[nn.Module, tuple[int, int]]) -> None:
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        if type(child) is nn.Conv2d:
            setattr(module, name, StackedConv2d(child, K, sizes.get(child)))
        elif type(child) is nn.BatchNorm2d:
            setattr(module, name, _stack_bn(child, K))
        elif type(child) is nn.Linear:
            setattr(module, name, StackedLinear(child, K))
        else:
            if list(child.parameters(recurse=False)) or list(child.buffers(recurse=False)):
                raise ConfigError(
                    f"virtual workers: module {where!r} ({type(child).__name__}) holds its own parameters or "
                    "buffers; only Conv2d, BatchNorm2d and Linear can be stacked into K replicas"
                )
            _stack_children(child, K, where, sizes)


@torch.no_grad()
def _conv_input_sizes(model: nn.Module, image_size: int) -> dict[nn.Module, tuple[int, int]]:
    """The map size each ``Conv2d`` of ``model`` sees on a square image of ``image_size`` pixels (one image
    of zeros through ``model`` in eval mode, its own mode restored; the first convolution's channels)."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    if not convs:
        return {}
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[-2:]))

    hooks = [c.register_forward_pre_hook(record) for c in convs]
    training = model.training
    try:
        model.eval()
        model(torch.zeros(1, convs[0].in_channels, image_size, image_size, device=convs[0].weight.device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return sizes


class StackedReplicas(nn.Module):
    """The wide network: input ``[K, B, C, H, W]``, output ``[K, B, ...]`` (replica r's logits at r)."""

    def __init__(self, model: nn.Module, K: int, image_size: int | None = None) -> None:
        super().__init__()
        storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
        if len(set(storages)) != len(storages):
            raise ConfigError("virtual workers: the model ties parameters (shared storage); not supported")
        if list(model.parameters(recurse=False)) or list(model.buffers(recurse=False)):
            raise ConfigError("virtual workers: the top-level module holds its own parameters or buffers")
        self.K = K
        self._shapes = {name: t.shape for name, t in model.state_dict().items()}
        self.net = copy.deepcopy(model)
        sizes = _conv_input_sizes(self.net, image_size) if image_size else {}
        _stack_children(self.net, K, "", sizes)

    def replica_state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Replica ``r``'s weights and buffers as a state dict of the original network (for evaluation with
        it, export, or comparing with a real run)."""
        wide = self.net.state_dict()
        return {
            name: wide[name].clone() if not shape else wide[name].reshape(self.K, *shape)[r].clone()
            for name, shape in self._shapes.items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, B = x.shape[:2]
        if K != self.K:
            raise ValueError(f"expected a batch for {self.K} replicas in dim 0, got shape {tuple(x.shape)}")
        wide = x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:])  # replica-major channels
        y = self.net(wide)
        return y.reshape(B, K, -1).transpose(0, 1)


def stack_replicas(model: nn.Module, K: int, *, image_size: int | None = None) -> StackedReplicas:
    """K identical replicas of ``model`` (its current weights and buffers) as one wide network. With the
    ``image_size`` it will train on, each convolution holds its weight in the layout of the path it will
    take at that size (``StackedConv2d``); without, every one that may take the "taps" path holds it OHWI."""
    if K < 1:
        raise ConfigError(f"virtual workers: K must be >= 1, got {K}")
    return StackedReplicas(model, K, image_size)


def replica_view(t: torch.Tensor, K: int) -> torch.Tensor:
    """``[K, -1]`` view of a replica-major tensor (a 0-d or shared tensor is one value for all replicas)."""
    if t.dim() == 0:
        return t.view(1, 1)
    return t.view(K, -1)
