"""Train one small character-level transformer several times, once per optimizer, from the same
init on the same batches, and compare final loss, step time and optimizer state size.

Identical init and batches make the runs comparable step for step: with fp32 state, torch.optim.AdamW
and fusedopt.AdamW differ only in rounding. Training amplifies rounding differences, so the losses
agree to ~1e-7 after 20 steps but only ~1e-3 after a few hundred, as two torch runs do when merely
the thread count (and so the matmul summation order) differs.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fusedopt
from fusedopt.cli_types import positive_int

ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1

# name -> factory(param_groups) -> optimizer. The groups carry "params" and "weight_decay";
# everything else is the factory's choice, so optimizers with other hyperparameters fit here too.
OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "torch": lambda groups: torch.optim.AdamW(groups, **ADAMW),
    "fusedopt": lambda groups: fusedopt.AdamW(groups, **ADAMW),
    "adamw8bit": lambda groups: fusedopt.AdamW8bit(groups, **ADAMW),
    # Lion: the paper's guidance, lr 3-10x below AdamW's and weight decay 3-10x above it
    "lion": lambda groups: fusedopt.Lion(
        [{**g, "weight_decay": 3 * g["weight_decay"]} for g in groups], lr=ADAMW["lr"] / 3, betas=(0.9, 0.99)
    ),
    "lion8bit": lambda groups: fusedopt.Lion8bit(
        [{**g, "weight_decay": 3 * g["weight_decay"]} for g in groups], lr=ADAMW["lr"] / 3, betas=(0.9, 0.99)
    ),
    # Muon on the decayed group (exactly the nn.Linear weights: hidden matrices, the head is tied to
    # the embedding), AdamW on embeddings, norms and biases. 'match_rms_adamw' lets Muon reuse
    # AdamW's lr and weight decay (Moonlight).
    "muon": lambda groups: fusedopt.MuonWithAdamW(
        [{**g, "use_muon": g["weight_decay"] > 0} for g in groups], muon_lr=ADAMW["lr"], adamw_lr=ADAMW["lr"],
        betas=ADAMW["betas"], eps=ADAMW["eps"], adjust_lr_fn="match_rms_adamw"
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per optimizer")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizers", default="torch,fusedopt",
                   help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    p.add_argument("--layers", type=positive_int, default=3)
    p.add_argument("--d-model", type=positive_int, default=128)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--context", type=positive_int, default=64, help="characters per training sequence")
    p.add_argument("--batch-size", type=positive_int, default=32)


# --- data ------------------------------------------------------------------------------------
def load_corpus() -> str:
    return (resources.files("fusedopt") / "data" / "corpus.txt").read_text(encoding="utf-8")


def encode(text: str) -> tuple[torch.Tensor, int]:
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(vocab)


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + torch.arange(context + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


# --- model -----------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Pre-norm GPT-style decoder; the output head reuses the token embedding (weight tying)."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        # nn.Embedding's N(0, 1) init would make the tied head's first logits huge.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        return self.ln_f(self.blocks(x)) @ self.tok.weight.T


def param_groups(model: nn.Module) -> list[dict]:
    """Decay the Linear weights only: decaying norms, biases and embeddings hurts small models."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --- training --------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    train_loss: float
    val_loss: float
    step_ms: float
    state_bytes_per_param: float


def state_bytes_per_param(opt: torch.optim.Optimizer, model: nn.Module) -> float:
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return total / sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, context: int, batch_size: int, device) -> float:
    starts = torch.arange(0, len(val) - context - 1, context)
    losses = []
    for chunk in starts.split(batch_size):
        x, y = windows(val, chunk, context)
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
    return (torch.stack(losses).sum() / (len(starts) * context)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name: str, init: nn.Module, batches: torch.Tensor, train_data: torch.Tensor, val_data: torch.Tensor,
          args: argparse.Namespace, device: torch.device) -> Result:
    model = copy.deepcopy(init)
    opt = OPTIMIZERS[name](param_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps))
    losses, step_times = [], []
    report_every = max(1, args.steps // 5)
    for step, starts in enumerate(batches):
        x, y = windows(train_data, starts, args.context)
        loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        step_times.append(time.perf_counter() - t0)
        sched.step()
        losses.append(loss.item())
        if (step + 1) % report_every == 0:
            print(f"  {name:<10} step {step + 1:>5}/{args.steps}  loss {losses[-1]:.4f}", flush=True)
    tail = losses[-10:]
    # The first step allocates the optimizer state; leave it out of the steady-state timing.
    timed = step_times[1:] or step_times
    return Result(
        name=name,
        train_loss=sum(tail) / len(tail),
        val_loss=evaluate(model, val_data, args.context, args.batch_size, device),
        step_ms=1e3 * sum(timed) / len(timed),
        state_bytes_per_param=state_bytes_per_param(opt, model),
    )


def print_table(results: list[Result]) -> None:
    print(f"\n{'optimizer':<12}{'train loss':>12}{'val loss':>12}{'step ms':>10}{'state B/param':>15}")
    for r in results:
        print(f"{r.name:<12}{r.train_loss:>12.4f}{r.val_loss:>12.4f}{r.step_ms:>10.3f}"
              f"{r.state_bytes_per_param:>15.4f}")
    by_name = {r.name: r for r in results}
    if "torch" in by_name and "fusedopt" in by_name:
        ref, fused = by_name["torch"], by_name["fusedopt"]
        print(f"\nfusedopt vs torch: final train loss rel. diff "
              f"{abs(fused.train_loss - ref.train_loss) / ref.train_loss:.2e}, "
              f"val loss rel. diff {abs(fused.val_loss - ref.val_loss) / ref.val_loss:.2e}, "
              f"step time x{ref.step_ms / fused.step_ms:.2f}")


def run(args: argparse.Namespace) -> list[Result]:
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        what = f"unknown optimizer(s) {unknown}" if unknown else "--optimizers names none"
        raise SystemExit(f"{what}; choose from {list(OPTIMIZERS)}")
    if args.d_model % args.heads:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.device == "cuda" and not fusedopt.backends()["cuda_usable"]:
        raise SystemExit(f"--device cuda is not usable here: {fusedopt.backends()}")
    device = torch.device(args.device)

    data, vocab = encode(load_corpus())
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    if args.context >= len(val_data) - 1:
        raise SystemExit(f"--context {args.context} is too long for the corpus ({len(val_data)} validation "
                         "characters); use a shorter context")
    torch.manual_seed(args.seed)
    init = CharTransformer(vocab, args.context, args.d_model, args.layers, args.heads).to(device)
    batches = torch.randint(0, len(train_data) - args.context - 1, (args.steps, args.batch_size),
                            generator=torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in init.parameters())
    print(f"fusedopt demo: {n_params / 1e6:.2f}M-param char transformer ({args.layers} layers, d_model "
          f"{args.d_model}), vocab {vocab}, {len(train_data)}/{len(val_data)} train/val chars, "
          f"{args.steps} steps of {args.batch_size}x{args.context} on {device}")

    results = [train(n, init, batches, train_data, val_data, args, device) for n in names]
    print_table(results)
    return results
