"""A BERT-base-shaped encoder in PyTorch, with dense FFs and with fastff.torch.UltraFFF: CPU
inference time, and how it splits between attention and the feedforward sub-layers.

UltraFastBERT #1 asked why its FFF-BERT ran slower than vanilla BERT: its FFF computes every
neuron and masks. This builds the same encoder twice (hidden 768, 12 heads, 12 post-LN layers,
sequence 128, random weights: the speed does not depend on their values), once with BERT's
dense 768 -> 3072 -> 768 GELU intermediate and once with UltraFFF(768, 768, depth=11) (4095
neurons, 12 per token), and times inference (torch.inference_mode) at batch 1 and 8 with the
same thread count for torch and fastff, the two encoders taking turns. Inside the same runs
each layer's attention (QKV projection, scaled-dot-product attention, output projection) and
its FF sub-layer (the dense FF or the UltraFFF) are timed; the rest of the total ("other") is
the residuals and LayerNorms.

    python benchmarks/encoder.py                      # 2 threads or what fastff would use
    python benchmarks/encoder.py --threads 1 --repeat 5 --json encoder.json

Needs torch (pip install "fastff[torch]").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastff
import fastff.torch as ft


class Timed(nn.Module):
    """Runs `inner` and adds its wall time to `clock[name]` (CPU ops are synchronous)."""

    def __init__(self, inner: nn.Module, name: str, clock: dict):
        super().__init__()
        self.inner, self.name, self.clock = inner, name, clock

    def forward(self, x):
        t0 = time.perf_counter()
        y = self.inner(x)
        self.clock[self.name] += time.perf_counter() - t0
        return y


class Attention(nn.Module):
    """BERT's self-attention: W_o SDPA(QKV(x)) over `heads` heads."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, h))


class Layer(nn.Module):
    """A post-LN BERT layer: x = LN(x + attention(x)); x = LN(x + ff(x))."""

    def __init__(self, attention: nn.Module, ff: nn.Module, hidden: int):
        super().__init__()
        self.attention, self.ff = attention, ff
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x):
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ff(x))


def dense_ff(hidden: int, intermediate: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden)
    )


def encoder(args, kind: str, clock: dict) -> nn.Module:
    layers = []
    for _ in range(args.layers):
        ff = (
            dense_ff(args.hidden, args.intermediate)
            if kind == "dense"
            else ft.UltraFFF(args.hidden, args.hidden, args.depth)
        )
        attention = Attention(args.hidden, args.heads)
        layers.append(
            Layer(Timed(attention, "attention", clock), Timed(ff, "ff", clock), args.hidden)
        )
    return nn.Sequential(*layers).eval()


def measure(models, x, clock, repeat):
    """{kind: median total, attention and FF seconds} of `repeat` forwards of each model after
    a warm-up. The models take turns (dense, fff, dense, ...), so that a slow phase of a shared
    machine falls on both rather than on whichever ran during it."""
    runs = {kind: [] for kind in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(repeat):
            for kind, model in models.items():
                clock["attention"] = clock["ff"] = 0.0
                t0 = time.perf_counter()
                model(x)
                runs[kind].append((time.perf_counter() - t0, clock["attention"], clock["ff"]))
    return {
        kind: [statistics.median(r[i] for r in kind_runs) for i in range(3)]
        for kind, kind_runs in runs.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--depth", type=int, default=11)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    threads = args.threads or fastff.get_num_threads()
    torch.set_num_threads(threads)  # the same count for torch's ops and fastff's kernels
    fastff.set_num_threads(threads)
    torch.manual_seed(0)
    clock = {"attention": 0.0, "ff": 0.0}
    models = {kind: encoder(args, kind, clock) for kind in ("dense", "fff")}
    print(
        f"encoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, sequence "
        f"{args.seq}; dense FF {args.hidden}->{args.intermediate}->{args.hidden} vs UltraFFF "
        f"depth {args.depth}; {threads} threads, median of {args.repeat}"
    )
    print(
        f"{'batch':>5} {'encoder':>8} {'total ms':>10} {'attention ms':>13} {'FF ms':>10} "
        f"{'other ms':>9} {'FF share':>9}"
    )
    results = []
    for batch in args.batches:
        x = torch.randn(batch, args.seq, args.hidden)
        row = {"batch": batch, "tokens": batch * args.seq}
        for kind, (total, attention, ff) in measure(models, x, clock, args.repeat).items():
            row[kind] = {"total_s": total, "attention_s": attention, "ff_s": ff}
            other = total - attention - ff
            print(
                f"{batch:>5} {kind:>8} {total * 1e3:>10.1f} {attention * 1e3:>13.1f} "
                f"{ff * 1e3:>10.2f} {other * 1e3:>9.2f} {ff / total:>9.0%}"
            )
        dense, fff = row["dense"], row["fff"]
        row["ff_speedup"] = dense["ff_s"] / fff["ff_s"]
        row["encoder_speedup"] = dense["total_s"] / fff["total_s"]
        share = dense["attention_s"] / dense["total_s"]
        print(
            f"{batch:>5} FF sub-layers {row['ff_speedup']:.1f}x faster with UltraFFF, encoder "
            f"{row['encoder_speedup']:.2f}x; attention is {share:.0%} of the dense encoder"
        )
        results.append(row)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "config": config, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
