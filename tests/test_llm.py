"""llm.py, in process: the MoE layer, loss, optimiser, schedule and data split against plain references.

The fast paths (sorted and grouped dispatch, fused linear cross-entropy, batched Muon) are compared with the
straightforward forms they replace (the original's per-expert loop, F.cross_entropy, torch.optim.Muon) on
random inputs; the balancing loss and CV against hand-computed values.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llm
import reference


def tiny_config(**kw):
    base = dict(d_model=32, n_heads=4, n_layers=2, d_ff=48, num_experts=8, expert_top_k=2, dropout=0.0,
                vocab_size=97, batch_size=4, max_seq_len=16, max_steps=20, eval_every=10, eval_steps=2,
                log_every=5, tokenizer="bytes")
    base.update(kw)
    return llm.MoEModelConfig(**base)


def cpu_run_setup(cfg):
    """Runtime, a small synthetic token stream split for cfg, and a model cache: what train_moe_model needs."""
    rt = llm.resolve_runtime("cpu")
    tokens = (np.arange(3000) * 7 % 97).astype(np.uint16)
    return rt, llm.TokenData.from_tokens(tokens, cfg, rt.device), llm.ModelCache(rt)


def moe_outputs(moe, x, seed=0):
    """Output and gradients of one MoE layer, with a fixed router noise draw."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, aux, z, counts = moe(x)
    w = torch.randn_like(out)  # a random cotangent: grouped_mm's backward rejects zero-stride gradients
    ((out * w).sum() + aux + 0.1 * z).backward()
    grads = [x.grad] + [p.grad.clone() for p in (moe.w1, moe.w2, moe.router.gate.weight)]
    return out.detach(), aux.detach(), counts, grads


def moe_pair(cfg, dispatch, std=0.2):
    """A production MoE layer and the original's loop version with the same weights."""
    moe = llm.MixtureOfExperts(cfg, dispatch)
    torch.nn.init.normal_(moe.w1, std=std), torch.nn.init.normal_(moe.w2, std=std)
    ref = reference.LoopMoE(cfg)
    ref.load_state_dict(moe.state_dict())
    return moe, ref


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dispatch", ["sorted", "grouped"])
def test_vectorised_moe_matches_per_expert_loop(top_k, dispatch):
    cfg = tiny_config(expert_top_k=top_k, noise_std=0.3)
    torch.manual_seed(1)
    moe, loop = moe_pair(cfg, dispatch)
    for m in (moe, loop):
        m.router.noise_std.fill_(0.3)
        m.train()  # noise on: both paths must see the same draw
    x = torch.randn(3, 10, cfg.d_model)
    ref, fast = moe_outputs(loop, x), moe_outputs(moe, x)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1])
    assert torch.equal(fast[2], ref[2]) and int(ref[2].sum()) == 30 * top_k
    for g_fast, g_ref in zip(fast[3], ref[3]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["sorted", "grouped"])
