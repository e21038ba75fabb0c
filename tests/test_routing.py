"""llm.py's routing instruments and balancing methods, against hand-computed values and plain references.

Covers routing_metrics (the CSV's load columns), the balancing loss's gradient into the router, ST-MoE's router
z-loss, DeepSeek-V3's bias balancing (choice vs combine weights, the update rule, reset per run, its effect on a
short run), evaluate on a model with known routing (inputs only), the training log's window, the config hash of the new
fields, and float32 staying float32 on CUDA (no TF32).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llm
from test_llm import cpu_run_setup, tiny_config


def test_routing_metrics_hand_computed():
    counts = np.array([[6, 2, 0, 0], [2, 2, 2, 2]])  # layer 0 skewed, layer 1 even
    m = llm.routing_metrics(counts)
    # layer 0: shares .75 .25 0 0; mean count 2, deviations 4 0 -2 -2 -> population std sqrt(6)
    h0 = (0.75 * math.log(4 / 3) + 0.25 * math.log(4)) / math.log(4)
    assert m["expert_usage_cv_per_layer"] == pytest.approx([math.sqrt(6) / 2, 0.0])
    assert m["expert_load_max_mean_per_layer"] == pytest.approx([3.0, 1.0])  # .75 / (1/4)
    assert m["routing_entropy_per_layer"] == pytest.approx([h0, 1.0])
    assert m["dead_expert_fraction_per_layer"] == pytest.approx([0.5, 0.0])  # two experts under .025
    np.testing.assert_allclose(m["expert_load_per_layer"], [[0.75, 0.25, 0, 0], [0.25] * 4])
    # overall: CV of the counts summed over layers (8 4 2 2: mean 4, deviations 4 0 -2 -2), the rest layer means
    assert m["expert_usage_cv"] == pytest.approx(math.sqrt(6) / 4)
    assert m["expert_load_max_mean"] == pytest.approx(2.0)
    assert m["routing_entropy"] == pytest.approx((h0 + 1) / 2)
    assert m["dead_expert_fraction"] == pytest.approx(0.25)
    assert m["expert_usage_cv_worst_layer"] == pytest.approx(math.sqrt(6) / 2)  # layer 0
    assert set(llm.ROUTING_KEYS) == set(m)
    assert llm.csv_value(m["expert_load_per_layer"]) == "0.75;0.25;0;0|0.25;0.25;0.25;0.25"
    assert llm.csv_value(m["dead_expert_fraction_per_layer"]) == "0.5;0"


def test_routing_metrics_dead_threshold_is_a_tenth_of_the_fair_share():
    # 10 experts, 1000 assignments: fair share 100; 9 counts as dead (under 10), 10 does not
    m = llm.routing_metrics([[9, 10, 131, 100, 100, 100, 100, 150, 150, 150]])
    assert m["dead_expert_fraction"] == pytest.approx(0.1)
    assert m["expert_load_max_mean"] == pytest.approx(1.5)
    one_expert = llm.routing_metrics([[5], [7]])  # a single expert is trivially even
    assert one_expert["routing_entropy"] == 1.0 and one_expert["expert_usage_cv"] == 0.0


def test_balancing_loss_gradient_reaches_the_router_at_full_strength():
    # aux = E * sum_j f_j * mean_n p_nj with f fixed by the top-k counts, so
    # d aux / d logit_nj = (E / N) * p_nj * (f_j - sum_i f_i p_ni), and d aux / d W = (d aux / d logits)^T x.
    torch.manual_seed(0)
    cfg = tiny_config(d_model=8, num_experts=4, expert_top_k=2)
    moe = llm.MixtureOfExperts(cfg).eval()
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.5)
    x = torch.randn(1, 6, 8)
    _, aux, _, counts = moe(x)
    aux.backward()
    W, xf = moe.router.gate.weight.detach().double(), x.reshape(6, 8).double()
    p = (xf @ W.T).softmax(-1)  # (N, E)
    f = counts.double() / (6 * 2)  # (E,)
    g_logits = (4 / 6) * p * (f - (p * f).sum(-1, keepdim=True))  # (N, E)
    expected = (g_logits.T @ xf).float()  # (E, C)
    assert expected.abs().max() > 1e-3  # the case is not degenerate
    torch.testing.assert_close(moe.router.gate.weight.grad, expected, rtol=1e-4, atol=1e-6)
    assert aux.item() == pytest.approx(4 * (f * p.mean(0)).sum().item(), rel=1e-6)


def test_router_z_loss_value_and_gradient_match_the_plain_formula():
    torch.manual_seed(1)
    router = llm.TopKRouter(8, 4, 2)
    with torch.no_grad():
        router.gate.weight.normal_()
    x = torch.randn(10, 8)
    W = router.gate.weight.detach().clone().requires_grad_(True)
    for training, std in ((False, 0.0), (True, 0.7)):
        router.train(training)
        router.noise_std.fill_(std)
        router.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        z = router(x)[3]
        z.backward()
        torch.manual_seed(2)  # the same noise draw: z is on the logits the routing used
        logits = x @ W.T + (torch.randn(10, 4) * std if training else 0)
        ref = torch.logsumexp(logits, dim=-1).pow(2).mean()
        (ref_grad,) = torch.autograd.grad(ref, W)
        torch.testing.assert_close(z, ref.detach())
        torch.testing.assert_close(router.gate.weight.grad, ref_grad)


def test_router_z_loss_is_summed_over_layers_and_weighted_into_the_loss():
    model = llm.MoEMinimalLLM(tiny_config(n_layers=3)).eval()
    model.set_routing(0.0, 0.0, 0.1)
    zs = []
    hooks = [b.feed_forward.router.register_forward_hook(lambda m, i, o: zs.append(o[3])) for b in model.blocks]
    idx, tgt = torch.randint(0, 97, (2, 2, 16)).unbind(0)
    loss, ce, _, z = model(idx, tgt)[:4]
    for h in hooks:
        h.remove()
    assert len(zs) == 3 and z.item() == pytest.approx(sum(v.item() for v in zs), rel=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 0.1 * z.item(), rel=1e-6)


def test_topk_choice_uses_biased_scores_and_weights_use_unbiased_logits():
    router = llm.TopKRouter(4, 4, 2).eval()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, 0] = torch.tensor([2.0, 1.0, 0.5, 0.0])  # logits of x = e0: 2, 1, .5, 0
        router.expert_bias.copy_(torch.tensor([-5.0, 0.0, 0.0, 3.0]))  # scores: -3, 1, .5, 3
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    top_w, top_idx, probs, _ = router(x)
    assert top_idx.tolist() == [[3, 1]]  # by the biased scores; unbiased top-2 would be 0 and 1
    e = math.e
    torch.testing.assert_close(top_w, torch.tensor([[1 / (1 + e), e / (1 + e)]]))  # softmax of logits 0 and 1
    torch.testing.assert_close(probs, torch.tensor([[2.0, 1.0, 0.5, 0.0]]).softmax(-1))  # the loss sees no bias


def test_bias_update_moves_toward_even_load_and_stays_centred():
    bias = torch.zeros(4)
    llm.update_routing_bias(bias, torch.tensor([10, 2, 4, 0]), 0.1)  # mean 4: signs -1, +1, 0, +1
    torch.testing.assert_close(bias, torch.tensor([-0.125, 0.075, -0.025, 0.075]))  # minus their mean .025
    llm.update_routing_bias(bias, torch.tensor([4, 4, 4, 4]), 0.1)  # even load: no change
    torch.testing.assert_close(bias, torch.tensor([-0.125, 0.075, -0.025, 0.075]))
    model = llm.MoEMinimalLLM(tiny_config(n_layers=2, num_experts=4))
    model.update_routing_bias(torch.tensor([[10, 2, 4, 0], [0, 0, 0, 8]]), 0.1)
    biases = [b.feed_forward.router.expert_bias for b in model.blocks]
    torch.testing.assert_close(biases[0], torch.tensor([-0.125, 0.075, -0.025, 0.075]))
    torch.testing.assert_close(biases[1], torch.tensor([0.05, 0.05, 0.05, -0.15]))
    assert not any("bias" in name for name, _ in model.named_parameters())  # not trained by gradients


def test_bias_is_reset_for_every_run_and_updated_from_each_updates_counts(monkeypatch):
    cfg = tiny_config(max_steps=3, gradient_accumulation_steps=2, eval_every=3, log_every=3, balancing="bias",
                      bias_update_rate=0.05, noise_std=0.0, load_balancing_weight=0.0)
    rt, data, models = cpu_run_setup(cfg)
    model, _ = models.get(cfg)
    seen, real_get = [], llm.ModelCache.get

    def recording_get(self, c, data=None):  # record each micro-batch's routing counts as trained
        m, fn = real_get(self, c, data)
        return m, lambda x, y=None: (lambda out: (m.training and seen.append(out.counts.clone()), out)[1])(
            fn(x, y))

    monkeypatch.setattr(llm.ModelCache, "get", recording_get)
    llm.train_moe_model(cfg, data, models, None, progress=False)
    assert len(seen) == 3 * 2
    expected = torch.zeros(cfg.n_layers, cfg.num_experts)
    for update in range(3):  # one bias step per optimizer update, from the sum of its two micro-batches
        llm.update_routing_bias(expected, seen[2 * update] + seen[2 * update + 1], 0.05)
    got = torch.stack([b.feed_forward.router.expert_bias for b in model.blocks])
    assert got.abs().max() > 0
    torch.testing.assert_close(got, expected)
    monkeypatch.setattr(llm.ModelCache, "get", real_get)
    model, _ = models.get(llm.replace(cfg, balancing="loss"))  # the next run starts unbiased
    assert all(b.feed_forward.router.expert_bias.abs().max() == 0 for b in model.blocks)
    llm.train_moe_model(llm.replace(cfg, balancing="loss"), data, models, None, progress=False)
    assert all(b.feed_forward.router.expert_bias.abs().max() == 0 for b in model.blocks)  # loss runs never move it


def test_evaluate_model_on_known_routing():
    # Biases force the routing: layer 0 sends every token to experts 0 and 1, layer 1 to experts 2 and 3.
    cfg = tiny_config(num_experts=8, expert_top_k=2)
    rt, data, models = cpu_run_setup(cfg)
    model, fn = models.get(cfg)
    model.set_routing(0.0, 10.0, 1.0)  # heavy balancing and z-loss weights: val_loss must leave both out
    with torch.no_grad():
        model.blocks[0].feed_forward.router.expert_bias[:2] = 1e4
        model.blocks[1].feed_forward.router.expert_bias[2:4] = 1e4
    calls = []

    def inputs_only(*args):  # evaluation hands the model its inputs, never the targets
        calls.append(len(args))
        return fn(*args)

    ev = llm.evaluate(inputs_only, model, data, rt.autocast)
    assert calls == [1] * len(data.val)
    model.eval()
    with torch.no_grad():
        plain = [F.cross_entropy(model.lm_head(model.norm(_hidden(model, x))).flatten(0, 1), y.flatten())
                 for x, y in data.val]
        total = [model(x, y).loss for x, y in data.val]
        correct = sum(int((model(x).logits.argmax(-1) == y).sum()) for x, y in data.val)
    assert ev.val_loss == pytest.approx(float(torch.stack(plain).mean()), rel=1e-5)
    assert ev.val_accuracy == correct / sum(y.numel() for _, y in data.val)
    assert float(torch.stack(total).mean()) > ev.val_loss + 10  # 10 x aux (>= 1 per layer) was left out
    r = ev.routing  # per layer 2 of 8 experts at half each: CV sqrt(3); summed over layers 4 of 8: CV 1
    assert r["expert_usage_cv"] == pytest.approx(1.0)
    assert r["expert_usage_cv_per_layer"] == pytest.approx([math.sqrt(3)] * 2)
    assert r["expert_usage_cv_worst_layer"] == pytest.approx(math.sqrt(3))
    assert r["dead_expert_fraction"] == 0.75 and r["expert_load_max_mean"] == pytest.approx(4.0)
    assert r["routing_entropy"] == pytest.approx(math.log(2) / math.log(8))
    assert r["expert_load_per_layer"][1] == pytest.approx([0, 0, 0.5, 0.5, 0, 0, 0, 0])


def _hidden(model, idx):  # the final hidden state, block by block (eval: no dropout, no noise)
    x = model.token_embedding(idx) * math.sqrt(model.cfg.d_model)
    for block in model.blocks:
        x = block(x)[0]
    return x


def test_training_log_reports_the_window_it_averages(tmp_path, monkeypatch):
    cfg = tiny_config(max_steps=4, log_every=2, eval_every=4, load_balancing_weight=0.01, router_z_loss_weight=0.002)
    rt, data, models = cpu_run_setup(cfg)
    outs, real_get = [], llm.ModelCache.get

    def recording_get(self, c, data=None):
        m, fn = real_get(self, c, data)
        keep = lambda out: [None if t is None else t.detach().clone() for t in out]  # noqa: E731
        return m, lambda x, y=None: (lambda out: (m.training and outs.append(keep(out)), out)[1])(fn(x, y))

    monkeypatch.setattr(llm.ModelCache, "get", recording_get)
    llm.train_moe_model(cfg, data, models, tmp_path / "m.jsonl", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    n_tok = cfg.batch_size * cfg.max_seq_len
    for r, window in zip(train, (outs[0:2], outs[2:4])):
        _, ce, aux, z, counts, correct, _ = zip(*window)
        assert r["loss"] == pytest.approx(float(sum(ce)) / 2, rel=1e-5)
        assert r["accuracy"] == pytest.approx(float(sum(correct)) / (2 * n_tok))  # both micro-batches, not the last
        assert r["aux_loss_unweighted"] == pytest.approx(float(sum(aux)) / 2, rel=1e-5)
        assert r["aux_loss_weighted"] == pytest.approx(0.01 * r["aux_loss_unweighted"])
        assert r["z_loss_unweighted"] == pytest.approx(float(sum(z)) / 2, rel=1e-5)
        assert r["z_loss_weighted"] == pytest.approx(0.002 * r["z_loss_unweighted"])
        assert r["routing"] == llm.routing_metrics(sum(c.numpy() for c in counts))  # noise included
    val = [r for r in recs if r["split"] == "val"][-1]
    assert set(val["routing"]) == set(llm.ROUTING_KEYS)
    assert np.asarray(val["routing"]["expert_load_per_layer"]).sum(axis=1) == pytest.approx([1.0] * cfg.n_layers)


@pytest.mark.timeout(180)
def test_bias_balancing_evens_out_routing_on_the_sample_corpus(tmp_path):
    # Smoke-sized model, no balancing loss, no noise: only the bias differs. Measured at rate 2e-2 and 30 updates
    # on seeds 1, 2, 3, 42: CV 0.21-0.24 with the bias against 0.75-0.87 without; per layer at most 0.42 against
    # at least 0.94. (Rate 5e-2: 0.17-0.26; the default 1e-3 moves the bias too little in 30 updates.)
    cfg = llm.MoEModelConfig(**{**llm.PRESETS["smoke"], "cache_dir": str(tmp_path), "max_steps": 30,
                                "eval_every": 30, "noise_std": 0.0, "load_balancing_weight": 0.0,
                                "bias_update_rate": 2e-2, "seed": 1})
    tokens, meta = llm.load_and_cache_data(cfg, quiet=True)
    cfg = llm.replace(cfg, vocab_size=meta["vocab_size"])
    rt = llm.resolve_runtime("cpu", use_amp=False)
    data, models = llm.TokenData.from_tokens(tokens, cfg, rt.device), llm.ModelCache(rt)
    res = {b: llm.train_moe_model(llm.replace(cfg, balancing=b), data, models, None, progress=False)
           for b in ("loss", "bias")}
    assert res["bias"].expert_usage_cv < 0.5 * res["loss"].expert_usage_cv, res
    assert res["bias"].expert_usage_cv_worst_layer < 0.7 * min(res["loss"].expert_usage_cv_per_layer), res


def test_config_hash_follows_every_result_field_and_the_data_not_paths_or_logging():
    cfg = llm.MoEModelConfig()
    same = [llm.replace(cfg, cache_dir="elsewhere"), llm.replace(cfg, log_every=3),
            llm.replace(cfg, data_files=("/some/where/a.txt",))]
    assert {llm.config_hash(c, "abc") for c in same} == {llm.config_hash(cfg, "abc")}
    changed = [llm.replace(cfg, balancing="bias"), llm.replace(cfg, router_z_loss_weight=1e-3),
               llm.replace(cfg, bias_update_rate=1e-2), llm.replace(cfg, seed=1)]
    hashes = {llm.config_hash(c, "abc") for c in changed} | {llm.config_hash(cfg, "abc"),
                                                            llm.config_hash(cfg, "abd")}
    assert len(hashes) == 6


def test_balancing_settings_validate_and_sweep():
    assert llm.parse_grid_item("balancing=loss,bias") == ("balancing", ["loss", "bias"])
    with pytest.raises(llm.UserError, match="--balancing must be one of loss, bias"):
        llm.MoEModelConfig(balancing="aux")
    for kw, flag in ((dict(router_z_loss_weight=-1e-3), "--router-z-loss-weight"),
                     (dict(bias_update_rate=float("nan")), "--bias-update-rate")):
        with pytest.raises(llm.UserError, match=flag):
            llm.MoEModelConfig(**kw)
    assert llm.main(["--grid", "balancing=loss,sideways", "--dry-run"]) == 2
    assert llm.main(["--balancing", "sideways", "--dry-run"]) == 2
    assert llm.plan_sweep(["--balancing", "loss", "bias"]).axes["balancing"] == ("loss", "bias")
    assert llm.MoEModelConfig().eval_every == 50


def test_float32_on_cuda_is_not_tf32(monkeypatch):
    # No GPU needed: resolve_runtime's CUDA branch with the device calls stubbed out.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    before = torch.get_float32_matmul_precision()
    rt = llm.resolve_runtime("cuda", use_amp=False, compile=False)
    assert torch.get_float32_matmul_precision() == before == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32
    assert rt.amp_dtype is None and rt.dtype_name == "float32" and "fp32" in rt.reason
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # someone else turned TF32 on
    assert rt.dtype_name == "float32 (tf32 matmuls)"
    assert llm.resolve_runtime("cuda", compile=False).dtype_name == "bfloat16"


def test_changing_biases_and_loss_weights_does_not_recompile():
    cfg = tiny_config()
    model = llm.MoEMinimalLLM(cfg, "grouped")
    graphs = []

    def counting_backend(gm, example_inputs):  # runs the traced graph eagerly, counting compilations
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(model, backend=counting_backend)
    idx, tgt = torch.randint(0, 97, (2, 2, 16)).unbind(0)
    model.set_routing(0.0, 0.01, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # grouped_mm compiles for bf16 only
        fn(idx, tgt)[0].backward()
    n = len(graphs)
    model.set_routing(0.0, 0.5, 1e-3)
    with torch.no_grad():
        model.blocks[0].feed_forward.router.expert_bias[:2] = 1e4  # every token of layer 0 to experts 0 and 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ce, aux, z, counts = fn(idx, tgt)[:5]
    loss.backward()
    assert len(graphs) == n  # buffers are graph inputs, not constants baked into the graph
    assert counts[0].tolist() == [32, 32, 0, 0, 0, 0, 0, 0]  # the compiled graph sees the new bias
    assert loss.item() == pytest.approx((ce + 0.5 * aux + 1e-3 * z).item(), rel=1e-6)
    torch._dynamo.reset()
