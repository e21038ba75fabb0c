"""A small Mixture-of-Experts language model and the routing-noise experiment built on it.

    python llm.py --preset smoke              # the 18-run sweep, tiny, on the shipped corpus (CPU)
    python llm.py --dry-run --json --expert-top-k 1 2   # the planned runs and their cost
    python llm.py --bench                     # this step vs the original's and a dense model's

Without --preset the same 18 runs (noise_std {0, 0.1, 0.5} x load-balancing weight {0.01, 0} x
seeds {42, 43, 44}) train the full-size model on the hub corpus. Each run appends a row to the CSV
(--out); rerunning the command skips finished runs; `torchrun --nproc-per-node=N llm.py ...`
spreads the runs over N processes. After the sweep report.py's summary is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as functional_adam  # torch's AdamW math over tensor lists

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = "moe_routing_noise_experiment_results.csv"
DOC_CHARS = 3000  # each document is cut to its first 3000 characters, as in the original
CACHE_FORMAT = 1  # bump when the token cache layout changes
MAX_SWEEP_RUNS = 10_000  # a plan asking for more is refused before anything is expanded

class UserError(Exception):
    """Bad input or environment: main() prints it as one line and exits 2."""

def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)

def first_line(e: BaseException, limit: int = 200) -> str:
    return (str(e).strip().splitlines() or [""])[0][:limit]

def sample_corpus() -> Path:
    """The smoke preset's corpus: the shipped sample, or $LLM_SAMPLE_CORPUS (for patched copies)."""
    return Path(os.environ.get("LLM_SAMPLE_CORPUS") or HERE / "data_cache" / "sample_corpus.txt")


# --------------------------------------------------------------------------------------------------
# Config

def param(default, group: str, help: str, choices: tuple = ()):
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})

@dataclass
class MoEModelConfig:
    # model
    d_model: int = param(384, "model", "hidden size")
    n_heads: int = param(8, "model", "attention heads (d_model must divide evenly)")
    n_layers: int = param(6, "model", "transformer blocks")
    d_ff: int = param(1536, "model", "hidden size of each expert's feed-forward layer")
    num_experts: int = param(8, "model", "experts per MoE layer")
    expert_top_k: int = param(2, "model", "experts each token is routed to")
    dropout: float = param(0.1, "model", "dropout: embeddings, residuals, attention, experts")
    vocab_size: typing.Optional[int] = param(None, "model", "vocabulary; default: the tokenizer's")
    # routing
    noise_std: float = param(0.1, "routing", "std of Gaussian noise on router logits in training")
    load_balancing_weight: float = param(0.01, "routing", "load-balancing loss weight (0 = off)")
    router_z_loss_weight: float = param(0.0, "routing", "ST-MoE router z-loss weight (1e-3 usual)")
    balancing: str = param("loss", "routing", "'bias': add DeepSeek-V3's routing bias to the loss",
                           choices=("loss", "bias"))
    bias_update_rate: float = param(1e-3, "routing", "how far each update moves the routing bias")
    # training
    batch_size: int = param(24, "training", "sequences per micro-batch")
    max_steps: int = param(400, "training", "optimizer updates per run")
    gradient_accumulation_steps: int = param(1, "training", "micro-batches per update")
    muon_lr: float = param(0.01, "training", "Muon learning rate (AdamW uses a tenth of it)")
    weight_decay: float = param(0.1, "training", "AdamW weight decay (Muon uses none)")
    grad_clip: float = param(1.0, "training", "gradient-norm clip (0 = off)")
    use_amp: bool = param(True, "training", "mixed precision: bf16 where native, else fp16")
    eval_every: int = param(50, "training", "evaluate every N updates, and after the last")
    eval_steps: int = param(100, "training", "validation batches per evaluation (at most)")
    log_every: int = param(10, "training", "read training metrics back every N updates")
    seed: int = param(42, "training", "seed for weights, batches, dropout and noise")
    # data
    max_seq_len: int = param(512, "data", "tokens per training window")
    num_documents: int = param(2000, "data", "documents read from the corpus")
    max_tokens: int = param(500_000, "data", "tokens kept from those documents")
    dataset: str = param("HuggingFaceTB/smollm-corpus", "data", "hub dataset id, or 'random'")
    dataset_config: str = param("cosmopedia-v2", "data", "dataset configuration")
    data_files: tuple = param((), "data", "local .txt/.md/.jsonl/.json/.parquet files instead")
    tokenizer: str = param("HuggingFaceTB/SmolLM-135M", "data", "hub id, folder, or 'bytes'")
    cache_dir: str = param("data_cache", "data", "where tokenized corpora are cached")

    def __post_init__(self):
        self.data_files = tuple(str(p) for p in self.data_files)
        for name, (rule, ok) in RULES.items():  # every message speaks in flags
            if not ok(getattr(self, name)):
                raise UserError(f"{flag(name)} must be {rule} (got {getattr(self, name)!r})")
        if self.d_model % self.n_heads or self.d_k % 2:
            raise UserError(f"--d-model {self.d_model} must split into --n-heads {self.n_heads} "
                            f"heads of even size (rotary pairs); try --d-model {self.n_heads * 64}")
        if self.expert_top_k > self.num_experts:
            raise UserError(f"--expert-top-k {self.expert_top_k} is larger than --num-experts "
                            f"{self.num_experts}; choose --expert-top-k <= --num-experts")

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

RULES = {  # field -> (what it must be, test); checked in this order
    **{name: ("at least 1", lambda v: v >= 1) for name in (
        "d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "batch_size",
        "max_steps", "gradient_accumulation_steps", "eval_every", "eval_steps", "log_every",
        "max_seq_len", "num_documents", "max_tokens")},
    **{name: ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0) for name in (
        "noise_std", "load_balancing_weight", "router_z_loss_weight", "bias_update_rate",
        "muon_lr", "weight_decay", "grad_clip")},
    **{f.name: (f"one of {', '.join(f.metadata['choices'])}", lambda v, c=f.metadata["choices"]:
                v in c) for f in fields(MoEModelConfig) if f.metadata["choices"]},
    "seed": ("in [0, 2**63)", lambda v: 0 <= v < 2 ** 63),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "vocab_size": ("at least 2, or unset", lambda v: v is None or v >= 2),
}
NOT_IDENTITY = ("cache_dir", "log_every", "data_files")  # not a run's identity (the data's hash is)
NOT_SWEPT = NOT_IDENTITY + ("use_amp",)  # one value per sweep: per process, or not a run's identity
ROUTING_AXES = ("noise_std", "load_balancing_weight", "seed")  # always swept, last (seed last)
DATA_FIELDS = ("dataset", "dataset_config", "data_files", "tokenizer", "num_documents",
               "max_tokens")
ARCH_FIELDS = ("d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "dropout",
               "vocab_size", "max_seq_len")  # one model (and its compiled graphs) serves these
FLAG_NAMES = {"load_balancing_weight": "lb-weight", "seed": "seeds"}
# Tiny model, byte tokenizer, the shipped sample corpus: the whole 18-run sweep in well under a
# minute on a CPU. fp32: at this size bf16's casts cost more than its matmuls save.
PRESETS = {"smoke": dict(tokenizer="bytes", data_files=(str(sample_corpus()),), d_model=64,
                         n_heads=4, n_layers=2, d_ff=128, batch_size=8, max_seq_len=64,
                         max_steps=30, eval_every=10, eval_steps=4, log_every=5,
                         num_documents=1000, max_tokens=100_000, use_amp=False)}

def flag(name: str) -> str:
    """The command-line spelling of a config field."""
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))

def field_type(name: str) -> type:
    hint = typing.get_type_hints(MoEModelConfig)[name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[int]

def config_identity(cfg: MoEModelConfig) -> dict:
    """Every field that changes a run's numbers (the data files count by their tokens' hash)."""
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}

