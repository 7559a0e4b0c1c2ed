"""fastis's benchmarks; each script runs as ``python -m bench.<name>`` from the repository root.

``_timing`` holds how everything is measured, ``providers`` what fastis is compared against,
``gpu_check`` drives the GPU sections (``gpu_score``, ``gpu_cross_entropy``, ``gpu_alias``,
``gpu_sampler``), ``e2e`` the end-to-end training benchmark, ``report`` turns
pytest-benchmark JSON into the tables of ``results/``.
"""
