"""A small Mixture-of-Experts language model and the routing-noise experiment built on it.

    python llm.py                     # 18 runs: noise_std {0,0.1,0.5} x lb weight {0.01,0} x seeds {42,43,44}
    python llm.py --preset smoke      # the same sweep, tiny, on the shipped sample corpus: CPU, offline, < 1 min
    python llm.py --bench             # time the training step against the original's and a dense model's
    torchrun --nproc-per-node=4 llm.py --out results.csv   # the same runs spread over 4 GPUs

Each run appends one row to the CSV as it finishes; rerunning the same command skips finished runs. After the
sweep report.py writes a markdown report with paired statistics and plots beside the CSV (`--report CSV`, or
`python report.py CSV`, rebuilds it). Sections: config, model, data, optimiser and schedule, runtime (device,
precision, compilation), train and evaluate, benchmark, sweep and CSV, CLI.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import sys
import threading
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as functional_adam  # torch's AdamW math over tensor lists (FusedUpdate)

import report
from report import DEFAULT_CSV, FIRST_COLUMNS, LATER_FIELDS, RESULT_NEUTRAL, TAIL_COLUMNS

HERE = Path(__file__).resolve().parent
SAMPLE_CORPUS = HERE / "data_cache" / "sample_corpus.txt"
DOC_CHARS = 3000  # each document is cut to its first 3000 characters, as in the original
CACHE_FORMAT = 1  # bump when the token cache layout changes


class UserError(Exception):
    """Bad input or environment: main() prints it as one line and exits 2."""


def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Config

def _f(default, group: str, help: str, choices: tuple = (), **kw):
    return field(default=default, metadata={"group": group, "help": help, "choices": choices}, **kw)


@dataclass
class MoEModelConfig:
    # model
    d_model: int = _f(384, "model", "hidden size")
    n_heads: int = _f(8, "model", "attention heads (d_model must divide evenly)")
    n_layers: int = _f(6, "model", "transformer blocks")
    d_ff: int = _f(1536, "model", "hidden size of each expert's feed-forward layer")
    num_experts: int = _f(8, "model", "experts per MoE layer")
    expert_top_k: int = _f(2, "model", "experts each token is routed to")
    dropout: float = _f(0.1, "model", "dropout on embeddings, residual branches, attention and expert hidden")
    vocab_size: typing.Optional[int] = _f(None, "model", "vocabulary size; default: the tokenizer's")
    # routing (swept: set with --noise-std / --lb-weight)
    noise_std: float = _f(0.1, "routing", "std of Gaussian noise added to router logits in training")
    load_balancing_weight: float = _f(0.01, "routing", "weight of the load-balancing loss (0 = off)")
    router_z_loss_weight: float = _f(0.0, "routing", "weight of the router z-loss (ST-MoE: mean squared logsumexp "
                                                     "of the router logits, summed over layers; 1e-3 usual; 0 = off)")
    balancing: str = _f("loss", "routing", "'loss': only the balancing loss (weight --lb-weight); 'bias': also "
                                           "DeepSeek-V3's per-expert routing bias (use --lb-weight 0 for its "
                                           "loss-free form)", choices=("loss", "bias"))
    bias_update_rate: float = _f(1e-3, "routing", "with --balancing bias: how far each update moves every "
                                                  "expert's bias toward even load")
    # training
    batch_size: int = _f(24, "training", "sequences per micro-batch")
    max_steps: int = _f(400, "training", "optimizer updates per run")
    gradient_accumulation_steps: int = _f(1, "training", "micro-batches per update")
    muon_lr: float = _f(0.01, "training", "Muon learning rate (AdamW uses a tenth of it)")
    weight_decay: float = _f(0.1, "training", "AdamW weight decay (Muon uses none, as the original)")
    grad_clip: float = _f(1.0, "training", "gradient-norm clip (0 = off)")
    use_amp: bool = _f(True, "training", "mixed precision: bf16 where the GPU or CPU has native bf16, fp16 with a "
                                         "GradScaler on older GPUs")
    eval_every: int = _f(50, "training", "evaluate every N updates, and always after the last (8 evaluations "
                                         "at the default 400: the curve shows over-fitting, best vs final)")
    eval_steps: int = _f(100, "training", "validation batches per evaluation (fewer if the split is smaller)")
    log_every: int = _f(10, "training", "read training metrics back from the device every N updates")
    seed: int = _f(42, "training", "seed for weights, batches, dropout and noise (swept: --seeds)")
    # data
    max_seq_len: int = _f(512, "data", "tokens per training window")
    num_documents: int = _f(2000, "data", "documents read from the corpus")
    max_tokens: int = _f(500_000, "data", "tokens kept from those documents")
    dataset: str = _f("HuggingFaceTB/smollm-corpus", "data", "Hugging Face dataset id ('random': random tokens, "
                                                              "for timing only)")
    dataset_config: str = _f("cosmopedia-v2", "data", "dataset configuration")
    data_files: tuple = _f((), "data", "local .txt/.jsonl/.json/.parquet files instead of the hub dataset")
    tokenizer: str = _f("HuggingFaceTB/SmolLM-135M", "data", "hub id, local tokenizer folder, or 'bytes'")
    cache_dir: str = _f("data_cache", "data", "where tokenized corpora are cached")
    # computed, not constructor arguments
    d_k: int = field(init=False, repr=False)

    def __post_init__(self):
        self.data_files = tuple(str(p) for p in self.data_files)
        self.validate()
        self.d_k = self.d_model // self.n_heads

    def validate(self):
        positive = ("d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "batch_size",
                    "max_steps", "gradient_accumulation_steps", "eval_every", "eval_steps", "log_every",
                    "max_seq_len", "num_documents", "max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1 (got {getattr(self, name)})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserError(f"--d-model {self.d_model} must split into --n-heads {self.n_heads} heads of even "
                            f"size (rotary embeddings rotate pairs); try --d-model {self.n_heads * 64}")
        if self.expert_top_k > self.num_experts:
            raise UserError(f"--expert-top-k {self.expert_top_k} is larger than --num-experts "
                            f"{self.num_experts}; choose top-k <= experts")
        for name in ("noise_std", "load_balancing_weight", "router_z_loss_weight", "bias_update_rate", "muon_lr",
                     "weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"--{_flag(name)} must be a finite number >= 0 (got {getattr(self, name)})")
        if not 0 <= self.seed < 2 ** 63:
            raise UserError(f"--seeds must be in [0, 2**63) (got {self.seed})")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1) (got {self.dropout})")
        for f in fields(self):
            if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]:
                raise UserError(f"--{_flag(f.name)} must be one of {', '.join(f.metadata['choices'])} "
                                f"(got {getattr(self, f.name)!r})")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise UserError(f"--vocab-size must be at least 2 (got {self.vocab_size})")


SWEPT = ("noise_std", "load_balancing_weight", "seed")  # set per run by the sweep, not by single-value flags
NOT_GRIDDABLE = RESULT_NEUTRAL + ("use_amp", "data_files")  # per process, or not part of a run's identity
DATA_FIELDS = ("dataset", "dataset_config", "data_files", "tokenizer", "num_documents", "max_tokens")

PRESETS = {
    # Tiny model, byte tokenizer and the shipped sample corpus: the whole 18-run sweep in under a minute on CPU.
    # fp32: at this size bf16's casts cost more than its matmuls save (17 s against 31 s for the sweep, measured
    # on a 2-core EPYC with native bf16).
    "smoke": dict(tokenizer="bytes", data_files=(str(SAMPLE_CORPUS),), d_model=64, n_heads=4, n_layers=2,
                  d_ff=128, batch_size=8, max_seq_len=64, max_steps=30, eval_every=10, eval_steps=4,
                  log_every=5, num_documents=1000, max_tokens=100_000, use_amp=False),
}


def _flag(name: str) -> str:
    """The command-line spelling of a config field (without the leading --)."""
    return {"load_balancing_weight": "lb-weight", "seed": "seeds"}.get(name, name.replace("_", "-"))


def config_hash(config: MoEModelConfig, tokens_sha256: str = "") -> str:
    """Identity of a run: every result-affecting field plus the tokens' content hash (not the files' paths,
    which change with a checkout or a copy), so resume never mixes setups and works across machines. Fields
    added later (report.LATER_FIELDS) count only away from their old value, so earlier rows still resume."""
    d = {k: v for k, v in asdict(config).items() if k not in RESULT_NEUTRAL + ("d_k", "data_files")
         and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    return hashlib.sha256(json.dumps([d, tokens_sha256], sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Model

class Rotary(nn.Module):
    """Rotary position embedding, interleaved-pair convention (dims 2i and 2i+1 rotate together), base 10000."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
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
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        q, k = self.rotary(q), self.rotary(k)
        # SDPA picks the fastest kernel available (flash / memory-efficient on GPU) for causal attention.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.w_o(y.transpose(1, 2).reshape(B, T, C))


