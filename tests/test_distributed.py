"""Real 2-process runs (accelerate launch, gloo on CPU) against 1-process references."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_train.py"
TWO_PROCESSES = ["--config_file", str(ROOT / "accelerate_configs" / "multi_cpu_2proc.yaml")]
ONE_PROCESS = ["--num_processes", "1", "--cpu"]
# two "machines" of one process each, both on this host: accelerate's multi-node launch, one command per machine
TWO_MACHINES = ["--config_file", str(ROOT / "accelerate_configs" / "multi_node.yaml"), "--main_process_ip", "127.0.0.1",
                "--main_process_port", "29541"]
ROUNDING = 1e-4  # see tests/test_zo_trainer.py: equal runs in a different float order agree to ~1e-5

NEWTON = ["zo_step_rule=\"newton\"", "learning_rate=0.5", "zo_momentum=0.9", "zo_momentum_history=2"]
# a preconditioner with a parameter-sized buffer, and a step rule that reads every query's perturbed losses
HIZOO_SPREAD = ["zo_optimizer=\"hizoo\"", "zo_hessian_smooth=0.5", "zo_step_rule=\"spread\"", "learning_rate=1e-2"]

BLOCKS = ('block_schedule=[{"name": "embedding", "parameters": ["model.embed_tokens.*"], "steps": 2, '
          '"training_order": "fo", "learning_rate": 0.1}, {"name": "layers", "parameters": ["model.layers.*"], '
          '"steps": 2, "training_order": "zo"}]')

FO_SGD_MOMENTUM = ['optim="sgd"', 'optim_args="momentum=0.9"']
# accelerate's FSDP plugin, version 2 (TrainingArguments.fsdp / fsdp_config), enabled on these CPU processes as on GPUs
FSDP2_PLUGIN = ["--fsdp_version", "2", "--fsdp_as_on_gpus"]

pytestmark = pytest.mark.slow


def run_script(processes, out, *flags):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *processes, str(SCRIPT), "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def ranks(out) -> list[dict]:
    return [torch.load(path) for path in sorted(Path(out).glob("rank*.pt"))]


def launch(processes, out, *flags, variants: dict[str, list[str]] | None = None) -> dict[str, list[dict]]:
    """One launch: {out's name: each rank's result}, and the same for each variant (``--variant``: trained after it in
    the same processes, ZOConfig fields on top of ``flags``'), by its name."""
    variant_flags = [arg for name, fields in (variants or {}).items() for arg in ("--variant", name, *fields)]
    done = run_script(processes, out, *flags, *variant_flags)
    assert done.returncode == 0, done.stderr[-3000:]
    return {Path(out).name: ranks(out), **{name: ranks(Path(out) / name) for name in variants or {}}}


def launch_machines(out, *flags):
    """The command of each machine rank, started together as on two hosts."""
    machines = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *TWO_MACHINES, "--machine_rank",
                                  str(rank), str(SCRIPT), "--out", str(out), *flags],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for rank in (0, 1)]
    for machine in machines:
        _, stderr = machine.communicate(timeout=300)
        assert machine.returncode == 0, stderr[-3000:]
    return ranks(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    block = ["--zo", 'trainable_parameters=["model.layers.1.mlp.*"]']
    return {
        # the references, and ZO optimizers with state: momentum rebuilt from seeds with a step rule that reduces
        # curvatures too, and a preconditioner with a parameter-sized buffer with one that reads the perturbed losses
        **launch(ONE_PROCESS, tmp / "one", "--batch", "8", "--queries", "4",
                 variants={"newton-one": NEWTON, "hizoo-one": HIZOO_SPREAD}),
        **launch(TWO_PROCESSES, tmp / "data", "--batch", "4", "--queries", "4", "--save_steps", "2",
                 variants={"newton-data": NEWTON}),
        # as a user's script: no use_cpu, and the launcher exports no ACCELERATE_USE_CPU; ZOConfig sets up the group
        **launch(TWO_PROCESSES, tmp / "query", "--batch", "4", "--queries", "4", "--parallel", "query", "--no_use_cpu",
                 variants={"hizoo-query": HIZOO_SPREAD}),
        **launch(TWO_PROCESSES, tmp / "fp16", "--batch", "4", "--queries", "4", "--mixed_precision", "fp16"),
        **launch(ONE_PROCESS, tmp / "resumed", "--batch", "8", "--queries", "4",
                 "--resume", str(tmp / "data" / "checkpoint-2")),
        # sharded at load time; with a parameter-sized optimizer state (a momentum buffer, sharded as the weights),
        # checkpointed and resumed on 2 processes and on 1
        **launch(TWO_PROCESSES, tmp / "sharded", "--batch", "4", "--queries", "4", "--distributed_config",
                 "--save_steps", "2", variants={"sharded-momentum": ["zo_momentum=0.9"]}),
        **launch(TWO_PROCESSES, tmp / "sharded-momentum-resumed", "--batch", "4", "--queries", "4",
                 "--distributed_config", "--zo", "zo_momentum=0.9",
                 "--resume", str(tmp / "sharded" / "sharded-momentum" / "checkpoint-2")),
        **launch(ONE_PROCESS, tmp / "sharded-momentum-resumed-whole", "--batch", "8", "--queries", "4",
                 "--zo", "zo_momentum=0.9", "--resume", str(tmp / "sharded" / "sharded-momentum" / "checkpoint-2")),
        # a first-order block (the embedding, SGD with momentum) then a ZO block, whole (DDP) and sharded (FSDP2's
        # backward); the sharded run resumed in the FO block, where its optimizer's momentum is sharded state
        **launch(TWO_PROCESSES, tmp / "fo-then-zo", "--batch", "4", "--queries", "2", "--steps", "4",
                 "--zo", BLOCKS, *FO_SGD_MOMENTUM),
        **launch(TWO_PROCESSES, tmp / "fo-then-zo-sharded", "--batch", "4", "--queries", "2", "--steps", "4",
                 "--distributed_config", "--save_steps", "1", "--zo", BLOCKS, *FO_SGD_MOMENTUM),
        **launch(TWO_PROCESSES, tmp / "fo-then-zo-sharded-resumed", "--batch", "4", "--queries", "2", "--steps", "4",
                 "--distributed_config", "--zo", BLOCKS, *FO_SGD_MOMENTUM,
                 "--resume", str(tmp / "fo-then-zo-sharded" / "checkpoint-1")),
        # sharded by accelerate's FSDP2 plugin; with momentum, checkpointed and resumed; an FO block then a ZO block
        **launch(TWO_PROCESSES, tmp / "plugin", "--batch", "4", "--queries", "4", *FSDP2_PLUGIN, "--save_steps", "2",
                 variants={"plugin-momentum": ["zo_momentum=0.9"],
                           "plugin-blocks": [BLOCKS, *FO_SGD_MOMENTUM, "zo_num_queries=2", "max_steps=4"]}),
        **launch(TWO_PROCESSES, tmp / "plugin-momentum-resumed", "--batch", "4", "--queries", "4", *FSDP2_PLUGIN,
                 "--zo", "zo_momentum=0.9", "--resume", str(tmp / "plugin" / "plugin-momentum" / "checkpoint-2")),
        "machines": launch_machines(tmp / "machines", "--batch", "4", "--queries", "4"),
        # the last MLP trains: each process computes the layers below it once per batch (prefix reuse), or not
        **launch(TWO_PROCESSES, tmp / "data-block", "--batch", "4", "--queries", "4", *block,
                 variants={"data-block-no-reuse": ["zo_reuse_prefix=false"]}),
        **launch(TWO_PROCESSES, tmp / "query-block", "--batch", "4", "--queries", "4", "--parallel", "query", *block,
                 variants={"query-block-no-reuse": ["zo_reuse_prefix=false"]}),
    }


def max_difference(a, b):
    return max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])


