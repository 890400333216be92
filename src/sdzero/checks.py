"""Range checks for configuration fields, so a bad value is refused when the config is loaded, in one
line naming the field, instead of failing (or silently misbehaving) in the middle of a stage."""

from __future__ import annotations

from sdzero.errors import Refusal

RULES = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(section: str, settings, rules: dict[str, str]) -> None:
    """Raise ValueError for the first field of `settings` outside its rule; None (an unset optional
    field) always passes; an empty `section` is the top level. `rules` maps a field name to a key of RULES."""
    for name, rule in rules.items():
        value = getattr(settings, name)
        if value is not None and not RULES[rule](value):
            raise Refusal(f"{section + '.' if section else ''}{name} must be {rule}, got {value!r}")