class TopKRouter(nn.Module):
    """Linear gate in float32; noise on the logits only in training; top-k of logits + bias picks the experts,
    a softmax over the k chosen (unbiased) logits combines them."""

    def __init__(self, d_model: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Buffers, not Python floats or parameters: changing them between runs or updates must not recompile the
        # graph, and the bias is set by the balancing rule (update_routing_bias), never by gradients.
        self.register_buffer("noise_std", torch.zeros(()), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=False)  # (E,); 0 for "loss"

    def forward(self, x):  # x (N, C) -> combine weights (N, k), experts (N, k), probs (N, E), z-loss ()
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E) float32
            if self.training:
                logits = logits + torch.randn_like(logits) * self.noise_std
            probs = logits.softmax(dim=-1)  # (N, E) full softmax, for the balancing loss
            # DeepSeek-V3's bias steers only the choice; the weights stay the router's own (all zero: plain top-k).
            top_idx = (logits + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
            top_w = logits.gather(-1, top_idx).softmax(dim=-1)  # (N, k) combine weights
            # ST-MoE's z-loss, on the logits this routing used (noisy in training), as the balancing loss's probs:
            # it keeps the logits that pick and weigh the experts small.
            z = logits.logsumexp(dim=-1).square().mean()
        return top_w, top_idx, probs, z


@torch.no_grad()
def update_routing_bias(bias, counts, rate: float):
    """DeepSeek-V3's balancing step, in place: bias (..., E) += rate * sign(mean load - load), then centred (a
    shift common to all experts changes no top-k choice, so centring only stops the values drifting).
    counts (..., E): assignments per expert in the update just taken."""
    load = counts.float()  # (..., E)
    bias += rate * torch.sign(load.mean(dim=-1, keepdim=True) - load)
    bias -= bias.mean(dim=-1, keepdim=True)


def load_balancing_loss(probs, counts, n_assignments: int):
    """num_experts * sum_i f_i * P_i: f_i = share of (token, slot) assignments to expert i, P_i = mean prob.
    Perfectly balanced routing gives 1.0."""
    f = counts.float() / n_assignments  # (E,)
    return probs.size(-1) * (f * probs.mean(dim=0)).sum()


def compute_dtype(x) -> torch.dtype:
    """The dtype autocast would run a matmul on x in (x's own dtype outside autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def grouped_mm(a, b, offs):
    """a (M, K) rows sorted by group, b (G, K, N), offs (G,) int32 group ends -> (M, N)."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def dropout(x, p: float, training: bool):
    """Inverted dropout, as F.dropout; on CPU the mask comes from torch.rand, which is faster there.

    Measured on a 2-core AMD EPYC (torch 2.13): F.dropout's bernoulli_ draws at about 6 ns per element, torch.rand
    at about 3 ns, and dropout is over a tenth of the CPU training step. Same distribution: each element is kept
    with probability 1 - p and scaled by 1 / (1 - p). GPUs keep F.dropout (one fused kernel)."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return torch.where(torch.rand(x.shape, device=x.device) >= p, x * (1 / (1 - p)), 0)


class Dropout(nn.Dropout):
    """nn.Dropout through dropout() above; the reference model ("loop" dispatch) keeps nn.Dropout's kernel."""
    fast = True

    def forward(self, x):
        return dropout(x, self.p, self.training) if self.fast else super().forward(x)


class MixtureOfExperts(nn.Module):
    """Dropless top-k MoE. Expert weights are stacked (E, out, in) so all experts run as one grouped matmul.

    dispatch: "grouped" sorts token copies by expert and runs two grouped GEMMs with no host sync; "sorted" is
    the same sort with a Python loop over experts (one sync per layer), where grouped_mm cannot run (see
    default_dispatch); "loop" mirrors the original (boolean mask per expert, a host sync per expert) and is
    the reference the tests and the benchmark compare against.
    """

    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.num_experts, self.top_k, self.dropout = cfg.num_experts, cfg.expert_top_k, cfg.dropout
        self.router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.expert_top_k)
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_ff, cfg.d_model))  # (E, d_ff, C)
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.d_ff))  # (E, C, d_ff)
        self.dispatch = "sorted"  # ModelCache sets what default_dispatch picks for the device

    def _expert_ffn(self, xs, e: int, dt):  # xs (n, C) -> (n, C): one expert, as the original's Expert
        drop = F.dropout if self.dispatch == "loop" else dropout
        h = drop(F.silu(xs @ self.w1[e].to(dt).T), self.dropout, self.training)
        return h @ self.w2[e].to(dt).T

    def forward(self, x):  # x (B, T, C) -> out (B, T, C), aux loss (), z-loss (), counts (E,)
        B, T, C = x.shape
        N, k, E = B * T, self.top_k, self.num_experts
        x_flat = x.reshape(N, C)
        top_w, top_idx, probs, z = self.router(x_flat)  # (N, k), (N, k), (N, E), ()
        flat_idx = top_idx.reshape(-1)  # (N*k,) expert of each token copy
        # scatter_add instead of bincount: bincount sizes its output from the data and would sync with the host.
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat_idx,
                                                                                  torch.ones_like(flat_idx))
        aux = load_balancing_loss(probs, counts, N * k)
        dt = compute_dtype(x)  # grouped_mm is not on autocast's cast lists: cast by hand
        if self.dispatch == "loop":
            return self._forward_loop(x_flat, top_w, top_idx, dt).view(B, T, C), aux, z, counts
        order = flat_idx.argsort(stable=True)  # (N*k,) copies grouped by expert
        xs = x_flat[order // k].to(dt)  # (N*k, C) each copy's token
        if self.dispatch == "grouped":
            offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
            h = grouped_mm(xs, self.w1.to(dt).transpose(-2, -1), offs)  # (N*k, d_ff)
            h = dropout(F.silu(h), self.dropout, self.training)
            ys = grouped_mm(h, self.w2.to(dt).transpose(-2, -1), offs)  # (N*k, C)
        else:
            ends = counts.cumsum(0).tolist()
            ys = torch.cat([self._expert_ffn(xs[s:e_], e, dt) for e, (s, e_) in enumerate(zip([0] + ends, ends))])
        # Un-sort with a gather (deterministic, unlike index_add's atomics), then weight and sum the k copies.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=x.device))
        y = ys[inverse].view(N, k, C).float()  # (N, k, C) in token order
        out = (y * top_w.unsqueeze(-1)).sum(dim=1)  # (N, C) float32 accumulation
        return out.to(x.dtype).view(B, T, C), aux, z, counts

    def _forward_loop(self, x_flat, top_w, top_idx, dt):
        out = torch.zeros(x_flat.shape, dtype=torch.float32, device=x_flat.device)
        for e in range(self.num_experts):
            mask = top_idx == e  # (N, k)
            rows = mask.any(dim=-1)  # (N,)
            if rows.any():  # the original's per-expert host sync
                w = (top_w * mask).sum(dim=-1)[rows]  # (n,) this expert's combine weight per token
                out[rows] += w.unsqueeze(-1) * self._expert_ffn(x_flat[rows].to(dt), e, dt).float()
        return out.to(x_flat.dtype)


# Logits alive at once in the fused loss. On a GPU, big chunks keep the matmuls large (2**27: 512 MB in fp32).
# On a CPU, chunks that stay in cache are faster: measured on a 2-core EPYC at 1024 x 8192 logits, bf16, the loss
# with its gradients took 41 ms in chunks of 128 rows (2**20 logits) against 55 ms in one chunk (fp32: no change).
CE_CHUNK_LOGITS = 2 ** 27
CE_CHUNK_LOGITS_CPU = 2 ** 20


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ W.T, plus the count of correct top-1 predictions, in row chunks.

    Hand-written because torch has no fused linear + cross-entropy: the plain form stores (N, V) logits
    (1.2 GB in bf16 at the default shape, twice that in fp32 for the loss) and its log-softmax backward is a
    slow separate pass. Here each chunk's gradient (softmax - one-hot) is formed while its logits exist and
    only grad_h (N, C) and grad_W (V, C) are kept; backward just scales them. Checked against F.cross_entropy
    in tests/test_llm.py."""

    @staticmethod
    def forward(ctx, h, W, targets, compute_dtype, need_grad: bool):  # h (N, C), W (V, C), targets (N,)
        N, V = h.size(0), W.size(0)
        chunk = max(1, (CE_CHUNK_LOGITS_CPU if h.device.type == "cpu" else CE_CHUNK_LOGITS) // V)  # rows per chunk
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
            if need_grad:
                g = logp.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logp.dtype))  # softmax - one-hot
                g = g.to(compute_dtype)
                grad_h[s:s + chunk] = g @ Wc / N  # the 1/N of the mean goes on the small (n, C) side
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
        return grad_h * grad_loss.to(grad_h.dtype), (grad_W * grad_loss).to(ctx.w_dtype), None, None, None


class MoETransformerBlock(nn.Module):
    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attention = MultiHeadAttention(cfg)
        self.feed_forward = MixtureOfExperts(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x):  # x (B, T, C)
        x = x + self.dropout(self.attention(self.norm1(x)))
        moe_out, aux, z, counts = self.feed_forward(self.norm2(x))
        return x + self.dropout(moe_out), aux, z, counts


class MoEMinimalLLM(nn.Module):
    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        assert cfg.vocab_size, "vocab_size is resolved from the data before the model is built"
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MoETransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied
        # Buffers: no recompiles per run.
        self.register_buffer("lb_weight", torch.zeros(()), persistent=False)
        self.register_buffer("z_weight", torch.zeros(()), persistent=False)
        self.fused_ce = True
        self.reset_parameters(cfg.seed)

    def reset_parameters(self, seed: int):
        """Same seed, same weights: runs of one seed start identical in every condition."""
        torch.manual_seed(seed)
        for name, p in self.named_parameters():  # named_parameters visits the tied weight once
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.ones_(p)  # RMSNorm gains
        for m in self.modules():  # a bias learnt in the previous run must not steer this one
            if isinstance(m, TopKRouter):
                m.expert_bias.zero_()

    def set_routing(self, noise_std: float, load_balancing_weight: float, router_z_loss_weight: float = 0.0):
        self.lb_weight.fill_(load_balancing_weight)
        self.z_weight.fill_(router_z_loss_weight)
        for block in self.blocks:
            block.feed_forward.router.noise_std.fill_(noise_std)

    def update_routing_bias(self, counts, rate: float):
        """counts (L, E): the last update's assignments per layer; see update_routing_bias."""
        for block, c in zip(self.blocks, counts):
            update_routing_bias(block.feed_forward.router.expert_bias, c, rate)

    def set_dispatch(self, dispatch: str):
        """"grouped" / "sorted" (fast paths) or "loop" (the original's, which also uses the plain loss)."""
        self.fused_ce = dispatch != "loop"
        for m in self.modules():
            if isinstance(m, Dropout):
                m.fast = dispatch != "loop"
        for block in self.blocks:
            block.feed_forward.dispatch = dispatch

    def forward(self, idx, targets):
        """idx, targets (B, T) -> loss (), cross-entropy (), aux loss (), z-loss (), routing counts (L, E),
        correct (). aux and z are unweighted sums over layers; loss = ce + lb_weight * aux + z_weight * z."""
        x = self.dropout(self.token_embedding(idx) * math.sqrt(self.cfg.d_model))  # (B, T, C)
        aux_total, z_total, layer_counts = 0.0, 0.0, []
        for block in self.blocks:
            x, aux, z, counts = block(x)
            aux_total, z_total = aux_total + aux, z_total + z
            layer_counts.append(counts)
        h = self.dropout(self.norm(x)).flatten(0, 1)  # (B*T, C)
        y = targets.flatten()  # (B*T,)
        dt = compute_dtype(h)
        # fp16 would underflow the fused loss's per-token gradients before the GradScaler can scale them up.
        if self.fused_ce and dt != torch.float16:
            need_grad = torch.is_grad_enabled() and (h.requires_grad or self.lm_head.weight.requires_grad)
            ce, correct = LinearCrossEntropy.apply(h, self.lm_head.weight, y, dt, need_grad)
        else:  # the plain form, as the original: kept as the reference
            logits = self.lm_head(h)  # (B*T, V)
            ce = F.cross_entropy(logits.float(), y)
            correct = (logits.argmax(dim=-1) == y).sum()
        loss = ce + self.lb_weight * aux_total + self.z_weight * z_total
        return loss, ce, aux_total, z_total, torch.stack(layer_counts), correct


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): a token uses top_k of num_experts experts."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    expert = sum(b.feed_forward.w1.numel() + b.feed_forward.w2.numel() for b in model.blocks)
    return total, total - expert + expert * cfg.expert_top_k // cfg.num_experts


