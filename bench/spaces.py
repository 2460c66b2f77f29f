"""A shipped search space with its defaults point changed, for benchmarks that scale it to their budget."""
from __future__ import annotations

from pathlib import Path


def space_with_defaults(space: str, defaults: list[str], out: Path, overrides: dict | None = None) -> str:
    """`space` itself if `defaults` (KEY=VALUE items) is empty; else a copy at `out` whose defaults point (the
    first trial, and the shared knobs of every seed point) has those values. Each key must be a param, and the
    point must fit the space with the run's base `overrides` (e.g. a ramp no longer than the epochs allow).
    A bad item is one line (SystemExit) before anything is written."""
    if not defaults:
        return space
    import yaml

    from trainers.config import ConfigError, parse_overrides
    from tuner.space.record import read_space_file, space_with_overrides

    _, raw = read_space_file(space)
    try:
        changes = parse_overrides(defaults)
        unknown = sorted(set(changes) - set(raw.get("params") or {}))
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not a param of {space} (base keys are KEY=VALUE overrides)")
        raw["defaults"] = {**(raw.get("defaults") or {}), **changes}
        raw["description"] = f"{raw.get('description') or ''} Defaults changed by a benchmark: {' '.join(defaults)}."
        space_with_overrides(raw, overrides or {}, space)  # still a valid space with the run's base
    except ConfigError as e:  # SpaceError and SearchError are ConfigErrors
        raise SystemExit(f"--defaults: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(out.resolve())
