"""llm.py's fast-step machinery, checked on CPU with cheap compile backends (no GPU needed).

- No compilation inside a run: a two-run compiled sweep compiles during ModelCache's warm-up and never again,
  counted by the backend itself (every graph dynamo hands to a backend goes through it).
- Fallbacks: a compile that fails costs one warning line and the run completes eagerly.
- The compiled optimizer step (clip + Muon + AdamW, lr in device tensors) equals the eager optimizers and does
  not recompile when the learning rate changes; the original's per-matrix Muon equals the batched one.
- The benchmark's dense ceiling spends the same expert FLOPs per token as the MoE.
"""
import numpy as np
import pytest
import torch
import torch._dynamo

import llm

COMPILES = []  # (backend name, graph) for every graph a counting backend compiled


def _counting(name):
    def backend(gm, example_inputs):
        COMPILES.append((name, gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _failing(gm, example_inputs):
    raise RuntimeError("no compiler here")


for _name, _fn in (("llm_test_counting", _counting("llm_test_counting")), ("llm_test_failing", _failing)):
    if _name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(compiler_fn=_fn, name=_name)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """A clean dynamo cache and compile count, and no fused-update failure left by another test."""
    torch._dynamo.reset()
    COMPILES.clear()
    monkeypatch.setitem(llm._fused_state, "broken", False)
    monkeypatch.setitem(llm._fused_state, "fn", {})
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
    monkeypatch.setattr(llm, "FUSED_UPDATE_DEVICES", ("cuda", "cpu"))  # the optimizer step compiled too
    from_tokens = llm.TokenData.from_tokens

    def cuda_like_layouts(tokens, cfg, device):  # on CUDA, .to() copies validation views to contiguous tensors
        d = from_tokens(tokens, cfg, device)
        d.val = [(x.contiguous(), y.contiguous()) for x, y in d.val]
        return d

    monkeypatch.setattr(llm.TokenData, "from_tokens", staticmethod(cuda_like_layouts))
    caches, after_warm_up = [], []
    compile_ = llm.ModelCache._compile

    def compile_and_count(self, *a, **kw):
        fn = compile_(self, *a, **kw)
        caches.append(self)
        after_warm_up.append(len(COMPILES))
        return fn

    monkeypatch.setattr(llm.ModelCache, "_compile", compile_and_count)
    rc = llm.main(["--preset", "smoke", "--use-amp", "--device", "cpu", "--compile", "--noise-std", "0.1", "--lb-weight", "0.01",
                   "--seeds", "42", "43", "--max-steps", "4", "--eval-every", "2", "--log-every", "2",
                   "--batch-size", "4", "--max-seq-len", "32", "--eval-steps", "2",
                   "--out", str(tmp_path / "r.csv")])
    assert rc == 0
    assert "warning" not in capsys.readouterr().err
    assert len(after_warm_up) == 1  # one architecture: compiled once, before the first run
    # Training graph (forward and backward), evaluation graph, optimizer step: all built by the warm-up.
    assert after_warm_up[0] >= 3
    assert len(COMPILES) == after_warm_up[0], "a run compiled after the warm-up"
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 3  # header and two runs
    # The count is not blind: the raw compiled model, fed one strided tensor as both inputs, recompiles.
    w = torch.randint(0, 200, (4, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches[0].fn.compiled(w[:, :-1], w[:, :-1])
    assert len(COMPILES) > after_warm_up[0]


def test_a_failing_compile_warns_once_and_the_run_completes_eagerly(tmp_path, monkeypatch, fresh_dynamo, capsys):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_failing")
    cfg = tiny_config()
    rt = llm.resolve_runtime("cpu", use_amp=False, compile=True)
    tokens = (np.arange(3000) * 7 % 97).astype(np.uint16)
    data = llm.TokenData.from_tokens(tokens, cfg, rt.device)
    models = llm.ModelCache(rt)
    model, fn = models.get(cfg, data=data)
    assert fn is model  # eager
    result = llm.train_moe_model(cfg, data, rt, models, None, progress=False)
    assert result["status"] == "ok" and result["steps"] == 4 and np.isfinite(result["val_loss"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "eager" in warnings[0]


def _optimizer_pair(rt_fused, rt_eager):
    cfg = tiny_config(dropout=0.0)
    models = [llm.MoEMinimalLLM(cfg) for _ in range(2)]
    opts = [llm.build_optimizers(models[0], cfg, rt_fused), llm.build_optimizers(models[1], cfg, rt_eager)]
    return cfg, models, opts


def test_compiled_optimizer_step_equals_the_eager_optimizers(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_counting")
    monkeypatch.setattr(llm, "FUSED_UPDATE_DEVICES", ("cpu",))
    cfg = tiny_config(dropout=0.0)
    fused_model, eager_model = llm.MoEMinimalLLM(cfg), llm.MoEMinimalLLM(cfg)  # same seed: same weights
    fused_opts = llm.build_optimizers(fused_model, cfg, llm.resolve_runtime("cpu", use_amp=False, compile=True))
    eager_opts = llm.build_optimizers(eager_model, cfg, llm.resolve_runtime("cpu", use_amp=False))
    assert getattr(fused_opts[0], "fused_update", None) is not None
    assert getattr(eager_opts[0], "fused_update", None) is None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    for mult in (0.3, 1.0, 0.55):  # a changing schedule: the lr lives in device tensors
        for opts in (fused_opts, eager_opts):
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mult
        for pf, pe in zip(fused_model.parameters(), eager_model.parameters()):
            pf.grad = torch.randn(pf.shape, generator=g) * 3  # large: the clip at 1.0 engages
            pe.grad = pf.grad.clone()
        for model, opts in ((fused_model, fused_opts), (eager_model, eager_opts)):
            llm.apply_update(opts, scaler, list(model.parameters()), cfg.grad_clip)
        assert all(p.grad is None or not p.grad.any() for p in fused_model.parameters())  # cleared
    assert not llm._fused_state["broken"]
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
    opts = [llm.Muon(ps, lr=0.02, ns_dtype=torch.float32, batched=batched) for ps, batched in zip(params, (True, False))]
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
    moe, dense = llm.MoEMinimalLLM(cfg), llm.DenseLLM(cfg)
    expert_params = sum(b.feed_forward.w1.numel() + b.feed_forward.w2.numel() for b in moe.blocks)
    dense_params = sum(p.numel() for b in dense.blocks for p in b.feed_forward.parameters())
    assert dense_params == expert_params * cfg.expert_top_k // cfg.num_experts  # the weights one token uses
    dense.set_routing(0.5, 0.01)
    idx, tgt = torch.randint(0, 97, (2, 4, 16)).unbind(0)
    loss, ce, aux, z, counts, correct = dense(idx, tgt)
    assert torch.isfinite(loss) and aux.item() == 0 and z.item() == 0 and counts.shape == (cfg.n_layers, 1)
    torch.testing.assert_close(loss, ce)  # no routing losses in the ceiling
    loss.backward()
    assert all(p.grad is not None for p in dense.parameters())  # nothing idle: the fused step needs every grad


def test_the_original_side_runs_fp16_with_a_scaler_on_cuda_and_fp32_elsewhere():
    for amp in (torch.bfloat16, None):
        cuda = llm.Runtime(torch.device("cuda"), amp, True, "")  # built by hand: no GPU is touched
        assert llm.original_runtime(cuda).amp_dtype == torch.float16
        assert llm.original_runtime(llm.Runtime(torch.device("cpu"), amp, False, "")).amp_dtype is None


def test_fp16_grad_scaler_path_stays_eager_and_unscales_before_the_clip(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "llm_test_counting")
    monkeypatch.setattr(llm, "FUSED_UPDATE_DEVICES", ("cpu",))
    cfg = tiny_config(dropout=0.0)
    scaled_model, plain_model = llm.MoEMinimalLLM(cfg), llm.MoEMinimalLLM(cfg)
    scaled_opts = llm.build_optimizers(scaled_model, cfg, llm.resolve_runtime("cpu", use_amp=False, compile=True))
    plain_opts = llm.build_optimizers(plain_model, cfg, llm.resolve_runtime("cpu", use_amp=False))
    assert getattr(scaled_opts[0], "fused_update", None) is not None  # attached, but a GradScaler bypasses it
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        scaler.scale(torch.zeros(()))  # as the loss's backward would: the scaler's state starts here
        for ps, pp in zip(scaled_model.parameters(), plain_model.parameters()):
            pp.grad = torch.randn(pp.shape, generator=g) * 3  # the clip at 1.0 engages on the unscaled norm
            ps.grad = pp.grad * scaler.get_scale()
        llm.apply_update(scaled_opts, scaler, list(scaled_model.parameters()), 1.0)
        llm.apply_update(plain_opts, torch.amp.GradScaler("cpu", enabled=False), list(plain_model.parameters()), 1.0)
    assert not COMPILES  # the eager path ran
    for ps, pp in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(ps, pp, rtol=1e-5, atol=1e-6)


def test_the_originals_compiled_newton_schulz_falls_back_to_eager_once(monkeypatch, fresh_dynamo, capsys):
    G = torch.randn(3, 24, 40)
    for backend, warned in (("llm_test_counting", False), ("llm_test_failing", True)):
        monkeypatch.setenv("LLM_COMPILE_BACKEND", backend)
        ns = llm.CompiledOrEager(llm.zeropower_via_newtonschulz)
        for _ in range(2):
            torch.testing.assert_close(ns(G, 5, dtype=torch.float32),
                                       llm.zeropower_via_newtonschulz(G, 5, dtype=torch.float32))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(err) == (1 if warned else 0)
    assert COMPILES  # the working backend compiled it