def flops_per_token(cfg: MoEModelConfig) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6 x active matmul weights + attention scores."""
    per_layer = 4 * cfg.d_model ** 2 + cfg.d_model * cfg.num_experts + 2 * cfg.expert_top_k * cfg.d_model * cfg.d_ff
    matmul_weights = cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.d_model * cfg.max_seq_len


def expert_usage_cv(counts) -> float:
    """Coefficient of variation of per-expert counts: population std / mean (0 = perfectly balanced)."""
    c = np.asarray(counts, dtype=np.float64)
    return float(c.std() / c.mean()) if c.mean() > 0 else float("nan")


DEAD_SHARE = 0.1  # an expert given under a tenth of its fair share (1/E) of the assignments counts as dead


def routing_metrics(counts) -> dict:
    """Load statistics of routing counts (L, E) ((token, slot) assignments per layer and expert), per layer and
    overall. Overall CV is of the counts summed over layers (as the original); the other overall figures are
    means of the per-layer ones. max/mean load: 1 = even, E / top_k at worst; entropy of the load shares over
    log E: 1 = even; dead: fraction of experts under DEAD_SHARE of the fair share."""
    from scipy.stats import entropy  # handles 0 log 0 and normalises
    c = np.asarray(counts, dtype=np.float64)  # (L, E)
    L, E = c.shape
    share = c / c.sum(axis=1, keepdims=True)  # (L, E), each row sums to 1
    max_mean = share.max(axis=1) * E  # (L,) max load over mean load (the mean share is 1 / E)
    ent = entropy(share, axis=1) / math.log(E) if E > 1 else np.ones(L)  # (L,)
    dead = (share < DEAD_SHARE / E).mean(axis=1)  # (L,)
    return {"expert_usage_cv": expert_usage_cv(c.sum(axis=0)),
            "expert_load_max_mean": float(max_mean.mean()), "routing_entropy": float(ent.mean()),
            "dead_expert_fraction": float(dead.mean()),
            "expert_usage_cv_per_layer": [expert_usage_cv(row) for row in c],
            "expert_load_max_mean_per_layer": max_mean.tolist(), "routing_entropy_per_layer": ent.tolist(),
            "dead_expert_fraction_per_layer": dead.tolist(), "expert_load_per_layer": share.tolist()}


# ------------------------------------------------------------------------------------------------------------
# Data

class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): needs no files and no network."""
    vocab_size = 256

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick HTTP probe, so an offline user hears so in seconds rather than after the hub client's retries.

    A request, not just a TCP connect: a server (or middlebox) that accepts and then stays silent must count as
    unreachable, or the hub client would wait on it for minutes. Any HTTP answer, even an error status, counts."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let the hub client try
    import urllib.error
    import urllib.request
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    ok = []

    def probe():  # in a thread: name resolution itself has no timeout
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:  # the server answered: it is there
            ok.append(True)
        except (OSError, ValueError):  # refused, timed out, no route, no name, a malformed URL
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(ok)


OFFLINE_HINT = ("to work offline use --data-files FILE [FILE ...] with --tokenizer bytes (or a local tokenizer "
                "folder), or --preset smoke")


def load_tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as e:
        raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}); {OFFLINE_HINT}") from None


def _data_files(cfg: MoEModelConfig) -> list[dict]:
    out = []
    for p in cfg.data_files:
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"data file not found: {p}; pass existing .txt/.jsonl/.json/.parquet files")
        if path.stat().st_size == 0:
            raise UserError(f"data file is empty: {p}; pass files that contain text")
        st = path.stat()
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def data_key(cfg: MoEModelConfig) -> dict:
    """Everything the token stream depends on; the cache file name is its hash."""
    files = _data_files(cfg)
    return {"format": CACHE_FORMAT, "dataset": None if files else cfg.dataset,
            "dataset_config": None if files else cfg.dataset_config, "files": files, "tokenizer": cfg.tokenizer,
            "num_documents": cfg.num_documents, "max_tokens": cfg.max_tokens, "doc_chars": DOC_CHARS}


def _iter_documents(cfg: MoEModelConfig, files: list[dict]):
    from datasets import load_dataset
    if files:
        suffixes = {Path(f["path"]).suffix.lower() for f in files}
        builder = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        kinds = {builder.get(s) for s in suffixes}
        if None in kinds or len(kinds) > 1:
            raise UserError(f"--data-files must all be one kind: .txt/.md, .jsonl/.json or .parquet (got "
                            f"{', '.join(sorted(suffixes))})")
        kind = kinds.pop()
        # Plain text: one document per paragraph (blank-line separated), not per line or per file.
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=[f["path"] for f in files], split="train", streaming=True, **extra)
    else:
        ds = load_dataset(cfg.dataset, cfg.dataset_config, split="train", streaming=True)
    for row in ds:
        if "text" not in row:
            raise UserError(f"the data has no 'text' column (columns: {', '.join(row)}); provide a 'text' field")
        if row["text"] and row["text"].strip():
            yield row["text"][:DOC_CHARS]