def config_hash(cfg: MoEModelConfig, tokens_sha256: str) -> str:
    """A run's identity: its config and its tokens' hash, so resume works across copies."""
    text = json.dumps([config_identity(cfg), tokens_sha256], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Model

class Rotary(nn.Module):
    """Rotary position embedding, base 10000, interleaved: dims 2i and 2i+1 rotate together."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):  # x (B, H, T, hd)
        T = x.size(-2)
        cos, sin = self.cos[:T], self.sin[:T]  # (T, hd/2)
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (B, H, T, hd/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
        return out.flatten(-2).type_as(x)

class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.n_heads, self.d_k, self.dropout = cfg.n_heads, cfg.d_k, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.w_o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_k, cfg.max_seq_len)

    def forward(self, x):  # x (B, T, C)
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4)
        q, k, v = qkv  # (B, H, T, hd) each
        q, k = self.rotary(q), self.rotary(k)
        # SDPA picks the fastest kernel available (flash / memory-efficient on GPU).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.w_o(y.transpose(1, 2).reshape(B, T, C))

class RouterOut(typing.NamedTuple):
    weights: torch.Tensor  # (N, k) combine weights
    experts: torch.Tensor  # (N, k) chosen experts
    probs: torch.Tensor  # (N, E) full softmax, for the balancing loss
    z_loss: torch.Tensor  # ()

class TopKRouter(nn.Module):
    """Linear gate in float32; noise on the logits only in training; top-k of logits + bias picks
    the experts, a softmax over the k chosen (unbiased) logits combines them."""

    def __init__(self, d_model: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Buffers, not floats or parameters: changing them between runs must not recompile, and the
        # bias is set by the balancing rule (update_routing_bias), never by gradients.
        self.register_buffer("noise_std", torch.zeros(()), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=False)  # (E,)

    def forward(self, x) -> RouterOut:  # x (N, C)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E) float32
            if self.training:
                logits = logits + torch.randn_like(logits) * self.noise_std
            probs = logits.softmax(dim=-1)  # (N, E)
            # DeepSeek-V3's bias steers only the choice; the weights stay the router's own.
            top_idx = (logits + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
            top_w = logits.gather(-1, top_idx).softmax(dim=-1)  # (N, k)
            # ST-MoE's z-loss on the logits this routing used (noisy in training).
            z = logits.logsumexp(dim=-1).square().mean()
        return RouterOut(top_w, top_idx, probs, z)

@torch.no_grad()
def update_routing_bias(bias, counts, rate: float):
    """DeepSeek-V3's balancing step, in place: bias (..., E) += rate * sign(mean load - load), then
    centred (a shift common to all experts changes no choice). counts (..., E): one update's."""
    load = counts.float()  # (..., E)
    bias += rate * torch.sign(load.mean(dim=-1, keepdim=True) - load)
    bias -= bias.mean(dim=-1, keepdim=True)

def load_balancing_loss(probs, counts, n_assignments: int):
    """num_experts * sum_i f_i * P_i: f_i = share of (token, slot) assignments to expert i, P_i =
    mean probability. Perfectly balanced routing gives 1.0."""
    f = counts.float() / n_assignments  # (E,)
    return probs.size(-1) * (f * probs.mean(dim=0)).sum()

def compute_dtype(x) -> torch.dtype:
    """The dtype autocast would run a matmul on x in (x's own dtype outside autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

# a (M, K) rows sorted by group, b (G, K, N), offs (G,) int32 group ends -> (M, N); None: not here
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

def dropout(x, p: float, training: bool):
    """Inverted dropout, as F.dropout; on CPU the mask comes from torch.rand, about twice as fast
    there as F.dropout's bernoulli_ (same distribution). GPUs keep F.dropout (one fused kernel)."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return torch.where(torch.rand(x.shape, device=x.device) >= p, x * (1 / (1 - p)), 0)

class MoEOut(typing.NamedTuple):
    out: torch.Tensor  # (B, T, C)
    aux: torch.Tensor  # () balancing loss, unweighted
    z: torch.Tensor  # () router z-loss, unweighted
    counts: torch.Tensor  # (E,) int64 assignments per expert

class MixtureOfExperts(nn.Module):
    """Dropless top-k MoE; expert weights stacked (E, out, in).

    dispatch "grouped": token copies sorted by expert, two grouped GEMMs, no host sync. "sorted":
    the same sort with a loop over experts (one sync per layer), where grouped_mm cannot run."""

    def __init__(self, cfg: MoEModelConfig, dispatch: str = "grouped"):
        super().__init__()
        assert dispatch in ("grouped", "sorted"), dispatch
        self.num_experts, self.top_k, self.p, self.dispatch = (cfg.num_experts, cfg.expert_top_k,
                                                               cfg.dropout, dispatch)
        self.router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.expert_top_k)
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_ff, cfg.d_model))  # (E, d_ff, C)
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.d_ff))  # (E, C, d_ff)

    def forward(self, x) -> MoEOut:  # x (B, T, C)
        B, T, C = x.shape
        N, k, E = B * T, self.top_k, self.num_experts
        x_flat = x.reshape(N, C)
        route = self.router(x_flat)
        flat_idx = route.experts.reshape(-1)  # (N*k,) expert of each token copy
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync).
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))
        aux = load_balancing_loss(route.probs, counts, N * k)
        dt = compute_dtype(x)  # grouped_mm is not on autocast's cast lists: cast by hand
        order = flat_idx.argsort(stable=True)  # (N*k,) copies grouped by expert
        xs = x_flat[order // k].to(dt)  # (N*k, C)
        if self.dispatch == "grouped":
            offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
            h = GROUPED_MM(xs, self.w1.to(dt).transpose(-2, -1), offs=offs)  # (N*k, d_ff)
            h = dropout(F.silu(h), self.p, self.training)
            ys = GROUPED_MM(h, self.w2.to(dt).transpose(-2, -1), offs=offs)  # (N*k, C)
        else:
            ends = counts.cumsum(0).tolist()
            ys = torch.cat([self._expert(xs[s:e], i, dt)
                            for i, (s, e) in enumerate(zip([0] + ends, ends))])
        # Un-sort with a gather (deterministic, unlike index_add), then weight and sum the k copies.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=x.device))
        y = ys[inverse].view(N, k, C).float()  # (N, k, C) in token order
        out = (y * route.weights.unsqueeze(-1)).sum(dim=1)  # (N, C) float32 accumulation
        return MoEOut(out.to(x.dtype).view(B, T, C), aux, route.z_loss, counts)

    def _expert(self, xs, e: int, dt):  # xs (n, C) -> (n, C): one expert's FFN
        h = dropout(F.silu(xs @ self.w1[e].to(dt).T), self.p, self.training)
        return h @ self.w2[e].to(dt).T

# Logits alive at once in the fused loss: big chunks keep GPU matmuls large (2**27: 512 MB in fp32);
# on a CPU chunks that stay in cache are faster.
CE_CHUNK_LOGITS = 2 ** 27
CE_CHUNK_LOGITS_CPU = 2 ** 20

class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ W.T and the count of correct top-1 predictions, in row chunks.

    Hand-written because torch has no fused linear + cross-entropy: the plain form stores (N, V)
    logits and its log-softmax backward is a separate slow pass. Each chunk's gradient (softmax -
    one-hot) is formed while its logits exist; only grad_h (N, C) and grad_W (V, C) are kept."""

    @staticmethod
    def forward(ctx, h, W, targets, compute_dtype, need_grad: bool):  # h (N, C), W (V, C), t (N,)
        N, V = h.size(0), W.size(0)
        chunk = max(1, (CE_CHUNK_LOGITS_CPU if h.device.type == "cpu" else CE_CHUNK_LOGITS) // V)
        hc, Wc = h.to(compute_dtype), W.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_grad else None
        for s in range(0, N, chunk):
            t = targets[s:s + chunk, None]  # (n, 1)
            logits = (hc[s:s + chunk] @ Wc.T).float()  # (n, V)
            correct += (logits.argmax(dim=-1, keepdim=True) == t).sum()
            logp = logits.log_softmax(dim=-1)  # (n, V)
            loss -= logp.gather(1, t).sum()
            if need_grad:  # p - onehot
                g = logp.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logp.dtype))
                g = g.to(compute_dtype)
                grad_h[s:s + chunk] = g @ Wc / N  # the 1/N of the mean on the small (n, C) side
                grad_W += g.T @ hc[s:s + chunk]
        if need_grad:
            grad_W /= N
        ctx.mark_non_differentiable(correct)
        ctx.w_dtype = W.dtype
        ctx.save_for_backward(grad_h, grad_W)
        return loss / N, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_W = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), (grad_W * grad_loss).to(ctx.w_dtype),
                None, None, None)

class MoETransformerBlock(nn.Module):
    def __init__(self, cfg: MoEModelConfig, dispatch: str = "grouped"):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attention = MultiHeadAttention(cfg)
        self.feed_forward = MixtureOfExperts(cfg, dispatch)
        self.p = cfg.dropout

    def forward(self, x) -> MoEOut:  # x (B, T, C)
        x = x + dropout(self.attention(self.norm1(x)), self.p, self.training)
        moe = self.feed_forward(self.norm2(x))
        return moe._replace(out=x + dropout(moe.out, self.p, self.training))

class ModelOut(typing.NamedTuple):
    """With targets: the training losses (logits None). Without: logits (B, T, V), losses None."""
    loss: typing.Optional[torch.Tensor]  # () ce + lb_weight * aux + z_weight * z
    ce: typing.Optional[torch.Tensor]  # () mean cross-entropy
    aux: torch.Tensor  # () balancing loss, unweighted, summed over layers
    z: torch.Tensor  # () router z-loss, unweighted, summed over layers
    counts: torch.Tensor  # (L, E) int64 routing assignments per layer and expert
    correct: typing.Optional[torch.Tensor]  # () correct top-1 predictions
    logits: typing.Optional[torch.Tensor]  # (B, T, V)

class MoEMinimalLLM(nn.Module):
    def __init__(self, cfg: MoEModelConfig, dispatch: str = "grouped"):
        super().__init__()
        assert cfg.vocab_size, "vocab_size is resolved from the data before the model is built"
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MoETransformerBlock(cfg, dispatch) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied
        self.register_buffer("lb_weight", torch.zeros(()), persistent=False)  # buffers: no
        self.register_buffer("z_weight", torch.zeros(()), persistent=False)  # recompiles
        self.reset_parameters(cfg.seed)

    def routers(self) -> list[TopKRouter]:
        return [m for m in self.modules() if isinstance(m, TopKRouter)]

    def reset_parameters(self, seed: int):
        """Same seed, same weights: runs of one seed start identical in every condition."""
        torch.manual_seed(seed)
        for p in self.parameters():  # visits the tied weight once
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.ones_(p)  # RMSNorm gains
        for r in self.routers():  # a bias learnt in the previous run must not steer this one
            r.expert_bias.zero_()

    def set_routing(self, noise_std: float, load_balancing_weight: float,
                    router_z_loss_weight: float = 0.0):
        self.lb_weight.fill_(load_balancing_weight)
        self.z_weight.fill_(router_z_loss_weight)
        for r in self.routers():
            r.noise_std.fill_(noise_std)

    def update_routing_bias(self, counts, rate: float):
        """counts (L, E): the last update's assignments per layer; see update_routing_bias."""
        for block, c in zip(self.blocks, counts):
            update_routing_bias(block.feed_forward.router.expert_bias, c, rate)

    def forward(self, idx, targets=None) -> ModelOut:  # idx, targets (B, T)
        x = dropout(self.token_embedding(idx) * math.sqrt(self.cfg.d_model), self.cfg.dropout,
                    self.training)  # (B, T, C)
        aux, z, counts = 0.0, 0.0, []
        for block in self.blocks:
            x, block_aux, block_z, block_counts = block(x)
            aux, z = aux + block_aux, z + block_z
            counts.append(block_counts)
        counts = torch.stack(counts)  # (L, E)
        h = dropout(self.norm(x), self.cfg.dropout, self.training)  # (B, T, C)
        if targets is None:
            return ModelOut(None, None, aux, z, counts, None, self.lm_head(h))
        h, y = h.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        dt = compute_dtype(h)
        if dt != torch.float16:
            need_grad = torch.is_grad_enabled() and (h.requires_grad or
                                                     self.lm_head.weight.requires_grad)
            ce, correct = LinearCrossEntropy.apply(h, self.lm_head.weight, y, dt, need_grad)
        else:  # fp16 would underflow the fused loss's per-token gradients before the GradScaler
            logits = self.lm_head(h)  # (B*T, V)
            ce, correct = F.cross_entropy(logits.float(), y), (logits.argmax(dim=-1) == y).sum()
        loss = ce + self.lb_weight * aux + self.z_weight * z
        return ModelOut(loss, ce, aux, z, counts, correct, None)

class Estimate(typing.NamedTuple):
    params: int
    active_params: int  # per token: top_k of num_experts experts
    flops_per_token: float  # training: 6 x active matmul weights + attention scores (nanoGPT's)
    train_tokens: int  # max_steps x batch x accumulation x seq_len
    memory_gb: float  # rough upper bound of peak training memory

def vocab_guess(cfg: MoEModelConfig) -> int:
    """vocab_size, or the tokenizer's where known without loading it (bytes; the default's)."""
    return cfg.vocab_size or (256 if cfg.tokenizer == "bytes" else 49152)

def estimate(cfg: MoEModelConfig) -> Estimate:
    """Size, cost and memory of a run from its config alone: arithmetic, never allocates a model."""
    C, V, L, E, k = cfg.d_model, vocab_guess(cfg), cfg.n_layers, cfg.num_experts, cfg.expert_top_k
    experts = L * 2 * E * cfg.d_ff * C
    params = V * C + L * (4 * C * C + E * C + 2 * C) + C + experts
    B, T = cfg.batch_size, cfg.max_seq_len
    matmul_weights = L * (4 * C ** 2 + C * E + 2 * k * C * cfg.d_ff) + V * C
    # fp32 weights, gradients, Muon momentum / AdamW moments (at most two copies); activations kept
    # for backward, per layer ~16 C-wide and 3 d_ff-wide fp32 values per token copy; a logits chunk
    state = 4 * params * 4
    activations = 4 * B * T * (L * (16 * C + 3 * k * cfg.d_ff + E) + 4 * C)
    logits = 4 * 3 * min(B * T * V, CE_CHUNK_LOGITS)
    return Estimate(params, params - experts + experts * k // E,
                    6 * matmul_weights + 12 * L * C * cfg.max_seq_len,
                    cfg.max_steps * B * cfg.gradient_accumulation_steps * T,
                    (state + activations + logits) / 1e9)


# --------------------------------------------------------------------------------------------------
# Data

class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): needs no files and no network."""
    vocab_size = 256

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

def hub_reachable(timeout: float = 5.0) -> bool:
    """An HTTP probe, so an offline user hears so in seconds, not after the hub client's retries.
    Any HTTP answer counts, even an error status; a server that stays silent does not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let the hub client try
    import urllib.error
    import urllib.request
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    answered = threading.Event()

    def probe():  # in a thread: name resolution itself has no timeout
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                   timeout=timeout).close()
        except urllib.error.HTTPError:  # the server answered: it is there
            pass
        except (OSError, ValueError):  # refused, timed out, no route, no name, a malformed URL
            return
        answered.set()

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(timeout + 1)

