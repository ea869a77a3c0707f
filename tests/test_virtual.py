"""K virtual workers (stacked replicas in one process) against the hand reference of local SGD
(hook_reference.py, which the real multi-process DeepSpeed runs of test_hook.py also match)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hook_reference import reference
from tiny import batch, loss_fn, lr_factor, make_model, make_optimizer

from localsgd_ds.config import ConfigError, LocalSGDConfig
from localsgd_ds.stacked import stack_replicas
from localsgd_ds.virtual import VirtualWorkers

ATOL = 1e-5  # grouped convolutions and batched matmuls sum in another order than K separate models


def run_virtual(
    K: int,
    steps: int,
    block: dict,
    *,
    spe: int,
    gas: int = 1,
    clip: float = 0.0,
    group_lrs=None,
    schedule: bool = False,
    forced: tuple[int, ...] = (),
    variant: str = "plain",
):
    model = make_model(0, variant)
    stacked = stack_replicas(model, K)
    optimizer = make_optimizer(stacked.net, group_lrs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) if schedule else None
    workers = VirtualWorkers(
        stacked,
        LocalSGDConfig.from_dict(block),
        optimizer,
        steps_per_epoch=spe,
        lr_scheduler=scheduler,
        gradient_clipping=clip,
        gradient_accumulation_steps=gas,
    )
    for s in range(steps):
        for micro in range(gas):
            xs, ys = zip(*(batch(k, s, micro) for k in range(K)))
            logits = workers(torch.stack(xs))  # [K * B, classes], replica-major
            workers.backward(loss_fn(logits, torch.stack(ys).flatten()))  # the mean over all K x B
            workers.step()
        if s + 1 in forced:
            workers.sync()
    return workers, [stacked.replica_state_dict(r) for r in range(K)]


def assert_close(ours, ref, atol=ATOL):
    for r, (a, b) in enumerate(zip(ours, ref)):
        for name, expected in b.items():
            assert a[name].dtype == expected.dtype, name
            torch.testing.assert_close(a[name], expected, atol=atol, rtol=0, msg=f"replica {r} {name}")


@pytest.mark.parametrize("K", [2, 4])
def test_local_sgd_matches_reference(K):
    workers, ours = run_virtual(K, 7, {"H": 3, "T": 0}, spe=5)
    assert_close(ours, reference(K, 7, H=3, switch=0))
    assert workers.stats.syncs == 2 and workers.stats.grad_allreduces == 0


def test_post_local_with_a_switch_not_a_multiple_of_H():
    workers, ours = run_virtual(2, 8, {"H": 2, "T": 1}, spe=3)
    assert_close(ours, reference(2, 8, H=2, switch=3))
    assert workers.stats.grad_allreduces == 3 and workers.stats.syncs == 2


def test_msgd_keeps_replicas_identical_and_matches_reference():
    workers, ours = run_virtual(3, 4, {"T": None}, spe=4)
    assert_close(ours, reference(3, 4, H=1, switch=None))
    assert all(torch.equal(ours[0]["fc.weight"], o["fc.weight"]) for o in ours)


def test_policies_accumulation_and_clipping():
    _, ours = run_virtual(2, 4, {"H": 2, "T": 0, "buffers": "broadcast", "momentum": "average"}, spe=4)
    assert_close(ours, reference(2, 4, H=2, switch=0, buffers="broadcast", momentum="average"))
    _, ours = run_virtual(2, 4, {"H": 2, "T": 0, "buffers": "local", "momentum": "reset"}, spe=4)
    assert_close(ours, reference(2, 4, H=2, switch=0, buffers="local", momentum="reset"))
    _, ours = run_virtual(2, 5, {"H": 2, "T": 0}, spe=5, gas=3)
    assert_close(ours, reference(2, 5, H=2, switch=0, gas=3))
    _, ours = run_virtual(2, 6, {"H": 2, "T": 1}, spe=2, clip=0.05)
    assert_close(ours, reference(2, 6, H=2, switch=2, clip=0.05))


def test_slowmo_under_a_schedule_with_groups_and_a_forced_sync():
    block = {"H": 4, "T": 0, "slowmo": {"beta": 0.5, "alpha": 1.0}}
    _, ours = run_virtual(2, 10, block, spe=10, group_lrs=(0.1, 0.05), schedule=True, forced=(6,))
    ref = reference(
        2, 10, H=4, switch=0, slowmo=(0.5, 1.0), group_lrs=(0.1, 0.05), schedule=True, forced=(6,)
    )
    assert_close(ours, ref)


def test_weights_held_ohwi_and_run_tap_by_tap_match_reference():
    """DeepNet's convolutions on 2x2 and 1x1 maps take the "taps" path with OHWI weights on CPU: post-local SGD
    with clipping and SlowMo on them equals K separate models."""
    from localsgd_ds.stacked import StackedConv2d

    block = {"H": 2, "T": 1, "slowmo": {"beta": 0.5, "alpha": 1.0}}
    workers, ours = run_virtual(2, 6, block, spe=2, clip=0.5, variant="deep")
    convs = {n: m for n, m in workers.module.net.named_modules() if isinstance(m, StackedConv2d)}
    assert [n for n, m in convs.items() if m.ohwi] == ["down", "point", "top"]
    assert convs["top"].taps(torch.zeros(4, 16, 1, 1))[0][:2] == (1, 1) and workers.stats.syncs == 2
    assert_close(ours, reference(2, 6, H=2, switch=2, slowmo=(0.5, 1.0), clip=0.5, variant="deep"))


def test_a_checkpoint_in_another_layout_is_refused(tmp_path):
    """Optimizer state in the usual [out, in, kh, kw] layout for an OHWI weight (a checkpoint from before
    weights were held OHWI) would load silently and step in the wrong element order: refused, by name."""
    part, _ = run_virtual(2, 2, {"H": 2, "T": 0}, spe=4, variant="deep")
    part.save_checkpoint(str(tmp_path), tag="old")
    path = tmp_path / "old" / "virtual_workers.pt"
    state = torch.load(path, weights_only=False)
    for slot in state["optimizer"]["state"].values():
        m = slot["momentum_buffer"]
        if m.dim() == 4 and m.shape[1] != m.shape[3]:  # OHWI [K x out, kh, kw, in] -> [K x out, in, kh, kw]
            slot["momentum_buffer"] = m.permute(0, 3, 1, 2).contiguous()
    torch.save(state, path)
    stacked = stack_replicas(make_model(0, "deep"), 2)
    fresh = VirtualWorkers(
        stacked, LocalSGDConfig.from_dict({"H": 2, "T": 0}), make_optimizer(stacked.net), steps_per_epoch=4
    )
    with pytest.raises(
        ConfigError, match=r"optimizer state 'momentum_buffer' of net.down.weight has shape \(16, 8, 3, 3\)"
    ):
        fresh.load_checkpoint(str(tmp_path), tag="old")


def test_averaged_holds_the_mean_and_gives_each_replica_its_own_back():
    workers, before = run_virtual(2, 3, {"H": 4, "T": 0}, spe=4)
    stacked = workers.module
    with workers.averaged():
        inside = stacked.replica_state_dict(1)
    after = [stacked.replica_state_dict(r) for r in range(2)]
    torch.testing.assert_close(inside["fc.weight"], (before[0]["fc.weight"] + before[1]["fc.weight"]) / 2)
    assert all(torch.equal(before[r]["fc.weight"], after[r]["fc.weight"]) for r in range(2))


def test_refusals():
    with pytest.raises(ConfigError, match="local_sgd.K = 3 but the data-parallel world size is 2"):
        VirtualWorkers(
            stack_replicas(make_model(0), 2),
            LocalSGDConfig.from_dict({"H": 2, "T": 0, "K": 3}),
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
            steps_per_epoch=2,
        )
    with pytest.raises(ConfigError, match="ties parameters"):
        stack_replicas(make_model(0, "tied"), 2)


def test_checkpoint_mid_period_resumes_exactly(tmp_path):
    block = {"H": 4, "T": 0, "slowmo": {"beta": 0.5, "alpha": 1.0}}
    full, _ = run_virtual(2, 6, block, spe=6, variant="deep")
    part, _ = run_virtual(2, 3, block, spe=6, variant="deep")
    part.save_checkpoint(str(tmp_path), tag="mid", client_state={"epoch": 1})
    stacked = stack_replicas(make_model(5, "deep"), 2)  # other weights: all must come from the checkpoint
    fresh = VirtualWorkers(
        stacked, LocalSGDConfig.from_dict(block), make_optimizer(stacked.net), steps_per_epoch=6
    )
    path, client = fresh.load_checkpoint(str(tmp_path), tag="mid")
    assert path is not None and client == {"epoch": 1} and fresh.hook.step == 3 and fresh.is_stale
    for s in range(3, 6):
        xs, ys = zip(*(batch(k, s) for k in range(2)))
        fresh.backward(loss_fn(fresh(torch.stack(xs)), torch.stack(ys).flatten()))
        fresh.step()
    for a, b in zip(full.module.state_dict().values(), fresh.module.state_dict().values()):
        assert torch.equal(a, b)


def test_stacked_batches_pad_uneven_validation_shares():
    from localsgd_ds.virtual import stacked_batches

    shares = [
        [(torch.ones(2, 1), torch.tensor([1, 2])), (torch.ones(1, 1), torch.tensor([3]))],
        [(torch.ones(2, 1), torch.tensor([4, 5]))],
    ]
    out = list(stacked_batches(shares, pad_label=-1))
    assert [x.shape for x, _ in out] == [(2, 2, 1), (2, 1, 1)]
    assert out[0][1].tolist() == [1, 2, 4, 5] and out[1][1].tolist() == [3, -1]
    with pytest.raises(ValueError, match="different numbers of batches"):
        list(stacked_batches(shares))


def stack_convs(convs, **kwargs):
    """One StackedConv2d holding ``convs`` (replica r gets conv r's weights, loaded in the usual layout
    whatever the one it is held in), and that state dict."""
    from localsgd_ds.stacked import StackedConv2d

    stacked = StackedConv2d(convs[0], len(convs), **kwargs)
    wide = {"weight": torch.cat([c.weight for c in convs]).detach()}
    if convs[0].bias is not None:
        wide["bias"] = torch.cat([c.bias for c in convs]).detach()
    stacked.load_state_dict(wide)
    return stacked, wide


def usual_layout_grad(stacked):
    """The stacked weight's gradient as ``[K x out, in, kh, kw]``, whatever layout the weight is held in."""
    return stacked.weight.grad.permute(0, 3, 1, 2) if stacked.ohwi else stacked.weight.grad


