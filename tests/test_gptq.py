"""GPTQ on tiny real models: better than round-to-nearest, on ONNX Runtime's grid, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import assert_same_state, assert_untouched_by_a_cancel_at_any_point, calibration_ids, correlated_inputs, full_plan, sampled_ids, state
from models import build_model
from workbench.quantization.blockquant import grid_params, rtn_quantize
from workbench.errors import JobCancelled
from workbench.quantization import gptq
from workbench.quantization.gptq import _round_to_grid, gptq_quantize, gptq_solve
from workbench.quantization.layerwise import InputGroup, capture, layer_output


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp(request.param), request.param)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


def reference_gptq(weight, h, bits, block_size, symmetric, damp=0.01):
    """The paper's Algorithm 1 column by column (no lazy batches), in float64, for comparison.

    Returns the codes and the dequantized weight.
    """
    w = weight.double().clone()
    n, k = w.shape
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes, values = np.zeros((n, k)), np.zeros((n, k))
    for j in range(k):
        if j % block_size == 0:
            scale, zero = grid_params(w[:, j:j + block_size].float().numpy(), bits, symmetric)
        safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
        codes[:, j] = np.clip(np.round(w[:, j].float().numpy() / safe + zero), 0, 2**bits - 1)
        values[:, j] = (codes[:, j] - zero) * scale
        error = (w[:, j] - torch.from_numpy(values[:, j])) / u[j, j]
        w[:, j:] -= error[:, None] * u[j, j:][None, :]
    return codes, torch.from_numpy(values).float()


def output_error(x, weight, approx):
    return float((x @ (weight - approx).T).norm() / (x @ weight.T).norm())


# --- the solver on one linear -------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn(symmetric, act_order):
    k, n = 96, 48
    x = correlated_inputs(k)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.1
    *_, dequantized = gptq_solve(weight, hessian(x), 4, block_size=32, symmetric=symmetric, act_order=act_order)
    rtn = torch.from_numpy(rtn_quantize(weight.numpy(), 4, 32, symmetric).dequantize())
    gptq_error, rtn_error = output_error(x, weight, dequantized), output_error(x, weight, rtn)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_blocked_solver_matches_the_column_by_column_algorithm():
    # K = 300 spans three lazy batches, many sub-blocks and a partial last block.
    k, n = 300, 40
    x = correlated_inputs(k, seed=5)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.1
    h = hessian(x)
    codes, _, _, dequantized = gptq_solve(weight, h, 4, block_size=32, symmetric=False)
    expected_codes, expected = reference_gptq(weight, h, 4, 32, symmetric=False)
    agreement = (codes[:, :k].numpy() == expected_codes).mean()
    assert agreement > 0.97, agreement  # float32 vs float64: a rare tie may flip, then drift a little
    assert output_error(x, weight, dequantized) < 1.02 * output_error(x, weight, expected)


@pytest.mark.parametrize("qmax", [15.0, 255.0])
def test_rounding_matches_numpys_round_and_clip(qmax):
    values = np.concatenate([
        np.arange(-3.0, qmax + 3.0, 0.5),  # every tie, both parities, and out of range
        np.random.default_rng(0).uniform(-1e6, 1e6, 1000),
        [np.nextafter(0.5, 1), np.nextafter(2.5, 0), -0.0, 1e30, -1e30],
    ]).astype(np.float32)
    expected = np.clip(np.round(values), 0, qmax)
    np.testing.assert_array_equal(_round_to_grid(torch.from_numpy(values.copy()), qmax).numpy(), expected)
    per_row = torch.full((len(values),), qmax)
    np.testing.assert_array_equal(_round_to_grid(torch.from_numpy(values.copy()), per_row).numpy(), expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_exactly_rtn(bits, symmetric, act_order):
    """With H a multiple of I no error propagates, so GPTQ must reproduce ORT's RTN bit for bit."""
    k, n = 80, 24  # 80 is not a multiple of the block: the last block is padded
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.1
    h = 3.0 * torch.eye(k)
    codes, scales, zeros, dequantized = gptq_solve(weight, h, bits, block_size=32, symmetric=symmetric,
                                                   act_order=act_order)
    rtn = rtn_quantize(weight.numpy(), bits, 32, symmetric)
    np.testing.assert_array_equal(codes.numpy().astype(np.uint8), rtn.q)
    np.testing.assert_array_equal(scales.numpy(), rtn.scales)
    if not symmetric:
        np.testing.assert_array_equal(zeros.numpy().astype(np.uint8), rtn.zero_points)
    np.testing.assert_array_equal(dequantized.numpy(), rtn.dequantize())


