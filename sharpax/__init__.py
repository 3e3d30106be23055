"""sharpax: cheap, composable sharpness-aware training for JAX and optax."""

from sharpax.sam import SAMState
from sharpax.sam import sam
from sharpax.sharpness import hessian_top_eigenvalue
from sharpax.sharpness import loss_landscape
from sharpax.sharpness import sam_sharpness

__version__ = "0.1.0"

__all__ = (
    "SAMState",
    "sam",
    "hessian_top_eigenvalue",
    "loss_landscape",
    "sam_sharpness",
)
