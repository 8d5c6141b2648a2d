"""How θ's uncertainty is stored: one file per representation, one interface
(:class:`~kalnat.representations.base.Representation`) that :mod:`kalnat.filter` runs on.

- :class:`Full`: the covariance ``P`` (the EKF; Joseph form as an option).
- :class:`Cholesky`: a lower factor ``L`` with ``P = L Lᵀ`` (the square-root EKF).
- :class:`PrecisionForm`: ``Λ = P⁻¹`` (the information filter).
- :class:`FisherForm`: a Fisher matrix and learning rate, ``P = η J⁻¹`` (natural gradient).
- :class:`Diagonal`: ``P = diag(p)``, O(d) memory (the variational-diagonal EKF).
- :class:`Blocks`: one full covariance per group of parameters (the decoupled EKF).
- :class:`Groups`: groups of parameters, each in a representation of its own.
- :class:`KronLayer`: Kronecker factors ``G ⊗ A`` for a dense layer (K-FAC's form);
  :func:`kronecker` puts every layer of a model in it.
- :class:`LowRank`: diagonal plus rank-k precision, O(d k) memory (LoFi).
- :class:`NIG`: any of them with an unknown noise scale (normal–inverse-gamma).
"""

from kalnat.representations.base import Representation
from kalnat.representations.blocks import BlockCovariance, Blocks
from kalnat.representations.cholesky import Cholesky, CholeskyFactor
from kalnat.representations.diagonal import Diagonal, DiagonalCovariance
from kalnat.representations.fisher import Fisher, FisherForm, FisherPrior
from kalnat.representations.groups import GroupCovariance, Groups, kronecker, last_layer_full
from kalnat.representations.kron import KronCovariance, KronLayer
from kalnat.representations.lowrank import LowRank, LowRankPrecision, LowRankPrior
from kalnat.representations.full import Covariance, Full, PriorCovariance
from kalnat.representations.named import from_name, stored_floats
from kalnat.representations.nig import NIG, NIGCovariance
from kalnat.representations.precision import Precision, PrecisionForm

__all__ = [
    "Representation", "Full", "Covariance", "PriorCovariance", "Cholesky", "CholeskyFactor",
    "PrecisionForm", "Precision", "FisherForm", "Fisher", "FisherPrior", "NIG", "NIGCovariance",
    "Diagonal", "DiagonalCovariance", "Blocks", "BlockCovariance", "LowRank", "LowRankPrecision",
    "LowRankPrior", "Groups", "GroupCovariance", "last_layer_full",
    "KronLayer", "KronCovariance", "kronecker", "from_name", "stored_floats",
]