OFFLINE_HINT = ("to work offline use --data-files FILE [FILE ...] with --tokenizer bytes (or a "
                "local tokenizer folder), or --preset smoke")

def load_tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer
    try:  # never run a tokenizer folder's or hub repo's own code
        return AutoTokenizer.from_pretrained(name, use_fast=True, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}: "
                        f"{first_line(e, 160)}); {OFFLINE_HINT}") from None

def data_description(cfg: MoEModelConfig) -> str:
    """What the corpus is, in words (the CSV's `data` column; its content hash is data_sha256)."""
    if cfg.data_files:
        return "files: " + ", ".join(Path(p).name for p in cfg.data_files)
    return "random" if cfg.dataset == "random" else f"{cfg.dataset}/{cfg.dataset_config}"

def data_key(cfg: MoEModelConfig) -> dict:
    """Everything the token stream depends on; the cache file's name is its hash."""
    files = []
    for p in cfg.data_files:
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"data file not found: {p}; pass existing .txt/.jsonl/.parquet files")
        st = path.stat()
        if st.st_size == 0:
            raise UserError(f"data file is empty: {p}; pass files that contain text")
        files.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    hub = None if files else cfg.dataset
    return {"format": CACHE_FORMAT, "dataset": hub, "dataset_config": hub and cfg.dataset_config,
            "files": files, "tokenizer": cfg.tokenizer, "num_documents": cfg.num_documents,
            "max_tokens": cfg.max_tokens, "doc_chars": DOC_CHARS}

def iter_documents(cfg: MoEModelConfig, files: list[dict]):
    from datasets import load_dataset
    if files:
        suffixes = {Path(f["path"]).suffix.lower() for f in files}
        builder = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}
        kinds = {builder.get(s) for s in suffixes}
        if None in kinds or len(kinds) > 1:
            raise UserError(f"--data-files must all be one kind: .txt/.md, .jsonl/.json or "
                            f".parquet (got {', '.join(sorted(suffixes))})")
        kind = kinds.pop()
        extra = {"sample_by": "paragraph"} if kind == "text" else {}  # a document per paragraph
        ds = load_dataset(kind, data_files=[f["path"] for f in files], split="train",
                          streaming=True, trust_remote_code=False, **extra)
    else:
        ds = load_dataset(cfg.dataset, cfg.dataset_config, split="train", streaming=True,
                          trust_remote_code=False)
    for row in ds:
        if "text" not in row:
            raise UserError(f"the data has no 'text' column (columns: {', '.join(row)}); add one")
        if row["text"] and row["text"].strip():
            yield row["text"][:DOC_CHARS]

def token_dtype(vocab: int):
    return np.uint16 if vocab <= 65536 else np.int32

def load_and_cache_data(cfg: MoEModelConfig, quiet: bool = False) -> tuple[np.ndarray, dict]:
    """The token stream for cfg and its description: read from cache_dir where cached (no network),
    else tokenized and cached as a .npy with a JSON sidecar holding its key. A cache entry that is
    unreadable or does not match is rebuilt with a warning, never trusted."""
    key = data_key(cfg)
    if cfg.dataset == "random" and not cfg.data_files:  # uniform random tokens: timing without data
        vocab = cfg.vocab_size or 49152
        tokens = np.random.default_rng(0).integers(0, vocab, cfg.max_tokens)
        tokens = tokens.astype(token_dtype(vocab))
        meta = {"key": key, "n_tokens": cfg.max_tokens, "n_documents": 0, "vocab_size": vocab}
        return tokens, describe_tokens(tokens, meta, "random tokens, not cached")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    npy = Path(cfg.cache_dir) / f"tokens_{digest}.npy"
    sidecar = npy.with_suffix(".json")
    if npy.exists() or sidecar.exists():
        try:
            meta, tokens = json.loads(sidecar.read_text()), np.load(npy, allow_pickle=False)
            if meta.get("key") != key or tokens.ndim != 1 or len(tokens) != meta["n_tokens"]:
                raise ValueError("contents do not match the sidecar")
            return tokens, describe_tokens(tokens, meta, str(npy))
        except Exception as e:
            warn(f"token cache {npy} is unreadable or mismatched ({type(e).__name__}: {e}); "
                 f"rebuilding")
    local_tokenizer = cfg.tokenizer == "bytes" or Path(cfg.tokenizer).expanduser().exists()
    if (not key["files"] or not local_tokenizer) and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by the hub libraries: they then fail in a second
    tokens, meta = tokenize_corpus(cfg, key, quiet)
    npy.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, tokens)
    write_file_safely(npy, buf.getvalue())
    write_file_safely(sidecar, json.dumps(meta, indent=1).encode())
    return tokens, describe_tokens(tokens, meta, str(npy))

