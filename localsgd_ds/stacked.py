"""K replicas of a network as one wide network: K virtual workers in one process, at the cost of one model.

Every ``Conv2d`` becomes a grouped convolution over K times the channels (run as K convolutions or as a
batched matrix product where that is faster: ``StackedConv2d``), every ``BatchNorm2d`` normalizes
K times the channels, every ``Linear`` becomes a batched matrix product: replica r owns the r-th block of
every tensor, so its arithmetic (BatchNorm statistics included, over its own batch only) is that of a
separate model, while one kernel call serves all K replicas. Parameter-free modules (ReLU, pooling,
flatten, residual additions) work unchanged on the wider tensors. Every parameter and buffer is
replica-major: ``t.view(K, -1)[r]`` is replica r's copy::

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


class StackedConv2d(nn.Conv2d):
    """K independent ``Conv2d`` layers on replica-major channels, with a grouped convolution's weight and bias
    (``groups = K x`` the layer's own; replica-major like every stacked tensor). How the K products run
    depends on the shapes only, so a run takes the same path every time (``path``); on CPU the grouped
    convolution is slow at both ends of a ResNet (``benchmarks/bench_virtual.py``, K = 16, ResNet-18):

    - ``"loop"``: the stem, whose replicas see 3 channels each (grouped: 2-3x one model's time at 112 px):
      one ordinary convolution per replica on its own channels, concatenated.
    - ``"bmm"``: the deep layers on small images, many channels over a map of at most 4 positions:
      ``unfold`` and one batched matrix product, K matrices ``[out, in x k x k] x [in x k x k, B x
      positions]`` (grouped: up to 4x slower; at 16 positions neither wins).
    - ``"grouped"``: everything else, and everything on a GPU (where the other paths are not measured).

    Every path is the same arithmetic up to the order of the sums."""

    BMM_MAX_POSITIONS = 4
    LOOP_MAX_CHANNELS = 4

    def __init__(self, conv: nn.Conv2d, K: int) -> None:
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

    def _out_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)
        )

    def path(self, x: torch.Tensor) -> str:
        """``"loop"``, ``"bmm"`` or ``"grouped"``: how input ``x`` is convolved (see the class)."""
        if x.device.type != "cpu" or self.replica_groups != 1:
            return "grouped"
        per_replica = self.in_channels // self.K
        if per_replica <= self.LOOP_MAX_CHANNELS:
            return "loop"
        height, width = self._out_size(x)
        return "bmm" if height * width <= self.BMM_MAX_POSITIONS else "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "grouped":
            return super().forward(x)
        if path == "loop":
            cin, cout = self.in_channels // self.K, self.out_channels // self.K
            return torch.cat(
                [
                    F.conv2d(
                        x[:, r * cin : (r + 1) * cin],
                        self.weight[r * cout : (r + 1) * cout],
                        None if self.bias is None else self.bias[r * cout : (r + 1) * cout],
                        self.stride,
                        self.padding,
                        self.dilation,
                    )
                    for r in range(self.K)
                ],
                dim=1,
            )
        height, width = self._out_size(x)
        B, K, L = x.shape[0], self.K, height * width
        inner = self.in_channels // K * self.kernel_size[0] * self.kernel_size[1]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, K * inner, L]
        cols = cols.view(B, K, inner, L).permute(1, 2, 0, 3).reshape(K, inner, B * L)
        y = torch.bmm(self.weight.view(K, -1, inner), cols)  # [K, out, B * L]
        y = y.view(K, -1, B, L).permute(2, 0, 1, 3).reshape(B, self.out_channels, height, width)
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


def _stack_children(module: nn.Module, K: int, path: str) -> None:
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        if type(child) is nn.Conv2d:
            setattr(module, name, StackedConv2d(child, K))
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
            _stack_children(child, K, where)


class StackedReplicas(nn.Module):
    """The wide network: input ``[K, B, C, H, W]``, output ``[K, B, ...]`` (replica r's logits at r)."""

    def __init__(self, model: nn.Module, K: int) -> None:
        super().__init__()
        storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
        if len(set(storages)) != len(storages):
            raise ConfigError("virtual workers: the model ties parameters (shared storage); not supported")
        if list(model.parameters(recurse=False)) or list(model.buffers(recurse=False)):
            raise ConfigError("virtual workers: the top-level module holds its own parameters or buffers")
        self.K = K
        self._shapes = {name: t.shape for name, t in model.state_dict().items()}
        self.net = copy.deepcopy(model)
        _stack_children(self.net, K, "")

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


def stack_replicas(model: nn.Module, K: int) -> StackedReplicas:
    """K identical replicas of ``model`` (its current weights and buffers) as one wide network."""
    if K < 1:
        raise ConfigError(f"virtual workers: K must be >= 1, got {K}")
    return StackedReplicas(model, K)


def replica_view(t: torch.Tensor, K: int) -> torch.Tensor:
    """``[K, -1]`` view of a replica-major tensor (a 0-d or shared tensor is one value for all replicas)."""
    if t.dim() == 0:
        return t.view(1, 1)
    return t.view(K, -1)
