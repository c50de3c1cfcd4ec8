"""One attention call, forward and backward, per kernel at a preset's training shape: where sdpa loses to eager.

`train_throughput.py` times whole training steps; this times the attention alone, for the model's eager function
and for each of torch's sdpa backends (the dispatcher's choice, the fused flash kernel, the math fallback), in
float32 and bfloat16, with the preset's (batch, heads, tokens, head_dim) taken from a real forward pass.

    python benchmarks/attention_kernels.py --presets specpt-small --threads 2 --json O.json
    python benchmarks/attention_kernels.py --quick      # a few calls each, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from train_throughput import DEFAULT_BATCH

KERNELS = ("eager", "sdpa", "sdpa-flash", "sdpa-math")


@dataclass
class Row:
    preset: str
    precision: str
    dropout: float
    kernel: str
    shape: list[int]  # [batch, heads, tokens, head_dim]
    ms: float | None  # forward + backward; None where the kernel refused the inputs
    error: str = ""


def attention_shape(preset: str, batch_size: int) -> list[int]:
    """[batch, heads, tokens, head_dim] of the preset's encoder self-attention, read off a forward pass."""
    import torch

    from specpt_hf.modeling_specpt import SpecPTAttention
    from specpt_hf.presets import create_model

    model = create_model(preset, "redshift").eval()
    config = model.config
    seen: list[torch.Size] = []
    layer = next(m for m in model.modules() if isinstance(m, SpecPTAttention))
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    flux = torch.ones(1, config.num_pixels)
    with torch.no_grad():
        model(flux=flux, ivar=torch.ones_like(flux), mask=torch.zeros_like(flux, dtype=torch.bool))
    handle.remove()
    tokens = seen[0][1]
    return [batch_size, config.num_heads, tokens, config.d_model // config.num_heads]


def time_kernel(kernel: str, shape: list[int], precision: str, dropout: float, calls: int) -> float:
    """Milliseconds per forward + backward of one attention call (the best of `calls`, after one warm-up)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from specpt_hf.modeling_specpt import eager_attention_forward

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype, requires_grad=True) for _ in range(3))
    module = torch.nn.Module().train()
    backends = {"sdpa-flash": [SDPBackend.FLASH_ATTENTION], "sdpa-math": [SDPBackend.MATH]}

    def call() -> None:
        if kernel == "eager":
            out, _ = eager_attention_forward(module, q, k, v, None, scaling=shape[3] ** -0.5, dropout=dropout)
        else:
            with sdpa_kernel(backends[kernel]) if kernel in backends else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout
                )  # [batch, heads, tokens, dim]
        out.float().sum().backward()

    call()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def format_table(rows: list[Row]) -> str:
    lines = [
        "| preset | precision | attention dropout | shape | " + " | ".join(KERNELS) + " |",
        "| --- | --- | ---: | --- |" + " ---: |" * len(KERNELS),
    ]
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.preset, r.precision, r.dropout, tuple(r.shape)), {})[r.kernel] = r
    for (preset, precision, dropout, shape), by_kernel in groups.items():
        cells = [
            "refused" if by_kernel[k].ms is None else f"{by_kernel[k].ms:.1f} ms"
            for k in KERNELS
            if k in by_kernel
        ]
        lines.append(
            f"| {preset} | {precision} | {dropout:g} | {'×'.join(map(str, shape))} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["specpt-small"])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.1], help="attention dropout")
    parser.add_argument("--batch-size", type=int, help="default: 16 tiny, 32 small, 128 base and paper")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per kernel (the best is kept)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 timed calls each")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    for preset in args.presets:
        if preset not in DEFAULT_BATCH:
            parser.error(f"--presets: unknown preset {preset!r}; choose from {sorted(DEFAULT_BATCH)}")
    if args.quick:
        args.calls = 2
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from specpt_hf.atomic import atomic_write_text

    args = parse_args(argv)
    # torch says why a forced flash kernel is refused; the rows record that refusal
    warnings.filterwarnings("ignore", message="Both fused kernels do not support non-zero dropout")
    warnings.filterwarnings("ignore", message="Flash attention kernel not used")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        shape = attention_shape(preset, args.batch_size or DEFAULT_BATCH[preset])
        for precision in args.precisions:
            for dropout in args.dropouts:
                for kernel in KERNELS:
                    try:
                        ms, error = time_kernel(kernel, shape, precision, dropout, args.calls), ""
                    except RuntimeError as err:  # a forced backend that cannot take these inputs
                        ms, error = None, str(err).splitlines()[0]
                    rows.append(Row(preset, precision, dropout, kernel, shape, ms, error))
    print(format_table(rows))
    if args.json:
        record = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": [asdict(r) for r in rows],
        }
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