def tokenize_corpus(cfg: MoEModelConfig, key: dict, quiet: bool) -> tuple[np.ndarray, dict]:
    from tqdm.auto import tqdm
    files = key["files"]
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    docs = itertools.islice(iter_documents(cfg, files), cfg.num_documents)
    chunks, n_tokens, n_docs = [], 0, 0
    source = f"{len(files)} local file(s)" if files else cfg.dataset
    try:
        with tqdm(total=cfg.max_tokens, desc=f"tokenizing {source}", unit="tok", disable=quiet,
                  leave=False) as bar:
            # 256 documents at a time: the fast tokenizers parallelise over a batch
            while n_tokens < cfg.max_tokens and (batch := list(itertools.islice(docs, 256))):
                n_docs += len(batch)
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    chunks.append(np.asarray(ids, dtype=np.int64))
                    n_tokens += len(ids)
                    bar.update(len(ids))
    except UserError:
        raise
    except Exception as e:
        where = "the data files" if files else f"dataset {cfg.dataset}/{cfg.dataset_config}"
        raise UserError(f"cannot read {where}: {type(e).__name__}: {first_line(e)}"
                        f"{'' if files else '; ' + OFFLINE_HINT}") from None
    if n_tokens == 0:
        raise UserError("the corpus produced no tokens; check --data-files / --dataset")
    tokens = np.concatenate(chunks)[: cfg.max_tokens].astype(token_dtype(vocab))
    return tokens, {"key": key, "n_tokens": int(len(tokens)), "n_documents": n_docs,
                    "vocab_size": int(vocab), "dtype": str(tokens.dtype),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

def describe_tokens(tokens: np.ndarray, meta: dict, where: str) -> dict:
    """meta and what the tokens themselves give: their content hash identifies the data."""
    return {**meta, "cache_file": where, "max_id": int(tokens.max()),
            "sha256": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()}

def write_file_safely(path: Path, data: bytes):
    """Write a fresh temporary file beside path, then rename it over path: a killed write leaves no
    half file, and a planted symlink (at path or a guessed temporary name) is never followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# Evaluation (protected)
# The train/validation split, the validation batches and every reported metric. Code edits may not
# touch this section or rebind a name it defines: a changed model cannot change how it is measured.

VAL_FRACTION = 10  # the last 1/10 of the token stream is held out
DEAD_SHARE = 0.1  # an expert given under a tenth of its fair share (1/E) of the assignments is dead
EVAL_CHUNK_LOGITS = 2 ** 24  # logits turned into float32 at once by evaluate
ROUTING_KEYS = ("expert_usage_cv", "expert_usage_cv_worst_layer", "dead_expert_fraction",
                "expert_load_max_mean", "routing_entropy", "expert_usage_cv_per_layer",
                "dead_expert_fraction_per_layer", "expert_load_max_mean_per_layer",
                "routing_entropy_per_layer", "expert_load_per_layer")

@dataclass
class TokenData:
    """Train stream and fixed validation batches on the device.

    Validation windows tile the held-out tail without overlap (stride T+1), so no validation token
    is a training token; training windows are drawn at random from the rest."""
    train: torch.Tensor  # (N_train,) int64
    val: list  # [(x (B, T), y (B, T))], the same for every run and every evaluation
    seq_len: int
    batch_size: int

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, cfg: MoEModelConfig, device) -> "TokenData":
        T, B = cfg.max_seq_len, cfg.batch_size
        n_val = len(tokens) // VAL_FRACTION
        n_train = len(tokens) - n_val
        need = B * (T + 1)
        if n_val < need or n_train < need:
            raise UserError(f"the corpus has {len(tokens):,} tokens, too few for one training "
                            f"and one validation batch of {B} x {T + 1} (the last 10% is held "
                            f"out): "
                            f"need {VAL_FRACTION * need:,}; add data or lower --batch-size or "
                            f"--max-seq-len")
        t = torch.from_numpy(tokens.astype(np.int64))
        n_batches = min(cfg.eval_steps, n_val // (T + 1) // B)
        windows = t[n_train:n_train + n_batches * B * (T + 1)].view(n_batches, B, T + 1)
        val = [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]
        return cls(train=t[:n_train].to(device), val=val, seq_len=T, batch_size=B)

    # -> x, y (B, T) on the device, no host round trip
    def sample_batch(self, gen: torch.Generator):
        T = self.seq_len
        starts = torch.randint(0, len(self.train) - T, (self.batch_size, 1), generator=gen,
                               device=gen.device)  # (B, 1)
        # (B, T+1)
        idx = starts.to(self.train.device) + torch.arange(T + 1, device=self.train.device)
        w = self.train[idx]
        return w[:, :-1], w[:, 1:]

def expert_usage_cv(counts) -> float:
    """Coefficient of variation of per-expert counts: population std / mean (0 = perfectly even)."""
    c = np.asarray(counts, dtype=np.float64)
    return float(c.std() / c.mean()) if c.mean() > 0 else float("nan")

def routing_metrics(counts) -> dict:
    """Load statistics of routing counts (L, E), per layer and overall (keys: ROUTING_KEYS).

    expert_usage_cv is the CV of the counts summed over layers (the original's); the worst layer's
    CV and the other overall figures come from the layers. max/mean load: 1 = even; entropy of the
    load shares over log E: 1 = even; dead: the fraction of experts under DEAD_SHARE of the fair
    share."""
    from scipy.stats import entropy  # handles 0 log 0 and normalises
    c = np.asarray(counts, dtype=np.float64)  # (L, E)
    L, E = c.shape
    share = c / c.sum(axis=1, keepdims=True)  # (L, E), rows sum to 1
    max_mean = share.max(axis=1) * E  # (L,)
    ent = entropy(share, axis=1) / math.log(E) if E > 1 else np.ones(L)  # (L,)
    dead = (share < DEAD_SHARE / E).mean(axis=1)  # (L,)
    cv_layers = [expert_usage_cv(row) for row in c]
    return {"expert_usage_cv": expert_usage_cv(c.sum(axis=0)),
            "expert_usage_cv_worst_layer": float(max(cv_layers)),
            "dead_expert_fraction": float(dead.mean()),
            "expert_load_max_mean": float(max_mean.mean()),
            "routing_entropy": float(ent.mean()), "expert_usage_cv_per_layer": cv_layers,
            "dead_expert_fraction_per_layer": dead.tolist(),
            "expert_load_max_mean_per_layer": max_mean.tolist(),
            "routing_entropy_per_layer": ent.tolist(), "expert_load_per_layer": share.tolist()}

class Evaluation(typing.NamedTuple):
    val_loss: float  # mean cross-entropy over every validation token (no balancing or z-loss)
    val_accuracy: float  # top-1 next-token accuracy
    val_perplexity: float  # exp(val_loss)
    # routing_metrics of the model's own (noise-free) routing on the validation batches
    routing: dict

@torch.no_grad()
def evaluate(fn, model: nn.Module, data: TokenData, autocast) -> Evaluation:
    """The model sees only the inputs; the loss and accuracy are computed here from the logits it
    returns.

    Sums accumulate on the device (float32: MPS has no float64); the host reads them once."""
    model.eval()
    dev = data.train.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    counts, n_tokens = 0, 0
    for x, y in data.val:
        with autocast():
            out = fn(x)
        logits, targets = out.logits.flatten(0, 1), y.flatten()  # (B*T, V), (B*T,)
        rows = max(1, EVAL_CHUNK_LOGITS // logits.size(-1))
        for s in range(0, len(targets), rows):
            chunk, t = logits[s:s + rows].float(), targets[s:s + rows]
            loss_sum += F.cross_entropy(chunk, t, reduction="sum")
            correct += (chunk.argmax(dim=-1) == t).sum()
        counts = counts + out.counts
        n_tokens += targets.numel()
    model.train()
    val_loss = loss_sum.item() / n_tokens
    return Evaluation(val_loss, correct.item() / n_tokens,
                      math.exp(val_loss) if val_loss < 700 else float("inf"),
                      routing_metrics(counts.cpu().numpy()))


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule

def lr_multiplier(step: int, max_steps: int) -> float:
    """Linear warmup over the first 5% of updates, then cosine from 1.0 down to 0.1."""
    warmup = max(1, max_steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

def zeropower_via_newtonschulz(G, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315),
                               eps: float = 1e-7, dtype=torch.bfloat16):
    """Orthogonalise each matrix of G (..., A, B) with the quintic Newton-Schulz iteration."""
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    # One matrix stays 2-D (addmm beats a batch-of-one bmm on CPU); a stack becomes (M, A, B).
    madd = torch.addmm if X.ndim == 2 else torch.baddbmm
    X = X if X.ndim == 2 else X.reshape(-1, *X.shape[-2:])
    for _ in range(steps):
        gram = X @ X.mT  # (M, A, A)
        update = madd(gram, gram, gram, beta=b, alpha=c)  # b*gram + c*gram@gram
        X = madd(X, update, X, beta=a)  # a*X + update@X
    X = X.view(*G.shape[:-2], *X.shape[-2:])
    return X.mT if transposed else X

def muon_update(params, grads, bufs, lr, momentum: float, nesterov: bool, ns_steps: int,
                weight_decay: float, ns_dtype):
    """One Muon step over lists of matrices; lr is a float or a device tensor (the compiled step).

    Matrices are bucketed by shape up to a transpose, each oriented wide (rows <= cols): the
    transpose's orthogonalisation is the transpose of it, so an expert's w1 (d_ff, C) and w2 (C,
    d_ff) share one call."""
    buckets: dict = {}
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        rows, cols = p.shape[-2:]
        scale = lr * math.sqrt(max(1.0, rows / cols))
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        flip = rows > cols
        update = update.reshape(-1, rows, cols)  # (n, rows, cols)
        buckets.setdefault((min(rows, cols), max(rows, cols)), []).append(
            (p, update.mT if flip else update, flip, scale))
    for items in buckets.values():
        ortho = zeropower_via_newtonschulz(torch.cat([u for _, u, _, _ in items]), ns_steps,
                                           dtype=ns_dtype)  # (M, small, large)
        offset = 0
        for p, u, flip, scale in items:
            o = ortho[offset:offset + len(u)]
            offset += len(u)
            update = (o.mT if flip else o).reshape(p.shape).to(p.dtype)
            if isinstance(scale, torch.Tensor):
                p.sub_(update * scale)
            else:
                p.add_(update, alpha=-scale)

class Muon(torch.optim.Optimizer):
    """Muon: momentum, Nesterov, Newton-Schulz orthogonalised update scaled by
    sqrt(max(1, rows/cols)).

    Not torch.optim.Muon: that one takes 2-D parameters only and orthogonalises one matrix at a
    time, so the default model's 96 expert matrices would be 96 chains of small kernels. This one
    treats a stacked (E, out, in) weight as E matrices and batches every matrix of one shape into
    one call; tests/test_llm.py checks it against torch.optim.Muon matrix by matrix."""

    def __init__(self, params, lr=0.01, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay,
                                      ns_dtype=ns_dtype))

    def buffers_for(self, params):
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            muon_update(params, [p.grad for p in params], self.buffers_for(params), group["lr"],
                        group["momentum"], group["nesterov"], group["ns_steps"],
                        group["weight_decay"], group["ns_dtype"])

@torch.no_grad()
def clip_muon_adamw(muon_p, muon_g, muon_bufs, adam_p, adam_g, exp_avgs, exp_avg_sqs, steps,
                    lr_muon, lr_adam, grad_clip: float, muon_hp: dict, adam_hp: dict):
    """The whole optimizer step as one function of tensor lists, for torch.compile: clip (as
    clip_grad_norm_), Muon, torch's functional AdamW (capturable: steps and lr on the device),
    gradients zeroed in place. No host reads, so nothing in it waits for the GPU."""
    grads = muon_g + adam_g
    if grad_clip > 0:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # () total 2-norm
        torch._foreach_mul_(grads, (grad_clip / (norm + 1e-6)).clamp(max=1.0))
    muon_update(muon_p, muon_g, muon_bufs, lr_muon, **muon_hp)
    functional_adam(adam_p, adam_g, exp_avgs, exp_avg_sqs, [], steps, foreach=True, capturable=True,
                    decoupled_weight_decay=True, amsgrad=False, lr=lr_adam, maximize=False,
                    **adam_hp)
    torch._foreach_zero_(grads)

@dataclass
class Optimizers:
    """One run's optimizers and how their step runs: eagerly (GradScaler for fp16, clip, each
    optimizer) or as one compiled clip_muon_adamw call, the learning rates in 0-d device tensors
    filled before each call (the schedule never recompiles)."""
    muon: torch.optim.Optimizer
    adamw: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list  # every parameter, in the model's order (clipped together)
    keep_grads: bool = False  # zero gradients in place (CUDA graphs accumulate into them)
    fused: typing.Optional[typing.Callable] = None  # the compiled clip_muon_adamw; None: eager
    fused_args: dict = field(default_factory=dict)  # its tensor lists and hyperparameters

    def set_lr(self, multiplier: float):
        for opt in (self.muon, self.adamw):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier

    def step(self, grad_clip: float):
        """Unscale (fp16), clip, step every optimizer, clear the gradients."""
        opts = (self.muon, self.adamw)
        if self.fused is not None:
            a = self.fused_args
            for lr, opt in zip((a["lr_muon"], a["lr_adam"]), opts):
                lr.fill_(opt.param_groups[0]["lr"])
            self.fused(muon_g=[p.grad for p in a["muon_p"]], adam_g=[p.grad for p in a["adam_p"]],
                       grad_clip=grad_clip, **a)
            return
        for opt in opts:
            self.scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=not self.keep_grads)

def build_optimizers(model: nn.Module, cfg: MoEModelConfig, rt: "Runtime", fused=None,
                     keep_grads: bool = False) -> Optimizers:
    """Muon for the hidden matrices (attention, router gates, experts), AdamW for the embedding
    and norms; fused: a compiled clip_muon_adamw to run the whole step (not with a GradScaler)."""
    named = list(model.named_parameters())
    muon_p = [p for n, p in named if p.ndim >= 2 and "token_embedding" not in n]
    adam_p = [p for n, p in named if p.ndim < 2 or "token_embedding" in n]
    # bf16 Newton-Schulz as the original and torch.optim.Muon, except where bf16 matmuls are slow
    # (a CPU without bf16 instructions, MPS): there fp32 costs no more and is more precise.
    fast_bf16 = rt.device.type == "cuda" or (rt.device.type == "cpu" and cpu_has_native_bf16())
    muon = Muon(muon_p, lr=cfg.muon_lr, ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    adamw = torch.optim.AdamW(adam_p, lr=cfg.muon_lr * 0.1, weight_decay=cfg.weight_decay,
                              fused=rt.device.type == "cuda")
    for opt in (muon, adamw):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    opts = Optimizers(muon, adamw, scaler, [p for _, p in named], keep_grads)
    if fused is None or scaler.is_enabled():  # fp16: unscale before the clip, skip steps on inf
        return opts
    dev, st, mg, ag = muon_p[0].device, adamw.state, muon.param_groups[0], adamw.param_groups[0]
    for p in adam_p:  # torch's AdamW state layout, capturable: the step count on the device
        st[p].update(step=torch.zeros((), dtype=torch.float32, device=dev),
                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    opts.fused, opts.fused_args = fused, dict(
        muon_p=muon_p, muon_bufs=muon.buffers_for(muon_p), adam_p=adam_p,
        exp_avgs=[st[p]["exp_avg"] for p in adam_p],
        exp_avg_sqs=[st[p]["exp_avg_sq"] for p in adam_p],
        steps=[st[p]["step"] for p in adam_p], lr_muon=torch.zeros((), device=dev),
        lr_adam=torch.zeros((), device=dev),
        muon_hp={k: mg[k] for k in ("momentum", "nesterov", "ns_steps", "weight_decay",
                                    "ns_dtype")},
        adam_hp=dict(beta1=ag["betas"][0], beta2=ag["betas"][1], weight_decay=ag["weight_decay"],
                     eps=ag["eps"]))
    return opts


# --------------------------------------------------------------------------------------------------
# Runtime: device, precision and compilation, decided once per sweep

@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: typing.Optional[torch.dtype]
    compile: bool
    reason: str
    compile_optimizer: bool = False  # the whole optimizer step as one compiled call (CUDA)

    @property
    def device_name(self) -> str:
        """Which device, and which CPU: recorded timings say where they were taken."""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        if self.device.type == "cpu":
            name = cpu_capabilities().get("cpu_name") or platform.processor() or platform.machine()
            return f"cpu ({name}, {torch.get_num_threads()} threads)"
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        name = str(self.amp_dtype or torch.float32).replace("torch.", "")
        tf32 = torch.get_float32_matmul_precision() != "highest"
        if self.amp_dtype is None and self.device.type == "cuda" and tf32:
            name += " (tf32 matmuls)"  # set by whoever imported this module: llm.py leaves TF32 off
        return name

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

def cpu_capabilities() -> dict:
    """What torch detected about this CPU (instruction sets, name); empty where it cannot say."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}

def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: there bf16 autocast pays."""
    caps = cpu_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))

def amp_policy(use_amp: bool, bf16_native: bool) -> tuple[typing.Optional[torch.dtype], str]:
    """Autocast dtype on a CUDA GPU (and fp32 anywhere when use_amp is off), and why."""
    if not use_amp:
        return None, "fp32 (use_amp off: --no-use-amp or the preset)"
    if bf16_native:
        return torch.bfloat16, "bf16 autocast (the GPU supports bf16)"
    return torch.float16, "fp16 autocast with a GradScaler (the GPU has no native bf16)"

def resolve_runtime(device: str = "auto", use_amp: bool = True,
                    compile: typing.Optional[bool] = None, local_rank: int = 0) -> Runtime:
    if device == "auto":
        mps = torch.backends.mps.is_available()
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple MPS is not available; use --device cpu (or auto)")
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                        f"visible); start at most that many processes per node (--nproc-per-node)")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":  # TF32 stays off (torch's default): what runs in float32 really is
        torch.cuda.set_device(dev)
        # without the flag, pre-Ampere GPUs report (slow, emulated) bf16 as supported
        amp, why = amp_policy(use_amp, torch.cuda.is_bf16_supported(including_emulation=False))
    elif not use_amp:
        amp, why = amp_policy(False, False)
    elif dev.type == "cpu" and cpu_has_native_bf16():
        amp, why = torch.bfloat16, "bf16 autocast (the CPU has native bf16: AVX512-BF16 or AMX)"
    else:
        amp, why = None, ("fp32 (this CPU has no bf16 matmul instructions)" if dev.type == "cpu"
                          else "fp32 (MPS)")
    use_compile = dev.type == "cuda" if compile is None else compile
    why += (f"; torch.compile {'on' if use_compile else 'off'} "
            f"({'flag' if compile is not None else 'default'})")
    # On a CPU compiling the optimizer step costs about a minute for a few ms per step.
    fuse = use_compile and dev.type == "cuda" and amp != torch.float16
    return Runtime(dev, amp, use_compile, why, fuse)

def compile_backend() -> str:
    """torch.compile's backend: inductor, or $LLM_COMPILE_BACKEND (the tests use cheap ones)."""
    return os.environ.get("LLM_COMPILE_BACKEND", "inductor")

def default_dispatch(rt: Runtime) -> str:
    """"grouped" where grouped_mm runs forward and backward (tried once), else "sorted". Under
    torch.compile the grouped kernels need a bf16 GPU; on CPU they run eagerly."""
    bf16_gpu = rt.device.type == "cuda" and rt.amp_dtype == torch.bfloat16
    if GROUPED_MM is None or rt.device.type == "mps" or (rt.compile and not bf16_gpu):
        return "sorted"
    try:  # the model's exact layout: transposed (E, out, in) weights, with a backward pass
        dt = rt.amp_dtype or torch.float32
        a = torch.randn(32, 16, device=rt.device, dtype=dt, requires_grad=True)
        w = torch.randn(2, 24, 16, device=rt.device, dtype=dt, requires_grad=True)
        offs = torch.tensor([8, 32], dtype=torch.int32, device=rt.device)
        y = GROUPED_MM(a, w.transpose(-2, -1), offs=offs)
        (y * torch.randn_like(y)).sum().backward()
        return "grouped"
    except Exception as e:
        warn(f"grouped_mm does not run here ({type(e).__name__}); using the sorted per-expert loop")
        return "sorted"

class ModelCache:
    """The current architecture's model and compiled step, re-initialised for every run.

    Graphs are built once per architecture, by a warm-up before the first run (noise, loss weights
    and routing biases are buffers: changing them does not recompile). The one compile path: where
    compiling or a compiled step fails, to_eager() switches the rest of the sweep to eager. One
    architecture at a time: old graphs and CUDA-graph pools would hold GPU memory."""

    def __init__(self, rt: Runtime, quiet: bool = False, build=None):
        self.rt, self.quiet, self.build = rt, quiet, build or MoEMinimalLLM
        self.dispatch = default_dispatch(rt)
        self.key = self.model = self.fn = self.compiled = self.step_fn = None
        self.cudagraphs = False

    def get(self, cfg: MoEModelConfig, data: typing.Optional[TokenData] = None):
        """(model, fn) for cfg: fn is the model or its compiled step, called fn(idx[, targets])."""
        key = tuple(getattr(cfg, k) for k in ARCH_FIELDS) + (cfg.batch_size,)
        if key != self.key:
            self.release()
            self.key, self.model = key, self.build(cfg, self.dispatch).to(self.rt.device)
            self.fn = self.model
            if self.rt.compile and not self._compile(cfg, data):
                return self.get(cfg, data)  # now eager
        self.model.reset_parameters(cfg.seed)
        self.model.set_routing(cfg.noise_std, cfg.load_balancing_weight, cfg.router_z_loss_weight)
        for p in self.model.parameters():
            if p.grad is not None:  # kept gradients (CUDA graphs) start every run at zero
                p.grad.zero_()
        return self.model, self.fn

    def optimizers(self, model: nn.Module, cfg: MoEModelConfig) -> Optimizers:
        return build_optimizers(model, cfg, self.rt, self.step_fn, keep_grads=self.cudagraphs)

    def release(self):
        """Drop the model and compiled code, and on CUDA the graph pools and cached memory."""
        if self.compiled is not None:
            torch._dynamo.reset()  # also frees the CUDA-graph trees and their memory pools
        self.key = self.model = self.fn = self.compiled = None
        if self.rt.device.type == "cuda":
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    def to_eager(self, why: str):
        """The fallback: one warning, then eager for the rest of the sweep."""
        warn(f"{why}; running eagerly (slower) for the rest of the sweep; --no-compile skips it")
        self.release()
        self.step_fn, self.cudagraphs = None, False
        self.rt = replace(self.rt, compile=False, compile_optimizer=False)
        self.dispatch = default_dispatch(self.rt)

    def _compile(self, cfg: MoEModelConfig, data) -> bool:
        """Compile and warm up; False (after to_eager) where that fails. CUDA graphs where the step
        has static shapes: grouped dispatch (sorted slices by data-dependent sizes), no GradScaler.
        """
        import torch._dynamo
        dynamo = torch._dynamo.config  # a new architecture counts as a recompile
        dynamo.recompile_limit = max(64, dynamo.recompile_limit)
        backend, t = compile_backend(), time.perf_counter()
        graphs = self.cudagraphs = (self.rt.device.type == "cuda" and backend == "inductor"
                                    and self.dispatch == "grouped"
                                    and self.rt.amp_dtype != torch.float16)
        mode = "reduce-overhead" if graphs else None
        try:
            if self.rt.compile_optimizer and self.step_fn is None:
                self.step_fn = torch.compile(clip_muon_adamw, backend=backend)
            compiled = self.compiled = torch.compile(self.model, backend=backend, mode=mode)

            def step(idx, targets=None):
                # Contiguous inputs: training views and validation batches meet one graph instead
                # of recompiling on a stride guard. With CUDA graphs each call starts a graph step:
                # callers consume the outputs before the next call overwrites them.
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return compiled(idx.contiguous(), None if targets is None else targets.contiguous())

            self.fn = step
            self._warm_up(cfg, data)
        except Exception as e:
            self.to_eager(f"torch.compile failed ({type(e).__name__}: {first_line(e)})")
            return False
        if not self.quiet:
            print(f"torch.compile{f' ({mode})' if mode else ''}: graphs built in "
                  f"{time.perf_counter() - t:.0f} s, before the first run")
        return True

    def _warm_up(self, cfg: MoEModelConfig, data):
        """Build every graph a run uses, through the calls a run makes (a training update, an
        evaluation forward), on batches laid out as the real ones. Three rounds: CUDA-graph trees
        record on a later call than the first. get() re-initialises the model afterwards."""
        model, dev = self.model, self.rt.device
        if data is not None:
            gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(0)
            train_batch, val_x = data.sample_batch(gen), data.val[0][0]
        else:  # made the same way: two views of one (B, T+1) window, like sample_batch
            w = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len + 1), device=dev)
            train_batch, val_x = (w[:, :-1], w[:, 1:]), w[:, :-1]
        if self.cudagraphs:  # own gradients, not graph-pool outputs that the next replay overwrites
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        opt = self.optimizers(model, cfg)
        for _ in range(3):
            model.train()
            run_update(self.fn, opt, [train_batch], cfg.grad_clip, self.rt.autocast)
            model.eval()
            with torch.no_grad(), self.rt.autocast():
                self.fn(val_x)
        model.train()
        sync(self.rt)
        model.zero_grad(set_to_none=not self.cudagraphs)

