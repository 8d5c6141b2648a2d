"""Online learning of recurrent models (docs/method.md §4).

    >>> from kalnat import families, recurrent
    >>> cell = recurrent.elman(n_inputs=1, n_state=8)
    >>> learner = recurrent.rtrl(cell, families.Gaussian(0.1), prior_var=1.0, forgetting=0.999)
    >>> state = learner.init(cell.init(jax.random.PRNGKey(0)))          # doctest: +SKIP
    >>> result = recurrent.fit_sequence(learner, state, X, Y)           # doctest: +SKIP

- :func:`rtrl`: natural-gradient RTRL — RTRL's ``G_t = ∂s_t/∂θ`` gives ``H_t``, any core
  learner (EKF by default) gives ``δθ``, and the state is corrected, ``s_t ← s_t + G_t δθ``.
- :func:`joint_ekf`: the extended Kalman filter on ``z = (s, θ)``; from the factored prior,
  with no state noise, it produces the same ``(s_t, θ_t)`` as :func:`rtrl` (the theorem).
- :func:`fit_sequence`: chunked, donated ``lax.scan`` over time with progressive predictions,
  for one long stream or a batch of sequences.
- cells: :func:`elman`, :func:`gru`, or any pair via :func:`recurrent_model`.
"""

from kalnat.recurrent.base import RecurrentLearner
from kalnat.recurrent.cells import RecurrentModel, elman, gru, recurrent_model
from kalnat.recurrent.joint import JointState, factored_covariance, joint_ekf
from kalnat.recurrent.rtrl import RTRLState, rtrl, rtrl_forward
from kalnat.recurrent.stream import fit_sequence

__all__ = [
    "RecurrentModel", "recurrent_model", "elman", "gru", "RecurrentLearner",
    "rtrl", "rtrl_forward", "RTRLState", "joint_ekf", "JointState", "factored_covariance",
    "fit_sequence",
]
