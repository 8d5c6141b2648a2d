"""The learner and the task of ``kalnat learn`` (and ``compare``, ``predict``) from its settings.

:func:`build_learner` turns the command's settings (a ``cfg`` dict: ``model_spec``, ``method``,
``prior_var``, ``forgetting``, ``covariance``, ``dtype``, ``bank``, ``seed``) into a model, a
learner and its initial state, the same every time (:mod:`kalnat.saved` relies on it);
:func:`resolve_task` finds the family and classes from the options, the data set or the first
rows; :func:`checkpoint_settings` reads the settings back from a checkpoint.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

import kalnat
from kalnat import datasets, families, models, representations, schedules
from kalnat.cli_choices import parse_model, resolve_covariance, resolve_dtype

__all__ = ["METHODS", "make_family", "build_model", "uses_bank", "single_settings", "build_learner",
           "resolve_task", "inference_note", "first_chunk_task", "checkpoint_settings"]


def _filter(make, **options):
    """``make`` (a core learner's constructor) at prior ``pv`` and forgetting ``lam``. When it
    forgets, its variances are bounded as the bank's members' are (no wind-up along a feature
    that stays constant); without forgetting P only shrinks and the bound is left off (the
    exact filter)."""
    def build(model, fam, pv, lam, **more):  # more: the representation (--covariance)
        bound = None if lam == 1.0 else kalnat.bank.default_max_variance(pv)
        return make(model, fam, prior_var=pv, forgetting=lam, max_variance=bound, **options, **more)
    return build


def _natural_gradient(model, fam, prior_var, forgetting, max_variance):
    """Online natural gradient with the rates that make it the same filter (docs/method.md §3)."""
    return kalnat.natural_gradient(model, fam, max_variance=max_variance, **schedules.kalman_to_natural(
        prior_var=prior_var, forgetting=forgetting)._asdict())


# Every learner of the core library, as built from the command's settings, bound included:
# the exact filter in four forms (ekf, ekf-joseph, information, natgrad give the same θ_t),
# its square-root form, the EKF relinearised twice per update, and for gaussian targets the
# normal–inverse-gamma filter that learns the noise scale.
METHODS = {
    "ekf": _filter(kalnat.ekf),
    "ekf-joseph": _filter(kalnat.ekf, joseph=True),
    "information": _filter(kalnat.information_filter),
    "natgrad": _filter(_natural_gradient),
    "sqrt-ekf": _filter(kalnat.sqrt_ekf),
    "iterated": _filter(kalnat.iterated_ekf, iterations=2),
    "nig": _filter(kalnat.nig_filter),
}


def make_family(name: str, n_classes: Optional[int] = None) -> families.Family:
    """The family the command learns with: gaussian as is, the others with
    :data:`kalnat.families.R_FLOOR`."""
    if name == "categorical":
        return families.Categorical(int(n_classes), r_floor=families.R_FLOOR)
    if name == "bernoulli":
        return families.Bernoulli(r_floor=families.R_FLOOR)
    if name == "poisson":
        return families.Poisson(r_floor=families.R_FLOOR)
    return families.from_name(name, n_classes)


def build_model(spec: str, n_features: int, family: families.Family):
    kind, hidden = parse_model(spec)
    if kind == "linear":
        return models.linear(n_features, family.n_outputs)
    return models.mlp(n_features, hidden, family.n_outputs)


MAX_COVARIANCE_BYTES = 8 * 2**30
MAX_CLASSES = 200


def uses_bank(cfg: dict) -> bool:
    """No prior and no forgetting given (and the EKF): the learner is a bank that tunes them."""
    return cfg.get("prior_var") is None and cfg.get("forgetting") is None and cfg["method"] == "ekf"


def single_settings(cfg: dict) -> tuple[float, float]:
    """``(prior_var, forgetting)`` of a single learner; an unset one takes its neutral value 1."""
    pv, lam = cfg.get("prior_var"), cfg.get("forgetting")
    return float(1.0 if pv is None else pv), float(1.0 if lam is None else lam)


def build_learner(cfg: dict, family: families.Family, n_features: int):
    """``(model, learner, initial state)`` from the command's settings, in ``cfg["dtype"]``
    (:func:`~kalnat.cli_choices.resolve_dtype`; settings without it: ``auto``, while a checkpoint
    without it loads as float64, :func:`checkpoint_settings`).

    With :func:`uses_bank` the learner is :func:`kalnat.auto` (or, when ``cfg["bank"]`` holds
    keyword arguments of :func:`kalnat.ekf_bank`, that bank); otherwise ``cfg["method"]`` at
    :func:`single_settings`.
    """
    if cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; expected one of {', '.join(METHODS)}")
    if cfg["method"] == "nig" and family.name != "gaussian":
        raise ValueError(f"--method nig learns the noise scale of a gaussian target; this target is {family.name}")
    model = build_model(cfg["model_spec"], n_features, family)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    d = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes)))
    own_form = cfg["method"] not in ("ekf", "iterated", "nig")
    if own_form and (cfg.get("covariance") or "auto") not in ("auto", "full"):
        raise ValueError(f"--covariance {cfg['covariance']} applies to --method ekf, iterated or nig "
                         f"({cfg['method']} has a form of its own)")
    rep = None if own_form else representations.from_name(cfg.get("covariance"), shapes)
    extra = {} if rep is None else dict(representation=rep)
    if uses_bank(cfg):
        opts = cfg.get("bank")
        learner = kalnat.ekf_bank(model, family, **opts, **extra) if opts else kalnat.auto(model, family, **extra)
    else:
        learner = METHODS[cfg["method"]](model, family, *single_settings(cfg), **extra)
    filters = learner.size if isinstance(learner, kalnat.bank.Bank) else 1
    stored = filters * representations.stored_floats(rep, d)
    dtype = np.dtype(resolve_dtype(cfg.get("dtype"), stored))
    needed = dtype.itemsize * stored
    if needed > MAX_COVARIANCE_BYTES:  # before allocating, not as an out-of-memory crash
        kind = "covariance" if rep is None else f"--covariance {resolve_covariance(cfg.get('covariance'), d)}"
        raise ValueError(f"--model {cfg['model_spec']} on {n_features} features has {d} parameters: "
                         f"the {kind} of {filters} filter{'s' * (filters > 1)} would need "
                         f"{needed / 2**30:.0f} GiB in {dtype.name}; use a smaller model, --covariance "
                         "diag, a smaller rank, one filter (--prior-var)"
                         + (" or --dtype float32" if dtype.name == "float64" else ""))
    params = model.init(jax.random.PRNGKey(int(cfg.get("seed", 0))))  # as kalnat.models' own, bit for bit
    # the filter computes in its parameters' dtype (kalnat.fit casts the rows to it)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return model, learner, learner.init(params)


def resolve_task(cfg: dict, source: datasets.Source, first_y) -> tuple[str, Optional[list]]:
    """The family name and class labels: from the options, the data set, or the first chunk."""
    family, classes = cfg.get("family"), cfg.get("classes")
    if family is None and source.task_hint is not None:
        family = source.task_hint
        if classes is None and source.n_classes_hint:
            classes = source.class_names or [str(i) for i in range(source.n_classes_hint)]
    guess_family, guess_classes = datasets.infer_task(first_y)
    guessed = False  # whether the classes are the first chunk's
    if family is None:
        family = guess_family
    if family in ("bernoulli", "categorical") and classes is None:
        if guess_classes is None:
            raise ValueError(f"{source.name}: the target {source.target_name!r} is not a class "
                             f"label (it looks {guess_family}); pass --classes or another --family")
        classes, guessed = guess_classes, True
    if family == "categorical" and len(classes) > MAX_CLASSES:
        raise ValueError(f"{source.name}: {len(classes)} distinct values in the target "
                         f"{source.target_name!r} is too many classes; is it a regression "
                         "(--family gaussian) or a count (--family poisson)?")
    if family in ("bernoulli", "categorical") and classes is not None and len(classes) < 2:
        if guessed:
            raise ValueError(f"{source.name}: only one class ({', '.join(classes)}) in the first chunk; pass "
                             "--classes with every label of the target (comma-separated)")
        raise ValueError(f"{source.name}: --classes names one class ({', '.join(classes)}); a {family} "
                         "target needs every label (comma-separated), two or more")
    if family == "bernoulli" and classes is not None and len(classes) != 2:
        raise ValueError(f"{source.name}: bernoulli needs two classes, the target has "
                         f"{len(classes)} ({', '.join(classes[:10])}); use --family categorical")
    if family not in ("bernoulli", "categorical"):
        classes = None
    return family, classes


def inference_note(cfg: dict, source: datasets.Source, family: str, classes) -> Optional[str]:
    """A line telling the user what was guessed about the task, or None if nothing was."""
    if cfg.get("family") or source.task_hint:
        return None
    what = family + (f" over {len(classes)} classes ({', '.join(classes[:6])}"
                     + (", …" if len(classes) > 6 else "") + ")" if classes else "")
    return (f"{source.name}: target {source.target_name!r} looks {what} from its first rows; "
            "pass --family (and --classes) to say otherwise")


def first_chunk_task(cfg: dict, source: datasets.Source, first_y, log=None):
    """``(family, classes, coder)`` from the options, the data set or the first chunk's targets
    (:func:`resolve_task`), with ``log`` told what was guessed (:func:`inference_note`), and the
    :class:`~kalnat.datasets.TargetCoder` of the stream's targets: what ``kalnat learn`` (one
    stream or one per key) and ``kalnat compare`` read before they learn a row."""
    family, classes = resolve_task(cfg, source, first_y)
    note = inference_note(cfg, source, family, classes)
    if note and log:
        log(note)
    names = [source.target_name, *(source.feature_names or [])]
    if log and source.target_name is not None and all(_number(n) for n in names):
        log(f"{source.name}: every column name ({', '.join(names[:4])}{', …' if len(names) > 4 else ''}) is a "
            "number: a file with no header row? Its first line was read as the names, not learned")
    return family, classes, datasets.TargetCoder(family, classes)


def _number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def checkpoint_settings(extra: dict) -> dict:
    """The settings :func:`build_learner` takes, from a checkpoint's ``extra`` (a model's or a
    keyed model's): as they were learned, ``auto`` resolved; a checkpoint written before a
    setting existed has what the command did then (the full covariance, float64)."""
    return {"model_spec": extra["model"], "method": extra["method"], "prior_var": extra["prior_var"],
            "forgetting": extra["forgetting"], "bank": extra.get("bank"), "seed": extra["seed"],
            "covariance": extra.get("covariance", "full"), "dtype": extra.get("dtype", "float64")}

