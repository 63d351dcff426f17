"""The world's judge: a small CNN that names the object and the style of a 32x32 picture.

Trained on world pictures with shift, blur, noise and colour jitter, so that a slightly
lumpy generated shape is still judged by what it is, not punished as another class.

    judge = Judge.load(folder)
    pred = judge.classify(images_uint8)       # {"object": [N] str, "style": [N] str, ...}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hirm_jax import log
from hirm_jax.world import data

_log = log.get(__name__)

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge_config.json"


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32, n_objects: int = len(data.ALL_OBJECTS), n_styles: int = len(data.ALL_STYLES)):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.object_head = nn.Linear(4 * width * 16, n_objects)
        self.style_head = nn.Linear(4 * width * 16, n_styles)

    def forward(self, x):
        h = self.features(x).flatten(1)
        return self.object_head(h), self.style_head(h)


def _to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[1:] != (data.SIZE, data.SIZE, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, {data.SIZE}, {data.SIZE}, 3] but are "
                         f"{images.dtype} {list(images.shape)}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift up to 2 px, blur, colour jitter and Gaussian noise (x in [-1, 1], [N, 3, H, W])."""
    n = x.shape[0]
    rand = lambda *s: torch.rand(*s, generator=generator)
    shifts = (rand(n, 2) * 5).long() - 2
    x = torch.stack([torch.roll(xi, (int(dy), int(dx)), dims=(1, 2)) for xi, (dy, dx) in zip(x, shifts)])
    sigma = rand(n) * 1.0
    kernel_x = torch.arange(-2, 3).float()
    kernels = torch.exp(-kernel_x[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)                      # [n, 5]
    k2 = (kernels[:, :, None] * kernels[:, None, :])[:, None]             # [n, 1, 5, 5]
    blurred = F.conv2d(F.pad(x.reshape(1, n * 3, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"),
                       k2.repeat_interleave(3, 0), groups=n * 3).reshape(x.shape)
    use_blur = (rand(n) < 0.5)[:, None, None, None]
    x = torch.where(use_blur, blurred, x)
    x = x * (1 + 0.2 * (rand(n, 1, 1, 1) - 0.5)) + 0.2 * (rand(n, 3, 1, 1) - 0.5)
    x = x + torch.randn(x.shape, generator=generator) * rand(n, 1, 1, 1) * 0.1
    return x.clamp(-1, 1)


class Judge:
    """A trained JudgeNet with `classify`; class names are data.ALL_OBJECTS / data.ALL_STYLES."""

    objects = data.ALL_OBJECTS
    styles = data.ALL_STYLES

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @torch.no_grad()
    def classify(self, images_uint8: np.ndarray, batch_size: int = 512) -> dict:
        """{"object": [N] names, "style": [N] names, "object_index", "style_index",
        "object_prob", "style_prob": [N, classes] softmax}."""
        x = _to_tensor(images_uint8)
        logits = [self.net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        obj = torch.cat([l[0] for l in logits]).softmax(-1).numpy()
        sty = torch.cat([l[1] for l in logits]).softmax(-1).numpy()
        oi, si = obj.argmax(1), sty.argmax(1)
        return {"object": [self.objects[i] for i in oi], "style": [self.styles[i] for i in si],
                "object_index": oi, "style_index": si, "object_prob": obj, "style_prob": sty}

    def accuracy(self, batch: "data.WorldBatch") -> dict:
        pred = self.classify(batch.images)
        return {"object_accuracy": float((pred["object_index"] == batch.objects).mean()),
                "style_accuracy": float((pred["style_index"] == batch.styles).mean())}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(
            {"objects": list(self.objects), "styles": list(self.styles), "width": self.net.object_head.in_features // 64},
            indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        from safetensors.torch import load_file
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
        if tuple(config["objects"]) != data.ALL_OBJECTS or tuple(config["styles"]) != data.ALL_STYLES:
            raise ValueError(f"judge in {folder} was trained for classes {config['objects']} / {config['styles']}, "
                             f"but this world has {list(data.ALL_OBJECTS)} / {list(data.ALL_STYLES)}")
        net = JudgeNet(width=config["width"])
        net.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)))
        return cls(net)


def train_judge(seed: int = 0, steps: int = 500, batch: int = 128, lr: float = 2e-3,
                pool_size: int = 8000, width: int = 32, log_every: int = 100, pool=None):
    """Returns (Judge, metrics) with held-out accuracy on fresh `eval` pictures.

    pool: optional data.sample(N >= pool_size, seed, "train") to take the pictures from.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    pool = data.sample(pool_size, seed=seed, split="train") if pool is None else pool[:pool_size]
    x_all = _to_tensor(pool.images)
    y_obj, y_sty = torch.from_numpy(pool.objects), torch.from_numpy(pool.styles)
    net = JudgeNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(1, steps + 1):
        idx = torch.randint(pool_size, (batch,), generator=gen)
        x = augment(x_all[idx], gen)
        lo, ls = net(x)
        loss = F.cross_entropy(lo, y_obj[idx]) + F.cross_entropy(ls, y_sty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - t0
            _log.info(f"[judge] step {step}/{steps} loss {loss.item():.4f} elapsed {elapsed:.0f}s "
                  f"eta {elapsed / step * (steps - step):.0f}s")
    judge = Judge(net)
    metrics = judge.accuracy(data.sample(2000, seed=seed, split="eval"))
    metrics["train_seconds"] = time.time() - t0
    _log.info(f"[judge] held-out accuracy: object {metrics['object_accuracy']:.4f} "
          f"style {metrics['style_accuracy']:.4f}")
    return judge, metrics