def load_and_cache_data(cfg: MoEModelConfig, quiet: bool = False) -> tuple[np.ndarray, dict]:
    """Token stream for cfg, from data_cache/ when present (no network), else built and cached.

    The cache is a plain .npy array plus a JSON sidecar with the key; anything unreadable or mismatched is
    rebuilt with a warning, never trusted."""
    key = data_key(cfg)
    if cfg.dataset == "random" and not cfg.data_files:  # uniform random tokens: for timing on machines with no data
        vocab = cfg.vocab_size or 49152
        tokens = np.random.default_rng(0).integers(0, vocab, cfg.max_tokens).astype(
            np.uint16 if vocab <= 65536 else np.int32)
        meta = {"key": key, "n_tokens": cfg.max_tokens, "n_documents": 0, "vocab_size": vocab}
        return tokens, _describe(tokens, meta, Path("random tokens, not cached"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir)
    npy, meta_path = cache / f"tokens_{digest}.npy", cache / f"tokens_{digest}.json"
    if npy.exists() or meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            tokens = np.load(npy, allow_pickle=False)
            if meta.get("key") != key or len(tokens) != meta["n_tokens"] or tokens.ndim != 1:
                raise ValueError("contents do not match the sidecar")
            return tokens, _describe(tokens, meta, npy)
        except Exception as e:
            warn(f"token cache {npy} is unreadable or mismatched ({type(e).__name__}: {e}); rebuilding it")

    files = key["files"]
    needs_hub = not files or cfg.tokenizer != "bytes" and not Path(cfg.tokenizer).expanduser().exists()
    if needs_hub and not _hub_reachable():
        # Set before datasets / huggingface_hub are imported: they read it once, and then fail in about a second.
        os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    chunks, n, n_docs, batch = [], 0, 0, []
    from tqdm.auto import tqdm
    source = cfg.dataset if not files else f"{len(files)} local file(s)"
    bar = tqdm(total=cfg.max_tokens, desc=f"tokenizing {source}", unit="tok", disable=quiet, leave=False)

    def flush():  # the fast tokenizers parallelise over a batch of documents
        nonlocal n
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray(ids, dtype=np.int64))
            n += len(ids)
            bar.update(len(ids))
        batch.clear()

    try:
        for text in itertools.islice(_iter_documents(cfg, files), cfg.num_documents):
            batch.append(text)
            n_docs += 1
            if len(batch) == 256:
                flush()
                if n >= cfg.max_tokens:
                    break
        if batch:
            flush()
    except UserError:
        raise
    except Exception as e:
        where = "the data files" if files else f"dataset {cfg.dataset}/{cfg.dataset_config}"
        hint = "" if files else f"; {OFFLINE_HINT}"
        raise UserError(f"cannot read {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}{hint}") from None
    finally:
        bar.close()
    if n == 0:
        raise UserError("the corpus produced no tokens; check --data-files / --dataset")
    tokens = np.concatenate(chunks)[: cfg.max_tokens]
    tokens = tokens.astype(np.uint16 if vocab <= 65536 else np.int32)
    meta = {"key": key, "n_tokens": int(len(tokens)), "n_documents": n_docs, "vocab_size": int(vocab),
            "dtype": str(tokens.dtype), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(f".{os.getpid()}.tmp.npy")  # write then rename: a killed build leaves no half file
    np.save(tmp, tokens)
    os.replace(tmp, npy)
    tmp_meta = meta_path.with_suffix(f".{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return tokens, _describe(tokens, meta, npy)


def _describe(tokens: np.ndarray, meta: dict, npy: Path) -> dict:
    """Add what is derived from the tokens themselves: their content hash identifies the data in a run's
    config_hash (file paths and modification times would change with every checkout or copy)."""
    return {**meta, "cache_file": str(npy), "max_id": int(tokens.max()),
            "sha256": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()}


@dataclass
class TokenData:
    """Train stream and fixed validation batches on the device.

    The last 10% of the stream is held out. Validation windows tile it without overlap (stride T+1), so no
    validation token is ever a training token; training windows are drawn at random from the first 90%."""
    train: torch.Tensor  # (N_train,) int64
    val: list  # [(x (B, T), y (B, T))], the same for every run and every evaluation
    seq_len: int
    batch_size: int

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, cfg: MoEModelConfig, device) -> "TokenData":
        T, B = cfg.max_seq_len, cfg.batch_size
        n_val = len(tokens) // 10
        n_train = len(tokens) - n_val
        need = B * (T + 1)
        if n_val < need or n_train < need:
            raise UserError(f"the corpus has {len(tokens):,} tokens, too few for one training batch and one "
                            f"validation batch of {B} x {T + 1} (the last 10% is held out): need at least "
                            f"{10 * need:,}; add data, or lower --batch-size / --max-seq-len")
        t = torch.from_numpy(tokens.astype(np.int64))
        n_windows = n_val // (T + 1)
        n_batches = min(cfg.eval_steps, n_windows // B)
        windows = t[n_train:n_train + n_batches * B * (T + 1)].view(n_batches, B, T + 1)
        val = [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]
        return cls(train=t[:n_train].to(device), val=val, seq_len=T, batch_size=B)

    def sample_batch(self, gen: torch.Generator):  # -> x, y (B, T) on the device, no host round trip
        T = self.seq_len
        starts = torch.randint(0, len(self.train) - T, (self.batch_size, 1), generator=gen,
                               device=gen.device)  # (B, 1)
        idx = starts.to(self.train.device) + torch.arange(T + 1, device=self.train.device)  # (B, T+1)
        w = self.train[idx]
        return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------------------------------------
# Optimiser and schedule

def zeropower_via_newtonschulz(G, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                               dtype=torch.bfloat16):
    """Orthogonalise each matrix of G (..., A, B) with the quintic Newton-Schulz iteration, batched."""
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    # One matrix stays 2-D (addmm: on CPU a batch-of-one bmm was measured slower than mm); a stack becomes
    # (M, A, B) for the fused batched multiply-adds.
    madd = torch.addmm if X.ndim == 2 else torch.baddbmm
    X = X if X.ndim == 2 else X.reshape(-1, *X.shape[-2:])
    for _ in range(steps):
        gram = X @ X.mT  # (M, A, A)
        update = madd(gram, gram, gram, beta=b, alpha=c)  # b*gram + c*gram@gram
        X = madd(X, update, X, beta=a)  # a*X + update@X
    X = X.view(*G.shape[:-2], *X.shape[-2:])
    return X.mT if transposed else X


def _add_scaled(p, o, scale):
    """p -= scale * o, where scale is a float (eager) or a device tensor (the compiled update's lr)."""
    if isinstance(scale, torch.Tensor):
        p.sub_(o.to(p.dtype) * scale)
    else:
        p.add_(o.to(p.dtype), alpha=-scale)


def muon_update(params, grads, bufs, lr, momentum: float, nesterov: bool, ns_steps: int, weight_decay: float,
                ns_dtype, batched: bool = True, ns=zeropower_via_newtonschulz):
    """One Muon step over lists of matrices (p, grad, momentum buffer); lr is a float or a device tensor.

    batched: bucket by shape up to a transpose, orienting each matrix wide (rows <= cols): orthogonalising a
    transpose gives the transpose, so an expert's w1 (d_ff, C) and w2 (C, d_ff) share one Newton-Schulz call.
    Not batched: one matrix at a time, as the original's loop over its nn.Linear weights."""
    buckets: dict = {}
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        rows, cols = p.shape[-2:]
        scale = lr * math.sqrt(max(1.0, rows / cols))
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        if not batched:
            for m, u in zip(p.view(-1, rows, cols), update.reshape(-1, rows, cols)):  # (rows, cols) each
                _add_scaled(m, ns(u, ns_steps, dtype=ns_dtype), scale)
            continue
        flip = rows > cols
        update = update.reshape(-1, rows, cols)  # (n, rows, cols)
        buckets.setdefault((min(rows, cols), max(rows, cols)), []).append(
            (p, update.mT if flip else update, flip, scale))
    for items in buckets.values():
        ortho = ns(torch.cat([u for _, u, _, _ in items]), ns_steps, dtype=ns_dtype)  # (M, small, large)
        offset = 0
        for p, u, flip, scale in items:
            o = ortho[offset:offset + len(u)]
            offset += len(u)
            _add_scaled(p, (o.mT if flip else o).reshape(p.shape), scale)


class Muon(torch.optim.Optimizer):
    """Muon (momentum, Nesterov, Newton-Schulz orthogonalised update scaled by sqrt(max(1, rows/cols))).

    Written here rather than using torch.optim.Muon because that one takes 2-D parameters only and
    orthogonalises one matrix at a time: the 96 expert matrices of the default model would be 96 separate
    chains of small kernels. This one treats a stacked (E, out, in) expert weight as E matrices (each
    orthogonalised separately, as the original did) and batches every matrix of the same shape into one
    Newton-Schulz call (muon_update). tests/test_llm.py checks it against torch.optim.Muon matrix by matrix."""

    def __init__(self, params, lr=0.01, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 ns_dtype=torch.bfloat16, batched=True, ns=zeropower_via_newtonschulz):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.ns_dtype, self.batched, self.ns = ns_dtype, batched, ns

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
                        group["momentum"], group["nesterov"], group["ns_steps"], group["weight_decay"],
                        self.ns_dtype, self.batched, self.ns)


@torch.no_grad()
def _clip_muon_adamw(muon_p, muon_g, muon_bufs, adam_p, adam_g, exp_avgs, exp_avg_sqs, steps, lr_muon, lr_adam,
                     grad_clip: float, muon_hp: dict, adam_hp: dict):
    """The whole optimizer step as one function of tensor lists, for torch.compile: clip (as clip_grad_norm_),
    Muon, AdamW (torch's own functional AdamW, capturable: step counts and lr stay on the device), and zeroed
    gradients. No host reads, so nothing in it waits for the GPU."""
    grads = muon_g + adam_g
    if grad_clip > 0:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # () total 2-norm
        torch._foreach_mul_(grads, (grad_clip / (norm + 1e-6)).clamp(max=1.0))
    muon_update(muon_p, muon_g, muon_bufs, lr_muon, **muon_hp)
    functional_adam(adam_p, adam_g, exp_avgs, exp_avg_sqs, [], steps, foreach=True, capturable=True,
                    decoupled_weight_decay=True, amsgrad=False, lr=lr_adam, maximize=False, **adam_hp)
    torch._foreach_zero_(grads)


# Devices where the optimizer step runs compiled (FusedUpdate). On a CPU, compiling it costs about a minute for a
# gain of a few ms; the tests add "cpu" with a cheap backend to check the compiled step against the eager one.
FUSED_UPDATE_DEVICES = ("cuda",)
_fused_state = {"broken": False, "fn": {}}  # compiled function per backend; "broken" after a failed compile


class FusedUpdate:
    """clip + Muon + AdamW in one torch.compile'd function (_clip_muon_adamw), learning rates in device tensors.

    Eager, the step is ~10 ms of Python and hundreds of small launches for ~3 ms of GPU work; compiled, the
    element-wise work fuses and the host queues a few dozen kernels. The lr lives in 0-d device tensors filled
    from the param groups before each call (a fill kernel, no sync), so the cosine schedule never recompiles.
    The function takes tensor lists, not optimizer objects: dynamo guards on their shapes, not their identity,
    so the new optimizers of every run reuse the graph built in ModelCache's warm-up. Gradients are zeroed in
    place, never set to None: they keep their storage, so CUDA-graph replays of the model accumulate into them."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW, backend: str):
        self.muon, self.adamw, self.backend = muon, adamw, backend
        dev = muon.param_groups[0]["params"][0].device
        self.muon_p = [p for g in muon.param_groups for p in g["params"]]
        self.adam_p = [p for g in adamw.param_groups for p in g["params"]]
        self.bufs = muon.buffers_for(self.muon_p)
        for p in self.adam_p:  # torch's AdamW state layout (capturable: step on the device)
            adamw.state[p].update(step=torch.zeros((), dtype=torch.float32, device=dev),
                                  exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        self.lr = [torch.zeros((), device=dev), torch.zeros((), device=dev)]  # Muon's, AdamW's
        mg, ag = muon.param_groups[0], adamw.param_groups[0]
        self.muon_hp = dict(momentum=mg["momentum"], nesterov=mg["nesterov"], ns_steps=mg["ns_steps"],
                            weight_decay=mg["weight_decay"], ns_dtype=muon.ns_dtype, batched=muon.batched)
        self.adam_hp = dict(beta1=ag["betas"][0], beta2=ag["betas"][1], weight_decay=ag["weight_decay"],
                            eps=ag["eps"])

    def __call__(self, grad_clip: float) -> bool:
        """Run the step; False (after one warning, for the rest of the process) where it cannot compile."""
        import torch._dynamo.exc  # (loaded by torch.compile already; named here for the except clause)
        grads = [p.grad for p in self.muon_p + self.adam_p]
        if _fused_state["broken"] or any(g is None for g in grads):
            return False
        if self.backend not in _fused_state["fn"]:
            _fused_state["fn"][self.backend] = torch.compile(_clip_muon_adamw, backend=self.backend)
        self.lr[0].fill_(self.muon.param_groups[0]["lr"])
        self.lr[1].fill_(self.adamw.param_groups[0]["lr"])
        st = self.adamw.state
        try:
            _fused_state["fn"][self.backend](
                self.muon_p, grads[:len(self.muon_p)], self.bufs, self.adam_p, grads[len(self.muon_p):],
                [st[p]["exp_avg"] for p in self.adam_p], [st[p]["exp_avg_sq"] for p in self.adam_p],
                [st[p]["step"] for p in self.adam_p], self.lr[0], self.lr[1], grad_clip, self.muon_hp,
                self.adam_hp)
        except torch._dynamo.exc.TorchDynamoException as e:
            # Compilation failed (inductor's errors derive from this too), before the step changed anything. Other
            # errors (out of memory mid-step) propagate: an eager rerun could apply part of the step twice.
            _fused_state["broken"] = True
            warn(f"the compiled optimizer step failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                 f"); running it eagerly (slower)")
            return False
        return True


class CompiledOrEager:
    """fn compiled on first use, as the original's @torch.compile decorator did; after one warning, eager where
    compiling fails (a CPU with no C++ compiler). Only for pure functions: a failed call is simply rerun eagerly.
    Measured on CPU at the README's shape (1 thread): the original's step took 270 ms with its Newton-Schulz
    compiled, and the same step 6% longer with it eager."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, backend=compile_backend())
        if self.compiled is not False:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                warn(f"compiling {self.fn.__name__} failed ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:200]}); running it eagerly")
                self.compiled = False
        return self.fn(*args, **kwargs)


def build_optimizers(model: MoEMinimalLLM, cfg: MoEModelConfig, rt: "Runtime", reference=False):
    """Muon for the hidden matrices (attention, router gates, experts); AdamW for embedding and norms.

    reference: the original's optimizers (per-matrix Newton-Schulz in bf16, compiled as its @torch.compile
    decorator did, on every device; torch's default AdamW), for the benchmark."""
    device = rt.device
    muon_params = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token_embedding" not in n]
    adam_params = [p for n, p in model.named_parameters() if p.ndim < 2 or "token_embedding" in n]
    # bf16 Newton-Schulz as the original (and torch.optim.Muon), except where bf16 matmuls are not fast (a CPU
    # without bf16 instructions, or MPS): there fp32 costs no more and is more precise. The reference keeps bf16.
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    ns_dtype = torch.bfloat16 if fast_bf16 or reference else torch.float32
    ns = CompiledOrEager(zeropower_via_newtonschulz) if reference else zeropower_via_newtonschulz
    muon = Muon(muon_params, lr=cfg.muon_lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                ns_dtype=ns_dtype, batched=not reference, ns=ns)
    adamw = torch.optim.AdamW(adam_params, lr=cfg.muon_lr * 0.1, weight_decay=cfg.weight_decay,
                              fused=device.type == "cuda" and not reference)
    for opt in (muon, adamw):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    # On CUDA with compile, gradients keep their storage between steps (zeroed in place): CUDA-graph replays of
    # the model must not hand out graph-pool memory as .grad when gradient accumulation keeps it across replays.
    muon.keep_grads = adamw.keep_grads = device.type == "cuda" and rt.compile and not reference
    if rt.compile and not reference and device.type in FUSED_UPDATE_DEVICES and not _fused_state["broken"]:
        muon.fused_update = FusedUpdate(muon, adamw, compile_backend())
    return [muon, adamw]


def lr_multiplier(step: int, max_steps: int) -> float:
    """Linear warmup over the first 5% of updates, then cosine from 1.0 down to 0.1."""
    warmup = max(1, max_steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------------
# Runtime: device, precision and compilation, decided once per sweep

@dataclass
class Runtime:
    """Device, precision and compilation, decided once (resolve_runtime) and printed with the reason."""
    device: torch.device
    amp_dtype: typing.Optional[torch.dtype]
    compile: bool
    reason: str

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        if self.device.type == "cpu":  # which CPU, so that recorded timings say where they were taken
            name = cpu_capabilities().get("cpu_name") or platform.processor() or platform.machine()
            return f"cpu ({name}, {torch.get_num_threads()} threads)"
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        name = str(self.amp_dtype or torch.float32).replace("torch.", "")
        if self.amp_dtype is None and self.device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
            name += " (tf32 matmuls)"  # set by whoever imported this module: llm.py leaves TF32 off
        return name

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


@functools.cache
def cpu_capabilities() -> dict:
    """What torch detected about this CPU (instruction sets, name); empty on a torch too old to say."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX). There bf16 autocast pays: measured
    on a 2-core AMD EPYC with AVX512-BF16, a 1024^3 matmul ran at 0.44 TFLOP/s in bf16 against 0.20 in fp32.
    Without them the CPU keeps fp32."""
    caps = cpu_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def amp_policy(use_amp: bool, bf16_native: bool) -> tuple[typing.Optional[torch.dtype], str]:
    """Autocast dtype on a CUDA GPU (and fp32 anywhere when use_amp is off), and why."""
    if not use_amp:
        return None, "fp32 (use_amp off: --no-use-amp or the preset)"
    if bf16_native:
        return torch.bfloat16, "bf16 autocast (the GPU supports bf16)"
    return torch.float16, "fp16 autocast with a GradScaler (the GPU has no native bf16)"


def resolve_runtime(device: str = "auto", use_amp: bool = True, compile: typing.Optional[bool] = None,
                    local_rank: int = 0) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple MPS is not available; use --device cpu (or auto)")
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most "
                        f"that many processes per node (--nproc-per-node)")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        # TF32 stays off (torch's default): under bf16 autocast nearly every matmul is bf16 anyway, and what
        # runs in float32 (the router; everything with --no-use-amp) is then really float32.
        torch.cuda.set_device(dev)
        try:  # without this flag, pre-Ampere GPUs report (slow, emulated) bf16 as supported
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            bf16 = torch.cuda.get_device_capability(dev)[0] >= 8
        amp, why = amp_policy(use_amp, bf16)
    elif dev.type == "cpu" and use_amp and cpu_has_native_bf16():
        amp, why = torch.bfloat16, "bf16 autocast (the CPU has native bf16: AVX512-BF16 or AMX)"
    elif not use_amp:
        amp, why = amp_policy(False, False)
    else:
        amp, why = None, f"fp32 ({'this CPU has no bf16 matmul instructions' if dev.type == 'cpu' else 'MPS'})"
    use_compile = dev.type == "cuda" if compile is None else compile
    why += f"; torch.compile {'on' if use_compile else 'off'} ({'flag' if compile is not None else 'default'})"
    return Runtime(dev, amp, use_compile, why)


def compile_backend() -> str:
    """torch.compile's backend: inductor, or LLM_COMPILE_BACKEND (the tests use "aot_eager": no C++/Triton build)."""
    return os.environ.get("LLM_COMPILE_BACKEND", "inductor")


class CompiledStep:
    """The compiled model, called as the model is.

    Inputs are made contiguous first, so training batches (strided views of a (B, T+1) gather) and validation
    batches (contiguous on CUDA, views on CPU) meet the same graph instead of recompiling on a stride guard.
    With CUDA graphs (mode "reduce-overhead") the inputs are copied into the graph's static buffers by torch, and
    each call starts a new graph step: callers consume the outputs before the next call, which overwrites them
    (gradients are not graph outputs: ModelCache gives the parameters their own .grad, accumulated in place)."""

    def __init__(self, compiled, cudagraphs: bool):
        self.compiled, self.cudagraphs = compiled, cudagraphs

    def __call__(self, idx, targets):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(idx.contiguous(), targets.contiguous())


class ModelCache:
    """The current architecture's model (and compiled version), re-initialised for every run.

    Reusing the module lets torch.compile build its graphs once per architecture instead of once per run (noise,
    loss weights and routing biases are buffers, so changing them does not recompile), and the graphs are built
    by a warm-up before the first run, so no run's time includes compilation: the warm-up runs the training step
    (forward, backward and the optimizer step) and the evaluation forward on batches laid out as the real ones
    (the run's own data when given). Only one architecture is kept: a --grid sweep runs each architecture's runs
    together, and old models, compiled code and CUDA-graph pools would hold GPU memory."""

    ARCH = ("d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "dropout", "vocab_size",
            "max_seq_len")

    def __init__(self, rt: Runtime, quiet: bool = False, build=None):
        self.rt, self.quiet, self.key, self.model, self.fn = rt, quiet, None, None, None
        self.build = build or MoEMinimalLLM  # the benchmark builds its dense ceiling through the same path

    def get(self, cfg: MoEModelConfig, dispatch: typing.Optional[str] = None,
            data: typing.Optional["TokenData"] = None):
        key = tuple(getattr(cfg, k) for k in self.ARCH) + (cfg.batch_size, dispatch)
        if key != self.key:
            self.release()
            self.model = self.build(cfg).to(self.rt.device)
            self.model.set_dispatch(dispatch or default_dispatch(self.rt))
            self.fn = self._compile(self.model, cfg, data) if self.rt.compile else self.model
            self.key = key
        self.model.reset_parameters(cfg.seed)
        self.model.set_routing(cfg.noise_std, cfg.load_balancing_weight, cfg.router_z_loss_weight)
        for p in self.model.parameters():
            if p.grad is not None:  # kept gradients (CUDA with compile) start every run at zero
                p.grad.zero_()
        return self.model, self.fn

    def release(self):
        """Drop the current architecture: model, compiled code and (on CUDA) its graph pools and cached memory."""
        compiled = self.fn is not None and self.fn is not self.model
        self.key = self.model = self.fn = None
        if compiled:
            import torch._dynamo
            torch._dynamo.reset()  # also frees the CUDA-graph trees and their memory pools
        if self.rt.device.type == "cuda":
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    def _compile(self, model: MoEMinimalLLM, cfg: MoEModelConfig, data):
        """Compile and warm up: CUDA graphs first where they fit (CUDA, static shapes, no GradScaler), then the
        default mode, then eager, one warning each."""
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):  # a new architecture counts as a recompile
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        backend, t = compile_backend(), time.perf_counter()
        # CUDA graphs (no per-kernel launches from the host) where the step has static shapes: the grouped
        # dispatch (or the dense ceiling). The sorted dispatch (fp16 or fp32 GPUs, where grouped_mm is not
        # compiled) slices by data-dependent sizes, so graphs would be re-recorded for every new routing; the
        # fp16 path also keeps the GradScaler's eager optimizer step.
        static = all(getattr(m, "dispatch", "grouped") == "grouped" for m in model.modules()
                     if isinstance(m, MixtureOfExperts))
        modes = ["reduce-overhead", None] if (self.rt.device.type == "cuda" and backend == "inductor" and static and
                                              self.rt.amp_dtype != torch.float16) else [None]
        for i, mode in enumerate(modes):
            fn = CompiledStep(torch.compile(model, backend=backend, mode=mode), cudagraphs=mode == "reduce-overhead")
            try:
                self._warm_up(model, fn, cfg, data)
            except Exception as e:
                nxt = "the default mode" if i + 1 < len(modes) else "eager (slower); --no-compile skips the attempt"
                warn(f"torch.compile{f' mode {mode}' if mode else ''} failed ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:200]}); running {nxt}")
                torch._dynamo.reset()
                model.zero_grad(set_to_none=True)
                continue
            if not self.quiet:
                print(f"torch.compile{f' ({mode})' if mode else ''}: graphs built in {time.perf_counter() - t:.0f} s,"
                      f" before the first run")
            return fn
        return model

    def _warm_up(self, model: MoEMinimalLLM, fn, cfg: MoEModelConfig, data):
        """Build every graph a run uses, through the calls a run makes: training step with backward and the
        optimizer step (grad on, train mode), evaluation forward (no_grad, eval mode). Three rounds: CUDA-graph
        trees record on a later call than the first. The weights it changes are re-initialised by get()."""
        rt, dev = self.rt, self.rt.device
        if data is not None:  # the real layouts: a sampled training batch, the first validation batch
            gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(0)
            train_batch, val_batch = data.sample_batch(gen), data.val[0]
        else:  # made the same way: two views of one (B, T+1) window, like sample_batch
            w = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len + 1), device=dev)
            train_batch = val_batch = (w[:, :-1], w[:, 1:])
        optimizers = build_optimizers(model, cfg, rt)
        scaler = torch.amp.GradScaler(dev.type, enabled=rt.amp_dtype == torch.float16)
        params = list(model.parameters())
        if fn.cudagraphs:  # gradients of our own, not graph-pool outputs that the next replay would overwrite
            for p in params:
                p.grad = torch.zeros_like(p)
        for _ in range(3):
            model.train()
            with rt.autocast():
                loss = fn(*train_batch)[0]
            scaler.scale(loss).backward()
            apply_update(optimizers, scaler, params, cfg.grad_clip)
            model.eval()
            with torch.no_grad(), rt.autocast():
                fn(*val_batch)
        model.train()
        _sync(rt)
        model.zero_grad(set_to_none=not fn.cudagraphs)