@pytest.mark.parametrize("mode", ["data", "query", "fp16", "newton-data", "hizoo-query", "machines"])
def test_replicas_stay_bitwise_identical(runs, mode):
    rank0, rank1 = runs[mode]
    assert rank0["world"] == rank1["world"] == 2
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])


@pytest.mark.parametrize("mode", ["data", "query", "machines"])
def test_two_processes_equal_one_process_on_the_global_batch(runs, mode):
    (one,) = runs["one"]
    assert one["world"] == 1
    assert max_difference(runs[mode][0], one) < ROUNDING
    moved = max((p - q).abs().max().item() for p, q in zip(one["params"].values(), runs["resumed"][0]["params"].values()))
    assert moved < ROUNDING  # also the reference for the resume below


@pytest.mark.parametrize("mode", ["data", "query"])
def test_prefix_reuse_leaves_parallel_steps_bitwise_the_same(runs, mode):
    reused, plain = runs[f"{mode}-block"][0], runs[f"{mode}-block-no-reuse"][0]
    assert [e["loss"] for e in reused["log"] if "loss" in e] == [e["loss"] for e in plain["log"] if "loss" in e]
    assert all(torch.equal(reused["params"][n], plain["params"][n]) for n in plain["params"])
    assert max_difference(reused, {"params": reused["init"]}) > 0  # the block trained


