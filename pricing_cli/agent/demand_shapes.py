"""Price-response shapes of the demand model, their pooled fit and the per-product choice.

Every shape multiplies the day's calendar level ``exp(log_base)`` (the constant-elasticity
fit's level at the reference price: product level, weekday, season, events) by a response to
the relative price r = price / ref_p:

    loglog   r ** -e                          (parameters of the base fit, not fitted here)
    linear   max(c − d·(r − 1), 0)            elasticity at ref d / c, choke price ref·(1 + c/d)
    logit    M·σ(a − b·r) / σ(a − b)          elasticity at ref b·(1 − σ(a − b)), M = exp(m)

So at r = 1 every shape's units are about the base level (c ≈ 1, M ≈ 1). The shapes here are
fitted per product by Fisher scoring on the rows of all products at once (bincounts by
product, one small k×k system per product), each product's parameters pulled toward its
category's mean (and the category's toward the overall mean) with the same
``train.demand_shrinkage`` as the base fit. The formulas live only here: prediction, fit and
elasticity all call :func:`response`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("loglog", "linear", "logit")
# Largest log-rate: exp overflow guard during line searches (demand.py's too; kept here, as
# demand imports this module).
ETA_MAX = 30.0
N_SHAPE_PARAMS = 3  # widest parameter vector (logit: m, a, b); linear uses the first two
FISHER_ITERATIONS = 40
STEP_TOL = 1e-6  # largest parameter move at which a fit counts as converged
MIN_RATE = 1e-12  # a Poisson mean of 0 would make a sold unit infinitely unlikely
# The linear shape's floor (share of the level): beyond the choke price demand is zero, but a
# Poisson likelihood needs a positive mean where a unit was sold.
LINEAR_FLOOR = 1e-6
# A shape other than loglog must beat it by SWITCH_PENALTY held-out deviance, plus
# EXTRA_PARAMETER_PENALTY per extra parameter (AIC-style), so noise alone keeps the
# constant-elasticity default: on the small preset's constant-elasticity market (45 held-out
# days a product) noise gave single products gains of up to 20 over loglog.
SWITCH_PENALTY = 10.0
EXTRA_PARAMETER_PENALTY = 2.0
EXTRA_PARAMETERS = {"loglog": 0, "linear": 0, "logit": 1}
# Pseudo-rows of the category's held-out deviance per row added to each product's own: the
# category's verdict weighs as much as 45 held-out days of the product's own, so a product
# with a handful of days takes its category's choice, and one product's noise rarely
# overturns a category.
FORM_PRIOR_ROWS = 100.0
# Ridge (relative to demand_shrinkage) of each shape parameter toward its group mean; the
# logit's location a is weakly identified when prices stay on one side of the curve's middle.
SHAPE_SHRINK = {"linear": np.array([0.1, 1.0]), "logit": np.array([0.1, 1.0, 1.0])}


def n_params(form: str) -> int:
    return {"linear": 2, "logit": 3}[form]


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # overflow-free


def response(form: str, theta: np.ndarray, r: np.ndarray, *, gradient: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Multiplier of the calendar level at relative price r, and optionally its gradient.

    Args:
        form: linear or logit.
        theta: (..., N_SHAPE_PARAMS) parameters broadcast against r (..., ).
        r: price / reference price.
        gradient: also return d multiplier / d theta, shape (..., n_params(form)).

    Returns:
        (multiplier, gradient or None).
    """
    if form == "linear":
        c, d = theta[..., 0], theta[..., 1]
        raw = c - d * (r - 1.0)
        value = np.maximum(raw, LINEAR_FLOOR)
        if not gradient:
            return value, None
        inside = (raw > LINEAR_FLOOR).astype(np.float64)
        return value, np.stack([inside, -(r - 1.0) * inside], axis=-1)
    if form == "logit":
        m, a, b = theta[..., 0], theta[..., 1], theta[..., 2]
        at_price, at_ref = _sigmoid(a - b * r), _sigmoid(a - b)
        value = np.exp(np.minimum(m, ETA_MAX)) * at_price / np.maximum(at_ref, 1e-300)
        if not gradient:
            return value, None
        d_a = (1.0 - at_price) - (1.0 - at_ref)
        d_b = -r * (1.0 - at_price) + (1.0 - at_ref)
        return value, value[..., None] * np.stack([np.ones_like(d_a), d_a, d_b], axis=-1)
    raise ValueError(f"unknown demand form {form!r}")