def test_empty_experts_get_no_tokens_and_zero_gradient(dispatch):
    cfg = tiny_config(expert_top_k=2)
    moe, loop = moe_pair(cfg, dispatch)
    for m in (moe, loop):
        with torch.no_grad():  # positive inputs and a gate that strongly prefers experts 0 and 1
            m.router.gate.weight.fill_(-1.0)
            m.router.gate.weight[:2] = 1.0
        m.eval()
    x = torch.rand(2, 8, cfg.d_model) + 0.1
    ref, fast = moe_outputs(loop, x), moe_outputs(moe, x)
    assert fast[2].tolist() == [16, 16, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-5)
    for g_fast, g_ref in zip(fast[3], ref[3]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    assert fast[3][1][2:].abs().max() == 0  # unused experts' w1 get exactly zero gradient


def test_grouped_dispatch_matches_loop_in_bf16():
    cfg = tiny_config(d_model=64, d_ff=128)
    torch.manual_seed(2)
    moe, loop = moe_pair(cfg, "grouped", std=0.1)
    x = torch.randn(2, 16, cfg.d_model)
    outs = []
    for m in (loop, moe):
        m.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(x).out.float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


def model_and_reference(cfg, dispatch):
    model = llm.MoEMinimalLLM(cfg, dispatch)
    ref = reference.OriginalLLM(cfg)
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.set_routing(0.2, 0.01)
    return model, ref


@pytest.mark.parametrize("dispatch", ["sorted", "grouped"])
def test_whole_model_fast_path_matches_reference_path(dispatch):
    cfg = tiny_config(dropout=0.0)
    model, ref = model_and_reference(cfg, dispatch)
    idx, tgt = torch.randint(0, 97, (2, 2, 16)).unbind(0)
    results = []
    for m in (ref, model):
        torch.manual_seed(3)
        out = m(idx, tgt)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in m.parameters()]))
    (r, r_grads), (f, f_grads) = results
    torch.testing.assert_close(f.loss, r.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(f.counts, r.counts) and f.correct == r.correct
    for a, b in zip(f_grads, r_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.eval(), ref.eval()  # without targets: the logits, as the original computes them
    torch.testing.assert_close(model(idx).logits, ref(idx).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_linear_cross_entropy_matches_f_cross_entropy(dtype, tol, monkeypatch):
    torch.manual_seed(4)
    N, C, V = 50, 16, 301
    h = torch.randn(N, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    logits = (h.to(dtype) @ W.to(dtype).T).float()
    ref = F.cross_entropy(logits, t)
    ref.backward()
    ref_grads = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    loss, correct = llm.LinearCrossEntropy.apply(h, W, t, dtype, True)
    (loss * 2.0).backward()  # a non-unit upstream gradient must scale the stored gradients
    torch.testing.assert_close(loss, ref.detach(), rtol=tol, atol=tol)
    assert int(correct) == int((logits.argmax(-1) == t).sum())
    torch.testing.assert_close(h.grad, 2 * ref_grads[0], rtol=tol, atol=tol)
    torch.testing.assert_close(W.grad, 2 * ref_grads[1], rtol=tol, atol=tol)


def test_fused_cross_entropy_in_chunks_gives_the_same_answer(monkeypatch):
    torch.manual_seed(5)
    h = torch.randn(40, 8, requires_grad=True)
    W, t = (torch.randn(100, 8) * 0.3).requires_grad_(True), torch.randint(0, 100, (40,))
    ref = F.cross_entropy(h @ W.T, t)
    ref.backward()
    ref_grads = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    monkeypatch.setattr(llm, "CE_CHUNK_LOGITS_CPU", 1500)  # 15 rows per chunk: 3 chunks, the last one short
    loss, correct = llm.LinearCrossEntropy.apply(h, W, t, torch.float32, True)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, ref_grads[1], rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    counts = torch.tensor([3, 1])  # top-1 picks 0, 0, 1, 0
    # f = [0.75, 0.25], P = [0.65, 0.35] -> 2 * (0.4875 + 0.0875) = 1.15
    assert llm.load_balancing_loss(probs, counts, 4).item() == pytest.approx(1.15)
    uniform = torch.full((6, 3), 1 / 3)
    assert llm.load_balancing_loss(uniform, torch.tensor([4, 4, 4]), 12).item() == pytest.approx(1.0)


def test_moe_aux_loss_is_the_formula_on_its_own_routing():
    cfg = tiny_config(expert_top_k=2)
    moe = llm.MixtureOfExperts(cfg).eval()
    x = torch.randn(2, 5, cfg.d_model)
    _, aux, _, counts = moe(x)
    _, top_idx, probs, _ = moe.router(x.reshape(10, -1))
    f = torch.bincount(top_idx.flatten(), minlength=8).float() / 20
    assert aux.item() == pytest.approx((8 * (f * probs.mean(0)).sum()).item(), rel=1e-6)
    assert counts.tolist() == torch.bincount(top_idx.flatten(), minlength=8).tolist()


def test_zero_balancing_weight_adds_nothing():
    model = llm.MoEMinimalLLM(tiny_config())
    model.set_routing(0.0, 0.0)
    idx, tgt = torch.randint(0, 97, (2, 2, 16)).unbind(0)
    loss, ce, aux, z = model(idx, tgt)[:4]
    assert aux.item() > 0 and z.item() > 0 and loss.item() == ce.item()
    model.set_routing(0.0, 0.5)
    loss, ce, aux = model(idx, tgt)[:3]
    assert loss.item() == pytest.approx(ce.item() + 0.5 * aux.item(), rel=1e-6)
    model.set_routing(0.0, 0.5, 0.25)
    loss, ce, aux, z = model(idx, tgt)[:4]
    assert loss.item() == pytest.approx(ce.item() + 0.5 * aux.item() + 0.25 * z.item(), rel=1e-6)


def test_router_noise_only_in_training():
    router = llm.TopKRouter(16, 8, 2)
    router.noise_std.fill_(1.0)
    x = torch.randn(32, 16)
    router.eval()
    a, b = router(x), router(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    clean_logits = x @ router.gate.weight.T
    torch.testing.assert_close(a[2], clean_logits.softmax(-1))
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c[2], d[2]) and not torch.equal(c[2], a[2])
    router.noise_std.fill_(0.0)
    e = router(x)
    assert all(torch.equal(u, v) for u, v in zip(a, e))


def test_expert_usage_cv_known_counts():
    assert llm.expert_usage_cv([10, 10, 10, 10]) == 0.0
    assert llm.expert_usage_cv([1, 2, 3, 4]) == pytest.approx(math.sqrt(1.25) / 2.5)  # population std
    assert llm.expert_usage_cv([8, 0, 0, 0]) == pytest.approx(math.sqrt(3))


def test_batched_muon_matches_torch_muon_matrix_by_matrix():
    assert hasattr(torch.optim, "Muon"), "this torch has no torch.optim.Muon to compare against"
    torch.manual_seed(6)
    shapes = [(24, 8), (8, 24), (16, 16)]
    ours = [torch.randn(s) for s in shapes] + [torch.randn(3, 12, 8)]  # the last: 3 stacked experts
    ref = [p.clone() for p in ours[:3]] + [m.clone() for m in ours[3]]
    start = [p.clone() for p in ref]
    ours = [torch.nn.Parameter(p) for p in ours]
    ref = [torch.nn.Parameter(p) for p in ref]
    opt = llm.Muon(ours, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16)
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(ours, grads):
            p.grad = g
        for p, g in zip(ref, grads[:3] + list(grads[3])):
            p.grad = g.clone()
        opt.step(), ref_opt.step()
    got = [p.detach() for p in ours[:3]] + list(ours[3].detach())
    for a, b in zip(got, ref):
        # Both orthogonalise in bf16 with the same fused multiply-adds, so they agree to float precision.
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
    assert all((b.detach() - s).abs().max() > 0.01 for b, s in zip(ref, start))  # the updates are not trivial


def test_muon_fp32_newton_schulz_orthogonalises():
    G = torch.randn(4, 32, 64)
    X = llm.zeropower_via_newtonschulz(G, dtype=torch.float32)
    s = torch.linalg.svdvals(X)  # the quintic iteration lands singular values roughly in (0.5, 1.5)
    assert s.min() > 0.3 and s.max() < 1.6


def test_lr_schedule_warmup_and_cosine_to_a_tenth():
    m = [llm.lr_multiplier(s, 400) for s in range(400)]
    assert m[0] == pytest.approx(1 / 20) and m[19] == pytest.approx(1.0)
    assert max(m) == pytest.approx(1.0) and m[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(m[19:], m[20:]))  # monotone decay after warmup


def test_split_is_disjoint_and_validation_is_fixed():
    cfg = tiny_config(batch_size=4, max_seq_len=16, eval_steps=3)
    tokens = np.arange(4000)  # every position has a distinct value
    data = llm.TokenData.from_tokens(tokens.astype(np.uint16), cfg, torch.device("cpu"))
    n_train = 4000 - 400
    val_tokens = torch.cat([torch.cat([x, y[:, -1:]], dim=1).flatten() for x, y in data.val])
    assert len(data.val) == 3 and int(val_tokens.min()) >= n_train
    assert len(set(val_tokens.tolist())) == len(val_tokens)  # windows do not overlap each other
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = data.sample_batch(gen)
        assert int(torch.maximum(x, y).max()) < n_train
        assert torch.equal(x[:, 1:], y[:, :-1])
    again = llm.TokenData.from_tokens(tokens.astype(np.uint16), cfg, torch.device("cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data.val, again.val))


def test_same_seed_same_initial_weights_in_every_condition():
    cfg = tiny_config()
    _, _, cache = cpu_run_setup(cfg)
    snapshots = []
    for noise, lb in ((0.0, 0.01), (0.5, 0.0)):
        model, _ = cache.get(llm.replace(cfg, noise_std=noise, load_balancing_weight=lb, seed=43))
        snapshots.append([p.detach().clone() for p in model.parameters()])
        assert model.blocks[0].feed_forward.router.noise_std.item() == noise
        with torch.no_grad():  # a trained model must not leak into the next run
            for p in model.parameters():
                p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(*snapshots))
    other, _ = cache.get(llm.replace(cfg, seed=44))
    assert not torch.equal(next(other.parameters()), snapshots[0][0])


def test_config_rejects_bad_values_and_computes_d_k():
    assert llm.MoEModelConfig().d_k == 48
    with pytest.raises(TypeError):
        llm.MoEModelConfig(d_k=48)  # computed, not a constructor argument
    for kw, words in [(dict(d_model=100), "--n-heads"), (dict(expert_top_k=9), "--num-experts"),
                      (dict(noise_std=-0.1), "--noise-std"), (dict(load_balancing_weight=-1), "--lb-weight"),
                      (dict(noise_std=float("inf")), "finite"), (dict(seed=-1), "--seeds"),
                      (dict(batch_size=0), "--batch-size")]:
        with pytest.raises(llm.UserError, match=words):
            llm.MoEModelConfig(**kw)


def test_training_on_the_sample_corpus_lowers_the_loss(tmp_path):
    cfg = llm.MoEModelConfig(**{**llm.PRESETS["smoke"], "cache_dir": str(tmp_path), "max_steps": 40,
                                "eval_every": 10})
    tokens, meta = llm.load_and_cache_data(cfg, quiet=True)
    cfg = llm.replace(cfg, vocab_size=meta["vocab_size"])
    rt = llm.resolve_runtime("cpu")
    data = llm.TokenData.from_tokens(tokens, cfg, rt.device)
    models = llm.ModelCache(rt)
    model, fn = models.get(cfg)
    before = llm.evaluate(fn, model, data, rt.autocast)
    result = llm.train_moe_model(cfg, data, models, tmp_path / "m.jsonl", progress=False)
    assert result.status == "ok" and result.steps == 40
    assert result.train_tokens == 40 * cfg.batch_size * cfg.max_seq_len
    assert before.val_loss > math.log(100)  # about uniform over the bytes at initialisation
    assert result.val_loss < before.val_loss - 1.5
    # best = the lowest of the run's evaluations (every 10 updates and the last), final = the last one
    vals = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["split"] == "val"]
    assert [v["step"] for v in vals] == [10, 20, 30, 40]
    assert result.best_val_perplexity == pytest.approx(min(v["perplexity"] for v in vals))
    assert result.val_perplexity == pytest.approx(vals[-1]["perplexity"])
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    # The run's routing figures are those of the trained model's own routing on the validation batches, read
    # here from each router's choices: CV of the counts summed over layers, the per-layer CVs from each layer.
    picks = {i: [] for i in range(cfg.n_layers)}
    hooks = [b.feed_forward.router.register_forward_hook(lambda m, i, o, k=k: picks[k].append(o[1].flatten()))
             for k, b in enumerate(model.blocks)]
    model.eval()
    with torch.no_grad(), rt.autocast():  # the evaluation's precision
        for x, _ in data.val:
            model(x)
    for h in hooks:
        h.remove()
    counts = np.stack([torch.bincount(torch.cat(picks[k]), minlength=cfg.num_experts).numpy()
                       for k in range(cfg.n_layers)])  # (L, E)
    assert result.expert_usage_cv == pytest.approx(llm.expert_usage_cv(counts.sum(axis=0)))
    per_layer = [llm.expert_usage_cv(c) for c in counts]
    assert result.expert_usage_cv_per_layer == pytest.approx(per_layer)
    assert result.expert_usage_cv_worst_layer == pytest.approx(max(per_layer))
    assert result.expert_usage_cv < max(result.expert_usage_cv_per_layer)  # summing over layers evens out
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert any('"split": "val"' in line for line in lines) and len(lines) >= 40 // cfg.log_every
    # Routing in training (router noise on) is measured on the last log window's batches.
    train = [json.loads(line) for line in lines if '"split": "train"' in line]
    assert result.train_expert_usage_cv_worst_layer == train[-1]["routing"]["expert_usage_cv_worst_layer"]
    assert result.train_dead_expert_fraction == train[-1]["routing"]["dead_expert_fraction"]


def test_gradient_accumulation_counts_updates_not_micro_batches(tmp_path):
    cfg = tiny_config(max_steps=6, gradient_accumulation_steps=3, eval_every=6, log_every=2)
    rt, data, models = cpu_run_setup(cfg)
    calls = []
    muon_step = llm.Muon.step
    llm.Muon.step = lambda self, closure=None: (calls.append(1), muon_step(self))[1]
    try:
        result = llm.train_moe_model(cfg, data, models, None, progress=False)
    finally:
        llm.Muon.step = muon_step
    assert len(calls) == 6 and result.steps == 6
    assert result.train_tokens == 6 * 3 * cfg.batch_size * cfg.max_seq_len


def test_non_finite_loss_marks_the_run_diverged_at_the_right_update(monkeypatch):
    cfg = tiny_config(max_steps=10, log_every=3, eval_every=10)
    rt, data, models = cpu_run_setup(cfg)
    model, _ = models.get(cfg)
    updates, real_update = [], llm.Optimizers.step

    def update_then_break(self, grad_clip):  # after 4 good updates, a NaN weight poisons update 5's loss
        real_update(self, grad_clip)
        updates.append(1)
        if len(updates) == 4:
            model.lb_weight.fill_(float("nan"))

    monkeypatch.setattr(llm.Optimizers, "step", update_then_break)
    result = llm.train_moe_model(cfg, data, models, None, progress=False)
    assert result.status == "diverged" and result.diverged_step == 5
    assert result.steps == 6  # noticed at the next log point, not later
    assert math.isnan(result.val_loss) and math.isnan(result.best_val_perplexity)


def test_architecture_matches_the_original_parameter_counts():
    # The user's published figures: 79,059,840 parameters, 22,436,736 outside the experts (vocabulary 49152).
    with torch.device("meta"):
        model = llm.MoEMinimalLLM(llm.MoEModelConfig(vocab_size=49152))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(b.feed_forward.w1.numel() + b.feed_forward.w2.numel() for b in model.blocks)
    est = llm.estimate(model.cfg)  # arithmetic only: the same counts without building a model
    assert (est.params, est.active_params) == (total, total - experts + experts * 2 // 8)  # top 2 of 8
    # nanoGPT's estimate: 6 x active matmul weights (attention, router, 2 of 8 experts, tied head) + attention
    C, L, T = 384, 6, 512
    assert est.flops_per_token == 6 * (L * (4 * C * C + 8 * C + 2 * 2 * C * 1536) + 49152 * C) + 12 * L * C * T
    assert est.train_tokens == 400 * 24 * 512
    assert total == 79_059_840 and total - experts == 22_436_736
    assert model.lm_head.weight is model.token_embedding.weight
    assert not any("bias" in name for name, _ in model.named_parameters())


def test_runs_of_one_seed_see_the_same_batches_in_every_condition(monkeypatch):
    cfg = tiny_config(max_steps=4, eval_every=4, log_every=2)
    rt, data, models = cpu_run_setup(cfg)
    seen, real_sample = [], llm.TokenData.sample_batch
    monkeypatch.setattr(llm.TokenData, "sample_batch", lambda self, gen: seen.append(real_sample(self, gen)) or seen[-1])
    runs = {}
    for noise, lb, seed in ((0.0, 0.01, 7), (0.5, 0.0, 7), (0.0, 0.01, 8)):
        seen.clear()
        result = llm.train_moe_model(llm.replace(cfg, noise_std=noise, load_balancing_weight=lb, seed=seed),
                                     data, models, None, progress=False)
        runs[(noise, lb, seed)] = ([x for x, _ in seen], result.val_loss)
    a, b, c = runs.values()
    assert len(a[0]) == 4 and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))  # same seed: same batches
    assert not torch.equal(a[0][0], c[0][0])  # another seed: other batches
    assert a[1] != b[1]  # the conditions really differ


def test_compiled_grouped_model_is_one_graph_and_matches_eager():
    cfg = tiny_config(d_model=64, d_ff=128)
    model = llm.MoEMinimalLLM(cfg, "grouped")
    model.set_routing(0.0, 0.01)
    model.eval()  # no dropout or noise, so eager and compiled see the same computation
    idx, tgt = torch.randint(0, 97, (2, 4, 16)).unbind(0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(idx, tgt)[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-3, atol=1e-3)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_cpu_dropout_keeps_1_minus_p_scales_and_passes_gradient_through_the_mask():
    torch.manual_seed(0)
    x = torch.randn(500_000, requires_grad=True)
    y = llm.dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # binomial std here is 0.0004
    torch.testing.assert_close(y[kept], x[kept] / 0.9)  # inverted dropout: kept values scaled by 1/(1-p)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # gradient flows through the same mask
    xb = torch.randn(64, 32).bfloat16()  # bf16: the 1/(1-p) scale is applied in float, then rounded once
    yb = llm.dropout(xb, 0.25, True)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb[yb != 0], (xb.float()[yb != 0] / 0.75).bfloat16(), rtol=0, atol=0)
    assert torch.equal(llm.dropout(x, 0.1, False), x)
    assert torch.equal(llm.dropout(x, 0.0, True), x)


def test_production_dropout_is_the_cpu_mask_and_the_reference_keeps_torchs():
    cfg = tiny_config(dropout=0.1)
    model, ref = model_and_reference(cfg, "grouped")
    idx, tgt = torch.randint(0, 97, (2, 4, 16)).unbind(0)
    losses = []
    for m in (model, model, ref):  # in training the masks are random, but seeded like everything else
        torch.manual_seed(5)
        losses.append(m(idx, tgt).ce)
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])  # other masks
    model.eval(), ref.eval()
    torch.testing.assert_close(model(idx, tgt).ce, ref(idx, tgt).ce)  # no dropout: the same model


def test_whole_model_fast_path_matches_reference_path_in_bf16():
    cfg = tiny_config(dropout=0.0, vocab_size=300)
    model, ref = model_and_reference(cfg, "grouped")
    idx, tgt = torch.randint(0, 300, (2, 4, 16)).unbind(0)
    model.set_routing(0.0, 0.01), ref.set_routing(0.0, 0.01)
    out = {}
    for name, m in (("loop", ref), ("grouped", model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(idx, tgt).loss
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out["grouped"][0], out["loop"][0], rtol=1e-2, atol=1e-2)
    for a, b in zip(out["grouped"][1], out["loop"][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_cpu_precision_and_newton_schulz_follow_the_bf16_instructions(monkeypatch):
    model = llm.MoEMinimalLLM(tiny_config())
    monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: True)
    rt = llm.resolve_runtime("cpu")
    assert rt.amp_dtype == torch.bfloat16 and "native bf16" in rt.reason
    ns_dtype = lambda rt: llm.build_optimizers(model, model.cfg, rt).muon.param_groups[0]["ns_dtype"]  # noqa
    assert ns_dtype(rt) == torch.bfloat16
    rt = llm.resolve_runtime("cpu", use_amp=False)
    assert rt.amp_dtype is None and "use_amp off" in rt.reason
    assert ns_dtype(rt) == torch.bfloat16  # fast here, as the original
    monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: False)
    rt = llm.resolve_runtime("cpu")
    assert rt.amp_dtype is None and "no bf16 matmul instructions" in rt.reason
    assert ns_dtype(rt) == torch.float32  # bf16 is slow: fp32
    assert llm.PRESETS["smoke"]["use_amp"] is False  # tiny matmuls: bf16's casts cost more than they save


def test_amp_policy_prefers_native_bf16_and_falls_back_to_fp16():
    assert llm.amp_policy(True, True)[0] == torch.bfloat16
    assert llm.amp_policy(True, False)[0] == torch.float16 and "GradScaler" in llm.amp_policy(True, False)[1]
    assert llm.amp_policy(False, True)[0] is None


def test_hub_probe_uses_the_endpoint_port_and_trusts_proxies(monkeypatch):
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):  # any HTTP answer, even an error status, means "reachable"
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert llm.hub_reachable(timeout=2)
    server.shutdown()
    server.server_close()
    assert not llm.hub_reachable(timeout=2)  # the port now refuses
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert llm.hub_reachable(timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not llm.hub_reachable(timeout=2)


def test_compile_flag_and_dispatch_choice_on_cpu():
    eager, forced = llm.resolve_runtime("cpu"), llm.resolve_runtime("cpu", compile=True)
    assert not eager.compile and forced.compile and "compile on (flag)" in forced.reason
    assert llm.default_dispatch(eager) == "grouped"  # grouped_mm runs eagerly on CPU
    assert llm.default_dispatch(forced) == "sorted"  # but its CPU kernels do not compile