def sync(rt: Runtime):
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


# --------------------------------------------------------------------------------------------------
# Train

@dataclass
class RunResult:
    """One finished run: its fields are the results CSV's columns, in order (the first ten are the
    original's). Per-layer values are lists; the sweep fills the identity fields after training."""
    seed: int
    noise_std: float
    load_balancing_weight: float
    val_loss: float
    val_accuracy: float
    val_perplexity: float
    training_time_minutes: float
    peak_memory_gb: float
    best_val_perplexity: float
    expert_usage_cv: float  # the original's: CV of the counts summed over layers
    status: str  # "ok" | "diverged"
    diverged_step: typing.Optional[int]
    steps: int
    train_tokens: int
    tokens_per_s: float
    expert_usage_cv_worst_layer: float
    dead_expert_fraction: float
    expert_load_max_mean: float
    routing_entropy: float
    expert_usage_cv_per_layer: list
    dead_expert_fraction_per_layer: list
    expert_load_max_mean_per_layer: list
    routing_entropy_per_layer: list
    expert_load_per_layer: list  # (L, E) load shares
    train_expert_usage_cv_worst_layer: float  # the last log window's batches, noise included
    train_dead_expert_fraction: float
    device: str
    dtype: str
    run_id: str = ""
    config_hash: str = ""
    data: str = ""
    data_sha256: str = ""
    config_json: str = ""

CSV_COLUMNS = tuple(f.name for f in fields(RunResult))
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # peak resident memory of the whole process: KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)

def tokens_per_update(cfg: MoEModelConfig) -> int:
    return cfg.batch_size * cfg.max_seq_len * cfg.gradient_accumulation_steps