@pytest.mark.parametrize(
    "cin, k, stride, padding, dilation, hw, bias, path",
    [
        (3, 7, 2, 3, 1, 16, True, "loop"),  # a stem on RGB images: one convolution per replica
        (8, 3, 1, 1, 1, 8, False, "grouped"),  # 64 output positions: the grouped convolution
        (8, 3, 1, 1, 1, 1, True, "taps"),  # a 1x1 map: the centre tap only, the others' gradients zero
        (8, 3, 1, 1, 1, 2, False, "taps"),  # a 2x2 map: every tap, each on its own rectangle
        (8, 3, 2, 1, 1, 4, False, "taps"),  # stride 2 down to 2x2
        (8, 3, 2, 1, 1, 2, True, "taps"),  # 2x2 down to 1x1: the 4 taps of the lower right
        (8, 3, 1, 2, 2, 2, True, "taps"),  # dilated
        (8, (3, 1), (1, 2), (1, 0), 1, (2, 3), True, "taps"),  # rectangular kernel, map and stride
        (8, 1, 2, 0, 1, 16, False, "taps"),  # a 1x1 kernel, stride 2, on 64 output positions
        (8, 1, 1, 0, 1, 14, True, "grouped"),  # a 1x1 kernel on 196
        (8, 3, 1, 1, 1, 4, False, "grouped"),  # 16 positions
    ],
)
def test_stacked_convolution_paths_equal_k_separate_convolutions(
    cin, k, stride, padding, dilation, hw, bias, path
):
    """Every path of StackedConv2d (chosen by shape) gives each replica its own convolution: outputs, weight,
    bias and input gradients of K = 3 separate nn.Conv2d with different weights and inputs."""
    torch.manual_seed(0)
    K, B, cout = 3, 2, 5
    size = hw if isinstance(hw, tuple) else (hw, hw)
    convs = [torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias) for _ in range(K)]
    stacked, wide = stack_convs(convs)
    assert all(torch.equal(t, wide[k]) for k, t in stacked.state_dict().items())
    xs = [torch.randn(B, cin, *size, requires_grad=True) for _ in range(K)]
    images = torch.cat([x.detach() for x in xs], 1).requires_grad_()
    assert stacked.path(images) == path
    expected = torch.cat([c(x) for c, x in zip(convs, xs)], 1)
    got = stacked(images)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    # NaNs where the weight's gradient will likely be allocated: a tap left unwritten shows
    torch.full_like(stacked.weight, float("nan"))
    got.backward(upstream)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(
        usual_layout_grad(stacked), torch.cat([c.weight.grad for c in convs]), atol=ATOL, rtol=1e-5
    )
    torch.testing.assert_close(images.grad, torch.cat([x.grad for x in xs], 1), atol=ATOL, rtol=1e-5)
    if bias:
        torch.testing.assert_close(
            stacked.bias.grad, torch.cat([c.bias.grad for c in convs]), atol=ATOL, rtol=1e-5
        )


