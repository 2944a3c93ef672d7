"""The fastmath flags every ``cpu`` kernel compiles with."""

__all__ = ["_FM"]

# reassoc/contract only: no nnan/ninf, NaN and -inf carry meaning here (NaN rows, masked keys)
_FM = {"contract", "reassoc", "nsz", "arcp"}
