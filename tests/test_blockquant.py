"""Numeric helpers against ONNX Runtime's own quantization kernel and MatMulNBits itself."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

from workbench.quantization.blockquant import pack_values, rtn_quantize, unpack_values


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(64, 96), (48, 80)])  # 80: the last block is padded
def test_rtn_matches_onnxruntime_kernel_bit_for_bit(bits, symmetric, shape):
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight.T.copy())
    ours = rtn_quantize(weight, bits, 32, symmetric)
    # Padding past K is never read; ONNX Runtime leaves it 0 where we store the zero point.
    real = weight.shape[1]
    theirs = unpack_values(packed.reshape(weight.shape[0], -1), bits, packed.size // weight.shape[0] * 8 // bits)
    np.testing.assert_array_equal(ours.q[:, :real], theirs[:, :real])
    np.testing.assert_array_equal(ours.scales, scales)
    if not symmetric:
        np.testing.assert_array_equal(ours.packed_zero_points(), zero_points)


def test_pack_round_trip():
    values = np.random.default_rng(1).integers(0, 16, size=(5, 64)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_values(pack_values(values, 4), 4, 64), values)
    assert pack_values(values, 4).shape == (5, 32)


def test_dequantized_error_is_within_half_a_step():
    weight = np.random.default_rng(2).standard_normal((32, 128)).astype(np.float32)
    quantized = rtn_quantize(weight, 4, 32, symmetric=False)
    step = np.repeat(quantized.scales, 32, axis=1)
    assert np.all(np.abs(quantized.dequantize() - weight) <= step / 2 + 1e-6)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
def test_matmulnbits_computes_the_dequantized_product(bits, symmetric):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((40, 80)).astype(np.float32)
    quantized = rtn_quantize(weight, bits, 32, symmetric)
    inputs = ["A", "B", "scales"]
    initializers = [numpy_helper.from_array(quantized.packed(), "B"), numpy_helper.from_array(quantized.scales, "scales")]
    if not symmetric:
        inputs.append("zero_points")
        initializers.append(numpy_helper.from_array(quantized.packed_zero_points(), "zero_points"))
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=80, N=40, bits=bits, block_size=32, accuracy_level=0
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, 80])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    activations = rng.standard_normal((3, 80)).astype(np.float32)
    (result,) = session.run(None, {"A": activations})
    np.testing.assert_allclose(result, activations @ quantized.dequantize().T, rtol=1e-4, atol=1e-4)
