"""``l1dfl experiment``: the paper's trainer comparison as one declared experiment (EXPERIMENT.toml),
run on this machine (:mod:`.local`) or submitted to SLURM (:mod:`.slurm`); see docs/experiment.md.

- :mod:`.config`: the TOML file (read with ``tomllib``, written with ``tomli-w``);
- :mod:`.jobs`: the job graph, what is done (from nnU-Net's own files), checks, commands, locks;
- :mod:`.local`, :mod:`.slurm`: the two ways to run it; :mod:`.status`: what each job is doing;
- :mod:`.cli`: the subcommands.
"""