class RunLog:
    """One run's record as it trains: running sums on the device over each log window (read back
    with one round of host syncs), its evaluations, and its metrics file (or None)."""

    def __init__(self, cfg: MoEModelConfig, device, log, bar):
        self.cfg, self.log, self.bar = cfg, log, bar
        # (4,) cross-entropy, aux, z (unweighted), correct predictions; float32 (MPS)
        self.sums = torch.zeros(4, device=device)
        self.counts = torch.zeros(cfg.n_layers, cfg.num_experts, dtype=torch.int64, device=device)
        self.first_bad = torch.zeros((), device=device)  # first update with a non-finite loss
        self.update_counts = 0  # (L, E) this update's assignments, for the bias rule
        self.micro_batches = self.updates = self.steps = 0
        self.status, self.diverged_step, self.best_ppl = "ok", None, float("inf")
        self.last_eval, self.train_routing = None, {}
        self.eval_time = self.eval_since_log = 0.0  # training time and tokens/s leave evals out
        self.t_log = time.perf_counter()

    def add(self, out: ModelOut, step: int):
        """Fold in one micro-batch's outputs, on the device (read before the next call)."""
        bad = ~torch.isfinite(out.loss.detach()) & (self.first_bad == 0)
        self.first_bad += bad.float() * step
        self.sums += torch.stack([out.ce.detach().float(), out.aux.detach().float(),
                                  out.z.detach().float(), out.correct.float()])
        self.counts += out.counts
        self.update_counts = self.update_counts + out.counts
        self.micro_batches += 1

    def write(self, record: dict):
        if self.log:
            self.log.write(json.dumps(record) + "\n")

    def log_window(self, step: int, lr: float) -> bool:
        """Read the window back, show and log it; False where the run diverged in it."""
        cfg = self.cfg
        ce, aux, z, correct = [v / self.micro_batches for v in self.sums.tolist()]
        bad, counts = int(self.first_bad.item()), self.counts.cpu().numpy().copy()
        self.sums.zero_()
        self.counts.zero_()
        now = time.perf_counter()
        tps = self.updates * tokens_per_update(cfg) / max(now - self.t_log - self.eval_since_log,
                                                          1e-9)
        self.t_log, self.eval_since_log, self.updates, self.micro_batches = now, 0.0, 0, 0
        self.train_routing = routing_metrics(counts)
        if bad:
            self.status, self.diverged_step = "diverged", bad
            self.bar.write(f"  run diverged: non-finite loss at update {bad}")
            return False
        acc = correct / (cfg.batch_size * cfg.max_seq_len)
        cv = self.train_routing["expert_usage_cv_worst_layer"]
        self.bar.set_postfix(dict(loss=f"{ce:.3f}", acc=f"{acc:.3f}", tok_s=f"{tps:,.0f}",
                                  aux=f"{aux:.3f}", cv_worst=f"{cv:.2f}"), refresh=False)
        self.bar.update(step - self.bar.n)
        self.write({"split": "train", "step": step, "loss": ce, "accuracy": acc,
                    "aux_loss_unweighted": aux,
                    "aux_loss_weighted": cfg.load_balancing_weight * aux,
                    "z_loss_unweighted": z, "z_loss_weighted": cfg.router_z_loss_weight * z,
                    "lr": lr, "tokens_per_s": tps, "routing": self.train_routing})
        return True

    def evaluate(self, fn, model, data: TokenData, rt: Runtime, step: int):
        sync(rt)
        t = time.perf_counter()
        ev = evaluate(fn, model, data, rt.autocast)
        self.last_eval, self.best_ppl = ev, min(self.best_ppl, ev.val_perplexity)
        spent = time.perf_counter() - t
        self.eval_time, self.eval_since_log = self.eval_time + spent, self.eval_since_log + spent
        if self.log:
            routing = dict(ev.routing)
            if self.cfg.balancing == "bias":
                routing["expert_bias"] = [r.expert_bias.tolist() for r in model.routers()]
            self.write({"split": "val", "step": step, "loss": ev.val_loss,
                        "accuracy": ev.val_accuracy, "perplexity": ev.val_perplexity,
                        "routing": routing})
            self.log.flush()

    def result(self, rt: Runtime, seconds: float, train_seconds: float) -> RunResult:
        cfg, nan, tr = self.cfg, float("nan"), self.train_routing
        ok = self.status == "ok" and self.last_eval is not None  # else every figure is nan
        ev = self.last_eval if ok else Evaluation(nan, nan, nan, {
            k: [] if k.endswith("_per_layer") else nan for k in ROUTING_KEYS})
        tokens = self.steps * tokens_per_update(cfg)
        return RunResult(
            seed=cfg.seed, noise_std=cfg.noise_std, load_balancing_weight=cfg.load_balancing_weight,
            val_loss=ev.val_loss, val_accuracy=ev.val_accuracy, val_perplexity=ev.val_perplexity,
            training_time_minutes=seconds / 60, peak_memory_gb=peak_memory_gb(rt.device),
            best_val_perplexity=self.best_ppl if ok else nan, status=self.status,
            diverged_step=self.diverged_step, steps=self.steps, train_tokens=tokens,
            tokens_per_s=tokens / train_seconds if train_seconds > 0 else nan,
            train_expert_usage_cv_worst_layer=tr.get("expert_usage_cv_worst_layer", nan),
            train_dead_expert_fraction=tr.get("dead_expert_fraction", nan),
            device=rt.device_name, dtype=rt.dtype_name, **{k: ev.routing[k] for k in ROUTING_KEYS})

def open_log(path: typing.Optional[Path]):
    if path is None:
        return contextlib.nullcontext()
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NOFOLLOW, 0o644), "w")

def run_update(fn, opt: Optimizers, batches: list, grad_clip: float, autocast, seen=None):
    """One optimizer update over the micro-batches, with no host sync; seen(out) gets each output
    before the next call overwrites it (CUDA graphs)."""
    for x, y in batches:
        with autocast():
            out = fn(x, y)
        opt.scaler.scale(out.loss / len(batches)).backward()
        if seen:
            seen(out)
    opt.step(grad_clip)

def train_moe_model(cfg: MoEModelConfig, data: TokenData, models: ModelCache,
                    metrics_path: typing.Optional[Path] = None, progress: bool = True) -> RunResult:
    """Train one run from its seed; a non-finite loss ends it as 'diverged'."""
    from tqdm.auto import tqdm
    model, fn = models.get(cfg, data)  # compiles only for a new architecture, before the clock
    rt = models.rt
    t_run = time.perf_counter()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    opt = models.optimizers(model, cfg)
    gen = torch.Generator(device=rt.device if rt.device.type == "cuda" else "cpu")
    gen.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and router noise
    bar = tqdm(total=cfg.max_steps, desc=f"seed {cfg.seed} noise {cfg.noise_std} lb "
               f"{cfg.load_balancing_weight}", unit="step", leave=False, disable=not progress,
               position=1, dynamic_ncols=True)
    with bar, open_log(metrics_path) as log:
        run = RunLog(cfg, rt.device, log, bar)
        t_loop = run.t_log
        for step in range(1, cfg.max_steps + 1):
            opt.set_lr(lr_multiplier(step - 1, cfg.max_steps))
            run.update_counts = 0
            batches = [data.sample_batch(gen) for _ in range(cfg.gradient_accumulation_steps)]
            run_update(fn, opt, batches, cfg.grad_clip, rt.autocast, lambda o: run.add(o, step))
            if cfg.balancing == "bias":
                model.update_routing_bias(run.update_counts, cfg.bias_update_rate)
            run.steps, run.updates = step, run.updates + 1
            last = step == cfg.max_steps
            if ((step % cfg.log_every == 0 or last)
                    and not run.log_window(step, opt.muon.param_groups[0]["lr"])):
                break
            if step % cfg.eval_every == 0 or last:
                run.evaluate(fn, model, data, rt, step)
    sync(rt)
    return run.result(rt, time.perf_counter() - t_run,
                      time.perf_counter() - t_loop - run.eval_time)

def train_with_fallback(cfg: MoEModelConfig, data: TokenData, models: ModelCache,
                        metrics_path: typing.Optional[Path], progress: bool) -> RunResult:
    """train_moe_model; where a compiled or graph-captured step raises (at any step), the sweep
    switches to eager with one warning and this run restarts from its beginning: nothing
    half-trained is kept."""
    try:
        return train_moe_model(cfg, data, models, metrics_path, progress)
    except UserError:
        raise
    except Exception as e:
        if not models.rt.compile:
            raise
        models.to_eager(f"a compiled step failed ({type(e).__name__}: {first_line(e)}); rerunning "
                        f"this run from its start")
        return train_moe_model(cfg, data, models, metrics_path, progress)

def random_batches(cfg: MoEModelConfig, device, n: int) -> list:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, cfg.max_seq_len)
    return [(torch.randint(0, cfg.vocab_size, shape, generator=g).to(device),
             torch.randint(0, cfg.vocab_size, shape, generator=g).to(device)) for _ in range(n)]

def time_training_steps(cfg: MoEModelConfig, rt: Runtime, steps: int) -> float:
    """Tokens/s of `steps` whole updates of cfg's shape on random tokens (after an untimed one)."""
    cfg = replace(cfg, vocab_size=vocab_guess(cfg))
    models = ModelCache(rt, quiet=True)
    model, fn = models.get(cfg)
    opt = models.optimizers(model, cfg)
    batches = random_batches(cfg, rt.device, cfg.gradient_accumulation_steps)
    run_update(fn, opt, batches, cfg.grad_clip, models.rt.autocast)
    sync(rt)
    t = time.perf_counter()
    for _ in range(steps):
        run_update(fn, opt, batches, cfg.grad_clip, models.rt.autocast)
    sync(rt)
    seconds = time.perf_counter() - t
    models.release()
    return steps * tokens_per_update(cfg) / seconds


# --------------------------------------------------------------------------------------------------
# Benchmark: this project's training step against the original's and a dense model's

def matmul_peak_tflops(rt: Runtime) -> tuple[float, str]:
    """Measured, not looked up: the best of a few large matmuls in the training dtype."""
    dt = rt.amp_dtype or torch.float32
    n = 8192 if rt.device.type == "cuda" else 1024
    a = torch.randn(n, n, device=rt.device, dtype=dt)
    b = torch.randn(n, n, device=rt.device, dtype=dt)
    best = float("inf")
    for _ in range(5):
        sync(rt)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(rt)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n ** 3 / best / 1e12, f"{str(dt).replace('torch.', '')} {n}x{n} matmul"

