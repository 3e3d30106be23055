"""sharpax: cheap, composable sharpness-aware training for JAX and optax."""

from sharpax.reuse import LookSAMState
from sharpax.reuse import VSAMState
from sharpax.reuse import looksam
from sharpax.reuse import num_sam_steps
from sharpax.reuse import sam_due
from sharpax.reuse import sam_rate
from sharpax.reuse import upcoming_sam_steps
from sharpax.reuse import vsam
from sharpax.sam import SAMState
from sharpax.sam import pmean_updates
from sharpax.sam import sam
from sharpax.sharpness import hessian_top_eigenvalue
from sharpax.sharpness import loss_landscape
from sharpax.sharpness import sam_sharpness
from sharpax.trajectory import MESA
from sharpax.trajectory import MESAState
from sharpax.trajectory import SAF
from sharpax.trajectory import SAFState
from sharpax.trajectory import TrajectoryAux
from sharpax.trajectory import check_example_ids
from sharpax.trajectory import mesa
from sharpax.trajectory import saf
from sharpax.trajectory import trajectory_kl
from sharpax.trajectory import with_mesa
from sharpax.trajectory import with_saf

__version__ = "0.1.0"

__all__ = (
    "LookSAMState",
    "VSAMState",
    "looksam",
    "num_sam_steps",
    "sam_due",
    "sam_rate",
    "upcoming_sam_steps",
    "vsam",
    "SAMState",
    "pmean_updates",
    "sam",
    "hessian_top_eigenvalue",
    "loss_landscape",
    "sam_sharpness",
    "MESA",
    "MESAState",
    "SAF",
    "SAFState",
    "TrajectoryAux",
    "check_example_ids",
    "mesa",
    "saf",
    "trajectory_kl",
    "with_mesa",
    "with_saf",
)
