"""Scale by simulation: plan a run's per-device memory and FLOPs by compiling the trainer's real
programs for its mesh on CPU host devices, from the model's config.json (no weights, no GPU).

`python -m maxent_jax.plan` (`__main__`), `core.plan` (the programs' memory and FLOPs, the
verdict, fixes), `programs` (what is compiled), `architecture` (where a model's config.json comes
from), `flash` (the cuDNN attention stand-in), `guard` (the launcher's and trainer's checks).
"""
