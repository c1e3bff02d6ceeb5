"""LoRA through the trainer, on an HF base on disk: final_hf is a PEFT adapter on that base, a resumed
run reproduces the uninterrupted one, and resuming on a different base is a one-line error."""

from __future__ import annotations

import json
import pathlib

import pytest
from flax import nnx

from configs.tiny import get_config
from maxent_jax.config import set_fields
from maxent_jax.data.tokenizer import build_offline_tokenizer
from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig
from maxent_jax.model.decoder import Decoder
from maxent_jax.model.hf_io import export_hf_checkpoint
from maxent_jax.model.lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from maxent_jax.trainer import Trainer

TIMING_KEYS = ("time", "time/step_s", "train/rollout_seconds")


def _base(path: pathlib.Path, tokenizer_dir: pathlib.Path, seed: int) -> pathlib.Path:
    config = get_config()
    cfg = ModelConfig.tiny(**dict(config.model.tiny))
    return export_hf_checkpoint(Decoder(cfg, rngs=nnx.Rngs(seed)), cfg, path, tokenizer_dir=tokenizer_dir)


def _config(base: pathlib.Path, steps: int, dropout: float = 0.0):
    c = get_config()
    c.model.name_or_path = str(base)
    c.lora.enabled = True
    c.lora.dropout = dropout
    c.lora.rank = 4
    c.lora.target_modules = ("q_proj", "v_proj", "down_proj")
    set_fields(c, {"train.sft_warmup_steps": 0, "train.max_steps": steps, "train.per_device_train_batch_size": 1,
                   "train.gradient_chunks": 1, "rollout.num_generations": 4, "rollout.max_completion_length": 8,
                   "data.synthetic.num_train": 64, "eval.do_eval": False, "checkpoint.save_steps": 1,
                   "checkpoint.save_total_limit": 0, "checkpoint.async_save": False, "logging.progress": False})
    return c


def _run(config, workdir: pathlib.Path) -> list[dict]:
    trainer = Trainer(config, workdir)
    try:
        trainer.run()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and "latency" not in k and "run/" not in k}
            for r in rows]


@pytest.mark.slow
def test_lora_run_exports_peft_resumes_exactly_and_refuses_another_base(tmp_path):
    tokenizer = build_offline_tokenizer(tmp_path / "tokenizer")
    base = _base(tmp_path / "base", tokenizer, seed=0)

    # With adapter dropout: its masks follow the restored step, so the resumed run is still exact.
    straight = _run(_config(base, 2, dropout=0.2), tmp_path / "straight")
    adapter = json.loads((tmp_path / "straight" / "final_hf" / ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["r"] == 4
    assert (tmp_path / "straight" / "final_hf" / ADAPTER_WEIGHTS).is_file()
    assert (tmp_path / "straight" / "final_merged_hf" / "config.json").is_file()

    _run(_config(base, 1, dropout=0.2), tmp_path / "resumed")  # two steps in all, resumed from the checkpoint of step 1
    resumed = _run(_config(base, 2, dropout=0.2), tmp_path / "resumed")
    last = [r for r in resumed if r.get("step") == 2 and "train/loss" in r]
    assert last and last == [r for r in straight if r.get("step") == 2 and "train/loss" in r]

    _base(base, tokenizer, seed=1)  # the base directory now holds other weights
    trainer = Trainer(_config(base, 3), tmp_path / "resumed")
    try:
        with pytest.raises(UserError, match="were trained on base") as err:
            trainer.run()
        assert "\n" not in str(err.value)
    finally:
        trainer.close()


@pytest.mark.slow
def test_lora_run_through_the_rollout_server_pushes_adapters_alone(tmp_path):
    """rollout.backend='server' with LoRA: the jax server receives the base in full at the first push and
    the adapters alone at the next ones (rollout/adapters.py)."""
    import urllib.request

    from rollout_fixtures import TOKEN, start_rollout_server, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    (tmp_path / "token").write_text(TOKEN)
    config = _config(model_dir, 3)
    config.rollout.backend = "server"
    config.vllm.token_file = str(tmp_path / "token")
    config.checkpoint.export_final = False
    with start_rollout_server("jax", model_dir) as (url, server):
        config.vllm.url = url + "/generate"
        records = _run(config, tmp_path / "run")
        info = json.loads(urllib.request.urlopen(url + "/info", timeout=30).read())
    steps = [r for r in records if "train/loss" in r]
    assert [r["train/rollout/push_adapter_only"] for r in steps] == [0.0, 1.0, 1.0]
    assert info["weight_version"] == info["adapter_version"] == 2
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert steps[0]["train/rollout/push_bytes"] > model_bytes > 4 * steps[-1]["train/rollout/push_bytes"]


@pytest.mark.slow
def test_default_config_with_lora_learns_and_writes_a_peft_adapter(tmp_path):
    """`python -m maxent_jax.train --config.lora.enabled=True` as shipped: mean train reward >= 0.8 over the
    last 10% of logged steps, and final_hf/ loads with peft on the base it names."""
    import os
    import subprocess
    import sys

    import numpy as np
    import peft
    import transformers

    from maxent_jax.cli import REPO_ROOT

    proc = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path}",
                           "--config.lora.enabled=True"], cwd=REPO_ROOT,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["train/reward"] for r in sorted(records, key=lambda r: r["step"]) if "train/reward" in r]
    assert np.mean(rewards[-max(1, len(rewards) // 10):]) >= 0.8, rewards
    adapter = json.loads((tmp_path / "final_hf" / ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "base_hf").resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    assert isinstance(peft.PeftModel.from_pretrained(base, tmp_path / "final_hf"), peft.PeftModel)
