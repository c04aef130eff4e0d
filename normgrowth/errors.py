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
