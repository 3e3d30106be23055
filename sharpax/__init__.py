"""sharpax: cheap, composable sharpness-aware training for JAX and optax."""

from sharpax import reuse_rules, schedules
from sharpax.ae_sam import ae_sam
from sharpax.esam import ESAMState, esam
from sharpax.gsam import GSAMState, gsam, gsam_rho_schedule
from sharpax.guards import check_chain
from sharpax.looksam import looksam
from sharpax.mesa import MESA, MESAState, mesa, with_mesa
from sharpax.msam import MSAMState, msam, msam_unperturbed_params
from sharpax.saf import SAF, SAFState, check_example_ids, saf, with_saf
from sharpax.sam import SAMState, pmean_updates, sam
from sharpax.scheduled import (
    ScheduledSAMState,
    num_sam_steps,
    sam_due,
    sam_rate,
    scheduled_sam,
    upcoming_sam_steps,
)
from sharpax.sharpness import hessian_top_eigenvalue, loss_landscape, sam_sharpness
from sharpax.ss_sam import ss_sam
from sharpax.trajectory import TrajectoryAux, trajectory_kl
from sharpax.vsam import vsam

# The states of looksam and vsam before they became scheduled_sam presets (same class now).
LookSAMState = ScheduledSAMState
VSAMState = ScheduledSAMState

__version__ = "0.1.0"

__all__ = (
    "MESA",
    "SAF",
    "ESAMState",
    "GSAMState",
    "LookSAMState",
    "MESAState",
    "MSAMState",
    "SAFState",
    "SAMState",
    "ScheduledSAMState",
    "TrajectoryAux",
    "VSAMState",
    "ae_sam",
    "check_chain",
    "check_example_ids",
    "esam",
    "gsam",
    "gsam_rho_schedule",
    "hessian_top_eigenvalue",
    "looksam",
    "loss_landscape",
    "mesa",
    "msam",
    "msam_unperturbed_params",
    "num_sam_steps",
    "pmean_updates",
    "reuse_rules",
    "saf",
    "sam",
    "sam_due",
    "sam_rate",
    "sam_sharpness",
    "scheduled_sam",
    "schedules",
    "ss_sam",
    "trajectory_kl",
    "upcoming_sam_steps",
    "vsam",
    "with_mesa",
    "with_saf",
)
