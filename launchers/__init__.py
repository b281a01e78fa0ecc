"""Entry points: command lines and launchers (local torchrun, Slurm). The library is `cpmtp_dist`."""