@pytest.mark.parametrize("method, mode", [("newton", "data"), ("hizoo", "query")])
def test_a_zo_optimizer_with_state_runs_in_parallel_as_on_one_process(runs, method, mode):
    (one,) = runs[f"{method}-one"]
    assert max_difference(runs[f"{method}-{mode}"][0], one) < ROUNDING
    assert max_difference(one, runs["one"][0]) > 10 * ROUNDING  # another method than ZO-SGD: other weights


def test_a_model_sharded_by_fsdp2_at_load_time_trains_as_the_whole_model_data_parallel(runs, tmp_path_factory):
    """`from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))` and ZOTrainer: the same losses and, gathered,
    the same weights as the whole model's 2-process data-parallel run, bit for bit; the saved model loads whole."""
    from transformers import AutoModelForCausalLM

    sharded, whole = runs["sharded"], runs["data"]
    for rank in (0, 1):
        assert max_difference(sharded[rank], whole[rank]) == 0.0
        assert [e["loss"] for e in sharded[rank]["log"] if "loss" in e] == [e["loss"] for e in whole[rank]["log"] if "loss" in e]
    export = next(Path(p) for p in tmp_path_factory.getbasetemp().glob("dist*/sharded/export"))
    loaded = AutoModelForCausalLM.from_pretrained(export)
    assert all(torch.equal(p, sharded[0]["params"][n]) for n, p in loaded.named_parameters())


def test_a_first_order_block_trains_a_sharded_model_through_fsdp2s_backward_as_ddp_does(runs):
    """FO steps reduce-scatter the gradient (FSDP2) where DDP all-reduces it: equal to float rounding; the ZO block
    that follows stays within it."""
    for rank in (0, 1):
        sharded, whole = runs["fo-then-zo-sharded"][rank], runs["fo-then-zo"][rank]
        assert max_difference(sharded, whole) < 1e-6
        moved = {n for n, p in whole["init"].items() if not torch.equal(p, whole["params"][n])}
        assert any("embed" in n for n in moved) and any("layers" in n for n in moved)  # both blocks trained
        assert [e["block_name"] for e in sharded["log"] if "loss" in e] == ["embedding"] * 2 + ["layers"] * 2


def test_a_sharded_run_resumes_in_a_first_order_block_bit_for_bit(runs):
    """The FO block's momentum, sharded as the weights, is gathered into the checkpoint and sharded again."""
    for rank in (0, 1):
        resumed, straight = runs["fo-then-zo-sharded-resumed"][rank], runs["fo-then-zo-sharded"][rank]
        assert max_difference(resumed, straight) == 0.0
        assert [e["loss"] for e in resumed["log"] if "loss" in e] == [e["loss"] for e in straight["log"] if "loss" in e]


def test_a_sharded_run_resumes_exactly_sharded_and_whole_on_one_process(runs):
    """Its checkpoint holds the weights and the momentum buffer whole: resumed on 2 processes, sharded again, the run
    ends bit for bit as without the stop; resumed on 1 process, whole, on the same global batch, it ends as the
    1-process run rounds."""
    sharded = runs["sharded-momentum"]
    assert max_difference(sharded[0], runs["sharded"][0]) > 10 * ROUNDING  # the momentum moved the weights
    for rank in (0, 1):
        assert max_difference(runs["sharded-momentum-resumed"][rank], sharded[rank]) == 0.0
    (whole,) = runs["sharded-momentum-resumed-whole"]
    assert whole["world"] == 1 and max_difference(whole, sharded[0]) < ROUNDING


def test_fp16_mixed_precision_trains_data_parallel(runs):
    """fp16 autocast, as accelerate sets it up on V100s: finite losses, an update that follows the float32 run's,
    and different low bits (the probes really ran in half precision)."""
    fp16, fp32, init = runs["fp16"][0], runs["data"][0], runs["one"][0]["init"]
    losses = lambda run: [e["loss"] for e in run["log"] if "loss" in e]  # noqa: E731
    assert all(math.isfinite(loss) for loss in losses(fp16))
    assert losses(fp16) != losses(fp32) and losses(fp16) == pytest.approx(losses(fp32), rel=1e-2)
    step = lambda run: torch.cat([(run["params"][n] - init[n]).flatten() for n in init])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(step(fp16), step(fp32), dim=0) > 0.9


