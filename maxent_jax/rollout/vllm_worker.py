"""The vLLM worker extension that loads pushed weights into the running model.

vLLM mixes this class into its worker (`worker_extension_cls`), so its methods run inside the
worker, next to the model, and are reached with `LLM.collective_rpc("<method name>")`. Every
name starts with `maxent_` so none shadows one of the worker's own (vLLM refuses such clashes,
and the worker already has `update_weights` and `reload_weights`).

Imported by vLLM inside its environment only; the trainer never imports this module.
"""

from __future__ import annotations

from typing import Iterable

import torch


class MaxentWeightReceiver:
    """Worker mixin: in-place weight replacement that leaves no stale pre-packed copy behind."""

    def maxent_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load HF-named tensors into the running model; returns the modules re-packed afterwards.

        `reload_weights` is vLLM's in-place reload: it restores each layer's checkpoint-format
        parameters, feeds the tensors through the model's own `load_weights` (HF names, fused
        q/k/v and gate/up), then re-runs each loaded layer's post-load processing. Calling
        `model.load_weights` directly fails on CPU, where post-load processing replaced linear
        weights by empty tensors and kept only a pre-packed copy.
        """
        self.reload_weights(weights_iterator=named_tensors, is_checkpoint_format=True)
        return self.maxent_repack_cpu_gemms()

    def maxent_repack_cpu_gemms(self) -> list[str]:
        """Re-pack the CPU GEMM weights of every module that still holds its unpacked weight.

        On CPU, vLLM packs each linear weight once, after loading, into a kernel-specific copy
        (`cpu_linear` closes over it). A reload re-packs the layers that received tensors, but a
        tied `lm_head` shares the embedding's parameter, receives no tensor of its own, and would
        keep multiplying by the packed copy of the *old* embedding: generation silently uses
        stale output weights. Modules whose weight was removed after packing (the linear layers)
        were re-packed by the reload itself and have no weight to pack from; they are skipped.
        A no-op on GPU, where no module has `cpu_linear`.
        """
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        repacked = []
        for name, module in self.model_runner.get_model().named_modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                repacked.append(name)
        return repacked
