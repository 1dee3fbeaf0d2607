"""Flags from config dataclasses: one flag per settable field, its help and choices from the field's own
documentation (config.py `opt`), defaults left None so presets can fill only what the user did not set."""

from __future__ import annotations

import argparse
import dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), title: str = "") -> None:
    """One flag per settable field of `cls` (fields the stage derives itself are not offered)."""
    from ..config import field_choices, field_help, settable_fields

    group = parser.add_argument_group(title or f"{cls.__name__} (defaults shown)")
    for f in settable_fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = field_choices(f)
        text = field_help(f)
        shown = f"{text} (default: {default!r})" if isinstance(default, str) else f"{text} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                               help=shown)
        else:
            conv = {int: int, float: float}.get(type(default), str)
            group.add_argument(_flag(f.name), dest=f.name, default=None, type=conv, choices=choices,
                               metavar="{" + ",".join(map(str, choices)) + "}" if choices else type(default).__name__.upper(),
                               help=shown)


def explicit_values(cls, args: argparse.Namespace) -> dict:
    """The fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def config_from_args(cls, args: argparse.Namespace, preset_values: dict | None = None, **fixed):
    """`cls` from the command line: the user's flags, then `preset_values` for the fields they left unset,
    then the class defaults; `fixed` always wins."""
    from ..config import apply_preset

    explicit = {**explicit_values(cls, args), **fixed}
    cfg = cls(**explicit)
    if preset_values:
        cfg = apply_preset(cfg, preset_values, set(explicit))
    return cfg