def default_dispatch(rt: Runtime) -> str:
    """"grouped" where grouped_mm runs forward and backward (tried once), else "sorted".

    Under torch.compile the grouped kernels need a bf16 GPU; on CPU they run eagerly."""
    if not _has_grouped_mm() or rt.device.type == "mps" or (rt.compile and (rt.device.type != "cuda" or
                                                                            rt.amp_dtype != torch.bfloat16)):
        return "sorted"
    try:  # the model's exact layout: transposed (E, out, in) weights, with a backward pass
        dt = rt.amp_dtype or torch.float32
        a = torch.randn(32, 16, device=rt.device, dtype=dt, requires_grad=True)
        w = torch.randn(2, 24, 16, device=rt.device, dtype=dt, requires_grad=True)
        y = grouped_mm(a, w.transpose(-2, -1), torch.tensor([8, 32], dtype=torch.int32, device=rt.device))
        (y * torch.randn_like(y)).sum().backward()
        return "grouped"
    except Exception as e:
        warn(f"grouped_mm does not run here ({type(e).__name__}); using the sorted per-expert loop")
        return "sorted"


# ------------------------------------------------------------------------------------------------------------
# Train and evaluate

def _sync(rt: Runtime):
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


# routing_metrics' keys: columns of the results CSV and the "routing" record of each evaluation in metrics.jsonl.
ROUTING_KEYS = ("expert_usage_cv", "expert_usage_cv_per_layer", "expert_load_max_mean", "routing_entropy",
                "dead_expert_fraction", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
                "dead_expert_fraction_per_layer", "expert_load_per_layer")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # peak resident memory of the whole process: KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