def test_rows_with_different_bits_are_solved_together():
    k = 64
    x = correlated_inputs(k, seed=2)
    weight = torch.randn(32, k, generator=torch.Generator().manual_seed(8)) * 0.1
    bits = np.array([4] * 16 + [8] * 16)
    codes, _, _, dequantized = gptq_solve(weight, hessian(x), bits, block_size=32, symmetric=False)
    alone4 = gptq_solve(weight[:16], hessian(x), 4, block_size=32, symmetric=False)
    alone8 = gptq_solve(weight[16:], hessian(x), 8, block_size=32, symmetric=False)
    torch.testing.assert_close(dequantized, torch.cat([alone4[3], alone8[3]]))
    assert codes[16:].max() > 15  # the 8-bit rows really use 8 bits


@pytest.mark.parametrize("act_order", [False, True])
def test_a_group_solved_in_row_chunks_equals_the_stacked_solve(monkeypatch, act_order):
    """Linears sharing an input (q/k/v) are solved a chunk of rows at a time, straight into each module's
    arrays; with chunks that straddle the modules' boundaries the results are those of one solve of the
    stacked rows (the same codes; scales to float32 rounding: BLAS may sum a product of another width in
    another order, seen on one processor and not another)."""
    k = 64
    x = correlated_inputs(k, seed=4)
    generator = torch.Generator().manual_seed(9)
    linears = [torch.nn.Linear(k, rows, bias=False) for rows in (24, 8, 8)]
    for linear in linears:
        linear.weight.data = torch.randn(linear.weight.shape, generator=generator) * 0.1
    bits = [4, 8, 4]
    stacked = torch.cat([linear.weight.detach() for linear in linears])
    row_bits = np.concatenate([np.full(linear.out_features, b) for linear, b in zip(linears, bits)])
    codes, scales, zeros, dequantized = gptq_solve(stacked, hessian(x), row_bits, block_size=32, symmetric=False,
                                                   act_order=act_order)
    monkeypatch.setattr(gptq, "ROW_CHUNK", 7)  # 40 rows in 6 chunks of 7 or fewer, crossing both boundaries
    stats = gptq._Hessian()
    stats.add(x)
    group = InputGroup(names=["q", "k", "v"], modules=linears, bits=bits, stats=stats)
    results, writes = {}, []
    gptq._quantize_group(group, results, writes, block_size=32, symmetric=False, act_order=act_order, damp=0.01)
    start = 0
    for name, linear, (module, written) in zip("qkv", linears, writes):
        stop = start + linear.out_features
        ours = results[name]
        np.testing.assert_array_equal(ours.q, codes[start:stop].numpy().astype(np.uint8))
        np.testing.assert_allclose(ours.scales, scales[start:stop].numpy(), rtol=1e-6, atol=0)
        np.testing.assert_array_equal(ours.zero_points, zeros[start:stop].numpy().astype(np.uint8))
        assert module is linear
        torch.testing.assert_close(written, dequantized[start:stop], rtol=1e-6, atol=1e-9)
        start = stop


def test_dead_inputs_are_zeroed_and_do_not_break_the_factorization():
    k = 64
    x = correlated_inputs(k, seed=4)
    x[:, 5] = 0.0
    weight = torch.randn(16, k, generator=torch.Generator().manual_seed(9)) * 0.1
    _, _, _, dequantized = gptq_solve(weight, hessian(x), 4, block_size=32, symmetric=True)
    assert torch.isfinite(dequantized).all()
    assert torch.all(dequantized[:, 5] == 0)


