"""Exact evaluation on the val set: every image counted once over all ranks, top-1, top-5, loss."""
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils


def class_scores(model, images, amp_dtype, flip=False):
    """float32 (N, classes) scores whose order is the prediction's: the logits; with `flip` (test-time
    augmentation) the log of the mean of the softmax of the images and of their mirror images.
    Either is what cross_entropy and softmax take (softmax gives the mean probabilities then)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
        mirrored = model(images.flip(3)) if flip else None
    if not flip:
        return logits.float()
    # log((p + q) / 2) from the log-probabilities: no log(0) where a probability underflows
    return torch.logaddexp(logits.float().log_softmax(1), mirrored.float().log_softmax(1)) - math.log(2)


@torch.no_grad()
def evaluate(model, loader, env, amp_dtype, expected_images, flip=False, real_labels=None):
    """Top-1 / top-5 (percent) and mean cross-entropy of `model` over the val set that `loader`
    gives this rank (data.ShardSampler's shard: no padding duplicates). The sums of all ranks meet
    in one all_reduce and the image count must equal `expected_images`. `flip`: class_scores'
    test-time augmentation. `real_labels` (val images, L), -1-padded (data.read_real_labels): adds
    real_top1, the share of the images with any ReaL label whose top-1 is one of them."""
    model.eval()
    # loss, top-1 hits, top-5 hits, images, ReaL top-1 hits, images with ReaL labels
    totals = torch.zeros(6, dtype=torch.float64, device=env.device)
    # The loader yields this rank's shard in order: its batches' sample indices, for the ReaL labels.
    shard = list(data.ShardSampler(expected_images, env.rank, env.world_size)) if real_labels is not None else None
    seen = 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not (env.main and sys.stderr.isatty())):
        logits = class_scores(model, images, amp_dtype, flip)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
        if real_labels is not None:
            real = real_labels[shard[seen:seen + labels.numel()]].to(top.device)
            totals[4] += (real == top[:, :1]).any(dim=1).sum()
            totals[5] += (real >= 0).any(dim=1).sum()
        seen += labels.numel()
    loss, top1, top5, images, real_hits, real_images = utils.all_reduce(totals, env).tolist()
    if int(images) != expected_images:
        raise RuntimeError(f"evaluation counted {int(images)} images but the val set has {expected_images}")
    figures = {"top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images, "loss": loss / images,
               "images": int(images)}
    if real_labels is not None:
        figures.update(real_top1=100.0 * real_hits / real_images, real_images=int(real_images))
    return figures


def evaluate_models(models, loader, env, amp_dtype, expected_images, **options):
    """{prefix: model or None} -> the val figures of each model, keys prefixed (image counts left
    out). Every rank evaluates rank 0's BatchNorm statistics (and rank 0 saves them)."""
    results = {}
    for prefix, model in models.items():
        if model is not None:
            utils.broadcast_buffers(model, env)
            figures = evaluate(model, loader, env, amp_dtype, expected_images, **options)
            results.update({prefix + k: v for k, v in figures.items() if not k.endswith("images")})
    return results