@torch.no_grad()
def evaluate_model(fn, model: MoEMinimalLLM, data: TokenData, rt: Runtime) -> dict:
    """Cross-entropy (without the balancing or z-loss), top-1 accuracy and routing_metrics of the routing the model
    used, over the fixed validation batches.

    Everything accumulates on the device (float32: MPS has no float64); the host reads it once at the end."""
    model.eval()
    dev = rt.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    counts = torch.zeros(model.cfg.n_layers, model.cfg.num_experts, device=dev, dtype=torch.int64)
    n_tokens = 0
    for x, y in data.val:
        with rt.autocast():
            _, ce, _, _, layer_counts, n_correct = fn(x, y)
        loss_sum += ce.float() * y.numel()
        correct += n_correct
        counts += layer_counts
        n_tokens += y.numel()
    model.train()
    val_loss = loss_sum.item() / n_tokens
    return {"val_loss": val_loss, "val_accuracy": correct.item() / n_tokens,
            "val_perplexity": math.exp(val_loss) if val_loss < 700 else float("inf"),
            **routing_metrics(counts.cpu().numpy())}


def apply_update(optimizers, scaler, params, grad_clip: float):
    """Unscale (fp16), clip, step every optimizer, clear gradients: the end of every training step.

    Where build_optimizers attached a FusedUpdate (CUDA with compile, no GradScaler) it does all of that in one
    compiled call; the fp16 GradScaler path stays eager (unscale_ before the clip, steps skipped on inf)."""
    fused = getattr(optimizers[0], "fused_update", None)
    if fused is not None and not scaler.is_enabled() and fused(grad_clip):
        return
    for opt in optimizers:
        scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=not getattr(opt, "keep_grads", False))


def train_moe_model(cfg: MoEModelConfig, data: TokenData, rt: Runtime, models: ModelCache,
                    metrics_path: typing.Optional[Path] = None, progress: bool = True) -> dict:
    """Train one run and return its metrics. A non-finite loss ends the run with status 'diverged'."""
    from tqdm.auto import tqdm
    model, fn = models.get(cfg, data=data)  # (compiles only for a new architecture, before the clock starts)
    t_run = time.perf_counter()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    optimizers = build_optimizers(model, cfg, rt)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    gen = torch.Generator(device=rt.device if rt.device.type == "cuda" else "cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and router noise
    params = list(model.parameters())
    log = open(metrics_path, "w") if metrics_path else None
    # Running sums on the device over the log window: cross-entropy, aux loss and z-loss (unweighted), correct
    # predictions, and the first non-finite update (0 = none yet). float32: MPS has no float64.
    stats = torch.zeros(5, device=rt.device)
    bias_balancing = cfg.balancing == "bias"
    update_counts = torch.zeros(cfg.n_layers, cfg.num_experts, dtype=torch.int64, device=rt.device)  # (L, E)
    tokens_per_update = cfg.batch_size * cfg.max_seq_len * cfg.gradient_accumulation_steps
    status, diverged_step, best_ppl, last_eval, steps_done, since_log = "ok", None, float("inf"), None, 0, 0
    bar = tqdm(total=cfg.max_steps, desc=f"seed {cfg.seed} noise {cfg.noise_std} lb {cfg.load_balancing_weight}",
               unit="step", leave=False, disable=not progress, position=1, dynamic_ncols=True)
    t_loop = t_log = time.perf_counter()
    eval_time = eval_since_log = 0.0  # training time and tokens/s exclude evaluation
    try:
        for step in range(1, cfg.max_steps + 1):
            mult = lr_multiplier(step - 1, cfg.max_steps)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * mult
            for _ in range(cfg.gradient_accumulation_steps):
                x, y = data.sample_batch(gen)
                with rt.autocast():
                    loss, ce, aux, z, layer_counts, n_correct = fn(x, y)
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
                bad = (~torch.isfinite(loss.detach()) & (stats[4] == 0)).float() * step
                stats += torch.stack([ce.detach().float(), aux.detach().float(), z.detach().float(),
                                      n_correct.float(), bad])
                if bias_balancing:
                    update_counts += layer_counts
            apply_update(optimizers, scaler, params, cfg.grad_clip)
            if bias_balancing:  # on the device, no host sync
                model.update_routing_bias(update_counts, cfg.bias_update_rate)
                update_counts.zero_()
            steps_done, since_log = step, since_log + 1
            last = step == cfg.max_steps
            if step % cfg.log_every == 0 or last:
                ce_sum, aux_sum, z_sum, n_ok, bad_step = stats.tolist()  # one sync
                n_micro = since_log * cfg.gradient_accumulation_steps
                train_loss, train_aux, train_z = ce_sum / n_micro, aux_sum / n_micro, z_sum / n_micro
                acc = n_ok / (n_micro * y.numel())  # over the same window as the loss
                now = time.perf_counter()
                tps = since_log * tokens_per_update / (now - t_log - eval_since_log)
                t_log, eval_since_log, since_log = now, 0.0, 0
                stats[:4] = 0
                if bad_step:
                    status, diverged_step = "diverged", int(bad_step)
                    bar.write(f"  run diverged: non-finite loss at update {diverged_step}")
                    break
                rec = {"loss": train_loss, "accuracy": acc, "aux_loss_unweighted": train_aux,
                       "aux_loss_weighted": cfg.load_balancing_weight * train_aux, "z_loss_unweighted": train_z,
                       "z_loss_weighted": cfg.router_z_loss_weight * train_z}
                bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}", ppl=f"{math.exp(min(train_loss, 50)):.1f}",
                                tok_s=f"{tps:,.0f}", aux_unweighted=f"{train_aux:.3f}",
                                aux_weighted=f"{rec['aux_loss_weighted']:.4f}",
                                **({"z_unweighted": f"{train_z:.2f}", "z_weighted": f"{rec['z_loss_weighted']:.4f}"}
                                   if cfg.router_z_loss_weight else {}))
                bar.update(step - bar.n)
                if log:
                    log.write(json.dumps({"split": "train", "step": step, **rec,
                                          "lr": optimizers[0].param_groups[0]["lr"], "tokens_per_s": tps}) + "\n")
            if step % cfg.eval_every == 0 or last:
                _sync(rt)
                t_eval = time.perf_counter()
                last_eval = evaluate_model(fn, model, data, rt)
                best_ppl = min(best_ppl, last_eval["val_perplexity"])
                eval_time += time.perf_counter() - t_eval
                eval_since_log += time.perf_counter() - t_eval
                if log:
                    routing = {k: last_eval[k] for k in ROUTING_KEYS}
                    if bias_balancing:
                        routing["expert_bias"] = [b.feed_forward.router.expert_bias.tolist() for b in model.blocks]
                    log.write(json.dumps({"split": "val", "step": step, "loss": last_eval["val_loss"],
                                          "accuracy": last_eval["val_accuracy"],
                                          "perplexity": last_eval["val_perplexity"], "routing": routing}) + "\n")
                    log.flush()
    finally:
        bar.close()
        if log:
            log.close()
    _sync(rt)
    train_time = time.perf_counter() - t_loop - eval_time
    nan = float("nan")
    ev = last_eval if status == "ok" else {}
    return {
        "val_loss": ev.get("val_loss", nan), "val_accuracy": ev.get("val_accuracy", nan),
        "val_perplexity": ev.get("val_perplexity", nan),
        "training_time_minutes": (time.perf_counter() - t_run) / 60, "peak_memory_gb": _peak_memory_gb(rt.device),
        "best_val_perplexity": best_ppl if status == "ok" else nan, "status": status, "diverged_step": diverged_step,
        "steps": steps_done, "train_tokens": steps_done * tokens_per_update,
        "tokens_per_s": steps_done * tokens_per_update / train_time if train_time > 0 else nan,
        **{k: ev.get(k, [] if k.endswith("_per_layer") else nan) for k in ROUTING_KEYS},
    }


def set_seed(seed: int):
    """Seed Python, NumPy and torch at once: kept for scripts written against the original (runs seed themselves)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# Benchmark: this project's training step against the original's and a dense model's

def _matmul_peak_tflops(rt: Runtime) -> tuple[float, str]:
    """Measured, not looked up: the best of a few large matmuls in the training dtype."""
    dt = rt.amp_dtype or torch.float32
    n = 8192 if rt.device.type == "cuda" else 1024
    a = torch.randn(n, n, device=rt.device, dtype=dt)
    b = torch.randn(n, n, device=rt.device, dtype=dt)
    best = float("inf")
    for _ in range(5):
        _sync(rt)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(rt)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n ** 3 / best / 1e12, f"{str(dt).replace('torch.', '')} {n}x{n} matmul"


class DenseFFN(nn.Module):
    """The benchmark's ceiling: one MLP of d_ff * top_k hidden units in place of the MoE, so a token spends the
    same matmul FLOPs as in the MoE's k experts, with no routing, sorting or grouped kernels."""

    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        hidden = cfg.d_ff * cfg.expert_top_k
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)
        self.p = cfg.dropout

    def forward(self, x):  # x (B, T, C) -> out (B, T, C), aux loss (), z-loss (), counts (1,), as MixtureOfExperts
        h = dropout(F.silu(self.w1(x)), self.p, self.training)  # (B, T, d_ff * k)
        zero = x.new_zeros((), dtype=torch.float32)
        return self.w2(h), zero, zero, torch.zeros(1, dtype=torch.int64, device=x.device)


class DenseLLM(MoEMinimalLLM):
    """MoEMinimalLLM with DenseFFN blocks: the same attention, embedding, loss and training path."""

    def __init__(self, cfg: MoEModelConfig):
        super().__init__(cfg)
        for block in self.blocks:
            block.feed_forward = DenseFFN(cfg)
        self.reset_parameters(cfg.seed)

    def set_routing(self, noise_std: float, load_balancing_weight: float, router_z_loss_weight: float = 0.0):
        pass  # no router: nothing to set


def original_runtime(rt: Runtime) -> Runtime:
    """The original's precision: `torch.cuda.amp.autocast()` (fp16) with a GradScaler on CUDA, whatever the GPU;
    elsewhere fp32, since that autocast only ever touched CUDA ops."""
    return replace(rt, amp_dtype=torch.float16 if rt.device.type == "cuda" else None)


