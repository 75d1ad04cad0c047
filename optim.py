"""The optimizers, the learning-rate schedule and the loss that train.py's step uses."""
import math

import torch
import torch.nn.functional as F


def build_optimizer(model, opt, lr, weight_decay, no_bn_weight_decay=False, fused=False):
    """`opt`: rmsprop (torch's, alpha .9, eps .01, momentum .9), rmsproptf (TensorFlow's), sgd
    (Nesterov, momentum .9) or adamw. `fused` (CUDA): SGD's and AdamW's one-kernel step, which also
    lets the fp16 GradScaler skip a step without a device synchronisation."""
    decay, no_decay = [], []
    for p in model.parameters():
        # NVIDIA's variant leaves BatchNorm weights/biases and all biases (the 1-d tensors) alone.
        (no_decay if no_bn_weight_decay and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.01, momentum=0.9)
    if opt == "rmsproptf":
        return RMSpropTF(groups, lr=lr, alpha=0.9, eps=1e-3, momentum=0.9)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)


def lr_at(step, base_lr, warmup_steps, total_steps, min_lr=0.0, warmup_lr=0.0, decay_steps=0, decay_rate=1.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup from warmup_lr reaching base_lr
    at the last warmup step, then a cosine from base_lr to min_lr at total_steps; or, with
    decay_steps, a staircase base_lr * decay_rate ** floor(step / decay_steps) counted from step 0
    (as TF's exponential_decay and timm's step schedule count it), never below min_lr."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * (step + 1) / warmup_steps
    if decay_steps:
        return max(min_lr, base_lr * decay_rate ** (step // decay_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def criterion(logits, targets, label_smoothing):
    """Cross-entropy in float32 with label smoothing; `targets` are class indices or, with mixup,
    probabilities (smoothing then mixes those with the uniform distribution)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow computes it (tf.compat.v1.train.RMSPropOptimizer, Google's EfficientNet
    optimizer), per parameter p with gradient g:

        g  = g + weight_decay * p                 (L2, as TF's loss term weight_decay * l2_loss(p))
        ms = ms + (1 - alpha) * (g**2 - ms)      (ms starts at 1, not 0 as torch's RMSprop)
        mom = momentum * mom + lr * g / sqrt(ms + eps)     (eps inside the root; lr inside the buffer)
        p  = p - mom

    torch.optim.RMSprop puts eps outside the root, starts ms at 0 and applies lr after the
    momentum, so the same hyperparameters take much larger first steps and respond to an lr change
    at once rather than through the buffer. (timm's RMSpropTF computes the same; tested.)"""

    def __init__(self, params, lr, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(square_avg=torch.ones_like(p), momentum_buffer=torch.zeros_like(p))
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            square_avgs = [self.state[p]["square_avg"] for p in params]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            change = torch._foreach_mul(grads, grads)  # TF's kernel: ms += (g**2 - ms) * (1 - alpha)
            torch._foreach_sub_(change, square_avgs)
            torch._foreach_add_(square_avgs, change, alpha=1.0 - group["alpha"])
            root = torch._foreach_add(square_avgs, group["eps"])
            torch._foreach_sqrt_(root)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_addcdiv_(buffers, grads, root, value=group["lr"])
            torch._foreach_sub_(params, buffers)
        return loss
