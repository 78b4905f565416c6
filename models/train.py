"""Recipes for the shipped checkpoints: float pretraining, then QAT fine-tuning on digits.

    python -m models.train --arch resnet20 --scheme lcq --wbits 4 --abits 4
    python -m models.train --all          # every shipped checkpoint, from scratch
                                          # (shipped files: --all --threads 1)
    python -m models.train --report       # the results table, from the checkpoints

Each architecture is pretrained in float once (saved as ``<arch>-float.pt``, a
plain state dict plus its accuracy) and every scheme fine-tunes a copy of it.
All inputs go through ``qconvert.preprocess.prepare_inputs``, the path
validation uses, so the checkpoint's input spec is exactly what training saw.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qconvert import load_checkpoint, save_checkpoint
from qconvert.archs import build_architecture
from qconvert.preprocess import prepare_inputs
from qconvert.quant import Quantizer, apply_layer_specs, quantize_model
from qconvert.quant.schemes import quantizable_layers

from .data import CALIB_PATH, DigitsSplit, load_calib, load_split, save_calib

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
SEED = 0
THREADS = 2
ARCH_KWARGS = {"in_channels": 1, "num_classes": 10}
DATASET = "sklearn digits, stratified 80/20 split (seed 0), pixels / 16"


@dataclass(frozen=True)
class Schedule:
    """One training phase: Adam with a cosine learning rate over ``epochs``."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0
    quant_lr_scale: float = 1.0  # lr multiplier for quantizer parameters (steps, alphas, ...)


@dataclass(frozen=True)
class ArchRecipe:
    input_shape: tuple[int, int, int]
    pretrain: Schedule
    finetune: Schedule


ARCHS: dict[str, ArchRecipe] = {
    "digits_cnn": ArchRecipe((1, 8, 8), Schedule(25, 3e-3, weight_decay=1e-4),
                             Schedule(8, 5e-4)),
    # 16x16 instead of 8x8: ResNet-20's two stride-2 stages need some room, and
    # 16x16 keeps it to a few seconds an epoch on 2 cores.
    "resnet20": ArchRecipe((1, 16, 16), Schedule(10, 3e-3, weight_decay=1e-4),
                           Schedule(4, 5e-4)),
    "mobilenetv2_small": ArchRecipe((1, 16, 16), Schedule(15, 3e-3, weight_decay=1e-4),
                                    Schedule(4, 5e-4)),
}

# (arch, scheme, weight bits, act bits): the shipped checkpoints, in training order.
RECIPES: tuple[tuple[str, str, int, int], ...] = tuple(
    (arch, scheme, w, a)
    for arch in ("digits_cnn", "resnet20")
    for scheme, w, a in (("lcq", 4, 4), ("asq-post", 4, 4), ("asq-lsq", 2, 2), ("lsq", 4, 4),
                         ("pot", 3, 3))
) + (("mobilenetv2_small", "lcq", 4, 4),)

# Per-recipe changes to the fine-tuning schedule; none was needed to stay within
# 2 points of float, kept so a scheme can get its own epochs / lr without new code.
FINETUNE_OVERRIDES: dict[tuple[str, str, int, int], dict] = {}


def checkpoint_name(arch: str, scheme: str, wbits: int, abits: int) -> str:
    return f"{arch}-{scheme}-w{wbits}a{abits}.pt"


def recipe_command(arch: str, scheme: str, wbits: int, abits: int) -> str:
    command = (f"python -m models.train --arch {arch} --scheme {scheme} "
               f"--wbits {wbits} --abits {abits}")
    threads = torch.get_num_threads()
    return command if threads == THREADS else f"{command} --threads {threads}"


def float_command(arch: str) -> str:
    command = f"python -m models.train --arch {arch} --float-only --retrain-float"
    threads = torch.get_num_threads()
    return command if threads == THREADS else f"{command} --threads {threads}"


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel on the raw 8x8 images (zero fill, like the background)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    shifts = torch.randint(0, 3, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])


