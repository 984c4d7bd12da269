"""NeMo-Run launchers for the closed loop (local and Slurm with the NGC NeMo container)."""
