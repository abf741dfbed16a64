"""Reproduce Table 2's Param column and the paper's sparsity levels from architecture configs alone.

    python scripts/paper_arithmetic.py

Builds T5-v1.1-XXL, PixArt-Σ XL/2 and the SD-VAE on the meta device (no weights, no download), counts
parameters with the project's own ``count_params``/``units``/``realized_sparsity``, and checks them against
SPEC §1 / Table 2. Exits 1 if any number disagrees.
"""
from __future__ import annotations

import sys

from skrr import count_params, realized_sparsity, units
from skrr.architectures import pixart_sigma_transformer, sd_vae, t5_xxl_encoder
from skrr.plan import PruningPlan
from skrr.surgery import signature


def main() -> int:
    enc, dit, vae = t5_xxl_encoder(), pixart_sigma_transformer(), sd_vae()
    n_enc, n_dit = count_params(enc), count_params(dit)
    n_dec = count_params(vae.decoder) + count_params(vae.post_quant_conv)
    sizes = units(enc)
    attn, ffn = sizes[0].params, sizes[1].params
    sig = signature(enc)

    def skip_blocks(n: int) -> float:
        return realized_sparsity(enc, PruningPlan.from_skips(sig, range(n), "block"))

    def skip_units(n_attn: int, n_ffn: int) -> float:
        chosen = [2 * b for b in range(n_attn)] + [2 * b + 1 for b in range(n_ffn)]
        return realized_sparsity(enc, PruningPlan.from_skips(sig, chosen, "unit"))

    rows = [  # (what, computed, expected)
        ("T5-XXL encoder params", n_enc, 4_762_310_656),
        ("MHA sub-block params", attn, 67_112_960),
        ("FFN sub-block params", ffn, 125_833_216),
        ("PixArt-Σ XL/2 params", n_dit, 610_856_096),
        ("SD-VAE decoder params", n_dec, 49_490_199),
        ("dense pipeline params", n_enc + n_dit + n_dec, 5_422_656_951),
    ]
    levels = [  # (what, sparsity, SPEC/paper value in %)
        ("ShortGPT/LaCo 6 blocks", skip_blocks(6), 24.31), ("ShortGPT/LaCo 8 blocks", skip_blocks(8), 32.41),
        ("ShortGPT/LaCo 10 blocks", skip_blocks(10), 40.52),
        ("Skrr 11 MHA + 10 FFN", skip_units(11, 10), 41.92), ("FinerCut 9 MHA + 11 FFN", skip_units(9, 11), 41.75),
    ]
    ok = True
    print(f"{'quantity':28s} {'computed':>16s} {'paper/SPEC':>16s}")
    for what, got, want in rows:
        ok &= got == want
        print(f"{what:28s} {got:16,d} {want:16,d} {'ok' if got == want else 'MISMATCH'}")
    dense = n_enc + n_dit + n_dec
    print("\nTable 2 Param column (whole pipeline = T5 + DiT + VAE decoder), bf16 weight bytes:")
    for what, s, want_pct in levels:
        pct = 100 * s
        good = round(pct, 2) == want_pct
        ok &= good
        params = dense - s * n_enc
        print(f"{what:28s} sparsity {pct:6.2f} % (SPEC {want_pct:5.2f}) {'ok' if good else 'MISMATCH'}  "
              f"pipeline {params / 1e9:.2f} B, {2 * params / 2**30:.2f} GiB bf16")
    print(f"{'Dense':28s} pipeline {dense / 1e9:.2f} B (Table 2: 5.42 B), {2 * dense / 2**30:.2f} GiB bf16 "
          f"(Table 2: 10.18 GB incl. ~0.08 activations)")
    print("all numbers match" if ok else "some numbers DO NOT match")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
