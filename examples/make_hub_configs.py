"""Write hub_configs/<variant>/config.json for every released SpecPT variant, generated from the presets.

Released variants: the autoencoder and the redshift model of `specpt-small`, `specpt-base` and `specpt-paper`,
named `<preset>-autoencoder` and `<preset>-redshift`. Each config.json is what `save_pretrained` writes for that
model (architectures and `auto_map` included), minus `transformers_version`, so the files only change when a
preset does. Never edit them by hand: change the preset and run

    python examples/make_hub_configs.py            # rewrite hub_configs/
    python examples/make_hub_configs.py --check    # exit 1 if hub_configs/ is out of date
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from specpt_hf.presets import TASKS, model_class, preset_config

RELEASED_PRESETS = ("specpt-small", "specpt-base", "specpt-paper")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hub_configs"


def variants() -> dict[str, tuple[str, str]]:
    """Variant folder name -> (preset, task)."""
    return {f"{preset}-{task}": (preset, task) for preset in RELEASED_PRESETS for task in TASKS}


def render(preset: str, task: str) -> str:
    """The config.json text of one variant (sorted keys, trailing newline)."""
    config = preset_config(preset, task)
    cls = model_class(task)
    config.architectures = [cls.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_specpt.{type(config).__name__}",
        "AutoModel": f"modeling_specpt.{cls.__name__}",
    }
    data = config.to_diff_dict()
    data.pop("transformers_version", None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stale(out: Path) -> list[str]:
    """Variants whose config.json under `out` is missing or differs from the presets."""
    result = []
    for name, (preset, task) in variants().items():
        path = out / name / "config.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(preset, task):
            result.append(name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: hub_configs/)")
    parser.add_argument("--check", action="store_true", help="only check that the folder is up to date")
    args = parser.parse_args(argv)

    if args.check:
        outdated = stale(args.out)
        for name in outdated:
            print(f"out of date: {args.out / name / 'config.json'}", file=sys.stderr)
        return 1 if outdated else 0
    for name, (preset, task) in variants().items():
        path = args.out / name / "config.json"
        write_atomic(path, render(preset, task))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
