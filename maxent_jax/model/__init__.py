"""The decoder-only language model: config, Flax NNX module, KV cache and chunked log-probs."""

from maxent_jax.model.cache import KVCache
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import LOGICAL_AXES, Decoder
from maxent_jax.model.logprobs import token_logprobs

__all__ = ["KVCache", "ModelConfig", "LOGICAL_AXES", "Decoder", "token_logprobs"]