# --- on the tiny models -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_result_is_on_its_grid(model, bits, symmetric, act_order):
    plan = full_plan(model, bits)
    results = gptq_quantize(model, calibration_ids(model, samples=4, tokens=16), plan, block_size=32,
                            symmetric=symmetric, act_order=act_order)
    modules = dict(model.named_modules())
    assert set(results) == set(plan)
    for name, quantized in results.items():
        n, k = modules[name].weight.shape
        blocks = -(-k // 32)
        assert (quantized.bits, quantized.block_size, quantized.k) == (bits, 32, k)
        assert quantized.q.shape == (n, blocks * 32) and quantized.q.dtype == np.uint8
        assert quantized.scales.shape == (n, blocks) and quantized.scales.dtype == np.float32
        assert quantized.q.max() <= 2**bits - 1
        if symmetric:
            assert quantized.zero_points is None
        else:
            assert quantized.zero_points.shape == (n, blocks) and quantized.zero_points.dtype == np.uint8
            assert quantized.zero_points.max() <= 2**bits - 1
        # Every value is an integer step of its block's scale away from the block's zero.
        zero = 2 ** (bits - 1) if symmetric else np.repeat(quantized.zero_points, 32, axis=1)[:, :k]
        steps = quantized.dequantize() / np.repeat(np.where(quantized.scales == 0, 1, quantized.scales), 32, 1)[:, :k]
        np.testing.assert_allclose(steps + zero, np.round(steps + zero), atol=1e-3)
        weight = modules[name].weight.detach().numpy()
        if act_order:  # static groups: the block parameters are those of the original weights
            blocks_of_weight = weight.reshape(n, blocks, 32)
            scale, zero_point = grid_params(blocks_of_weight, bits, symmetric)
            np.testing.assert_array_equal(quantized.scales, scale)
            if not symmetric:
                np.testing.assert_array_equal(quantized.zero_points, zero_point.astype(np.uint8))
        # Close to the weight it stands for: GPTQ moves weights to cancel errors, but on average
        # by about a grid step, not more (64 calibration tokens leave H rank-deficient here).
        step = np.abs(np.repeat(quantized.scales, 32, axis=1)[:, :k])
        assert np.abs(quantized.dequantize() - weight).mean() < step.mean(), name


def test_model_weights_are_restored(model):
    before = state(model)
    results = gptq_quantize(model, calibration_ids(model), full_plan(model), block_size=32, symmetric=False)
    assert results
    assert_same_state(model, before)
    assert not model.training


def test_model_weights_are_restored_after_a_cancel_from_progress(model):
    before = state(model)
    messages = []

    def progress(fraction, message):
        messages.append(message)
        if message.startswith("layer 2/"):  # layer 1's weights have been written by now
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        gptq_quantize(model, calibration_ids(model), full_plan(model), block_size=32, symmetric=True,
                      progress=progress)
    assert "layer 1/2" in messages
    assert_same_state(model, before)


def test_model_weights_are_restored_after_a_cancel_at_any_point(model):
    ids = calibration_ids(model, samples=2, tokens=16)
    plan = full_plan(model)
    checks = assert_untouched_by_a_cancel_at_any_point(
        model, lambda cancelled: gptq_quantize(model, ids, plan, block_size=32, symmetric=False, cancelled=cancelled)
    )
    assert checks > 10  # checked per chunk, per linear group and per layer


def loss_with(model, ids, weights):
    """Mean next-token loss on ids with `weights` (name -> (N, K) array) written into a copy."""
    modules = dict(model.named_modules())
    before = {name: modules[name].weight.detach().clone() for name in weights}
    try:
        with torch.no_grad():
            for name, weight in weights.items():
                modules[name].weight.copy_(torch.from_numpy(weight))
            return float(model(ids, labels=ids, use_cache=False).loss)
    finally:
        with torch.no_grad():
            for name, weight in before.items():
                modules[name].weight.copy_(weight)


def test_gptq_loss_is_below_rtn_loss(model):
    ids = sampled_ids(model)
    # A tied lm_head is the embedding table too; writing it would quantize the embeddings as well.
    plan = {name: 4 for name in full_plan(model) if name != "lm_head" or not model.config.tie_word_embeddings}
    modules = dict(model.named_modules())
    gptq = {name: q.dequantize() for name, q in
            gptq_quantize(model, ids, plan, block_size=32, symmetric=False).items()}
    rtn = {name: rtn_quantize(modules[name].weight.detach().numpy(), 4, 32, False).dequantize() for name in plan}
    with torch.no_grad():
        original = float(model(ids, labels=ids, use_cache=False).loss)
    gptq_loss, rtn_loss = loss_with(model, ids, gptq), loss_with(model, ids, rtn)
    assert original < gptq_loss < rtn_loss, (original, gptq_loss, rtn_loss)
    # A clear share of RTN's damage is removed (about a quarter on these random, nearly
    # uncorrelated tiny models; half on the real demo model).
    assert gptq_loss - original < 0.9 * (rtn_loss - original), (original, gptq_loss, rtn_loss)


def test_progress_reports_each_layer_and_the_lm_head(model):
    messages = []
    gptq_quantize(model, calibration_ids(model, samples=2, tokens=16), full_plan(model), block_size=32,
                  symmetric=True, progress=lambda fraction, message: messages.append((fraction, message)))
    texts = [message for _, message in messages]
    assert "layer 1/2" in texts and "layer 2/2" in texts and "lm_head" in texts
    fractions = [fraction for fraction, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_partial_plan_leaves_other_linears_alone(model):
    plan = {"model.layers.1.mlp.down_proj": 8, "model.layers.0.self_attn.v_proj": 4}
    results = gptq_quantize(model, calibration_ids(model, samples=2, tokens=16), plan, block_size=32,
                            symmetric=False)
    assert set(results) == set(plan)
    assert results["model.layers.1.mlp.down_proj"].bits == 8


@pytest.mark.parametrize(
    ("plan", "words"),
    [
        ({"model.layers.0.self_attn.nothing": 4}, "not a linear layer"),
        ({"model.layers.0.self_attn.q_proj": 3}, "3 bits"),
        ({"model.embed_tokens": 4}, "not a linear layer"),
    ],
)
def test_bad_plans_are_refused_with_a_clear_message(model, plan, words):
    with pytest.raises(ValueError, match=words):
        gptq_quantize(model, calibration_ids(model, samples=1, tokens=16), plan, block_size=32, symmetric=True)


def test_bad_calibration_and_block_size_are_refused(model):
    plan = {"lm_head": 4}
    with pytest.raises(ValueError, match="calibration"):
        gptq_quantize(model, torch.zeros(0, 0, dtype=torch.long), plan, block_size=32, symmetric=True)
    with pytest.raises(ValueError, match="Block size"):
        gptq_quantize(model, calibration_ids(model, samples=1, tokens=16), plan, block_size=24, symmetric=True)


def test_capture_keeps_each_layers_own_arguments(tmp_path):
    """Layers with a sliding window get their own mask; running the layers on the captured
    arguments must reproduce the model's own last hidden state."""
    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = model.model.layers
    with torch.no_grad():
        captured = capture(model, layers, [ids], lambda: False)
        hidden = captured.hidden[0]
        for index in captured.order:
            args, kwargs, _ = captured.calls[index][0]
            hidden = layer_output(layers[index](hidden, *args, **kwargs))
        expected = model.model(ids, use_cache=False).last_hidden_state
    assert captured.order == [0, 1]
    torch.testing.assert_close(model.model.norm(hidden), expected)
    # and the layers' own forward methods are back
    assert "forward" not in layers[0].__dict__
