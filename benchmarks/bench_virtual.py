"""How fast are K virtual workers? A local step of K stacked replicas against its physical limit.

The limit is one model stepped at batch K x B: the same arithmetic in the fewest kernel calls. But K
distinct models also move K sets of weights where one model moves one: the floor adds, beyond one model's
step, what the other K - 1 replicas must cost whatever runs them: their optimizer step, and two reads and
a write of their weights (the layers read the weights forward and backward and write the gradients),
each timed alone on copies of the stacked parameters, minus the same for one model. The naive
alternative is K replicas stepped one after another at batch B. All sides zero gradients to None, as
DeepSpeed and the virtual workers do. All sides run in interleaved
rounds (A B C A B C ...) in one process, so load changes hit all of them alike; the report gives the
median and the spread of each ratio. Memory: the bytes of parameters, gradients and momentum per replica
(exact), and the activation bytes autograd saves per image (measured with saved-tensor hooks), which
give the largest K that fits a device of a given size::

    python benchmarks/bench_virtual.py                          # ResNet-8 and ResNet-18, K = 16, CPU
    python benchmarks/bench_virtual.py --device cuda --models resnet50 --image-size 224 --batch 32
    python benchmarks/bench_virtual.py --memory-only --models resnet50 --image-size 224 --batch 32   # no timing
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localsgd_ds.models import ResNet8  # noqa: E402
from localsgd_ds.stacked import stack_replicas  # noqa: E402
from localsgd_ds.virtual import build_optimizer, prefer_huge_pages  # noqa: E402

MODELS = {
    "resnet8": lambda: ResNet8(num_classes=10),
    "resnet18": lambda: resnet18(num_classes=10),
    "resnet50": lambda: resnet50(num_classes=1000),
}


def sgd(params) -> torch.optim.Optimizer:
    """Every side's optimizer: the one ``build_optimizer`` makes for a virtual run (fused where it can)."""
    return build_optimizer(
        {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}}, params
    )


