"""Pretrain a causal LM with ZOTrainer from a flat YAML recipe (the embedded default: recipes/default.yaml).

    accelerate launch recipes/pretrain_zo.py [--config recipes/paper/table2_zo_q20.yaml] [--FIELD VALUE ...]

The runner is `zo_trainer.run` (its docstring lists the flags, what is refused and what a run writes).
"""

from zo_trainer.run import cli

if __name__ == "__main__":
    cli()
