"""Evaluation over all ranks: the one collective of the validation pass, made after the loop.

Ranks hold different numbers of validation samples (``localsgd_ds.data.val_loader`` gives each a
disjoint share, every sample once), so accuracy is a ratio of summed counts, not a mean of per-rank
accuracies, and no collective may run inside the loop (ranks leave it at different batches).

Example::

    correct = total = 0
    for images, labels in val_loader(loc, batch_size=100, rank=rank, world_size=8):
        correct += int((model(images).argmax(1) == labels).sum()); total += len(labels)
    correct, total = evaluate_counts(correct, total)     # summed over ranks
"""

from __future__ import annotations

import torch


def evaluate_counts(correct: int, total: int, device: torch.device | str | None = None) -> tuple[int, int]:
    """Sum (correct, total) over all ranks when torch.distributed is initialized; else return them.

    Accuracy is then ``correct / total``: a mean of counts, not of per-rank means (ranks see different
    numbers of validation samples). NCCL needs a CUDA tensor: ``device`` defaults to the current GPU
    for it and to the CPU otherwise.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(correct), int(total)
    if device is None:
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    counts = torch.tensor([int(correct), int(total)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)
    return int(counts[0]), int(counts[1])
