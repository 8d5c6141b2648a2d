"""The command's option choices, importable without JAX (``kalnat --help`` reads them)."""

# What --method names; kalnat.cli_learn.METHODS builds each (tests check the two agree).
METHOD_NAMES = ("ekf", "ekf-joseph", "information", "natgrad", "sqrt-ekf", "iterated", "nig")
FAMILIES = ("gaussian", "bernoulli", "categorical", "poisson")
# How θ's uncertainty is stored (kalnat.representations): the full covariance, its diagonal
# (O(d)), or one block per layer's weights and biases (the decoupled EKF).
COVARIANCES = ("full", "diag", "blocks")

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


def parse_model(spec: str):
    """``"linear"`` → ``("linear", ())``; ``"mlp:64,32"`` → ``("mlp", (64, 32))``."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "linear" and not rest:
        return "linear", ()
    if kind == "mlp":
        try:
            hidden = tuple(int(h) for h in rest.split(",") if h.strip())
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
    return value
