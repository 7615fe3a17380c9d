"""Independent references: a plain-torch Adam/AdamW written from the paper, run in any dtype
(float64 for ground truth), and helpers shared by the tests."""
import io
import math

import torch


class ReferenceAdam:
    """Adam/AdamW on plain tensors, states in the params' dtype. Not the code under test."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=True, amsgrad=False, maximize=False):
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.decoupled, self.amsgrad, self.maximize = decoupled, amsgrad, maximize
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, vmax in zip(self.params, grads, self.m, self.v, self.vmax):
            g = g.to(p.dtype)
            if self.maximize:
                g = -g
            if self.wd:
                if self.decoupled:
                    p.mul_(1 - self.lr * self.wd)
                else:
                    g = g + self.wd * p
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g * g, alpha=1 - b2)
            second = v
            if self.amsgrad:
                torch.maximum(vmax, v, out=vmax)
                second = vmax
            m_hat = m / (1 - b1 ** self.t)
            v_hat = second / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def fp32_ulp_budget(steps: int, magnitude: float) -> float:
    """Worst-case drift between two fp32 implementations of the same update that differ only in
    rounding (FMA contraction, vectorized vs scalar lerp): at most ~1 ulp of |p| per step, added
    linearly over `steps` steps."""
    return steps * magnitude * 2.0 ** -23


def max_abs(a, b) -> float:
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)


def rel_l2(a, b) -> float:
    num = math.sqrt(sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b)))
    den = math.sqrt(sum((y.double() ** 2).sum().item() for y in b))
    return num / max(den, 1e-30)


class ReferenceLion:
    """Lion as in google/automl's lion_pytorch.py, on plain tensors in the params' dtype."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params, self.lr, self.betas, self.wd, self.maximize = params, lr, betas, weight_decay, maximize
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads):
        b1, b2 = self.betas
        for p, g, m in zip(self.params, grads, self.m):
            g = g.to(p.dtype)
            if self.maximize:
                g = -g
            p.mul_(1 - self.lr * self.wd)
            p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-self.lr)
            m.mul_(b2).add_(g, alpha=1 - b2)


def reference_quantize(x, absmax, qmap, block=256):
    """Nearest-entry blockwise quantization with plain torch ops (searchsorted), written from the
    spec in fusedopt/quant.py: y = x * (1/absmax) clamped to the map, nearest entry (a tie goes
    to the smaller), and a nonzero x never lands on 0 or the other sign.
    x: 1-D fp32; absmax: one per block. Returns int64 codes."""
    n = x.numel()
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    inv = torch.where(torch.isinf(inv), torch.zeros_like(inv), inv).repeat_interleave(block)[:n]
    y = (x * inv).clamp(qmap[0].item(), qmap[-1].item())
    lo = (torch.searchsorted(qmap, y, right=True) - 1).clamp(0, qmap.numel() - 1)
    hi = (lo + 1).clamp(max=qmap.numel() - 1)
    c = torch.where(qmap[hi] - y < y - qmap[lo], hi, lo)
    c = torch.where((x > 0) & (qmap[c] <= 0), c + 1, c)
    c = torch.where((x < 0) & (qmap[c] >= 0), c - 1, c)
    return c


def block_absmax(x, block=256):
    n = x.numel()
    padded = torch.nn.functional.pad(x.abs(), (0, (-n) % block))
    return padded.view(-1, block).amax(dim=1)


class ReferenceAdam8bit:
    """Blockwise 8-bit Adam/AdamW on flat fp32 params with plain torch ops: dequantize, the Adam
    update, skip elements whose new moments are not finite, new absmax per block, requantize with
    reference_quantize. Not the code under test (that is csrc/.../math/adam8bit.h)."""

    def __init__(self, params, signed_map, unsigned_map, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decoupled=True, block=256):
        self.params, self.smap, self.umap, self.block = params, signed_map, unsigned_map, block
        self.lr, self.betas, self.eps, self.wd, self.decoupled = lr, betas, eps, weight_decay, decoupled
        zero_s = int((signed_map == 0).nonzero())
        nb = [math.ceil(p.numel() / block) for p in params]
        self.cm = [torch.full((p.numel(),), zero_s, dtype=torch.long) for p in params]
        self.cv = [torch.zeros(p.numel(), dtype=torch.long) for p in params]
        self.am = [torch.zeros(k) for k in nb]
        self.av = [torch.zeros(k) for k in nb]
        self.t = 0

    def moments(self, i):
        n = self.params[i].numel()
        m = self.smap[self.cm[i]] * self.am[i].repeat_interleave(self.block)[:n]
        v = self.umap[self.cv[i]] * self.av[i].repeat_interleave(self.block)[:n]
        return m, v

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            m, v = self.moments(i)
            g = g.float()
            if self.wd and not self.decoupled:
                g = g + self.wd * p
            p_new = p * (1 - self.lr * self.wd) if self.decoupled else p.clone()
            m_new = m.lerp(g, 1 - b1)
            v_new = v * b2 + (1 - b2) * g * g
            p_new = p_new - (self.lr / bc1) * m_new / (v_new.sqrt() / math.sqrt(bc2) + self.eps)
            ok = torch.isfinite(m_new) & torch.isfinite(v_new)
            p.copy_(torch.where(ok, p_new, p))
            m, v = torch.where(ok, m_new, m), torch.where(ok, v_new, v)
            self.am[i], self.av[i] = block_absmax(m, self.block), block_absmax(v, self.block)
            self.cm[i] = reference_quantize(m, self.am[i], self.smap, self.block)
            self.cv[i] = reference_quantize(v, self.av[i], self.umap, self.block)


def through_bytes(state_dict):
    """A state_dict after torch.save / torch.load(weights_only=True), as a checkpoint would be."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class ReferenceLion8bit:
    """Lion with a blockwise 8-bit momentum on flat fp32 params with plain torch ops: dequantize,
    the Lion update, skip elements whose new momentum is not finite, new absmax per block,
    requantize with reference_quantize. Not the code under test (that is math/lion8bit.h)."""

    def __init__(self, params, signed_map, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, block=256):
        self.params, self.smap, self.block = params, signed_map, block
        self.lr, self.betas, self.wd = lr, betas, weight_decay
        zero = int((signed_map == 0).nonzero())
        self.cm = [torch.full((p.numel(),), zero, dtype=torch.long) for p in params]
        self.am = [torch.zeros(math.ceil(p.numel() / block)) for p in params]

    def momentum(self, i):
        return self.smap[self.cm[i]] * self.am[i].repeat_interleave(self.block)[: self.params[i].numel()]

    @torch.no_grad()
    def step(self, grads):
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            m, g = self.momentum(i), g.float()
            p_new = p * (1 - self.lr * self.wd) - self.lr * torch.sign(m * b1 + g * (1 - b1))
            m_new = m * b2 + g * (1 - b2)
            ok = torch.isfinite(m_new)
            p.copy_(torch.where(ok, p_new, p))
            m = torch.where(ok, m_new, m)
            self.am[i] = block_absmax(m, self.block)
            self.cm[i] = reference_quantize(m, self.am[i], self.smap, self.block)
