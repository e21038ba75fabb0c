"""The original's implementation, as plain code: the tests' oracle and the benchmark's "original";
and the benchmark's dense ceiling.

What the original did and llm.py does differently: a Python loop over experts with a boolean mask
and a host sync per expert, torch's own dropout, cross-entropy on materialised logits, Muon one
matrix at a time (Newton-Schulz in bf16, compiled as its @torch.compile decorator did), torch's
default AdamW, gradients set to None, and fp16 autocast with a GradScaler on CUDA whatever the GPU
(fp32 elsewhere: that autocast only touched CUDA ops). `python llm.py --bench` loads this file.
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import llm


class LoopMoE(llm.MixtureOfExperts):
    """The original dispatch: per expert a boolean mask, `if mask.any()` (a host sync)."""

    def forward(self, x) -> llm.MoEOut:  # x (B, T, C)
        B, T, C = x.shape
        N, k = B * T, self.top_k
        x_flat = x.reshape(N, C)
        route = self.router(x_flat)
        counts = torch.bincount(route.experts.reshape(-1), minlength=self.num_experts)  # (E,)
        aux = llm.load_balancing_loss(route.probs, counts, N * k)
        dt = llm.compute_dtype(x)
        out = torch.zeros(x_flat.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            mask = route.experts == e  # (N, k)
            rows = mask.any(dim=-1)  # (N,)
            if rows.any():
                w = (route.weights * mask).sum(dim=-1)[rows]  # (n,) this expert's weight per token
                xs = x_flat[rows].to(dt)
                h = F.dropout(F.silu(xs @ self.w1[e].to(dt).T), self.p, self.training)
                out[rows] += w.unsqueeze(-1) * (h @ self.w2[e].to(dt).T).float()
        return llm.MoEOut(out.to(x.dtype).view(B, T, C), aux, route.z_loss, counts)


class OriginalLLM(llm.MoEMinimalLLM):
    """The same parameters (state dicts load both ways), the original's computation."""

    def __init__(self, cfg, dispatch="grouped"):
        super().__init__(cfg)
        for block in self.blocks:
            block.feed_forward = LoopMoE(cfg)
        self.reset_parameters(cfg.seed)

    def forward(self, idx, targets=None) -> llm.ModelOut:
        p, train = self.cfg.dropout, self.training
        x = F.dropout(self.token_embedding(idx) * math.sqrt(self.cfg.d_model), p, train)
        aux, z, counts = 0.0, 0.0, []
        for block in self.blocks:
            x = x + F.dropout(block.attention(block.norm1(x)), p, train)
            moe = block.feed_forward(block.norm2(x))
            x = x + F.dropout(moe.out, p, train)
            aux, z = aux + moe.aux, z + moe.z
            counts.append(moe.counts)
        logits = self.lm_head(F.dropout(self.norm(x), p, train))  # (B, T, V)
        counts = torch.stack(counts)
        if targets is None:
            return llm.ModelOut(None, None, aux, z, counts, None, logits)
        flat = logits.flatten(0, 1)
        ce = F.cross_entropy(flat.float(), targets.flatten())
        correct = (flat.argmax(dim=-1) == targets.flatten()).sum()
        loss = ce + self.lb_weight * aux + self.z_weight * z
        return llm.ModelOut(loss, ce, aux, z, counts, correct, None)


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    """The original's zeropower_via_newtonschulz5 on one matrix."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if G.size(-2) > G.size(-1) else X


def compiled_or_eager(fn):
    """fn compiled on first use, as the original's decorator; eager (one warning) if that fails."""
    state = {"fn": None}

    def call(*args, **kwargs):
        if state["fn"] is None:
            state["fn"] = torch.compile(fn, backend=llm.compile_backend())
        if state["fn"] is not fn:
            try:
                return state["fn"](*args, **kwargs)
            except Exception as e:
                llm.warn(f"compiling {fn.__name__} failed ({type(e).__name__}); running it eagerly")
                state["fn"] = fn
        return fn(*args, **kwargs)

    return call


class OriginalMuon(torch.optim.Optimizer):
    """The original's Muon: one matrix at a time (a stacked (E, out, in) weight is E matrices)."""

    def __init__(self, params, lr=0.01, momentum=0.95, nesterov=True, ns_steps=5, ns=newton_schulz):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns = ns

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                rows, cols = p.shape[-2:]
                scale = group["lr"] * max(1, rows / cols) ** 0.5
                for m, u in zip(p.view(-1, rows, cols), g.reshape(-1, rows, cols)):
                    m.add_(self.ns(u, group["ns_steps"]).to(m.dtype), alpha=-scale)


def original_runtime(rt: llm.Runtime) -> llm.Runtime:
    """The original's precision: fp16 autocast with a GradScaler on CUDA; fp32 elsewhere."""
    return replace(rt, amp_dtype=torch.float16 if rt.device.type == "cuda" else None, compile=False,
                   compile_optimizer=False)


def original_optimizers(model, cfg, rt: llm.Runtime) -> llm.Optimizers:
    named = list(model.named_parameters())
    muon = OriginalMuon([p for n, p in named if p.ndim >= 2 and "token_embedding" not in n],
                        lr=cfg.muon_lr, ns=compiled_or_eager(newton_schulz))
    adamw = torch.optim.AdamW([p for n, p in named if p.ndim < 2 or "token_embedding" in n],
                              lr=cfg.muon_lr * 0.1, weight_decay=cfg.weight_decay)
    for opt in (muon, adamw):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return llm.Optimizers(muon, adamw, scaler, [p for _, p in named])


class DenseFFN(nn.Module):
    """The benchmark's ceiling: one MLP of d_ff * top_k hidden units in place of the MoE, so a token
    spends the same matmul FLOPs as in its k experts, with no routing, sorting or grouped kernels."""

    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.d_ff * cfg.expert_top_k
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)
        self.p = cfg.dropout

    def forward(self, x) -> llm.MoEOut:  # x (B, T, C)
        h = llm.dropout(F.silu(self.w1(x)), self.p, self.training)  # (B, T, d_ff * k)
        zero = x.new_zeros((), dtype=torch.float32)
        return llm.MoEOut(self.w2(h), zero, zero, torch.zeros(1, dtype=torch.int64, device=x.device))


class DenseLLM(llm.MoEMinimalLLM):
    """MoEMinimalLLM with DenseFFN blocks: the same attention, embedding, loss and training path."""

    def __init__(self, cfg, dispatch="grouped"):
        super().__init__(cfg, dispatch)
        for block in self.blocks:
            block.feed_forward = DenseFFN(cfg)
        self.reset_parameters(cfg.seed)