def load_reference():
    """tests/reference.py: the original's implementation and the dense ceiling."""
    import importlib.util
    path = HERE / "tests" / "reference.py"
    if not path.is_file():
        raise UserError(f"--bench needs {path} (the original's implementation, kept with the "
                        f"tests); restore the project's tests/ folder")
    sys.modules.setdefault("llm", sys.modules[__name__])  # run as a script: one llm module, not two
    spec = importlib.util.spec_from_file_location("llm_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def bench_side(name: str, cfg: MoEModelConfig, rt: Runtime, ref):
    """(runtime, fn, optimizers, what to keep alive) of one side of the benchmark."""
    if name == "original":  # eager, per-expert loop, plain loss, its optimizers and precision
        side_rt, model = ref.original_runtime(rt), ref.OriginalLLM(cfg).to(rt.device)
        model.set_routing(cfg.noise_std, cfg.load_balancing_weight, cfg.router_z_loss_weight)
        return side_rt, model, ref.original_optimizers(model, cfg, side_rt), model
    # exactly what a sweep runs (compiled on CUDA; compilation counts as warm-up)
    models = ModelCache(rt, quiet=True, build=ref.DenseLLM if name == "dense" else None)
    model, fn = models.get(cfg)
    return models.rt, fn, models.optimizers(model, cfg), models

def benchmark(cfg: MoEModelConfig, rt: Runtime, steps: int, warmup: int) -> dict:
    """Median time of whole updates (micro-batches and optimizer step) for this project's step, the
    original's (tests/reference.py) and a dense model of the same active FLOPs, in one process;
    timed updates alternate between the sides, so drift on a shared machine hits all alike."""
    cfg = replace(cfg, vocab_size=cfg.vocab_size or 49152)
    peak, peak_what = matmul_peak_tflops(rt)
    flops, tokens = estimate(cfg).flops_per_token, tokens_per_update(cfg)
    batches, accum = random_batches(cfg, rt.device, 4), cfg.gradient_accumulation_steps
    ref = load_reference()
    impls, steppers, alive = [], [], []
    for name in ("this project", "original", "dense"):
        side_rt, fn, opt, keep = bench_side(name, cfg, rt, ref)
        base_mem = 0.0
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(rt.device)
            base_mem = torch.cuda.memory_allocated(rt.device) / 1e9  # the other sides stay alive
        t = time.perf_counter()

        def step(i, fn=fn, opt=opt, side_rt=side_rt):
            micro = [batches[(i + j) % len(batches)] for j in range(accum)]
            run_update(fn, opt, micro, cfg.grad_clip, side_rt.autocast)

        for i in range(warmup):
            step(i)
        sync(rt)
        scaled = " + GradScaler" if side_rt.amp_dtype == torch.float16 else ""
        impls.append({"impl": name, "device": rt.device_name, "dtype": side_rt.dtype_name + scaled,
                      "peak_mem_gb": peak_memory_gb(rt.device) - base_mem,
                      "warmup_s": time.perf_counter() - t})
        steppers.append(step)
        alive.append(keep)
    times = [[] for _ in steppers]
    for i in range(steps):
        for k, step in enumerate(steppers):
            t = time.perf_counter()
            step(i)
            sync(rt)
            times[k].append(time.perf_counter() - t)
    for r, ts in zip(impls, times):
        step_s = float(np.median(ts))
        tflops = flops * tokens / step_s / 1e12
        r.update(step_ms=step_s * 1e3, tokens_per_s=tokens / step_s, tflops=tflops,
                 mfu=tflops / peak)
    ours, orig, dense = impls
    return {"speedup": ours["tokens_per_s"] / orig["tokens_per_s"],
            "dense_ratio": ours["tokens_per_s"] / dense["tokens_per_s"], "peak_tflops": peak,
            "peak_measured_with": peak_what, "flops_per_token": flops, "tokens_per_step": tokens,
            "gradient_accumulation_steps": accum, "dtype": rt.dtype_name, "compile": rt.compile,
            "torch": torch.__version__, "impls": impls}

def print_benchmark(res: dict):
    print(f"\nbenchmark: {res['tokens_per_step']:,} tokens per update "
          f"({res['gradient_accumulation_steps']} micro-batches), "
          f"{res['flops_per_token'] / 1e9:.3f} GFLOP/token, compile "
          f"{'on' if res['compile'] else 'off'}, torch {res['torch']}")
    print(f"peak: {res['peak_tflops']:.1f} TFLOP/s measured with a {res['peak_measured_with']} "
          f"(MFU is against this)")
    print(f"{'impl':<14}{'precision':<20}{'update ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
          f"{'peak GB':>10}{'warmup s':>10}")
    for r in res["impls"]:
        print(f"{r['impl']:<14}{r['dtype']:<20}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['tflops']:>10.2f}{r['mfu']:>8.1%}{r['peak_mem_gb']:>10.2f}"
              f"{r['warmup_s']:>10.1f}")
    print(f"speed-up over the original: {res['speedup']:.2f}x; {res['dense_ratio']:.0%} of the "
          f"dense model's tokens/s (same active FLOPs, no routing: the ceiling)")


# --------------------------------------------------------------------------------------------------
# Sweep and CSV (the statistics are report.py's)

@dataclass(frozen=True)
class SweepPlan:
    """A sweep, resolved from llm.py's arguments and never expanded: the runs are the product of the
    axes (the last, seed, varies fastest)."""
    base: MoEModelConfig  # preset + single-valued flags applied
    axes: dict  # swept field -> values, as given; noise_std, load_balancing_weight, seed last
    out: Path  # the CSV --out names
    n_runs: int  # computed from the axes

    def configs(self) -> typing.Iterator[MoEModelConfig]:
        for combo in itertools.product(*self.axes.values()):
            yield replace(self.base, **dict(zip(self.axes, combo)))  # validated by the constructor

    def design(self) -> str:
        return " x ".join(f"{len(v)} {k}" for k, v in self.axes.items())

def plan_sweep(argv: list[str]) -> SweepPlan:
    """Parse and resolve llm.py's own argument list; UserError for anything the CLI would refuse."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help prints nothing here
            args = build_parser().parse_args(list(argv))
    except SystemExit:  # --help
        raise UserError("the arguments ask for help, not for a sweep") from None
    return resolve_plan(args)

def resolve_plan(args) -> SweepPlan:
    """A field given several values is an axis, in the order given; the routing axes come last."""
    names = dict.fromkeys([*getattr(args, "given", {}), *(f.name for f in fields(MoEModelConfig))])
    axes, singles = {}, {}
    for name in names:
        if name in ROUTING_AXES or not hasattr(args, name):
            continue
        v = getattr(args, name)
        if name == "data_files":
            singles[name] = tuple(v)
        elif not isinstance(v, list):  # booleans: one value
            singles[name] = v
        elif len(check_distinct(name, v)) > 1:
            axes[name] = tuple(v)
        else:
            singles[name] = v[0]
    for name in ROUTING_AXES:
        axes[name] = tuple(check_distinct(name, getattr(args, name)))
    n_runs = math.prod(len(v) for v in axes.values())
    if n_runs > MAX_SWEEP_RUNS:
        sizes = " x ".join(str(len(v)) for v in axes.values())
        raise UserError(f"the sweep has {n_runs:,} runs ({sizes}), more than {MAX_SWEEP_RUNS:,}; "
                        f"sweep fewer values")
    base = MoEModelConfig(**{**PRESETS.get(args.preset, {}), **singles,
                             **{k: v[0] for k, v in axes.items()}})
    plan = SweepPlan(base, axes, Path(args.out), n_runs)
    for _ in plan.configs():  # every run validated before any trains (at most MAX_SWEEP_RUNS)
        pass
    return plan

def check_distinct(name: str, values: list) -> list:
    if len(set(values)) < len(values):
        raise UserError(f"{name} lists a value twice ({' '.join(map(str, values))}); list each "
                        f"value once")
    return values

def run_id_for(cfg: MoEModelConfig, axes: dict) -> str:
    """A safe file name: the routing values and numeric swept fields (never raw strings), then a
    hash of the config and the data's description; only [A-Za-z0-9._-], at most 100 characters."""
    parts = [f"n{cfg.noise_std:g}", f"lb{cfg.load_balancing_weight:g}"]
    for k in axes:
        v = getattr(cfg, k)
        if k not in ROUTING_AXES and isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{flag(k)[2:]}{v:g}")
    text = re.sub(r"[^A-Za-z0-9._-]", "", "_".join(parts + [f"s{cfg.seed}"]))
    ident = json.dumps([config_identity(cfg), data_description(cfg)], sort_keys=True)
    return f"{text[:90]}_{hashlib.sha256(ident.encode()).hexdigest()[:8]}"

def csv_value(v) -> str:
    """None: empty; floats round-trip; per-layer lists ";"-joined, a matrix's rows "|"-joined."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], (list, tuple)):
            return "|".join(csv_value(row) for row in v)
        return ";".join(f"{x:.6g}" for x in v)
    return str(v)

def read_done(path: Path) -> set[str]:
    """config_hash of every finished run in an existing CSV (a torn line is ignored, with a
    warning)."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != list(CSV_COLUMNS):
        raise UserError(f"{path} has other columns than this llm.py writes; pass --fresh to start "
                        f"a new file (the old one is kept as a backup) or choose another --out")
    done = set()
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(CSV_COLUMNS):
            warn(f"{path}: line {i} is incomplete (a run killed while writing?); ignoring it")
        elif row[CSV_COLUMNS.index("status")] in ("ok", "diverged"):
            done.add(row[CSV_COLUMNS.index("config_hash")])
    return done

def append_row(path: Path, result: RunResult):
    """Append one complete line under an exclusive lock, then fsync: concurrent ranks never
    interleave. The file is opened without following a symlink."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a+b") as f:
        with contextlib.suppress(ImportError):  # Windows: single-process sweeps only
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            writer.writerow(CSV_COLUMNS)
        else:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a torn line from a killed writer: start ours on a fresh line
                buf.write("\n")
        writer.writerow([csv_value(v) for v in asdict(result).values()])
        f.write(buf.getvalue().encode())
        f.flush()
        os.fsync(f.fileno())

class PlannedRun(typing.NamedTuple):
    cfg: MoEModelConfig  # vocab_size resolved
    config_hash: str
    run_id: str
    corpus: str  # key of its token stream in the sweep's corpora
    meta: dict  # the token stream's description (sha256, cache file, ...)

def corpus_key(cfg: MoEModelConfig) -> str:
    return json.dumps([getattr(cfg, k) for k in DATA_FIELDS])

def dist_setup() -> tuple[int, int, int]:
    """(rank, world, local_rank); under torchrun a gloo group, only for broadcast and barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if not torch.cuda.is_available():  # CPU ranks share the cores: spinning threads would fight
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get(
                "LOCAL_WORLD_SIZE", world))))
        import datetime  # runs take minutes, so waits at barriers are long
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))

def barrier(world: int):
    if world > 1:
        dist.barrier()

def plan_runs(plan: SweepPlan, local_rank: int, world: int, say) -> tuple[list, dict]:
    """Every run, resolved against its token stream, and the token streams (local rank 0 builds the
    caches; the other ranks then read them)."""
    corpora = {}
    if local_rank != 0:
        barrier(world)
    for cfg in plan.configs():
        if corpus_key(cfg) not in corpora:
            corpora[corpus_key(cfg)] = _, meta = load_and_cache_data(cfg, quiet=local_rank != 0)
            say(f"data: {meta['n_tokens']:,} tokens from {meta['n_documents']:,} documents "
                f"({meta['cache_file']})")
    if local_rank == 0:
        barrier(world)
    runs = []
    for cfg in plan.configs():
        meta = corpora[corpus_key(cfg)][1]
        cfg = replace(cfg, vocab_size=cfg.vocab_size or meta["vocab_size"])
        if meta["max_id"] >= cfg.vocab_size:
            raise UserError(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's ids "
                            f"(up to {meta['max_id']}); raise it or leave it unset")
        runs.append(PlannedRun(cfg, config_hash(cfg, meta["sha256"]), run_id_for(cfg, plan.axes),
                               corpus_key(cfg), meta))
    return runs, corpora

def split_for(run: PlannedRun, corpora: dict, splits: dict, device, say) -> TokenData:
    """The run's TokenData, one at a time (runs of one data shape are contiguous in the sweep)."""
    cfg = run.cfg
    key = (run.corpus, cfg.max_seq_len, cfg.batch_size, cfg.eval_steps)
    if key not in splits:
        splits.clear()
        splits[key] = d = TokenData.from_tokens(corpora[run.corpus][0], cfg, device)
        fewer = (f"; fewer than --eval-steps {cfg.eval_steps}, so every evaluation uses all of them"
                 if len(d.val) < cfg.eval_steps else "")
        say(f"split: train {len(d.train):,} tokens; validation {len(d.val)} batches of "
            f"{cfg.batch_size} x {cfg.max_seq_len} (the last 10%, non-overlapping){fewer}")
    return splits[key]

def runs_to_do(out: Path, runs: list[PlannedRun], rank: int, world: int, say) -> list[int]:
    """Indices of the runs not yet in the CSV; rank 0 decides, so every rank has the same list."""
    todo = [None]
    if rank == 0:
        done = read_done(out)
        todo = [[i for i, r in enumerate(runs) if r.config_hash not in done]]
        if others := len(done - {r.config_hash for r in runs}):
            say(f"note: {out} also holds {others} run(s) of other setups; the report groups by "
                f"every setting that differs")
    if world > 1:
        dist.broadcast_object_list(todo, src=0)
    if len(todo[0]) < len(runs):
        say(f"resuming {out}: {len(runs) - len(todo[0])} of {len(runs)} runs already done, "
            f"{len(todo[0])} to go")
    return todo[0]

def run_sweep(plan: SweepPlan, device: str = "auto", compile: typing.Optional[bool] = None,
              fresh: bool = False) -> int:
    rank, world, local_rank = dist_setup()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"MoE routing experiment: {plan.design()} = {plan.n_runs} runs" +
        (f" over {world} processes" if world > 1 else ""))
    for k, v in plan.axes.items():
        say(f"  {k}: {', '.join(map(str, v))}")
    if rank == 0:
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        if fresh and (plan.out.exists() or plan.out.is_symlink()):
            backup = plan.out.with_name(f"{plan.out.stem}.{time.strftime('%Y%m%d-%H%M%S')}.bak"
                                        f"{plan.out.suffix}")
            plan.out.rename(backup)
            say(f"--fresh: moved the existing {plan.out} to {backup}")
    rt = resolve_runtime(device, plan.base.use_amp, compile, local_rank)
    say(f"device: {rt.device_name}; {rt.reason}")
    runs, corpora = plan_runs(plan, local_rank, world, say)
    splits = {}
    data_of = lambda run: split_for(run, corpora, splits, rt.device, say)  # noqa: E731
    data_of(runs[0])  # fails early on a corpus too short for the first run
    todo = runs_to_do(plan.out, runs, rank, world, say)  # before compiling: a bad --out fails fast
    models = ModelCache(rt, quiet=rank != 0)
    size = estimate(runs[0].cfg)
    say(f"model: {size.params:,} parameters, {size.active_params:,} active per token; "
        f"{size.flops_per_token / 1e9:.3f} GFLOP per training token")
    say("config: " + json.dumps({k: v for k, v in asdict(runs[0].cfg).items()
                                 if k not in ROUTING_AXES}))
    both = sum(r.cfg.balancing == "bias" and r.cfg.load_balancing_weight > 0 for r in runs)
    if both:
        say(f"note: {both} run(s) with --balancing bias also add the balancing loss (--lb-weight > "
            f"0); --lb-weight 0 gives DeepSeek-V3's loss-free balancing")
    train_runs(plan, runs, todo[rank::world], models, data_of, rank, world)
    barrier(world)
    if rank == 0:
        say(f"\nresults: {plan.out}")
        print_report(plan.out)
    return 0