def test_query_parallel_splits_the_forwards(runs):
    passes = lambda run: [e["forward_passes"] for e in run["log"] if "loss" in e]  # noqa: E731
    assert passes(runs["query"][0]) == [4, 8, 12]  # 2 of the 4 directions per process: 4 forwards per step
    assert passes(runs["one"][0]) == [8, 16, 24]
    losses = lambda run: [e["loss"] for e in run["log"] if "loss" in e]  # noqa: E731
    assert losses(runs["query"][0]) == pytest.approx(losses(runs["one"][0]), abs=1e-5)


def test_a_batch_is_gathered_in_one_collective_per_dtype_and_batch_size():
    """Packing for the gather (tensors of one dtype side by side) gives back each tensor whole; the 2-process
    query-parallel runs above check the gathered batch itself against a 1-process run."""
    from accelerate import Accelerator

    from zo_trainer.trainer import _gather_together

    accelerator, calls = Accelerator(cpu=True), []
    gather = accelerator.gather
    accelerator.gather = lambda tensor: calls.append(tensor.dtype) or gather(tensor)
    batch = {"input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(8).view(2, 4) * 3,
             "attention_mask": torch.ones(2, 6, dtype=torch.bool), "pixels": torch.randn(2, 3, 2), "count": torch.tensor(5),
             "nothing": torch.zeros(0, 3, dtype=torch.long)}
    gathered = _gather_together(accelerator, batch)
    assert all(torch.equal(gathered[k], gather(v)) for k, v in batch.items())
    assert sorted(map(str, calls)) == ["torch.bool", "torch.float32", "torch.int64", "torch.int64", "torch.int64"]  # ids + labels: one


def test_communication_is_a_few_scalars_per_step(runs):
    data_log = [e for e in runs["data"][0]["log"] if "loss" in e]
    # q = 4 float64 projected gradients and the 2q perturbed losses (the spread rule's σ): 3q scalars
    assert [e["communicated_bytes"] for e in data_log] == [96, 192, 288]
    query_log = [e for e in runs["query"][0]["log"] if "loss" in e]
    gathered = 2 * 8 * 32 * 8  # input_ids and labels, 8 sequences of 32 int64 tokens
    lengths = 2 * 2 * 8  # their lengths on each of the 2 processes, int64
    assert [e["communicated_bytes"] for e in query_log] == [(gathered + lengths + 96) * k for k in (1, 2, 3)]


def test_two_process_checkpoint_resumes_on_one_process(runs):
    (resumed,) = runs["resumed"]
    assert resumed["world"] == 1
    assert max_difference(resumed, runs["data"][0]) < ROUNDING
    logs = [e for e in resumed["log"] if "loss" in e]  # steps 1-2 come from the checkpoint, 3 was run here
    assert [(e["step"], e["forward_passes"]) for e in logs] == [(1, 8), (2, 16), (3, 24)]


def test_uneven_query_splits_are_refused_for_a_compute_loss_of_its_own(tmp_path):
    """3 queries on 2 processes: one process would run compute_loss 4 times per batch, the other 2, and a collective
    inside it would wait forever."""
    done = run_script(TWO_PROCESSES, tmp_path, "--queries", "3", "--parallel", "query", "--own_compute_loss")
    assert done.returncode != 0
    assert "use a zo_num_queries divisible by the number of processes" in done.stderr


def test_accelerates_fsdp2_plugin_trains_zo_bitwise_as_the_whole_model(runs, tmp_path_factory):
    """`fsdp="full_shard", fsdp_config={"version": 2}`: accelerate's preparation shards the model, ZO trains its shards
    with the same losses and, gathered, the same weights as the whole model's data-parallel run; the saved model is
    whole and loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    for rank in (0, 1):
        assert max_difference(runs["plugin"][rank], runs["data"][rank]) == 0.0
        assert [e["loss"] for e in runs["plugin"][rank]["log"] if "loss" in e] == \
            [e["loss"] for e in runs["data"][rank]["log"] if "loss" in e]
    export = next(Path(p) for p in tmp_path_factory.getbasetemp().glob("dist*/plugin/export"))
    loaded = AutoModelForCausalLM.from_pretrained(export)
    assert all(torch.equal(p, runs["plugin"][0]["params"][n]) for n, p in loaded.named_parameters())


def test_accelerates_fsdp2_plugin_resumes_bit_for_bit_and_trains_first_order_blocks(runs):
    """The plugin's run checkpoints the weights and the momentum whole and resumes them sharded, exactly; an FO block
    under the plugin trains through FSDP2's backward as DDP does, to float rounding."""
    momentum = runs["plugin-momentum"]
    assert max_difference(momentum[0], runs["plugin"][0]) > 10 * ROUNDING  # the momentum moved the weights
    for rank in (0, 1):
        resumed = runs["plugin-momentum-resumed"][rank]
        assert max_difference(resumed, momentum[rank]) == 0.0
        assert [e["loss"] for e in resumed["log"] if "loss" in e] == [e["loss"] for e in momentum[rank]["log"] if "loss" in e]
        blocks, whole = runs["plugin-blocks"][rank], runs["fo-then-zo"][rank]
        assert max_difference(blocks, whole) < 1e-6
        assert [e["block_name"] for e in blocks["log"] if "loss" in e] == ["embedding"] * 2 + ["layers"] * 2