def benchmark(cfg: MoEModelConfig, rt: Runtime, steps: int, warmup: int) -> dict:
    """Median time of whole updates (gradient_accumulation_steps micro-batches and the optimizer step) for this
    project's step, the original's step, and a dense model of the same active FLOPs, in one process.

    "original" reproduces the original code's step as it ran, element by element: its precision policy (fp16
    autocast with a GradScaler on CUDA; fp32 elsewhere, where its CUDA-only autocast did nothing), the loop over
    experts with a boolean mask and a host sync per expert ("loop" dispatch), torch's dropout, plain
    cross-entropy on materialised logits, no compiled model, clip_grad_norm_ over all parameters, Muon one
    matrix at a time with bf16 Newton-Schulz (compiled per matrix where this run compiles, as its decorator did),
    torch's default AdamW, gradients set to None. All three use the same micro-batches per update, so the
    ratio compares implementations, not configs."""
    cfg = replace(cfg, vocab_size=cfg.vocab_size or 49152)
    peak, peak_what = _matmul_peak_tflops(rt)
    flops = flops_per_token(cfg)
    tokens = cfg.batch_size * cfg.max_seq_len * cfg.gradient_accumulation_steps
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), generator=g).to(rt.device),
                torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), generator=g).to(rt.device))
               for _ in range(4)]
    sides = (("this project", rt, MoEMinimalLLM), ("original", original_runtime(rt), None), ("dense", rt, DenseLLM))
    impls, steppers = [], []
    for name, side_rt, build in sides:
        base_mem = 0.0
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(rt.device)
            base_mem = torch.cuda.memory_allocated(rt.device) / 1e9  # the other sides' models stay alive
        t = time.perf_counter()
        if build is None:  # the original: eager, per-expert loop, plain loss
            fn = model = MoEMinimalLLM(cfg).to(rt.device)
            model.set_routing(cfg.noise_std, cfg.load_balancing_weight, cfg.router_z_loss_weight)
            model.set_dispatch("loop")
        else:  # exactly what a sweep runs (compiled on CUDA; compilation counts as warm-up)
            model, fn = ModelCache(rt, quiet=True, build=build).get(cfg)
        opts = build_optimizers(model, cfg, side_rt, reference=build is None)
        scaler = torch.amp.GradScaler(rt.device.type, enabled=side_rt.amp_dtype == torch.float16)

        def step(i, fn=fn, opts=opts, scaler=scaler, side_rt=side_rt, params=list(model.parameters())):
            for j in range(cfg.gradient_accumulation_steps):
                x, y = batches[(i + j) % len(batches)]
                with side_rt.autocast():
                    loss = fn(x, y)[0]
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            apply_update(opts, scaler, params, cfg.grad_clip)

        for i in range(warmup):
            step(i)
        _sync(rt)
        impls.append({"impl": name, "device": rt.device_name, "dtype": side_rt.dtype_name + (
                          " + GradScaler" if side_rt.amp_dtype == torch.float16 else ""),
                      "peak_mem_gb": _peak_memory_gb(rt.device) - base_mem, "warmup_s": time.perf_counter() - t})
        steppers.append(step)
    # Timed updates alternate between the sides, so drift on a shared machine hits all alike.
    times = [[] for _ in steppers]
    for i in range(steps):
        for k, step in enumerate(steppers):
            t = time.perf_counter()
            step(i)
            _sync(rt)
            times[k].append(time.perf_counter() - t)
    for r, ts in zip(impls, times):
        step_s = float(np.median(ts))
        tflops = flops * tokens / step_s / 1e12
        r.update(step_ms=step_s * 1e3, tokens_per_s=tokens / step_s, tflops=tflops, mfu=tflops / peak)
    ours, orig, dense = impls
    return {"speedup": ours["tokens_per_s"] / orig["tokens_per_s"],
            "dense_ratio": ours["tokens_per_s"] / dense["tokens_per_s"], "peak_tflops": peak,
            "peak_measured_with": peak_what, "flops_per_token": flops, "tokens_per_step": tokens,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "dtype": rt.dtype_name,
            "compile": rt.compile, "torch": torch.__version__, "impls": impls}


def print_benchmark(res: dict):
    print(f"\nbenchmark: {res['tokens_per_step']:,} tokens per update ({res['gradient_accumulation_steps']} "
          f"micro-batches), {res['flops_per_token'] / 1e9:.3f} GFLOP/token, compile {'on' if res['compile'] else 'off'}"
          f", torch {res['torch']}")
    print(f"peak: {res['peak_tflops']:.1f} TFLOP/s measured with a {res['peak_measured_with']} (MFU is against this)")
    print(f"{'impl':<14}{'precision':<20}{'update ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GB':>10}"
          f"{'warmup s':>10}")
    for r in res["impls"]:
        print(f"{r['impl']:<14}{r['dtype']:<20}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['tflops']:>10.2f}"
              f"{r['mfu']:>8.1%}{r['peak_mem_gb']:>10.2f}{r['warmup_s']:>10.1f}")
    print(f"speed-up over the original: {res['speedup']:.2f}x; {res['dense_ratio']:.0%} of the dense model's "
          f"tokens/s (same active FLOPs, no routing: the ceiling)")


# ------------------------------------------------------------------------------------------------------------
# Sweep and CSV (the report is report.py's)


def run_id_for(cfg: MoEModelConfig, grid_fields: list[str], chash: str) -> str:
    parts = [f"n{cfg.noise_std:g}", f"lb{cfg.load_balancing_weight:g}"]
    parts += [f"{_flag(k)}{getattr(cfg, k)}" for k in grid_fields]
    return "_".join(parts + [f"s{cfg.seed}", chash[:8]])


def csv_header(grid_fields: list[str]) -> list[str]:
    return list(FIRST_COLUMNS) + list(grid_fields) + list(TAIL_COLUMNS)


def read_done(path: Path, header: list[str]) -> set[str]:
    """config_hash of every finished run in an existing CSV (a torn last line is ignored with a warning)."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] == [c for c in header if c not in report.LATER_ROUTING_COLUMNS]:
        rows = _add_routing_columns(path, rows, header)
    if rows[0] != header:
        raise UserError(f"{path} has different columns than this sweep writes (another --grid?); pass --fresh to "
                        f"start a new file (the old one is kept as a backup) or choose another --out")
    done, col, width = set(), header.index("config_hash"), len(header)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != width:
            warn(f"{path}: line {i} is incomplete (a run killed while writing?); ignoring it")
            continue
        if row[header.index("status")] in ("ok", "diverged"):
            done.add(row[col])
    return done


def _add_routing_columns(path: Path, rows: list[list[str]], header: list[str]) -> list[list[str]]:
    """A CSV written before the routing columns existed gets them, empty, so its runs still count as done; the
    file as it was is kept as a .bak copy. Returns the rows as now written."""
    old, width = rows[0], len(rows[0])
    backup = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.bak{path.suffix}")
    backup.write_bytes(path.read_bytes())
    new = [header] + [[dict(zip(old, r)).get(c, "") for c in header] for r in rows[1:] if len(r) == width]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(new)
    os.replace(tmp, path)
    warn(f"{path} predates the routing columns: added them (empty for its {len(new) - 1} run(s)); the file as it "
         f"was is kept as {backup}")
    return new


def append_row(path: Path, header: list[str], row: dict):
    """Append one complete line under an exclusive lock, then fsync: concurrent ranks never interleave."""
    buf = io.StringIO()
    w = csv.writer(buf)
    with open(path, "a+", newline="") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # Windows: single-process sweeps only
            pass
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            w.writerow(header)
        else:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":  # a torn line from a killed writer: start ours on a fresh line
                buf.write("\n")
        w.writerow([_csv_value(row.get(k)) for k in header])
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, (list, tuple)):  # per layer ";"-joined; a matrix (expert_load_per_layer): rows "|"-joined
        if v and isinstance(v[0], (list, tuple)):
            return "|".join(_csv_value(row) for row in v)
        return ";".join(f"{x:.6g}" for x in v)
    return v


def parse_grid(items: list[str]) -> dict[str, list]:
    """--grid FIELD=V1,V2 -> {field: [typed values]}; the field must be a MoEModelConfig constructor field."""
    hints = typing.get_type_hints(MoEModelConfig)
    names = {f.name for f in fields(MoEModelConfig) if f.init}
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--grid {item!r}: expected FIELD=V1,V2 (for example expert_top_k=1,2)")
        if name not in names:
            raise UserError(f"--grid {item!r}: unknown field {name!r}; fields: {', '.join(sorted(names))}")
        if name in NOT_GRIDDABLE:
            raise UserError(f"--grid {name}: this field does not change a run's numbers or is per-process; "
                            f"set it once with --{_flag(name)}")
        typ = _scalar_type(hints[name])
        if typ not in (int, float, bool, str):
            raise UserError(f"--grid: field {name!r} cannot be swept")
        try:
            grid[name] = [_parse_scalar(typ, v.strip()) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--grid {item!r}: values must be {typ.__name__}") from None
    return grid


def _scalar_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _parse_scalar(typ, text: str):
    if typ is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return typ(text)


def sweep_configs(base: MoEModelConfig, axes: dict[str, list]) -> list[MoEModelConfig]:
    """The Cartesian product of the axes, in the order given (the last axis, seeds, varies fastest)."""
    names = list(axes)
    return [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*axes.values())]


def _dist_setup():
    """(rank, world, local_rank); under torchrun, a gloo process group used only for broadcast and barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not torch.cuda.is_available():  # CPU ranks share the cores; spinning OpenMP threads would fight
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():  # runs take minutes, so waits at barriers are long
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def run_sweep(args, base: MoEModelConfig, axes: dict[str, list], grid_fields: list[str], rt_args: dict) -> int:
    rank, world, local_rank = _dist_setup()
    main_rank = rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    out = Path(args.out)
    header = csv_header(grid_fields)
    configs = sweep_configs(base, axes)
    design = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
    say(f"MoE routing experiment: {design} = {len(configs)} runs" + (f" over {world} processes" if world > 1 else ""))
    for k, v in axes.items():
        say(f"  {k}: {', '.join(map(str, v))}")
    if main_rank:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.fresh and out.exists():
            backup = out.with_name(f"{out.stem}.{time.strftime('%Y%m%d-%H%M%S')}.bak{out.suffix}")
            out.rename(backup)
            say(f"--fresh: moved the existing {out} to {backup}")
    rt = resolve_runtime(local_rank=local_rank, **rt_args)
    say(f"device: {rt.device_name}; {rt.reason}")

    # Every corpus the sweep needs (one, unless --grid changes the data). Local rank 0 builds the caches first;
    # the others then read them rather than racing to build them.
    corpus_of = lambda c: json.dumps([getattr(c, k) for k in DATA_FIELDS])
    corpora = {}
    if local_rank != 0:
        _barrier(world)
    for c in configs:
        if corpus_of(c) not in corpora:
            corpora[corpus_of(c)] = tokens, meta = load_and_cache_data(c, quiet=not main_rank)
            say(f"data: {meta['n_tokens']:,} tokens from {meta['n_documents']:,} documents ({meta['cache_file']})")
    if local_rank == 0:
        _barrier(world)
    runs = []
    for c in configs:
        meta = corpora[corpus_of(c)][1]
        c = replace(c, vocab_size=c.vocab_size or meta["vocab_size"])
        if meta["max_id"] >= c.vocab_size:
            raise UserError(f"--vocab-size {c.vocab_size} is smaller than the tokenizer's ids (up to "
                            f"{meta['max_id']})")
        runs.append((c, config_hash(c, meta["sha256"])))
    splits = {}  # (corpus, window, batch, eval batches) -> TokenData on the device

    def data_for(c: MoEModelConfig) -> TokenData:
        key = (corpus_of(c), c.max_seq_len, c.batch_size, c.eval_steps)
        if key not in splits:
            splits.clear()  # one at a time: runs of one data shape are contiguous in the sweep
            splits[key] = d = TokenData.from_tokens(corpora[key[0]][0], c, rt.device)
            say(f"split: train {len(d.train):,} tokens; validation {len(d.val)} batches of {c.batch_size} x "
                f"{c.max_seq_len} (the last 10%, non-overlapping)" + (
                    f"; fewer than --eval-steps {c.eval_steps}, so every evaluation uses all of them"
                    if len(d.val) < c.eval_steps else ""))
        return splits[key]

    first = runs[0][0]
    data_for(first)  # fails early on a corpus too short for the first run
    # The CSV is checked before the model is built: a wrong --out fails before minutes of compiling.
    if main_rank:
        done = read_done(out, header)
        todo = [i for i, (_, h) in enumerate(runs) if h not in done]
        others = len(done - {h for _, h in runs})
        if others:
            say(f"note: {out} also holds {others} run(s) of other setups; the summary below covers this sweep, "
                f"the report groups by every setting that differs")
    else:
        todo = None
    if world > 1:  # one rank reads the CSV and decides, so every rank works from the same list
        import torch.distributed as dist
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    if len(todo) < len(runs):
        say(f"resuming {out}: {len(runs) - len(todo)} of {len(runs)} runs already done, {len(todo)} to go")
    models = ModelCache(rt, quiet=not main_rank)
    total, active = count_parameters(models.get(first, data=data_for(first))[0])
    say(f"model: {total:,} parameters, {active:,} active per token; "
        f"{flops_per_token(first) / 1e9:.3f} GFLOP per training token")
    say("config: " + json.dumps({k: v for k, v in asdict(first).items() if k not in SWEPT + ("d_k",)}))
    both = sum(c.balancing == "bias" and c.load_balancing_weight > 0 for c, _ in runs)
    if both:
        say(f"note: {both} run(s) with --balancing bias also add the balancing loss (--lb-weight > 0); "
            f"--lb-weight 0 gives DeepSeek-V3's loss-free balancing")

    mine = todo[rank::world]
    runs_dir = out.with_name(out.stem + "_runs")
    from tqdm.auto import tqdm
    overall = tqdm(total=len(todo), desc="sweep", unit="run", position=0, disable=None if main_rank else True,
                   bar_format="run {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {desc}", dynamic_ncols=True)
    t_sweep = time.perf_counter()
    try:
        for k, i in enumerate(mine):
            cfg, chash = runs[i]
            rid = run_id_for(cfg, grid_fields, chash)
            run_dir = runs_dir / rid
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            overall.set_description_str(rid)
            result = train_moe_model(cfg, data_for(cfg), rt, models, run_dir / "metrics.jsonl",
                                     progress=main_rank and sys.stderr.isatty())
            row = {**asdict(cfg), **result, "device": rt.device_name, "dtype": rt.dtype_name, "run_id": rid,
                   "config_hash": chash,
                   "config_json": json.dumps({k: v for k, v in asdict(cfg).items() if k != "d_k"})}
            append_row(out, header, row)
            eta = (time.perf_counter() - t_sweep) / (k + 1) * (len(mine) - k - 1)
            msg = (f"run {k + 1}/{len(mine)} ({rid}): {result['status']}, best val ppl "
                   f"{result['best_val_perplexity']:.2f}, cv {result['expert_usage_cv']:.3f}, "
                   f"{result['training_time_minutes']:.2f} min, {result['tokens_per_s']:,.0f} tok/s; "
                   f"ETA {eta / 60:.1f} min")
            tqdm.write(msg) if main_rank else print(f"[rank {rank}] {msg}", flush=True)
            overall.update(world if world > 1 else 1)
    finally:
        overall.close()
    _barrier(world)
    if main_rank:
        say(f"\nresults: {out}")
        report.print_summary(out, {h for _, h in runs})
        try:
            say(f"report: {report.write_report(out)}")
        except ValueError as e:
            say(f"report not written: {e}")
    return 0