def train_runs(plan: SweepPlan, runs: list[PlannedRun], mine: list[int], models: ModelCache,
               data_of, rank: int, world: int):
    from tqdm.auto import tqdm
    runs_dir = plan.out.with_name(plan.out.stem + "_runs")
    t_sweep = time.perf_counter()
    with tqdm(total=len(mine) * world, desc="sweep", unit="run", position=0,
              disable=None if rank == 0 else True, dynamic_ncols=True,
              bar_format="run {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {desc}") as overall:
        for k, i in enumerate(mine):
            run = runs[i]
            run_dir = runs_dir / run.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            write_file_safely(run_dir / "config.json",
                              json.dumps(asdict(run.cfg), indent=1).encode())
            overall.set_description_str(run.run_id)
            result = train_with_fallback(run.cfg, data_of(run), models, run_dir / "metrics.jsonl",
                                         progress=rank == 0 and sys.stderr.isatty())
            r = replace(result, run_id=run.run_id, config_hash=run.config_hash,
                        data=data_description(run.cfg), data_sha256=run.meta["sha256"],
                        config_json=json.dumps(config_identity(run.cfg)))
            append_row(plan.out, r)
            eta = (time.perf_counter() - t_sweep) / (k + 1) * (len(mine) - k - 1)
            msg = (f"run {k + 1}/{len(mine)} ({run.run_id}): {r.status}, best val ppl "
                   f"{r.best_val_perplexity:.2f}, cv {r.expert_usage_cv:.3f} (worst layer "
                   f"{r.expert_usage_cv_worst_layer:.3f}), {r.training_time_minutes:.2f} min, "
                   f"{r.tokens_per_s:,.0f} tok/s; ETA {eta / 60:.1f} min")
            tqdm.write(msg) if rank == 0 else print(f"[rank {rank}] {msg}", flush=True)
            overall.update(world)

def print_report(out: Path):
    """report.py's summary and report, through its public API (imported only now: pandas, scipy)."""
    try:
        import report
    except ImportError as e:
        return warn(f"report.py cannot be imported ({e}); the results are in {out}")
    try:
        print(report.summary_text(report.summary(out)))
    except Exception as e:  # the results are saved whatever the report makes of them
        print(f"summary not available: {first_line(e)}")
    try:
        print(f"report: {report.write_report(out)}")
    except Exception as e:
        print(f"report not written: {first_line(e)}")


# --------------------------------------------------------------------------------------------------
# CLI

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, exit 2 at the CLI, nothing printed by
    plan_sweep."""

    def error(self, message):
        raise UserError(f"{message} (python llm.py --help lists the flags)")

def parse_grid_item(item: str) -> tuple[str, list]:
    """--grid FIELD=V1,V2 -> (field, typed values): FIELD's flag with those values, spelt another
    way."""
    name, sep, text = item.partition("=")
    name = name.strip().replace("-", "_")
    names = {f.name for f in fields(MoEModelConfig)}
    if not sep or not text.strip():
        raise UserError(f"--grid {item!r}: expected FIELD=V1,V2 (for example expert_top_k=1,2)")
    if name not in names:
        raise UserError(f"--grid {item!r}: unknown field {name!r}; fields: "
                        f"{', '.join(sorted(names))}")
    if name in NOT_SWEPT:
        raise UserError(f"--grid {name}: this field does not change a run's numbers or is "
                        f"per-process; set it once with {flag(name)}")
    typ = field_type(name)
    try:
        return name, [typ(v.strip()) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--grid {item!r}: values must be {typ.__name__}") from None

class Once(argparse.Action):
    """Store a field's values, from its flag or from --grid FIELD=V1,V2; a field set twice, in any
    spelling, is refused rather than silently replaced."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, spelling = self.dest, option_string
        if self.dest == "grid":
            name, values = parse_grid_item(values)
            spelling = f"--grid {name}=..."
        given = namespace.__dict__.setdefault("given", {})  # field -> spelling, in order given
        if given.get(name) == spelling:
            raise UserError(f"{spelling} is given twice; give {name} once, with all its values")
        if name in given:
            raise UserError(f"{given[name]} and {spelling} both set {name}; keep one")
        given[name] = spelling
        setattr(namespace, name, values)

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a small MoE LM over a sweep of settings; write a CSV.",
                       epilog="Every MoEModelConfig field has a flag, which overrides --preset; "
                              "several values sweep it (the runs are every combination).")
    g = p.add_argument_group("sweep")
    for name, typ, default in (("noise_std", float, [0.0, 0.1, 0.5]), ("seed", int, [42, 43, 44]),
                               ("load_balancing_weight", float, [0.01, 0.0])):
        g.add_argument(flag(name), dest=name, type=typ, nargs="+", action=Once, default=default,
                       metavar=typ.__name__[0].upper(),
                       help=f"values to sweep (default: {default})")
    g.add_argument("--grid", action=Once, metavar="FIELD=V1,V2",
                   help="a field's flag with several values, spelt another way: expert_top_k=1,2")
    g.add_argument("--preset", choices=sorted(PRESETS), help="smoke: tiny, the sample corpus, CPU")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", default=DEFAULT_CSV, metavar="CSV", help=f"default: {DEFAULT_CSV}")
    g.add_argument("--fresh", action="store_true", help="start a new CSV (keeps the old as .bak)")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on for CUDA)")
    g.add_argument("--dry-run", action="store_true", help="print every run's config; train nothing")
    g.add_argument("--json", action="store_true", help="with --dry-run: one JSON object with each "
                   "run's config, FLOPs per token, tokens, parameters and memory estimate")
    g.add_argument("--time-steps", type=int, metavar="K", help="with --dry-run --json: time K "
                   "steps of each model shape on random tokens (adds tokens_per_s)")
    g.add_argument("--bench", action="store_true", help="time the training step against the "
                   "original's and a dense model's (tests/reference.py), on random tokens")
    g.add_argument("--bench-steps", type=int, metavar="N", help="timed steps (default: 30, CPU 20)")
    g.add_argument("--bench-out", metavar="JSON", help="also write the --bench figures as JSON")
    groups = {}
    for f in fields(MoEModelConfig):
        if f.name in ROUTING_AXES:
            continue
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(f"config: {group}")
        typ, choices = field_type(f.name), f.metadata["choices"] or None
        kw = dict(action=Once, type=typ, nargs="+", choices=choices,
                  metavar=None if choices else typ.__name__.upper())
        if typ is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif f.name == "data_files":
            kw.update(type=None, metavar="PATH")
        elif f.name in NOT_SWEPT:
            del kw["nargs"]
        groups[group].add_argument(flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                                   help=f"{f.metadata['help']} (default: {f.default})", **kw)
    return p

class FlagSpec(typing.NamedTuple):
    options: tuple  # ("--lb-weight", ...)
    dest: str
    nargs: object
    metavar: typing.Optional[str]
    help: typing.Optional[str]

def flag_specs() -> list[FlagSpec]:
    """The command line's options, for tools that write or check llm.py arguments (simple_llm.py's
    plans). argparse keeps its actions private: this is the one place that reads them."""
    return [FlagSpec(tuple(a.option_strings), a.dest, a.nargs, a.metavar, a.help)
            for a in build_parser()._actions if a.option_strings]

def dry_run(plan: SweepPlan, args) -> int:
    """Print the runs (or one JSON object with their cost); nothing is trained or written."""
    if not args.json:
        print(f"dry run: {plan.n_runs} runs ({plan.design()}); nothing is trained")
        for i, cfg in enumerate(plan.configs(), 1):
            print(f"run {i}/{plan.n_runs}: {json.dumps(asdict(cfg))}")
        return 0
    speeds = {}  # tokens/s by model shape
    rt = resolve_runtime(args.device, plan.base.use_amp, args.compile) if args.time_steps else None
    runs = []
    for cfg in plan.configs():
        shape = tuple(getattr(cfg, k) for k in ARCH_FIELDS) + (cfg.batch_size,
                                                               cfg.gradient_accumulation_steps)
        if rt and shape not in speeds:
            speeds[shape] = time_training_steps(cfg, rt, args.time_steps)
        e = estimate(cfg)
        runs.append({"run_id": run_id_for(cfg, plan.axes), "config": asdict(cfg),
                     "flops_per_token": e.flops_per_token, "train_tokens": e.train_tokens,
                     "params": e.params, "memory_gb": e.memory_gb,
                     **({"tokens_per_s": speeds[shape]} if rt else {})})
    print(json.dumps({"n_runs": plan.n_runs, "out": str(plan.out),
                      "axes": {k: list(v) for k, v in plan.axes.items()}, "runs": runs}))
    return 0

def run_benchmark(plan: SweepPlan, args) -> int:
    if args.bench_out and not Path(args.bench_out).resolve().parent.is_dir():
        raise UserError(f"--bench-out {args.bench_out}: its folder does not exist")
    rt = resolve_runtime(args.device, plan.base.use_amp, args.compile)
    print(f"device: {rt.device_name}; {rt.reason}")
    cfg = replace(plan.base, noise_std=plan.axes["noise_std"][-1],
                  load_balancing_weight=plan.axes["load_balancing_weight"][0])
    res = benchmark(cfg, rt, steps=args.bench_steps or (30 if rt.device.type == "cuda" else 20),
                    warmup=10 if rt.compile else 2)
    print_benchmark(res)
    if args.bench_out:
        write_file_safely(Path(args.bench_out), json.dumps(res, indent=1).encode())
    return 0

def check_flags(args):
    if args.bench_steps is not None and args.bench_steps < 1:
        raise UserError("--bench-steps must be at least 1")
    if args.json and not args.dry_run:
        raise UserError("--json goes with --dry-run")
    if args.time_steps is not None and (args.time_steps < 1 or not args.json):
        raise UserError("--time-steps K needs K >= 1 and --dry-run --json")
    if not (args.bench or args.dry_run) and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a CSV file name")

def main(argv=None) -> int:
    out = DEFAULT_CSV
    try:
        args = build_parser().parse_args(argv)
        out = args.out
        check_flags(args)
        plan = resolve_plan(args)
        if int(os.environ.get("RANK", "0")) > 0 and (args.bench or args.dry_run):
            return 0  # under torchrun, one-off commands run on rank 0 only
        if args.bench:
            return run_benchmark(plan, args)
        if args.dry_run:
            return dry_run(plan, args)
        return run_sweep(plan, args.device, args.compile, args.fresh)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, full disk, a file where a folder should be, a symlink
        print(f"error: {e.strerror or e}: {e.filename or ''}{saved_note(out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{saved_note(out)}; rerun the same command to resume", file=sys.stderr)
        return 130

def saved_note(out: str) -> str:
    return f" (finished runs are saved in {out})" if Path(out).is_file() else ""

if __name__ == "__main__":
    sys.exit(main())
