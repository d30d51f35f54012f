"""Hydra's sweep grammar as Optuna distributions. Imported by the sweeper only when a sweep starts (the leading
underscore keeps Hydra's plugin scan from importing it, and Optuna with it, on every run)."""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(distribution per swept key, the other overrides as given). A later override of a key replaces an
    earlier one, so the command line (after hydra.sweeper.params) can pin or re-sweep a parameter."""
    by_key = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(overrides)}
    space = {key: distribution(o) for key, o in by_key.items() if o.is_sweep_override()}
    fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
    return space, fixed


def distribution(override: Override) -> BaseDistribution:
    """interval(a, b): uniform floats (Hydra parses its ends as floats), `tag(log, interval(a, b))` log-uniform;
    range(start, stop[, step]): those values, ordered (ints or floats); choice(...), a,b,c, shuffle(...):
    categorical."""
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return FloatDistribution(sweep.start, sweep.end, log="log" in sweep.tags)
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if not values:
        raise ValueError(f"{override.input_line}: sweeps no values")
    if isinstance(sweep, RangeSweep) and not sweep.shuffle:
        step = abs(sweep.step)
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return IntDistribution(min(values), max(values), step=step)
        return FloatDistribution(min(values), max(values), step=step)
    return CategoricalDistribution(values)
