"""The host-side pieces of the vllm backend that need no engine: tensor conversion, seeds, checkpoint headers.

They run in the trainer's environment (torch and safetensors are there too), so they are not
marked `vllm`; everything that needs the engine is in test_vllm_backend.py.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from maxent_jax.errors import UserError
from maxent_jax.rollout.vllm_backend import checkpoint_tensors, numpy_to_torch, prompt_seed


def test_bfloat16_and_read_only_arrays_reach_torch_bit_exact_zero_copy_without_warnings():
    values = np.array([[1.5, -2.25], [3.0e-3, 65504.0]], dtype=np.float32)
    for dtype, torch_dtype in ((ml_dtypes.bfloat16, torch.bfloat16), (np.float32, torch.float32), (np.float16, torch.float16)):
        frozen = np.frombuffer(values.astype(dtype).tobytes(), dtype=dtype).reshape(2, 2)  # read-only, as the server parses it
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tensor = numpy_to_torch(frozen)
        assert tensor.dtype == torch_dtype and tuple(tensor.shape) == (2, 2)
        assert tensor.data_ptr() == frozen.ctypes.data, "the model's bytes were copied"
        np.testing.assert_array_equal(tensor.float().numpy(), frozen.astype(np.float32))


def test_transposed_views_keep_their_logical_layout():
    array = np.arange(6, dtype=np.float32).reshape(2, 3).T
    np.testing.assert_array_equal(numpy_to_torch(array).numpy(), array)


def test_prompt_seeds_are_deterministic_distinct_and_in_range():
    seeds = {prompt_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert prompt_seed(3, 4) == prompt_seed(3, 4)
    assert prompt_seed(3, 4) != prompt_seed(4, 3)


def test_checkpoint_tensors_reads_names_shapes_dtypes_across_shards(tmp_path):
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.norm.weight": np.zeros((4,), ml_dtypes.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert checkpoint_tensors(str(tmp_path)) == {
        "model.embed_tokens.weight": ((8, 4), "float32"),
        "model.norm.weight": ((4,), "bfloat16"),
    }


def test_checkpoint_problems_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"no \*\.safetensors files"):
        checkpoint_tensors(str(tmp_path))
    save_file({"model.layers.0.q.weight": np.zeros((2, 2), np.int8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"'model.layers.0.q.weight' has dtype I8"):
        checkpoint_tensors(str(tmp_path))