def batches(split: DigitsSplit, shape: Sequence[int], batch_size: int,
            gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled, augmented epoch of prepared (resized, normalized) training batches."""
    x_raw = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        images = shift_augment(x_raw[idx], gen)
        yield prepare_inputs(images, shape, split.mean, split.std), y[idx]


@torch.no_grad()
def count_correct(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                  shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> int:
    """Correct predictions on raw images, in eval mode, as one batch (what the tests recompute)."""
    model.eval()
    logits = model(prepare_inputs(images, shape, mean, std))
    return int((logits.argmax(dim=1) == torch.as_tensor(labels)).sum())


def is_quant_param(name: str) -> bool:
    return any(part in ("act_quant", "weight_quant") for part in name.split("."))


def make_optimizer(model: nn.Module, sched: Schedule) -> torch.optim.Optimizer:
    """Adam; quantizer parameters get their own lr and no weight decay."""
    weights, quant = [], []
    for name, p in model.named_parameters():
        (quant if is_quant_param(name) else weights).append(p)
    groups = [{"params": weights, "lr": sched.lr, "weight_decay": sched.weight_decay}]
    if quant:
        groups.append({"params": quant, "lr": sched.lr * sched.quant_lr_scale, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def fit(model: nn.Module, split: DigitsSplit, shape: Sequence[int], sched: Schedule,
        gen: torch.Generator, log: str = "") -> None:
    """Train with cross-entropy and a per-step cosine lr; raises if the loss is not finite."""
    opt = make_optimizer(model, sched)
    steps = sched.epochs * math.ceil(len(split.y_train) / sched.batch_size)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for epoch in range(sched.epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in batches(split, shape, sched.batch_size, gen):
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{log}: loss is {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            total, count = total + loss.item() * len(y), count + len(y)
        if log:
            print(f"  {log} epoch {epoch + 1}/{sched.epochs} loss {total / count:.4f}", flush=True)


@torch.no_grad()
def init_quantizers(model: nn.Module, split: DigitsSplit, shape: Sequence[int],
                    samples: int = 256) -> None:
    """Initialise every quantizer from one un-augmented batch of training images.

    Quantizers init on their first training-mode forward; BatchNorm is kept in
    eval mode for it so the float running statistics are not disturbed.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model(prepare_inputs(split.x_train[:samples], shape, split.mean, split.std))
    uninit = [n for n, m in model.named_modules() if isinstance(m, Quantizer)
              and not bool(m.initialized)]
    if uninit:
        raise RuntimeError(f"quantizers not initialised: {uninit}")
    model.train()


def build_float(arch: str) -> nn.Module:
    return build_architecture(arch, ARCH_KWARGS)


def float_checkpoint_name(arch: str) -> str:
    return f"{arch}-float.pt"


def mark_float(model: nn.Module) -> nn.Module:
    """Give a float model the (all-float) layer specs save_checkpoint needs, so that
    the float checkpoint loads with load_checkpoint like the QAT ones."""
    apply_layer_specs(model, dict.fromkeys(quantizable_layers(model)))
    model.qconvert_scheme = "float"
    return model


def pretrain_float(arch: str, split: DigitsSplit, out_dir: Path, sched: Schedule | None = None,
                   seed: int = SEED, reuse: bool = True) -> tuple[dict, dict]:
    """The float model's state dict and training record; trained once per architecture,
    saved as ``<arch>-float.pt`` and reused by every scheme while its schedule matches."""
    path = out_dir / float_checkpoint_name(arch)
    recipe = ARCHS[arch]
    sched = sched or recipe.pretrain
    if reuse and path.is_file():
        ckpt = load_checkpoint(path)
        if ckpt.training.get("schedule") == asdict(sched) and ckpt.training.get("seed") == seed:
            return ckpt.model.state_dict(), ckpt.training
    gen = seed_everything(seed)
    model = build_float(arch)
    start = time.perf_counter()
    fit(model, split, recipe.input_shape, sched, gen, log=f"{arch} float")
    seconds = time.perf_counter() - start
    correct = count_correct(model, split.x_test, split.y_test, recipe.input_shape,
                            split.mean, split.std)
    record = {
        "command": float_command(arch),
        "threads": torch.get_num_threads(),
        "dataset": DATASET, "seed": seed, "schedule": asdict(sched),
        "epochs": sched.epochs, "lr": sched.lr,
        "float_acc": round(100 * correct / len(split.y_test), 2),
        "test_correct": correct, "test_samples": len(split.y_test),
        "train_seconds": round(seconds, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, mark_float(model), arch=arch, arch_kwargs=ARCH_KWARGS,
                    input_shape=recipe.input_shape, mean=split.mean, std=split.std,
                    training=record)
    print(f"{path.name}: float {record['float_acc']:.2f} % ({seconds:.1f} s)", flush=True)
    return model.state_dict(), record


def finetune_schedule(arch: str, scheme: str, wbits: int, abits: int) -> Schedule:
    return replace(ARCHS[arch].finetune, **FINETUNE_OVERRIDES.get((arch, scheme, wbits, abits), {}))


def train_recipe(arch: str, scheme: str, wbits: int, abits: int, *, split: DigitsSplit,
                 out_dir: Path = CHECKPOINT_DIR, seed: int = SEED,
                 pretrain: Schedule | None = None, finetune: Schedule | None = None,
                 reuse_float: bool = True) -> Path:
    """Pretrain (or reuse) the float model, fine-tune it with QAT, save the checkpoint."""
    recipe = ARCHS[arch]
    shape = recipe.input_shape
    float_state, float_record = pretrain_float(arch, split, out_dir, pretrain, seed, reuse_float)
    sched = finetune or finetune_schedule(arch, scheme, wbits, abits)
    gen = seed_everything(seed)
    model = build_float(arch)
    model.load_state_dict(copy.deepcopy(float_state))
    quantize_model(model, scheme, wbits, abits)
    start = time.perf_counter()
    init_quantizers(model, split, shape)
    fit(model, split, shape, sched, gen, log=f"{arch} {scheme} w{wbits}a{abits}")
    seconds = time.perf_counter() - start
    correct = count_correct(model, split.x_test, split.y_test, shape, split.mean, split.std)
    acc = round(100 * correct / len(split.y_test), 2)
    training = {
        "command": recipe_command(arch, scheme, wbits, abits),
        "dataset": DATASET,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "optimizer": "AdamW, cosine lr",
        "float_epochs": float_record["epochs"],
        "float_lr": float_record["lr"],
        "epochs": sched.epochs,
        "lr": sched.lr,
        "quant_lr_scale": sched.quant_lr_scale,
        "batch_size": sched.batch_size,
        "weight_bits": wbits,
        "act_bits": abits,
        "float_acc": float_record["float_acc"],
        "qat_acc": acc,
        "test_correct": correct,
        "test_samples": len(split.y_test),
        "train_seconds": round(seconds, 1),
        "float_train_seconds": float_record["train_seconds"],
    }
    path = save_checkpoint(out_dir / checkpoint_name(arch, scheme, wbits, abits), model,
                           arch=arch, arch_kwargs=ARCH_KWARGS, input_shape=shape,
                           mean=split.mean, std=split.std, training=training)
    delta = acc - float_record["float_acc"]
    print(f"{path.name}: float {float_record['float_acc']:.2f} % -> QAT {acc:.2f} % "
          f"({delta:+.2f}), {seconds:.1f} s", flush=True)
    return path


def report(out_dir: Path = CHECKPOINT_DIR, calib: Path = CALIB_PATH) -> str:
    """The results table (markdown) of the QAT checkpoints, accuracy recomputed on ``calib``."""
    x, y = load_calib(calib)
    rows = ["| arch | scheme | bits (W/A) | float acc % | QAT acc % | delta | train s | bytes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    floats = [(arch, "float", 32, 32) for arch in ARCHS]
    for arch, scheme, w, a in floats + list(RECIPES):
        name = float_checkpoint_name(arch) if scheme == "float" else checkpoint_name(
            arch, scheme, w, a)
        path = out_dir / name
        if not path.is_file():
            continue
        ckpt = load_checkpoint(path)
        correct = count_correct(ckpt.model, x, y, ckpt.input.shape, ckpt.input.mean,
                                ckpt.input.std)
        t = ckpt.training
        acc = 100 * correct / len(y)
        qat = "-" if scheme == "float" else f"{acc:.2f}"
        delta = "-" if scheme == "float" else f"{acc - t['float_acc']:+.2f}"
        rows.append(f"| {arch} | {scheme} | {w}/{a} | {t['float_acc']:.2f} | {qat} | {delta} | "
                    f"{t['train_seconds']:.0f} | {path.stat().st_size} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS))
    parser.add_argument("--scheme")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--all", action="store_true", help="train every shipped checkpoint")
    parser.add_argument("--report", action="store_true", help="print the results table")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads (results are reproducible for a fixed count)")
    parser.add_argument("--float-only", action="store_true",
                        help="only pretrain the float model of --arch")
    parser.add_argument("--retrain-float", action="store_true",
                        help="pretrain the float model even if <arch>-float.pt exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        print(report(args.out))
        return
    split = load_split()
    save_calib(split)
    if args.float_only:
        if not args.arch:
            parser.error("--float-only needs --arch")
        pretrain_float(args.arch, split, args.out, reuse=not args.retrain_float)
        return
    if args.all:
        todo = list(RECIPES)
    elif args.arch and args.scheme:
        todo = [(args.arch, args.scheme, args.wbits, args.abits)]
    else:
        parser.error("give --arch and --scheme, or --all, or --report")
    start, cpu = time.perf_counter(), time.process_time()
    retrained: set[str] = set()
    for arch, scheme, w, a in todo:
        # --all retrains each float model once, then every scheme reuses it.
        fresh = (args.all or args.retrain_float) and arch not in retrained
        retrained.add(arch)
        train_recipe(arch, scheme, w, a, split=split, out_dir=args.out, reuse_float=not fresh)
    print(f"total: {time.perf_counter() - start:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU", flush=True)


if __name__ == "__main__":
    main()
