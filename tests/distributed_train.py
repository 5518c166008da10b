"""Train a tiny Llama with ZOTrainer; run under `accelerate launch` by tests/test_distributed.py.

Each rank writes the bytes of its parameters to <out>/rank<r>.pt, so the test can compare replicas
bitwise and compare a P-process run with a 1-process run. ``--variant NAME FIELD=JSON ...`` trains once more in the
same processes (no second launch), from the same initial model, with those ZOConfig fields on top of ``--zo``, into
<out>/NAME.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import fp16_autocast_as_on_gpus, fsdp_plugin_as_on_gpus, random_token_dataset, tiny_llama  # noqa: E402

from zo_trainer import ZOConfig, ZOTrainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
parser.add_argument("--queries", type=int, default=2)
parser.add_argument("--parallel", default="data")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--save_steps", type=int, default=0)
parser.add_argument("--resume", default=None)
parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
parser.add_argument("--no_use_cpu", action="store_true", help="leave use_cpu unset, as a user's script would")
parser.add_argument("--fsdp_version", type=int, default=None, help="ask for accelerate's FSDP plugin of this version")
parser.add_argument("--fsdp_as_on_gpus", action="store_true",
                    help="enable the FSDP plugin on these CPU processes as accelerate does on GPUs")
parser.add_argument("--distributed_config", action="store_true",
                    help="load the model sharded by FSDP2 over the processes (from_pretrained(distributed_config=...))")
parser.add_argument("--own_compute_loss", action="store_true", help="a Trainer subclass with its own compute_loss")
parser.add_argument("--zo", nargs="*", default=[], metavar="FIELD=JSON", help="more ZOConfig fields, e.g. zo_momentum=0.9")
parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [FIELD=JSON ...]",
                    help="also train with these fields on top of --zo, into <out>/NAME (repeatable)")
cli = parser.parse_args()
if cli.fsdp_as_on_gpus:
    fsdp_plugin_as_on_gpus()


def fields(settings: list[str]) -> dict:
    return {key: json.loads(value) for key, value in (setting.split("=", 1) for setting in settings)}


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter gathered whole where FSDP2 shards it."""
    return p.full_tensor() if type(p).__name__ == "DTensor" else p.detach().clone()


class OwnComputeLoss(ZOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train(out: str, extra: dict, resume: str | None):
    """One run into ``out``; returns its trainer."""
    settings = dict(
        output_dir=out, max_steps=cli.steps, per_device_train_batch_size=cli.batch, learning_rate=1e-2,
        logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=not cli.no_use_cpu, seed=0,
        zo_num_queries=cli.queries, zo_parallel=cli.parallel, save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500, dataloader_drop_last=True, fp16=cli.mixed_precision == "fp16",
        bf16=cli.mixed_precision == "bf16",
        **({"fsdp": "full_shard", "fsdp_config": {"version": cli.fsdp_version,
                                                  "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
           if cli.fsdp_version else {}),
    )
    args = ZOConfig(**{**settings, **fields(cli.zo), **extra})
    model = tiny_llama()
    if cli.distributed_config:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        base = os.path.join(out, "base")
        if torch.distributed.get_rank() == 0:
            model.save_pretrained(base)
        torch.distributed.barrier()
        model = AutoModelForCausalLM.from_pretrained(base, distributed_config=DistributedConfig(
            fsdp_size=torch.distributed.get_world_size()))
    if cli.mixed_precision == "fp16" and not torch.cuda.is_available():  # accelerate autocasts fp16 on GPUs only
        fp16_autocast_as_on_gpus(model)
    init = {n: whole(p) for n, p in model.named_parameters()}
    trainer_class = OwnComputeLoss if cli.own_compute_loss else ZOTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=random_token_dataset(n=64))
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.accelerator.process_index
    state = {n: whole(p) for n, p in trainer.model.named_parameters()}
    if cli.distributed_config or cli.fsdp_as_on_gpus:
        trainer.save_model(os.path.join(out, "export"))
    torch.save({"params": state, "init": init, "world": trainer.accelerator.num_processes, "log": trainer.state.log_history},
               os.path.join(out, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    return trainer


trainer = train(cli.out, {}, cli.resume)
for name, *settings in cli.variant:
    trainer = train(os.path.join(cli.out, name), fields(settings), None)
trainer.accelerator.end_training()  # then destroy the process group: gloo can abort at exit otherwise
