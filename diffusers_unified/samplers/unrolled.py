"""diffrax's Dopri5 and Tsit5 with their stages written out: the same methods, a cheaper step.

diffrax's Runge-Kutta solvers compute a step's stages in a loop over the
stages (one `while_loop` iteration per stage, each slicing the Butcher
tableau and writing the stage into a buffer), which keeps compilation short
for every kind of Runge-Kutta method. For a network of a few small layers that
bookkeeping is a sizeable part of each vector-field evaluation: with the
small benchmark MLP at batch 1024, the likelihood's augmented field cost
about 17% more per evaluation inside diffrax's Dopri5 than inside a
fixed-step scan (experiments/peer_comparison.py). `UnrolledRK` takes the
same tableau (`diffrax.Dopri5.tableau`, `diffrax.Tsit5.tableau`) and writes
the stages out in the traced program, so a step is the evaluations and their
linear combinations only; diffrax still does everything else (the PID step
size controller, the initial step, the loop, saving). The price is a
network compiled once per stage: `samplers.ode.adaptive_solver` therefore
takes these for vector data only, and diffrax's own solvers for images.

The one difference beyond float rounding: the dense output between steps is
linear (`LocalLinearInterpolation`) where diffrax's solvers interpolate to
their own order. The solves here save only the final state (`SaveAt(t1=True)`),
which interpolation never touches.
"""

from __future__ import annotations

from typing import ClassVar

import diffrax
import equinox as eqx
import jax


def _combine(weights, ks):
    """sum_j weights_j ks_j over the nonzero weights, leaf by leaf (the states may be pytrees)."""
    used = [(float(w), k) for w, k in zip(weights, ks, strict=False) if w != 0.0]

    def leaf(*values):
        return sum(w * v for (w, _), v in zip(used, values, strict=True))

    return jax.tree.map(leaf, *[k for _, k in used])


class UnrolledRK(diffrax.AbstractAdaptiveSolver):
    """An explicit, first-same-as-last Runge-Kutta method (a diffrax `ButcherTableau` whose last
    stage is the step's end) with its stages unrolled; for ODE terms."""

    tableau: diffrax.ButcherTableau = eqx.field(static=True)
    method_order: int = eqx.field(static=True)
    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def __check_init__(self):
        tab = self.tableau
        if not (tab.fsal and tab.ssal) or tab.implicit or tab.c1 != 0.0:
            raise ValueError("UnrolledRK needs an explicit tableau that is FSAL and SSAL")

    def order(self, terms):
        return self.method_order

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)  # the first stage of the first step

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        f0 = solver_state
        if made_jump is not False:  # after a jump in the vector field, its old value is stale
            f0 = jax.lax.cond(made_jump, lambda: terms.vf(t0, y0, args), lambda: f0)
        # diffrax solves backwards in time (t0 > t1 in diffeqsolve) forwards in -t: the
        # solver's times always increase, and the term's control carries the direction.
        dt, h = t1 - t0, terms.contr(t0, t1)
        ks = [f0]
        for c, a in zip(self.tableau.c, self.tableau.a_lower, strict=True):
            y = jax.tree.map(lambda y0_, d: y0_ + h * d, y0, _combine(a, ks))
            ks.append(terms.vf(t1 if c == 1.0 else t0 + float(c) * dt, y, args))
        # SSAL: the last stage's point is the step's end, and FSAL: its value is the next f0.
        y_error = jax.tree.map(lambda d: h * d, _combine(self.tableau.b_error, ks))
        return y, y_error, {"y0": y0, "y1": y}, ks[-1], diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


SOLVERS = {
    "dopri5": lambda: UnrolledRK(diffrax.Dopri5.tableau, 5),
    "tsit5": lambda: UnrolledRK(diffrax.Tsit5.tableau, 5),
}
