"""gradcheck: finite-difference gradient checks for hand-written backward passes.

    import gradcheck
    report = gradcheck.check(f, inputs, grads)          # any scalar function and its gradients
    report = gradcheck.check_vjp(forward, backward, inputs)   # a forward/backward pair
    report.assert_ok(); print(report.table())

``gradcheck.cases`` turns every ref_bert op (and the full model) into such checks,
``gradcheck.strategies`` draws model configurations and inputs for hypothesis, and
``python -m gradcheck`` runs the whole battery. See gradcheck/core.py for the numerics.
"""
from .core import DEFAULT_FLOOR, DEFAULT_RTOL, Report, Result, check, check_inplace, check_vjp, relative_error

__all__ = ["check", "check_vjp", "check_inplace", "relative_error", "Report", "Result", "DEFAULT_RTOL",
           "DEFAULT_FLOOR"]
