"""Presets are data: one TOML file per preset (src/gptstack/presets/NAME.toml, or a file of your own), with a
section per stage of the stage table. Every key is checked against the stage's config class on load, so a
typo is a one-line error before any stage runs. The pipeline and the CLI's `--preset` read the same files.

    description = "..."
    inherits = "d12"            # optional: start from another preset, section by section
    rl_task = "arithmetic_direct"
    [budget_steps]              # --budget steps: optimizer steps per training stage
    base = 166
    [base]                      # PretrainConfig fields
    depth = 4
    ...
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check_fields
from ..errors import ConfigError
from .stages import BY_NAME, NAMES, TRAINED

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
TOP_LEVEL = ("description", "inherits", "rl_task", "budget_steps")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


@dataclass
class Preset:
    name: str
    path: Path
    description: str = ""
    rl_task: str = "arithmetic_direct"
    sections: dict[str, dict] = field(default_factory=dict)       # stage -> validated field values
    budget_steps: dict[str, int] = field(default_factory=dict)    # training stage -> steps (--budget steps)

    def values(self, stage: str) -> dict:
        return dict(self.sections.get(stage, {}))

    def config(self, stage: str, **fixed):
        """The stage's config: its class's defaults, then this preset's section, then `fixed`."""
        cls = BY_NAME[stage].config
        cfg = cls(**{**self.values(stage), **fixed})
        return cfg

    def with_budget(self, budget: str) -> "Preset":
        """Under `--budget steps` every training stage runs its fixed step count, with no time limit."""
        if budget != "steps":
            return self
        if not self.budget_steps:
            raise ConfigError(f"preset {self.name!r} has no [budget_steps] section: --budget steps needs one")
        sections = {k: dict(v) for k, v in self.sections.items()}
        for stage, steps in self.budget_steps.items():
            sections.setdefault(stage, {}).update(minutes=0.0, steps=steps)
        return dataclasses.replace(self, sections=sections)


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read preset '{path}' ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset '{path}' is not valid TOML ({e})") from None


def _locate(name: str) -> Path:
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"preset file '{path}' does not exist")
        return path
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())} or give a .toml file")
    return path


def load_preset(name: str, _seen: tuple = ()) -> Preset:
    """The preset `name` (a packaged name or a .toml path), validated: unknown sections or fields, wrong
    types and unknown tasks are errors naming the file and the key."""
    path = _locate(name)
    if path in _seen:
        raise ConfigError(f"preset '{path}' inherits from itself")
    raw = _read(path)
    where = str(path)
    for key, value in raw.items():
        if key in TOP_LEVEL:
            continue
        if key not in NAMES:
            close = difflib.get_close_matches(key, NAMES + TOP_LEVEL, n=1)
            raise ConfigError(f"{where}: unknown section or key '{key}'" + (f" (did you mean '{close[0]}'?)" if close
                                                                             else f"; stages are {', '.join(NAMES)}"))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a [{key}] table of {BY_NAME[key].config.__name__} fields")
        cls = BY_NAME[key].config
        if cls is None and value:
            raise ConfigError(f"{where}: stage '{key}' has no settings")
        if cls is not None:
            check_fields(cls, value, f"{where} [{key}]")
    base = load_preset(raw["inherits"], _seen + (path,)) if "inherits" in raw else Preset(name, path)
    sections = {k: dict(v) for k, v in base.sections.items()}
    for key in NAMES:
        if key in raw:
            sections.setdefault(key, {}).update(raw[key])
    budget = dict(base.budget_steps)
    for stage, steps in (raw.get("budget_steps") or {}).items():
        if stage not in TRAINED:
            raise ConfigError(f"{where} [budget_steps]: '{stage}' is not a training stage ({', '.join(TRAINED)})")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{where} [budget_steps]: {stage} must be a positive number of steps, got {steps!r}")
        budget[stage] = steps
    rl_task = raw.get("rl_task", base.rl_task)
    from ..data.tasks import list_tasks

    if rl_task not in list_tasks():
        raise ConfigError(f"{where}: rl_task {rl_task!r} is not a task; tasks are {', '.join(list_tasks())}")
    preset = Preset(name=path.stem if path.parent == PRESET_DIR else str(path), path=path,
                    description=raw.get("description", base.description), rl_task=rl_task, sections=sections,
                    budget_steps=budget)
    for stage in sections:   # the merged sections must still build and validate as configs
        if BY_NAME[stage].config is not None:
            try:
                preset.config(stage)
            except TypeError as e:
                raise ConfigError(f"{where} [{stage}]: {e}") from None
    return preset
