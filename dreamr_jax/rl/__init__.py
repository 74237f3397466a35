"""SAPO's algorithmic core: reward terms, advantage estimators and policy losses, each registered
by name (`dreamr_jax.rl.registry`) so a variant is one config key rather than a code change.

Importing the package imports the three modules below, which is what fills the registries.
"""

from dreamr_jax.rl import advantages, losses, rewards  # noqa: F401  (registers by import)
