"""The command's option choices, importable without JAX (``kalnat --help`` reads them)."""

# What --method names; kalnat.cli_setup.METHODS builds each (tests check the two agree).
METHOD_NAMES = ("ekf", "ekf-joseph", "information", "natgrad", "sqrt-ekf", "iterated", "nig")
FAMILIES = ("gaussian", "bernoulli", "categorical", "poisson")
# How θ's uncertainty is stored (kalnat.representations): the full covariance, its diagonal
# (O(d)), one block per layer's weights and biases (the decoupled EKF), a diagonal plus rank-K
# precision (O(d K)), a full covariance for the last layer and rank K for the rest, or
# Kronecker factors per dense layer (K-FAC's form, O(n_in² + n_out²) a layer); auto
# picks by the number of parameters (AUTO_FULL_MAX).
COVARIANCES = ("auto", "full", "diag", "blocks", "lowrank:K", "last-layer:K", "kron")
DEFAULT_RANK = 10
# Up to this many parameters the default keeps the full covariance (O(d²) per row, exact);
# beyond it a diagonal plus rank-DEFAULT_RANK precision (O(d K²)); the bundled sets (digits: 585)
# stay on the full covariance, whose re-expression at block boundaries is cheaper than the
# structured forms' (kalnat.scaling re-expresses a dense P).
AUTO_FULL_MAX = 1024


# The numbers the filters compute in (--dtype). auto: float32 where the learner's covariances
# together (a bank's members all) hold more than AUTO_FLOAT32_ABOVE numbers, 8 MB in float64,
# float64 below. A bank runs each member through a chunk in turn, and a row's update reads and
# writes the member's whole state: beyond the caches its time is the memory's. `kalnat learn
# digits` (d = 585, 40 members, 13.7 million numbers; a cold cache) took 53.8 and 57.6 s in
# float32 against 79.9 and 77.1 s in float64 (benchmarks/startup.py --digits full --dtypes auto
# float64 auto float64; docs/cli.md); log-loss 0.2285 against 0.2286 since numerics.cholesky
# floors S's pivots (0.2276 in float32 before). One filter of that size gained little (its
# state fits the caches), and results move with the dtype (an MLP's path through the rows
# follows rounding): small learners, and a single filter to 1 024 parameters, keep float64. The
# full covariance's update stays positive definite in float32 over 10⁶ rows of ill-scaled
# features (d = 8, docs/benchmarks.md), and the command standardises its features.
DTYPES = ("auto", "float32", "float64")
AUTO_FLOAT32_ABOVE = 2**20


def resolve_dtype(spec, stored: int) -> str:
    """``--dtype`` for a learner whose covariances together keep ``stored`` numbers (a bank's
    members all), ``auto`` resolved (what a checkpoint records)."""
    name = (spec or "auto").strip().lower()
    if name not in DTYPES:
        raise ValueError(f"--dtype {spec!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return "float32" if stored > AUTO_FLOAT32_ABOVE else "float64"
    return name


def parse_covariance(spec: str):
    """``--covariance``: ``(kind, rank)``; ``rank`` is ``None`` but for ``lowrank[:K]`` and
    ``last-layer[:K]`` (default rank 10)."""
    kind, sep, rest = spec.strip().lower().partition(":")
    if kind in ("auto", "full", "diag", "blocks", "kron") and not sep:
        return kind, None
    if kind in ("lowrank", "last-layer"):
        if not sep:
            return kind, DEFAULT_RANK
        if rest.isascii() and rest.isdigit() and int(rest) > 0:   # isdigit alone takes "²"
            return kind, int(rest)
    raise ValueError(f"--covariance {spec!r}: expected auto, full, diag, blocks, lowrank:K, "
                     "last-layer:K or kron (K a positive rank, e.g. lowrank:10)")


def resolve_covariance(spec, d: int) -> str:
    """``--covariance`` for a model of ``d`` parameters, ``auto`` resolved (what a checkpoint
    records, so that it loads the same way whatever a later default is)."""
    kind, rank = parse_covariance(spec or "auto")
    if kind == "auto":
        kind, rank = ("full", None) if d <= AUTO_FULL_MAX else ("lowrank", DEFAULT_RANK)
    return kind if rank is None else f"{kind}:{rank}"

# How features are standardised for the filter (earlier rows only, always):
#   running  each row by the statistics of all rows before it. The coordinates move under the
#            filter, which (learning at a rate ~1/t) never unlearns what it learned in the
#            early ones;
#   follow   statistics frozen between boundaries at rows 2, 4, 8, …; at each boundary θ and
#            P are re-expressed exactly in the new coordinates (scaling.reexpress), so what
#            was learned keeps its meaning;
#   reprior  like follow, but the prior is reset to v·I in the new coordinates
#            (scaling.reexpress_with_prior; linear models, else as follow): an early, too
#            narrow scale does not leave a far too broad prior behind.
SCALINGS = ("running", "follow", "reprior")
DEFAULT_SCALING = "reprior"


def parse_model(spec: str, strict: bool = False):
    """``"linear"`` → ``("linear", ())``; ``"mlp:64,32"`` → ``("mlp", (64, 32))``. ``strict``
    (the option as typed): every width given, mlp:3,,2 a typo and not mlp:3,2; a checkpoint's
    spec, stored as typed before the option was checked so, is read leniently."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "linear" and not rest:
        return "linear", ()
    if kind == "mlp":
        try:
            hidden = tuple(int(h) for h in rest.split(",") if strict or h.strip())
        except ValueError:
            hidden = ()
        if hidden and all(h > 0 for h in hidden):
            return "mlp", hidden
    raise ValueError(f"--model {spec!r}: expected 'linear' or 'mlp:W1,W2,…' (positive widths)")


# --delimiter's names for separators a shell makes awkward to type
DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "space": " ", "pipe": "|"}


def parse_delimiter(text: str) -> str:
    """``--delimiter``: one character, or a name (``tab`` or ``\\t``, ``comma``, ``semicolon``,
    ``space``, ``pipe``)."""
    value = DELIMITER_NAMES.get(text.lower() if len(text) > 1 else text, text)
    if len(value) != 1:
        names = ", ".join(sorted(k for k in DELIMITER_NAMES if k.isalpha()))
        raise ValueError(f"--delimiter {text!r}: expected one character or one of {names} (or \\t)")
    if value.isalnum() or value in "\".+-\r\n":  # part of a number, CSV's quote, or a line's end
        raise ValueError(f"--delimiter {text!r}: a separator cannot be a character of numbers, a quote or a line break")
    return value