# ------------------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a small Mixture-of-Experts LM over a sweep of routing settings and write a CSV.",
        epilog="Every MoEModelConfig field has a flag; a flag given explicitly overrides --preset.")
    g = p.add_argument_group("sweep")
    g.add_argument("--noise-std", type=float, nargs="+", default=[0.0, 0.1, 0.5], metavar="F",
                   help="router noise std values to sweep (default: 0.0 0.1 0.5)")
    g.add_argument("--lb-weight", type=float, nargs="+", default=[0.01, 0.0], metavar="F",
                   help="load-balancing loss weights to sweep (default: 0.01 0.0)")
    g.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], metavar="N",
                   help="seeds per condition (default: 42 43 44)")
    g.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="also sweep any config field, e.g. --grid expert_top_k=1,2 (repeatable)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="smoke: tiny model on the shipped sample corpus "
                   "(CPU, offline, under a minute)")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", default=DEFAULT_CSV, metavar="CSV", help=f"results CSV (default: {DEFAULT_CSV})")
    g.add_argument("--fresh", action="store_true",
                   help="start a new CSV (an existing one is renamed to a .bak file); default: resume it")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: cuda, else mps, else cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--dry-run", action="store_true", help="print every run's resolved config; train nothing")
    g.add_argument("--report", metavar="CSV", help="only (re)write the markdown report and plots for CSV")
    g.add_argument("--bench", action="store_true",
                   help="time the training step against the original's step and a dense model of the same active "
                        "FLOPs, on random tokens")
    g.add_argument("--bench-steps", type=int, default=None, metavar="N",
                   help="timed steps for --bench (default: 30 on GPU, 20 on CPU)")
    g.add_argument("--bench-out", metavar="JSON", help="also write the --bench figures as JSON")
    hints = typing.get_type_hints(MoEModelConfig)
    groups = {}
    for f in fields(MoEModelConfig):
        if not f.init or f.name in SWEPT:
            continue
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(f"config: {group}")
        typ, kw = _scalar_type(hints[f.name]), {}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif hints[f.name] is tuple:
            kw.update(nargs="+", metavar="PATH")
        elif f.metadata["choices"]:
            kw.update(type=typ, choices=f.metadata["choices"])
        else:
            kw.update(type=typ, metavar=typ.__name__.upper())
        groups[group].add_argument(f"--{_flag(f.name)}", dest=f.name, default=argparse.SUPPRESS,
                                   help=f"{f.metadata['help']} (default: {f.default})", **kw)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bench_steps is not None and args.bench_steps < 1:
        parser.error("--bench-steps must be at least 1")
    if int(os.environ.get("RANK", "0")) > 0 and (args.report or args.bench or args.dry_run):
        return 0  # under torchrun, one-off commands run on rank 0 only
    try:
        if args.report:
            try:
                print(f"report: {report.write_report(Path(args.report))}")
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"cannot write a report for {args.report}: {e}") from None
            return 0
        overrides = {f.name: getattr(args, f.name) for f in fields(MoEModelConfig)
                     if f.name not in SWEPT and hasattr(args, f.name)}
        base = MoEModelConfig(**{**PRESETS.get(args.preset, {}), **overrides})
        grid = parse_grid(args.grid)
        both = sorted(set(grid) & set(overrides))
        if both:  # the grid would silently replace the flag's value
            raise UserError(f"--{_flag(both[0])} and --grid {both[0]}=... both set {both[0]}; keep one")
        axes = {k: v for k, v in grid.items() if k not in SWEPT}
        axes.update(noise_std=grid.get("noise_std", args.noise_std),
                    load_balancing_weight=grid.get("load_balancing_weight", args.lb_weight),
                    seed=grid.get("seed", args.seeds))
        for k, v in axes.items():
            if len(set(v)) < len(v):
                raise UserError(f"{k} lists a value twice ({' '.join(map(str, v))}); each run must be distinct")
        for combo in itertools.product(*axes.values()):  # validate every run before any trains
            replace(base, **dict(zip(axes, combo)))
        grid_fields = [k for k in axes if k not in SWEPT]
        rt_args = dict(device=args.device, use_amp=base.use_amp, compile=args.compile)
        if args.bench:
            if args.bench_out and not Path(args.bench_out).resolve().parent.is_dir():
                raise UserError(f"--bench-out {args.bench_out}: its folder does not exist")
            rt = resolve_runtime(**rt_args)
            print(f"device: {rt.device_name}; {rt.reason}")
            steps = args.bench_steps or (30 if rt.device.type == "cuda" else 20)
            res = benchmark(replace(base, noise_std=args.noise_std[-1], load_balancing_weight=args.lb_weight[0]),
                            rt, steps=steps, warmup=10 if rt.compile else 2)
            print_benchmark(res)
            if args.bench_out:
                Path(args.bench_out).write_text(json.dumps(res, indent=1))
            return 0
        if args.dry_run:
            configs = sweep_configs(base, axes)
            print(f"dry run: {len(configs)} runs ({' x '.join(f'{len(v)} {k}' for k, v in axes.items())}); "
                  f"nothing is trained")
            for i, c in enumerate(configs, 1):
                d = {k: v for k, v in asdict(c).items() if k != "d_k"}
                print(f"run {i}/{len(configs)}: {json.dumps(d)}")
            return 0
        if Path(args.out).is_dir():
            raise UserError(f"--out {args.out} is a folder; give a CSV file name")
        return run_sweep(args, base, axes, grid_fields, rt_args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, full disk, a file where a folder should be
        print(f"error: {e.strerror or e}: {e.filename or ''}{_saved(args.out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{_saved(args.out)}; rerun the same command to resume", file=sys.stderr)
        return 130


def _saved(out: str) -> str:
    return f" (finished runs are saved in {out})" if Path(out).is_file() else ""


if __name__ == "__main__":
    sys.exit(main())
