"""How a node's GPUs are split between the vLLM rollout server and the trainer, checked against the model.

`launch/resolve_config.py` calls `check_split` for the launcher (its `split_*` facts). A trainer mesh whose fsdp/tensor sizes do not divide the model's sharded dimensions makes
every such weight replicate silently (`parallel.rules` falls back with a warning): 8 GPUs with one
kept for vLLM gave Qwen2.5-1.5B (hidden 1536) a 1,7,1 mesh. When the split was the launcher's
default (not given) the most training GPUs whose mesh divides the model is chosen, with
a vLLM tensor parallelism the model's heads allow; when the user gave --dp/--tp/--mesh, the check
refuses and names that split instead. Cheap: no jax, only the model's config.json.
"""

from __future__ import annotations

import ml_collections

from maxent_jax.errors import UserError
from maxent_jax.model.config import ModelConfig
from maxent_jax.plan.architecture import divides, model_config


def vllm_tp_ok(cfg: ModelConfig, tp: int) -> bool:
    """vLLM shards attention heads over its tensor parallelism (kv heads split, or replicated when fewer)."""
    return cfg.num_heads % tp == 0 and (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0)


def propose(cfg: ModelConfig, gpus: int, tp: int) -> tuple[int, int, int] | None:
    """(dp, tp, training GPUs) on one node: the most training GPUs whose 1,F,1 mesh divides the model,
    vLLM on the rest with the requested tp when it fits them, else the largest valid tp."""
    for train_gpus in range(gpus - 1, 0, -1):
        vllm = gpus - train_gpus
        if not divides(cfg, (1, train_gpus, 1)):
            continue
        options = ([tp] if vllm % tp == 0 and vllm_tp_ok(cfg, tp) else []) + \
                  [t for t in range(vllm, 0, -1) if vllm % t == 0 and vllm_tp_ok(cfg, t)]
        if options:
            return vllm // options[0], options[0], train_gpus
    return None


def check_split(config: ml_collections.ConfigDict, *, gpus: int, nodes: int, dp: int, tp: int, mesh: str,
                serve: bool, given: bool) -> dict[str, str]:
    """The launcher's split as `{dp, tp, train_gpus, mesh[, note]}`, or a UserError naming a valid one."""
    cfg = model_config(config)
    one_node_server = serve and nodes == 1
    train_gpus = gpus - dp * tp if one_node_server else gpus
    processes = nodes - 1 if serve and nodes > 1 else nodes
    if train_gpus < 1 or processes < 1:  # the launcher refuses this split itself, naming --dp/--tp
        return {"dp": str(dp), "tp": str(tp), "train_gpus": str(train_gpus), "mesh": mesh}
    shape = _mesh(mesh or ",".join(map(str, config.mesh.shape)), processes * train_gpus)
    if shape is None:  # the launcher's default: the config's mesh when it fits the trainer's devices
        if mesh:
            raise UserError(f"--mesh={mesh} does not fit the {processes * train_gpus} trainer GPUs "
                            f"({processes} process(es) x {train_gpus})")
        shape = (processes, train_gpus, 1)
    out: dict[str, str] = {}
    if not divides(cfg, shape):
        where = f"{train_gpus} trainer GPUs" + (f" ({gpus} - vLLM's dp*tp={dp * tp})" if one_node_server else "")
        problem = (f"mesh {','.join(map(str, shape))} on {where} does not divide "
                   f"{config.model.name_or_path or 'the model'} (hidden_size {cfg.hidden_size}, heads "
                   f"{cfg.num_heads}, vocab {cfg.vocab_size}, mlp {cfg.intermediate_size}): its weights would be "
                   "replicated")
        proposal = propose(cfg, gpus, tp) if one_node_server else None
        if proposal is None:
            raise UserError(f"{problem}; pick --mesh with fsdp dividing {cfg.hidden_size} and tensor dividing "
                            f"{cfg.num_heads}")
        p_dp, p_tp, p_train = proposal
        if given:
            raise UserError(f"{problem}; use --dp {p_dp} --tp {p_tp} (vLLM on {p_dp * p_tp} GPUs, training on "
                            f"{p_train}: mesh 1,{p_train},1)")
        out["note"] = (f"the default split leaves {where}, which does not divide the model; using --dp {p_dp} "
                       f"--tp {p_tp}: vLLM on {p_dp * p_tp} GPUs, training on {p_train} (mesh 1,{p_train},1)")
        dp, tp, train_gpus, shape = p_dp, p_tp, p_train, (1, p_train, 1)
    if serve and not vllm_tp_ok(cfg, tp):
        raise UserError(f"--tp={tp} does not divide the model's {cfg.num_heads} attention heads "
                        f"({cfg.num_kv_heads} kv heads); vLLM needs it to")
    return {**out, "dp": str(dp), "tp": str(tp), "train_gpus": str(train_gpus), "mesh": ",".join(map(str, shape))}


def _mesh(text: str, devices: int) -> tuple[int, int, int] | None:
    """'1,-1,1' -> (1, devices, 1); None when the sizes do not multiply to `devices`."""
    sizes = [int(x) for x in text.strip("()").split(",")]
    fixed = 1
    for d in sizes:
        fixed *= d if d != -1 else 1
    if -1 in sizes:
        if devices % fixed:
            return None
        sizes = [devices // fixed if d == -1 else d for d in sizes]
    return tuple(sizes) if sizes[0] * sizes[1] * sizes[2] == devices else None  # type: ignore[return-value]
