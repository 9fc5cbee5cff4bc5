"""Experiments: runs that train many runs and compare them (``vitkit experiment``).

Layer: above ``vitkit.training`` (which trains each run) and ``vitkit.analysis`` (which turns
the finished runs into tables, figures and reports), below the CLI. An experiment never
steps a model itself: every run is an ordinary ``train(cfg)`` run folder, so it resumes,
and a time budget is the loop's ``max_minutes``, which re-measures the speed as it goes.
"""

from vitkit.experiments.mpp_pilots import MppPilotStudy, run_mpp_pilots
from vitkit.experiments.mpp_transfer import MppTransferStudy, run_mpp_transfer
from vitkit.experiments.scaling import ScalingExperiment, run_scaling

__all__ = [
    "MppPilotStudy",
    "MppTransferStudy",
    "ScalingExperiment",
    "run_mpp_pilots",
    "run_mpp_transfer",
    "run_scaling",
]
