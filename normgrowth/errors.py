"""User-facing errors: one sentence saying what is wrong and what to do.

The CLI prints the message of a :class:`NormgrowthError` (no traceback) and exits with code 2.
"""


class NormgrowthError(Exception):
    """An input problem the user can fix; ``str(err)`` is the whole message shown to them."""


class NonFiniteNormError(NormgrowthError):
    """A norm came out inf or NaN (typically half-precision overflow)."""

    def __init__(self, site: str, layer: int, n_bad: int, dtype: str):
        self.site, self.layer, self.n_bad = site, layer, n_bad
        super().__init__(
            f"non-finite norm (inf or NaN) at site {site}, layer {layer}, in {n_bad} token(s) "
            f"with dtype {dtype}: the model overflowed; rerun with --dtype float32 or bfloat16."
        )


class TrainingDiverged(NormgrowthError):
    """A fine-tuning loss came out inf or NaN: ``step`` (1-based) of ``n_steps`` in the stage ``label``."""

    def __init__(self, loss: float, step: int, n_steps: int, label: str = ""):
        self.loss, self.step, self.n_steps, self.label = loss, step, n_steps, label
        super().__init__(f"the training loss became {loss} at step {step} of {n_steps}"
                         f"{' (' + label + ')' if label else ''}: the fine-tuning diverged; lower the learning rate "
                         "or add steps.")
