"""llm.py's fast-step machinery, checked on CPU with cheap compile backends (no GPU needed).

- No compilation inside a run: a two-run compiled sweep compiles during ModelCache's warm-up and never again,
  counted by the backend itself (every graph dynamo hands to a backend goes through it).
- Fallbacks: a compile that fails costs one warning line and the run completes eagerly; a compiled step
  that fails on a later step switches the sweep to eager and reruns that run from its start.
- The compiled optimizer step (clip + Muon + AdamW, lr in device tensors) equals the eager optimizers and does
  not recompile when the learning rate changes; the original's per-matrix Muon (tests/reference.py) equals
  the batched one.
- The benchmark's dense ceiling spends the same expert FLOPs per token as the MoE.
"""
import csv

import numpy as np
import pytest
import torch
import torch._dynamo

import llm
import reference

COMPILES = []  # (backend name, graph) for every graph a counting backend compiled


def _counting(name):
    def backend(gm, example_inputs):
        COMPILES.append((name, gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _failing(gm, example_inputs):
    raise RuntimeError("no compiler here")


FLAKY = {"calls": 0, "fail_at": None}  # the compiled code raises on call number fail_at


def _flaky(gm, example_inputs):
    """Compiles fine; its code raises on a later call, as a broken graph replay would."""
    inner = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(*args):
        FLAKY["calls"] += 1
        if FLAKY["calls"] == FLAKY["fail_at"]:
            raise RuntimeError("graph replay failed")
        return inner(*args)
    return run


for _name, _fn in (("llm_test_counting", _counting("llm_test_counting")), ("llm_test_failing", _failing),
                   ("llm_test_flaky", _flaky)):
    if _name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(compiler_fn=_fn, name=_name)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """A clean dynamo cache and compile count."""
    torch._dynamo.reset()
    COMPILES.clear()
    yield
    torch._dynamo.reset()


def tiny_config(**kw):
    base = dict(d_model=32, n_heads=4, n_layers=2, d_ff=48, num_experts=4, expert_top_k=2, dropout=0.1,
                vocab_size=97, batch_size=4, max_seq_len=16, max_steps=4, eval_every=2, eval_steps=2,
                log_every=2, tokenizer="bytes", use_amp=False)
    base.update(kw)
    return llm.MoEModelConfig(**base)


@pytest.mark.timeout(300)
def test_two_run_sweep_compiles_nothing_after_the_warm_up(tmp_path, monkeypatch, fresh_dynamo, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_counting")
    monkeypatch.setattr(llm, "default_dispatch", lambda rt: "grouped")  # the GPU's one-graph path,
    monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: True)  # which compiles in bf16 only
    resolve = llm.resolve_runtime  # the optimizer step compiled too, as on CUDA
    monkeypatch.setattr(llm, "resolve_runtime", lambda *a, **k: llm.replace(resolve(*a, **k),
                                                                            compile_optimizer=True))
    from_tokens = llm.TokenData.from_tokens

    def cuda_like_layouts(tokens, cfg, device):  # on CUDA, .to() copies validation views to contiguous tensors
        d = from_tokens(tokens, cfg, device)
        d.val = [(x.contiguous(), y.contiguous()) for x, y in d.val]
        return d

    monkeypatch.setattr(llm.TokenData, "from_tokens", staticmethod(cuda_like_layouts))
    caches, after_warm_up = [], []
    compile_ = llm.ModelCache._compile

    def compile_and_count(self, *a, **kw):
        ok = compile_(self, *a, **kw)
        caches.append(self)
        after_warm_up.append(len(COMPILES))
        return ok

    monkeypatch.setattr(llm.ModelCache, "_compile", compile_and_count)
    rc = llm.main(["--preset", "smoke", "--use-amp", "--device", "cpu", "--compile", "--noise-std", "0.1",
                   "--lb-weight", "0.01",
                   "--seeds", "42", "43", "--max-steps", "4", "--eval-every", "2", "--log-every", "2",
                   "--batch-size", "4", "--max-seq-len", "32", "--eval-steps", "2",
                   "--out", str(tmp_path / "r.csv")])
    assert rc == 0
    warned = [w for w in capsys.readouterr().err.splitlines() if "warning" in w and "report.py" not in w]
    assert not warned
    assert len(after_warm_up) == 1  # one architecture: compiled once, before the first run
    # Training graph (forward and backward), evaluation graph, optimizer step: all built by the warm-up.
    assert after_warm_up[0] >= 3
    assert len(COMPILES) == after_warm_up[0], "a run compiled after the warm-up"
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 3  # header and two runs
    # The count is not blind: the raw compiled model, fed one strided tensor as both inputs, recompiles.
    w = torch.randint(0, 200, (4, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches[0].compiled(w[:, :-1], w[:, :-1])
    assert len(COMPILES) > after_warm_up[0]


def test_a_failing_compile_warns_once_and_the_run_completes_eagerly(tmp_path, monkeypatch, fresh_dynamo, capsys):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_failing")
    cfg = tiny_config()
    rt = llm.resolve_runtime("cpu", use_amp=False, compile=True)
    tokens = (np.arange(3000) * 7 % 97).astype(np.uint16)
    data = llm.TokenData.from_tokens(tokens, cfg, rt.device)
    models = llm.ModelCache(rt)
    model, fn = models.get(cfg, data=data)
    assert fn is model and not models.rt.compile  # eager, for the rest of the sweep
    result = llm.train_moe_model(cfg, data, models, None, progress=False)
    assert result.status == "ok" and result.steps == 4 and np.isfinite(result.val_loss)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
                and "report.py" not in line]  # (until report.py has its summary API)
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "eager" in warnings[0]


@pytest.mark.timeout(300)  # two short sweeps; generous, as other tests may share the CPU (xdist)
def test_a_compiled_step_failing_mid_run_reruns_that_run_eagerly_from_its_start(tmp_path, monkeypatch,
                                                                                fresh_dynamo, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_flaky")
    monkeypatch.setitem(FLAKY, "calls", 0)
    monkeypatch.setitem(FLAKY, "fail_at", None)
    compile_ = llm.ModelCache._compile

    def fail_soon_after_the_warm_up(self, *a):  # at run 1's 5th update (one compiled call each)
        ok = compile_(self, *a)
        FLAKY["fail_at"] = FLAKY["calls"] + 5
        return ok

    monkeypatch.setattr(llm.ModelCache, "_compile", fail_soon_after_the_warm_up)
    args = ["--preset", "smoke", "--device", "cpu", "--compile", "--noise-std", "0.1", "--lb-weight", "0.01",
            "--seeds", "42", "43", "--max-steps", "12", "--eval-every", "6", "--out", "r.csv"]
    assert llm.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
                and "report.py" not in line]  # (a report.py that cannot be imported is warned about too)
    assert len(warnings) == 1 and "compiled step failed" in warnings[0] and "from its start" in warnings[0]
    assert FLAKY["calls"] >= FLAKY["fail_at"]  # the failure really happened
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [(r["seed"], r["status"], r["steps"]) for r in rows] == [("42", "ok", "12"), ("43", "ok", "12")]
    # The rerun is a whole eager run: the same numbers as an eager sweep from scratch.
    monkeypatch.delenv("LLM_COMPILE_BACKEND")
    assert llm.main([a for a in args[:-1] if a != "--compile"] + ["eager.csv", "--no-compile"]) == 0
    eager = list(csv.DictReader(open(tmp_path / "eager.csv")))
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in eager]


def test_compiled_optimizer_step_equals_the_eager_optimizers(monkeypatch, fresh_dynamo):
    cfg = tiny_config(dropout=0.0)
    fused_model, eager_model = llm.MoEMinimalLLM(cfg), llm.MoEMinimalLLM(cfg)  # same seed: same weights
    rt = llm.resolve_runtime("cpu", use_amp=False)
    step_fn = torch.compile(llm.clip_muon_adamw, backend="llm_test_counting")
    fused_opts = llm.build_optimizers(fused_model, cfg, rt, fused=step_fn)
    eager_opts = llm.build_optimizers(eager_model, cfg, rt)
    assert fused_opts.fused is step_fn and eager_opts.fused is None
    g = torch.Generator().manual_seed(0)
    for mult in (0.3, 1.0, 0.55):  # a changing schedule: the lr lives in device tensors
        for opts in (fused_opts, eager_opts):
            opts.set_lr(mult)
        for pf, pe in zip(fused_model.parameters(), eager_model.parameters()):
            pf.grad = torch.randn(pf.shape, generator=g) * 3  # large: the clip at 1.0 engages
            pe.grad = pf.grad.clone()
        for opts in (fused_opts, eager_opts):
            opts.step(cfg.grad_clip)
        assert all(p.grad is None or not p.grad.any() for p in fused_model.parameters())  # cleared
    assert len(COMPILES) == 1  # the compiled step ran, and one graph served every lr
    moved = 0
    for (name, pf), pe, p0 in zip(fused_model.named_parameters(), eager_model.parameters(),
                                  llm.MoEMinimalLLM(cfg).parameters()):
        torch.testing.assert_close(pf, pe, rtol=1e-5, atol=1e-5, msg=name)
        moved += not torch.equal(pf, p0)
    assert moved == len(list(fused_model.parameters()))  # every parameter was stepped


def test_original_per_matrix_muon_equals_the_batched_one():
    torch.manual_seed(0)
    shapes = [(4, 48, 32), (4, 32, 48), (96, 32), (32, 32), (4, 32)]  # stacked experts, qkv, w_o, a router gate
    params = [[torch.nn.Parameter(torch.randn(s)) for s in shapes] for _ in range(2)]
    for a, b in zip(*params):
        b.data.copy_(a.data)
    fp32_ns = lambda u, steps: reference.newton_schulz(u, steps, dtype=torch.float32)  # noqa: E731
    opts = [llm.Muon(params[0], lr=0.02, ns_dtype=torch.float32),
            reference.OriginalMuon(params[1], lr=0.02, ns=fp32_ns)]
    for _ in range(3):
        for a, b in zip(*params):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_ceiling_spends_the_moes_expert_flops_per_token():
    cfg = tiny_config(dropout=0.0)
    moe, dense = llm.MoEMinimalLLM(cfg), reference.DenseLLM(cfg)
    expert_params = sum(b.feed_forward.w1.numel() + b.feed_forward.w2.numel() for b in moe.blocks)
    dense_params = sum(p.numel() for b in dense.blocks for p in b.feed_forward.parameters())
    assert dense_params == expert_params * cfg.expert_top_k // cfg.num_experts  # the weights one token uses
    dense.set_routing(0.5, 0.01)
    idx, tgt = torch.randint(0, 97, (2, 4, 16)).unbind(0)
    loss, ce, aux, z, counts, correct, _ = dense(idx, tgt)
    assert torch.isfinite(loss) and aux.item() == 0 and z.item() == 0 and counts.shape == (cfg.n_layers, 1)
    torch.testing.assert_close(loss, ce)  # no routing losses in the ceiling
    loss.backward()
    assert all(p.grad is not None for p in dense.parameters())  # nothing idle: the fused step needs every grad


def test_the_original_side_runs_fp16_with_a_scaler_on_cuda_and_fp32_elsewhere():
    for amp in (torch.bfloat16, None):
        cuda = llm.Runtime(torch.device("cuda"), amp, True, "")  # built by hand: no GPU is touched
        assert reference.original_runtime(cuda).amp_dtype == torch.float16
        assert reference.original_runtime(llm.Runtime(torch.device("cpu"), amp, False, "")).amp_dtype is None


def test_fp16_grad_scaler_path_stays_eager_and_unscales_before_the_clip(fresh_dynamo):
    cfg = tiny_config(dropout=0.0)
    scaled_model, plain_model = llm.MoEMinimalLLM(cfg), llm.MoEMinimalLLM(cfg)
    fp16 = llm.Runtime(torch.device("cpu"), torch.float16, True, "")  # an fp16 GPU's policy, on the CPU
    step_fn = torch.compile(llm.clip_muon_adamw, backend="llm_test_counting")
    scaled_opts = llm.build_optimizers(scaled_model, cfg, fp16, fused=step_fn)
    plain_opts = llm.build_optimizers(plain_model, cfg, llm.resolve_runtime("cpu", use_amp=False))
    assert scaled_opts.scaler.is_enabled() and scaled_opts.fused is None  # a GradScaler keeps it eager
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        scaled_opts.scaler.scale(torch.zeros(()))  # as the loss's backward would: the scaler starts here
        for ps, pp in zip(scaled_model.parameters(), plain_model.parameters()):
            pp.grad = torch.randn(pp.shape, generator=g) * 3  # the clip at 1.0 engages on the unscaled norm
            ps.grad = pp.grad * scaled_opts.scaler.get_scale()
        scaled_opts.step(1.0)
        plain_opts.step(1.0)
    assert not COMPILES  # the eager path ran
    for ps, pp in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(ps, pp, rtol=1e-5, atol=1e-6)


def test_the_originals_compiled_newton_schulz_falls_back_to_eager_once(monkeypatch, fresh_dynamo, capsys):
    G = torch.randn(24, 40)
    for backend, warned in (("llm_test_counting", False), ("llm_test_failing", True)):
        monkeypatch.setenv("LLM_COMPILE_BACKEND", backend)
        ns = reference.compiled_or_eager(reference.newton_schulz)
        for _ in range(2):
            torch.testing.assert_close(ns(G, 5, dtype=torch.float32),
                                       reference.newton_schulz(G, 5, dtype=torch.float32))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
                and "report.py" not in line]  # (until report.py has its summary API)
        assert len(err) == (1 if warned else 0)
    assert COMPILES  # the working backend compiled it