def elasticity_at_reference(form: str, theta: np.ndarray) -> np.ndarray:
    """Price elasticity (positive: demand falls) at r = 1 for parameters (..., 3)."""
    if form == "linear":
        return theta[..., 1] / np.maximum(theta[..., 0], 1e-12)
    if form == "logit":
        return theta[..., 2] * (1.0 - _sigmoid(theta[..., 1] - theta[..., 2]))
    raise ValueError(f"unknown demand form {form!r}")


def initial_params(form: str, elasticity: np.ndarray) -> np.ndarray:
    """(n_products, 3) start from each product's constant elasticity (same slope at ref)."""
    e = np.clip(np.asarray(elasticity, dtype=np.float64), 0.2, 10.0)
    theta = np.zeros((len(e), N_SHAPE_PARAMS))
    if form == "linear":
        theta[:, 0], theta[:, 1] = 1.0, e
    else:  # logit with the curve's middle at the reference: elasticity b / 2
        theta[:, 1], theta[:, 2] = 2.0 * e, 2.0 * e
    return theta


@dataclass(frozen=True)
class ShapeRows:
    """The rows a shape is fitted on: product index, relative price, calendar log level,
    units, and each product's category (-1: none)."""

    product: np.ndarray
    r: np.ndarray
    log_base: np.ndarray
    units: np.ndarray
    product_category: np.ndarray
    weight: np.ndarray | None = None  # per-row likelihood weight (1 when None)


def _group_means(theta: np.ndarray, has_rows: np.ndarray, product_category: np.ndarray
                 ) -> np.ndarray:
    """(n_products, k) prior mean of each product: its category's mean of the products
    with rows (shrunk toward the overall mean by one product's worth), else the overall."""
    overall = theta[has_rows].mean(axis=0) if has_rows.any() else theta.mean(axis=0)
    prior = np.broadcast_to(overall, theta.shape).copy()
    n_categories = int(product_category.max() + 1) if len(product_category) else 0
    for k in range(n_categories):
        members = (product_category == k) & has_rows
        if members.any():
            mean = (theta[members].sum(axis=0) + overall) / (members.sum() + 1.0)
            prior[product_category == k] = mean
    return prior


def _nll_by_product(form: str, theta: np.ndarray, rows: ShapeRows, prior: np.ndarray,
                    penalty: np.ndarray) -> np.ndarray:
    """(n_products,) penalized Poisson negative log-likelihood of each product."""
    n = len(theta)
    mult, _ = response(form, theta[rows.product], rows.r)
    lam = np.maximum(np.exp(rows.log_base) * mult, MIN_RATE)
    w = rows.weight if rows.weight is not None else 1.0
    nll = np.bincount(rows.product, w * (lam - rows.units * np.log(lam)), n)
    return nll + (penalty * (theta[:, :len(penalty)] - prior[:, :len(penalty)]) ** 2).sum(axis=1)