def make_sides(name: str, K: int, B: int, size: int, device: torch.device):
    """Three closures, each doing one local training step of K workers' worth of images."""
    torch.manual_seed(0)
    base = MODELS[name]().to(device)
    classes = base.fc.out_features
    images = torch.randn(K, B, 3, size, size, device=device)
    labels = torch.randint(0, classes, (K, B), device=device)
    loss_fn = nn.CrossEntropyLoss()

    stacked = stack_replicas(base, K, image_size=size).to(device)  # as the recipe stacks it
    opt_stacked = sgd(stacked.parameters())

    def virtual() -> None:
        logits = stacked(images)
        loss = sum(loss_fn(logits[k], labels[k]) for k in range(K))
        opt_stacked.zero_grad(set_to_none=True)
        loss.backward()
        opt_stacked.step()

    big = copy.deepcopy(base)
    opt_big = sgd(big.parameters())
    flat_images, flat_labels = images.flatten(0, 1), labels.flatten()

    def one_model() -> None:
        loss = loss_fn(big(flat_images), flat_labels)
        opt_big.zero_grad(set_to_none=True)
        loss.backward()
        opt_big.step()

    replicas = [copy.deepcopy(base) for _ in range(K)]
    opts = [sgd(m.parameters()) for m in replicas]

    def sequential() -> None:
        for k, (m, o) in enumerate(zip(replicas, opts)):
            loss = loss_fn(m(images[k]), labels[k])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    # What K distinct models cost beyond one model's arithmetic, whatever runs them: the optimizer steps K
    # replicas' weights and state, not one. Timed alone on copies with gradients in place.
    def optimizer_step(params) -> Callable[[], object]:
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c in copies:
            c.grad = torch.randn_like(c) * 1e-3
        opt = sgd(copies)
        return opt.step

    # And the convolutions must read K sets of weights (forward, backward) and write K sets of gradients:
    # timed as two plain reads and one write of the same bytes.
    def weight_traffic(params) -> Callable[[], None]:
        weights = [p.detach() for p in params]
        grads = [torch.empty_like(w) for w in weights]

        def run() -> None:
            for w, g in zip(weights, grads):
                w.sum()
                g.copy_(w)

        return run

    sides = {"virtual": virtual, "one_model": one_model, "sequential": sequential}
    for tag, params in (("K", list(stacked.parameters())), ("1", list(base.parameters()))):
        sides[f"optimizer_{tag}"] = optimizer_step(params)
        sides[f"traffic_{tag}"] = weight_traffic(params)
    return sides, base, stacked


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sides(sides: dict, rounds: int, device: torch.device) -> dict[str, list[float]]:
    for fn in sides.values():  # warm-up: allocator, oneDNN / cuDNN kernel choice
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def activation_bytes_per_image(model: nn.Module, size: int, device: torch.device) -> int:
    """Bytes autograd keeps for the backward pass of one training image (saved tensors, deduplicated)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model = copy.deepcopy(model).train()
    x = torch.randn(2, 3, size, size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) // 2


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    ratios = sorted(a / b for a, b in zip(num, den))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "n": len(ratios)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet8", "resnet18"], choices=sorted(MODELS))
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="images per worker per step (B)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--device-gb", type=float, default=80.0, help="device memory for the largest-K answer"
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the timing, report the memory")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="leave THP_MEM_ALLOC_ENABLE unset (a virtual run sets it)",
    )
    args = parser.parse_args(argv)
    if not args.no_huge_pages:
        prefer_huge_pages()  # as the recipe does for --virtual; all sides run in this one process
    device = torch.device(args.device)
    print(
        f"# K = {args.K} workers x B = {args.batch} images of {args.image_size} px, {args.device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}\n"
    )
    print("| model | virtual step (ms) | one model at K x B (ms) | K one after another (ms) "
          "| floor: one model + K replicas' optimizer and weight traffic (ms) "
          "| virtual / one model | virtual / floor | virtual / one after another |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = {}
    for name in [] if args.memory_only else args.models:
        sides, base, stacked = make_sides(name, args.K, args.batch, args.image_size, device)
        times = time_sides(sides, args.rounds, device)
        vs_one = ratio_stats(times["virtual"], times["one_model"])
        vs_seq = ratio_stats(times["virtual"], times["sequential"])
        times["floor"] = [
            one + ok - o1 + tk - t1
            for one, ok, o1, tk, t1 in zip(
                *(times[k] for k in ("one_model", "optimizer_K", "optimizer_1", "traffic_K", "traffic_1"))
            )
        ]
        vs_floor = ratio_stats(times["virtual"], times["floor"])
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

        def r(d: dict) -> str:
            return f"{d['median']:.3f} [{d['min']:.3f}-{d['max']:.3f}]"

        print(
            f"| {name} | {med['virtual']:.1f} | {med['one_model']:.1f} | {med['sequential']:.1f} "
            f"| {med['floor']:.1f} | {r(vs_one)} | {r(vs_floor)} | {r(vs_seq)} |"
        )
        one = sum(p.numel() * p.element_size() for p in base.parameters())
        stacked_bytes = sum(p.numel() * p.element_size() for p in stacked.parameters())
        results[name] = {"times_s": times, "virtual_over_one_model": vs_one, "virtual_over_sequential": vs_seq,
                         "virtual_over_floor": vs_floor,
                         "param_bytes_per_replica": one, "stacked_param_bytes": stacked_bytes}  # fmt: skip
        del sides, stacked
    print("\n## Memory (fp32, SGD with momentum)\n")
    print("| model | state per replica (MB): weights + gradients + momentum | stacked / K x one model "
          "| activations per image (MB) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: |")
    for name in args.models:
        model = MODELS[name]().to(device)
        one = sum(p.numel() * p.element_size() for p in model.parameters())
        r = results.setdefault(name, {"param_bytes_per_replica": one, "stacked_param_bytes": args.K * one})
        if args.memory_only:  # the stacked network's size, without building its optimizer and batches
            r["stacked_param_bytes"] = sum(
                p.numel() * p.element_size() for p in stack_replicas(model, args.K).parameters()
            )
        per_image = activation_bytes_per_image(model, args.image_size, device)
        r["activation_bytes_per_image"] = per_image
        print(
            f"| {name} | {3 * r['param_bytes_per_replica'] / 1e6:.1f} "
            f"| {r['stacked_param_bytes'] / (args.K * r['param_bytes_per_replica']):.3f} | {per_image / 1e6:.2f} |"
        )
    for name in args.models:
        r = results[name]
        per_replica = 3 * r["param_bytes_per_replica"] + args.batch * r["activation_bytes_per_image"]
        k_max = int(args.device_gb * 1e9 // per_replica)
        r["largest_K"] = k_max
        print(
            f"\n{name}: one replica needs {per_replica / 1e9:.2f} GB at B = {args.batch}, "
            f"{args.image_size} px (state + saved activations); {args.device_gb:g} GB holds K <= {k_max} "
            "(before the allocator's overhead and the workspace of the convolutions)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