def test_fsdp_on_cpu_processes_is_refused_with_a_clear_error(tmp_path):
    """Accelerate ignores its FSDP plugin on CPU: ZO refuses rather than train the whole model on every process."""
    done = run_script(TWO_PROCESSES, tmp_path, "--fsdp_version", "2")
    assert done.returncode != 0
    assert "accelerate enables its FSDP plugin on GPUs and other accelerators only" in done.stderr and "distributed_config=DistributedConfig(fsdp_size=N)" in done.stderr


FSDP_SCRIPT = ROOT / "tests" / "distributed_fsdp.py"


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """Every variant of tests/distributed_fsdp.py, in one 2-process launch."""
    out = tmp_path_factory.mktemp("fsdp") / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           str(FSDP_SCRIPT), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", ["all", "last-mlp-prefix-reuse", "momentum-buffer", "zo-adam", "data-parallel"])
def test_an_fsdp2_sharded_model_trains_bitwise_as_the_whole_model(fsdp, variant):
    """The engine's loop on a `fully_shard`-ed model (2 processes, uneven shards) against the same loop on the whole
    model in the same processes: the same probe losses and, gathered, the same weights, bit for bit."""
    result = fsdp[variant]
    assert len(result["sharded"]) == 21  # every parameter of the 2-layer Llama is a DTensor shard
    assert result["sharded_losses"] == result["whole_losses"]
    assert result["evaluated"][0] == result["evaluated"][1]  # a forward after the update sees the updated shards
    assert result["max_weight_difference"] == 0.0
    assert result["max_weight_change"] > 1e-3
    # the optimizer's buffers, gathered whole, are the whole model's bit for bit, and reload as the same shards
    buffers = {"momentum-buffer": 21, "zo-adam": 42}.get(variant, 0)  # one buffer (Adam: two) per parameter
    assert result["state_buffers"] == buffers
    assert result["max_state_difference"] == 0.0 and result["reloaded_state_equal"]


def test_fsdp2_mixed_precision_computes_in_bfloat16_keeps_float32_shards_and_restores_them_exactly(fsdp):
    result = fsdp["bf16"]
    assert result["computed"] == ["torch.bfloat16"] and result["kept"] == ["torch.float32"]
    assert result["restored"]  # the probes' perturbed bfloat16 copies never reach the float32 shards
    assert result["losses"][-1] < result["losses"][0] - 1e-3


SHARDED_THE_OTHER_WAY = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
from torch.distributed.fsdp import fully_shard
from zo_trainer.zo import ZOEstimator
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29547", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
x = torch.randn(2, 8)
model = nn.Linear(8, 8)
fully_shard(model)
try:
    ZOEstimator(model, distribution="lowrank").probe(lambda: model(x).sum(), 0)
except ValueError as e:
    print(e)
columns = nn.Linear(8, 8)  # tensor-parallel style: the columns split
columns.weight = nn.Parameter(distribute_tensor(columns.weight.detach(), init_device_mesh("cpu", (1,)), [Shard(1)]))
try:
    ZOEstimator(columns).probe(lambda: columns(x).sum(), 0)
except ValueError as e:
    print(e)
dist.destroy_process_group()
"""


def test_sharded_parameters_the_engine_cannot_train_are_refused_with_a_clear_error():
    done = subprocess.run([sys.executable, "-c", SHARDED_THE_OTHER_WAY], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weight is sharded by FSDP2: each process adds its rows of the direction, which needs element-wise" \
        in done.stdout
    assert "weight is a DTensor with placements (Shard(dim=1),) on a 1-D mesh: the ZO engine trains FSDP2's" \
        in done.stdout