def test_taps_gradient_buffer_keeps_dead_taps_zero_and_accumulates():
    """The "taps" path writes the weight's gradient into a buffer kept from step to step: after a step on a
    2x2 map (every tap live) a step on a 1x1 map (the centre alone) still gives zeros at the other taps,
    and a second backward without zero_grad adds (gradient accumulation)."""
    torch.manual_seed(0)
    K, cin, cout = 3, 8, 5
    convs = [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False) for _ in range(K)]
    stacked, _ = stack_convs(convs)
    assert stacked.ohwi
    for hw in (2, 1, 1):
        xs = [torch.randn(2, cin, hw, hw) for _ in range(K)]
        stacked(torch.cat(xs, 1)).square().sum().backward()
        sum(c(x).square().sum() for c, x in zip(convs, xs)).backward()
        torch.testing.assert_close(
            usual_layout_grad(stacked), torch.cat([c.weight.grad for c in convs]), atol=ATOL, rtol=1e-5
        )
        if hw == 2:  # as zero_grad(set_to_none=True) does; the buffer keeps the 2x2 step's values
            stacked.weight.grad = None
            for c in convs:
                c.weight.grad = None
    assert stacked.weight.grad is stacked.gradient_buffer(frozenset({(1, 1)}))


def test_taps_on_a_weight_in_the_usual_layout():
    """Stacked for 8x8 maps (grouped, usual layout), a convolution that meets a 1x1 map runs tap by tap on a
    copy of its weight, and autograd gets the whole gradient, dead taps as zeros."""
    torch.manual_seed(0)
    K, cin, cout = 3, 8, 5
    convs = [torch.nn.Conv2d(cin, cout, 3, padding=1) for _ in range(K)]
    stacked, _ = stack_convs(convs, input_size=(8, 8))
    xs = [torch.randn(2, cin, 1, 1) for _ in range(K)]
    assert not stacked.ohwi and stacked.path(torch.cat(xs, 1)) == "taps"
    torch.full_like(stacked.weight, float("nan"))  # NaNs where the gradient will likely be allocated
    stacked(torch.cat(xs, 1)).square().sum().backward()
    sum(c(x).square().sum() for c, x in zip(convs, xs)).backward()
    torch.testing.assert_close(
        usual_layout_grad(stacked), torch.cat([c.weight.grad for c in convs]), atol=ATOL, rtol=1e-5
    )


