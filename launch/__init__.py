"""Entry points: the `pope` command, the local launcher and SLURM submission."""
