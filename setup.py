"""Builds the optional C kernel of the CPU directions (zo_trainer/zo/_philox.c); metadata is in pyproject.toml.

Optional: where no C compiler is found the install still succeeds and zo_trainer draws the same numbers
with torch operations, about 40x slower (`python benchmarks/bench_directions.py`), and says so once.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "zo_trainer.zo._philox",
            ["zo_trainer/zo/_philox.c"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