def test_image_size_puts_ohwi_only_where_taps_run():
    """Stacked for 8 px images, ResNet-8's last stage (2x2 maps) and its strided 1x1 convolutions take the
    "taps" path and hold their weights OHWI; the 8x8 and 4x4 3x3 convolutions run grouped, in the usual
    layout; without the image size every convolution past the stem is OHWI."""
    from localsgd_ds.models import ResNet8
    from localsgd_ds.stacked import StackedConv2d

    def ohwi(image_size):
        stacked = stack_replicas(ResNet8(num_classes=3), 2, image_size=image_size)
        return sorted(n for n, m in stacked.net.named_modules() if isinstance(m, StackedConv2d) and m.ohwi)

    assert ohwi(8) == [
        "blocks.1.downsample.0", "blocks.2.conv1", "blocks.2.conv2", "blocks.2.downsample.0"
    ]  # fmt: skip
    assert len(ohwi(None)) == 8 and "stem.0" not in ohwi(None)


def test_path_rules(monkeypatch):
    """Which path a shape takes (the rules of StackedConv2d, measured on ResNet-18's layers)."""
    from localsgd_ds.stacked import StackedConv2d

    def path(cin, k, stride, hw, cout=8):
        conv = StackedConv2d(torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), 2)
        return conv.path(torch.zeros(1, 2 * cin, hw, hw))

    assert [path(3, 3, 1, 1), path(8, 3, 1, 2), path(8, 3, 1, 4)] == ["loop", "taps", "grouped"]
    assert [path(8, 1, 1, 8), path(8, 1, 1, 9), path(8, 1, 2, 28), path(8, 1, 2, 29)] == [
        "taps", "grouped", "taps", "grouped"
    ]  # fmt: skip
    off_cpu = StackedConv2d(torch.nn.Conv2d(8, 8, 3, device="meta"), 2)  # as on a GPU: grouped, usual layout
    assert off_cpu.path(torch.zeros(1, 16, 1, 1, device="meta")) == "grouped" and not off_cpu.ohwi
    monkeypatch.setattr(StackedConv2d, "TAPS_MIN_WEIGHT", 8 * 8 * 9)  # a large weight: taps on any map
    assert [path(8, 3, 1, 16), path(8, 3, 1, 16, cout=7)] == ["taps", "grouped"]


def test_prefer_huge_pages_cuts_the_page_faults_of_a_large_tensor():
    """A virtual run's gradients are K times the model's; with huge pages a fresh 151 MB tensor costs a few
    hundred page faults instead of one per 4 KiB page (36,904). In a fresh process each way; a value the
    user set is kept."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    probe = (
        "import os, resource, sys\n"
        "from localsgd_ds.virtual import prefer_huge_pages\n"
        "set_here = prefer_huge_pages() if sys.argv[1] == 'on' else None\n"
        "import torch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.empty(16, 512, 4608).fill_(1.0)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, set_here)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def faults(mode: str, **extra) -> tuple[int, str]:
        out = subprocess.run(
            [sys.executable, "-c", probe, mode],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return int(out[0]), out[1]

    off, _ = faults("off")
    on, set_here = faults("on")
    assert set_here == "True" and on * 10 < off, (on, off)
    kept, set_here = faults("on", THP_MEM_ALLOC_ENABLE="0")
    assert set_here == "False" and kept * 10 > off, (kept, off)
