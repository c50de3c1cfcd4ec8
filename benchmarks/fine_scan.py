"""Fine scan: refined NMAD, η and ZERR calibration per class against the fine scan's trials and step
(`refinement_fine_trials`, `refinement_fine_step`).

    python benchmarks/fine_scan.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --per-class 250 --out benchmarks/results/fine_scan
    python benchmarks/fine_scan.py --quick --out /tmp/fs     # seconds: untrained tiny model

The same held-out spectra as template_smoothing.py (the first --per-class of each class's first file, seed 101)
are refined with each setting; the coarse curve, which chooses the minimum, is the same in every setting, so the
settings differ only in where the parabola that gives Z and ZERR is fitted. Per class: NMAD, η (|Δz|/(1+z) >
0.0033) and the median |Δz| / ZERR within 0.01 (0.67 where ZERR is right); and the CPU seconds per spectrum of
the whole refined prediction (1 thread). Writes fine_scan.json and fine_scan.md to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import predict_chunks  # noqa: E402
from speed import _cpu_seconds  # noqa: E402
from template_smoothing import benchmark_parser, refined_test_spectra, score, write_result  # noqa: E402

SETTINGS = ((5, 1e-4), (5, 2e-4), (7, 1e-4), (7, 1.5e-4), (7, 2e-4), (9, 1e-4))  # (trials, step in ln(1 + z))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Fine scan",
        "",
        f"{result['machine']['summary']}, {result['machine']['date']}. Model: {result['model']}; {result['test_set']}.",
        "Refined redshifts with the fine scan's trials and step (the model's own setting: "
        f"{result['model_setting']['trials']} trials of {result['model_setting']['step']:g}). η: |Δz|/(1+z) > 0.0033. "
        "|Δz|/ZERR: median over the spectra within 0.01 (0.67 where ZERR is right). ms: CPU time per spectrum of "
        "the whole refined prediction, 1 thread.",
        "",
        "| trials | step | class | n | NMAD | η (%) | median abs(Δz)/ZERR | ms / spectrum |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["settings"]:
        for name, m in row["by_class"].items():
            if m["n"]:
                ms = f"{row['ms_per_spectrum']:.1f}" if name == "all" else ""
                lines.append(
                    f"| {row['trials']} | {row['step']:g} | {name} | {m['n']} | {m['nmad']:.2e} | "
                    f"{100 * m['eta']:.1f} | {m['zerr_ratio']:.2f} | {ms} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model, batch, z_true, classes = refined_test_spectra(args, parser)
    own = {"trials": model.config.refinement_fine_trials, "step": model.config.refinement_fine_step}
    settings = []
    for trials, step in SETTINGS[:2] if args.quick else SETTINGS:
        model.config.refinement_fine_trials, model.config.refinement_fine_step = trials, step
        start = _cpu_seconds()
        out = predict_chunks(model, batch)
        ms = 1000 * (_cpu_seconds() - start) / len(z_true)
        rows = score(out["z"], out["zerr"], z_true, classes)
        settings.append({"trials": trials, "step": step, "ms_per_spectrum": ms, "by_class": rows})
        print(
            f"{trials} x {step:g}: "
            + ", ".join(f"{c} {m['nmad']:.2e}" for c, m in rows.items())
            + f"; {ms:.1f} ms"
        )
    write_result(args, "fine_scan", markdown, model_setting=own, settings=settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
