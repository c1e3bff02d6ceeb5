"""Model FLOPs per token of the decoder, for model FLOPs utilisation (MFU) in benchmarks.

Counted the usual way (PaLM appendix B): only matmuls, 2 FLOPs per multiply-add.

    N_mm       = L * (D*(H + 2*K)*d + H*d*D + 3*D*F) + D*V     (weights that take part in matmuls)
    forward    = 2 * N_mm + 4 * L * H * d * S                  (S = sequence length: q.k and p.v)
    training   = 3 * forward  = 6 * N_mm + 12 * L * H * d * S  (backward costs two forwards)

with L layers, D model width, H query heads, K key/value heads, d head size, F MLP width
(SwiGLU: gate, up and down), V vocabulary. The embedding lookup is a gather (no FLOPs); a tied
LM head still costs its D*V matmul. Attention is counted over all S keys even though causal
masking lets fast kernels skip half: this is the convention MFU figures are quoted in.
Remat recomputation is not model FLOPs and is not counted.
"""

from __future__ import annotations


def decoder_matmul_params(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> int:
    """N_mm: parameters that take part in a matmul per token (biases and norms excluded)."""
    d_model, q_width, kv_width = hidden_size, num_heads * head_dim, num_kv_heads * head_dim
    attention = d_model * (q_width + 2 * kv_width) + q_width * d_model
    mlp = 3 * d_model * intermediate_size
    return num_layers * (attention + mlp) + d_model * vocab_size


def decoder_flops_per_token(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    training: bool = True,
) -> float:
    """Model FLOPs per token: 6*N_mm + 12*L*H*d*S for a train step, a third of it for a forward."""
    n_mm = decoder_matmul_params(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
    forward = 2.0 * n_mm + 4.0 * num_layers * num_heads * head_dim * seq_len
    return 3.0 * forward if training else forward


def model_flops_utilization(
    tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float, num_devices: int
) -> float:
    """MFU = achieved model FLOP/s over the devices' peak FLOP/s (a fraction in [0, 1])."""
    return tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices)
