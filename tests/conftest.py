import jax

# Exactness checks run in float64 (PAPER.md: equivalences hold to rounding).
jax.config.update("jax_enable_x64", True)
