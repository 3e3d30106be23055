"""sharpax: cheap, composable sharpness-aware training for JAX and optax."""

from sharpax.sam import SAMState
from sharpax.sam import sam

__version__ = "0.1.0"

__all__ = (
    "SAMState",
    "sam",
)