def fit_shape(form: str, rows: ShapeRows, start: np.ndarray, strength: float) -> np.ndarray:
    """Pooled Fisher-scoring fit of one shape's per-product parameters.

    Args:
        form: linear or logit.
        rows: the fit rows.
        start: (n_products, 3) initial parameters (see :func:`initial_params`).
        strength: train.demand_shrinkage.

    Returns:
        (n_products, 3) parameters; products without rows get their group's mean.
    """
    k = n_params(form)
    n = len(start)
    theta = start.copy()
    penalty = strength * SHAPE_SHRINK[form] + 1e-6
    has_rows = np.bincount(rows.product, minlength=n) > 0
    base = np.exp(rows.log_base)
    w = rows.weight if rows.weight is not None else np.ones(len(rows.units))
    for iteration in range(FISHER_ITERATIONS):
        # The group means move slowly: re-centre the prior every few steps.
        if iteration % 5 == 0:
            prior = _group_means(theta, has_rows, rows.product_category)
            f = _nll_by_product(form, theta, rows, prior, penalty)
        mult, grad_mult = response(form, theta[rows.product], rows.r, gradient=True)
        assert grad_mult is not None
        lam = np.maximum(base * mult, MIN_RATE)
        grad_lam = base[:, None] * grad_mult
        score = (w * (1.0 - rows.units / lam))[:, None] * grad_lam
        gradient = np.column_stack([np.bincount(rows.product, score[:, i], n) for i in range(k)])
        gradient += 2.0 * penalty * (theta[:, :k] - prior[:, :k])
        fisher = np.empty((n, k, k))
        for i in range(k):
            for j in range(i, k):
                fisher[:, i, j] = fisher[:, j, i] = np.bincount(
                    rows.product, w * grad_lam[:, i] * grad_lam[:, j] / lam, n)
        fisher += 2.0 * np.diag(penalty)[None]
        step = -np.linalg.solve(fisher, gradient[:, :, None])[:, :, 0]
        # Backtracking per product: halve the step of products whose objective rose.
        t = np.ones(n)
        for _ in range(20):
            candidate = theta.copy()
            candidate[:, :k] += t[:, None] * step
            f_new = _nll_by_product(form, candidate, rows, prior, penalty)
            worse = ~(f_new <= f + 1e-12 * np.abs(f))
            if not worse.any():
                break
            t[worse] *= 0.5
        keep = ~worse
        theta[keep] = candidate[keep]
        f[keep] = f_new[keep]
        if np.abs(t[:, None] * step).max(initial=0.0) < STEP_TOL and iteration % 5 == 4:
            break  # converged under the latest group means
    prior = _group_means(theta, has_rows, rows.product_category)
    theta[~has_rows] = prior[~has_rows]
    return theta


def deviance_by_product(predicted: np.ndarray, units: np.ndarray, product: np.ndarray,
                        n_products: int, weight: np.ndarray | None = None) -> np.ndarray:
    """(n_products,) summed Poisson deviance of each product's rows."""
    predicted = np.maximum(predicted, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(units > 0, units * np.log(units / predicted), 0.0)
    w = weight if weight is not None else 1.0
    return np.bincount(product, w * 2.0 * (term - (units - predicted)), n_products)


def choose_forms(deviance: dict[str, np.ndarray], holdout_rows: np.ndarray,
                 product_category: np.ndarray) -> np.ndarray:
    """Each product's shape (index into FORMS): lowest held-out deviance of its own plus
    FORM_PRIOR_ROWS rows at its category's deviance per row (so sparse products follow the
    category), plus the switching and extra-parameter margins.

    Args:
        deviance: form -> (n_products,) held-out deviance (only the forms to choose among).
        holdout_rows: (n_products,) held-out rows per product.
        product_category: (n_products,) category index, -1 for none (pools with all).
    """
    forms = list(deviance)
    groups = np.where(product_category >= 0, product_category, product_category.max() + 1)
    n_groups = int(groups.max() + 1) if len(groups) else 0
    rows_by_group = np.bincount(groups, holdout_rows, n_groups)
    score = np.empty((len(holdout_rows), len(forms)))
    for j, form in enumerate(forms):
        per_row = np.bincount(groups, deviance[form], n_groups) / np.maximum(rows_by_group, 1)
        score[:, j] = (deviance[form] + FORM_PRIOR_ROWS * per_row[groups]
                       + EXTRA_PARAMETER_PENALTY * EXTRA_PARAMETERS[form]
                       + (SWITCH_PENALTY if form != "loglog" else 0.0))
    return np.array([FORMS.index(forms[j]) for j in score.argmin(axis=1)], dtype=np.int8)
