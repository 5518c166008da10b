"""ZO steps of an FSDP2-sharded model against the same steps of the whole model, in every process of a torchrun launch.

    torchrun --nproc_per_node 2 tests/distributed_fsdp.py --out result.json

Each variant (`VARIANTS`: what trains, the optimizer, data-parallel or not) builds the same tiny Llama twice, shards
one copy with ``fully_shard`` (every decoder layer, then the root; after its estimator is made, as accelerate shards
after ZOTrainer's), and runs the engine's documented loop (`ZOEstimator` + `ZOSGD`/`ZOAdam`) on both with the same
batches: the global batch in every process, or data-parallel a batch of its own and the projected gradients averaged
across the processes. Process 0 writes, per variant, the probe losses of both runs, a held-out loss after the last
step, the largest weight difference at the end (the sharded weights gathered whole) and the same for the optimizer's
state (`sharding.gather_state`), reloaded into a new optimizer (`sharding.shard_state`), to ``--out``. The variant
"bf16" shards alone, computing in bfloat16 from float32 shards (FSDP2's mixed precision), and records whether a
probe left the weights bitwise as they were, the dtypes a module computed with and kept, and the losses of 20 steps.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama  # noqa: E402

from zo_trainer.zo import ZOSGD, ZOAdam, ZOEstimator, sharding  # noqa: E402

STEPS, BATCH, TOKENS = 3, 4, 16
VOCAB = 251  # odd: the last process holds fewer rows
# variant -> (what trains, optimizer, momentum, data-parallel)
VARIANTS = {
    "all": ("all", "sgd", 0.0, False),
    "last-mlp-prefix-reuse": ("last_mlp", "sgd", 0.0, False),
    "momentum-buffer": ("all", "sgd", 0.9, False),
    "zo-adam": ("all", "adam", 0.0, False),
    "data-parallel": ("all", "sgd", 0.0, True),
}


def make_optimizer(model, estimator, variant):
    _, optimizer_name, momentum, _ = VARIANTS[variant]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adam":
        return ZOAdam(trainable, estimator, lr=1e-3, weight_decay=0.1)
    return ZOSGD(trainable, estimator, lr=1e-2, weight_decay=0.1, momentum=momentum)


def train(model, estimator, variant, rank, world):
    data_parallel = VARIANTS[variant][3]
    optimizer = make_optimizer(model, estimator, variant)
    losses = []
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (BATCH * world, TOKENS), generator=torch.Generator().manual_seed(step))
        if data_parallel:
            batch = batch[rank * BATCH : (rank + 1) * BATCH]
        probe = estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, step)
        if data_parallel:
            dist.all_reduce(probe.projected_grads)
            probe.projected_grads /= world
        losses.append(probe.losses.tolist())
        optimizer.accumulate(probe)
        optimizer.step()
    return losses, optimizer


def state_tensors(state_dict: dict) -> list[torch.Tensor]:
    return [value for _, buffers in sorted(state_dict["state"].items()) for _, value in sorted(buffers.items())
            if torch.is_tensor(value)]


def mixed_precision() -> dict:
    model = tiny_llama(vocab_size=VOCAB, layers=2, use_cache=False, tie_word_embeddings=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    computed = []
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda module, _: computed.append(str(module.weight.dtype)))
    estimator = ZOEstimator(model, num_queries=2, seed=3)
    batch = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, 0)
    model.reshard()
    restored = all(torch.equal(p.full_tensor(), before[name]) for name, p in model.named_parameters())
    optimizer = ZOSGD(list(model.parameters()), estimator, lr=3e-3)
    losses = []
    for step in range(20):
        probe = estimator.probe(lambda: model(input_ids=batch, labels=batch).loss, step)
        optimizer.accumulate(probe)
        optimizer.step()
        losses.append(probe.loss.item())
    kept = sorted({str(p.dtype) for p in model.parameters()})
    return {"restored": restored, "computed": sorted(set(computed)), "kept": kept, "losses": losses}


def against_the_whole_model(variant: str, rank: int, world: int) -> dict:
    whole = tiny_llama(vocab_size=VOCAB, layers=2, use_cache=False, tie_word_embeddings=False)
    if VARIANTS[variant][0] == "last_mlp":
        for name, p in whole.named_parameters():
            p.requires_grad_(name.startswith("model.layers.1.mlp."))
    sharded = copy.deepcopy(whole)
    estimator = ZOEstimator(sharded, num_queries=2, seed=3)  # before sharding, as ZOTrainer's is before accelerate's
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    whole_losses, whole_optimizer = train(whole, ZOEstimator(whole, num_queries=2, seed=3), variant, rank, world)
    sharded_losses, sharded_optimizer = train(sharded, estimator, variant, rank, world)
    # the optimizer's state gathered whole is the whole model's; loaded into a new optimizer it is sharded again
    gathered_state = sharding.gather_state(sharded_optimizer.state_dict())
    reloaded = make_optimizer(sharded, estimator, variant)
    reloaded.load_state_dict(copy.deepcopy(gathered_state))
    sharding.shard_state(reloaded)
    held_out = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():  # a forward right after the last update: it must see the updated shards
        evaluated = [model(input_ids=held_out, labels=held_out).loss.item() for model in (whole, sharded)]
    sharded.reshard()
    gathered = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    before = tiny_llama(vocab_size=VOCAB, layers=2, use_cache=False, tie_word_embeddings=False).state_dict()
    return {
        "whole_losses": whole_losses,
        "sharded_losses": sharded_losses,
        "evaluated": evaluated,
        "max_weight_difference": max((gathered[n] - p).abs().max().item() for n, p in whole.named_parameters()),
        "max_weight_change": max((before[n] - p).abs().max().item() for n, p in whole.named_parameters()),
        "sharded": [n for n, p in sharded.named_parameters() if type(p).__name__ == "DTensor"],
        "state_buffers": len(state_tensors(gathered_state)),
        "max_state_difference": max([(a - b).abs().max().item() for a, b in
                                     zip(state_tensors(gathered_state), state_tensors(whole_optimizer.state_dict()),
                                         strict=True)] or [0.0]),
        "reloaded_state_equal": all(
            sharding.is_sharded(a) and torch.equal(a.to_local(), b.to_local())
            for a, b in zip(state_tensors(reloaded.state_dict()), state_tensors(sharded_optimizer.state_dict()),
                            strict=True)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {variant: against_the_whole_model(variant, rank, world) for variant in VARIANTS}
    results["bf16"] = mixed_precision()
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
