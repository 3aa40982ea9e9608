"""The corrected form's amplification cap for IVON's σ², on the report's five tracking set-ups.

    python -m research.caps [--caps 1.5,2,3,5] [--forms second_order@2,...] [--estimator ivon_b2]
                                     [--seed 0] [--quick]

For one estimator (default: IVON's σ² with matched β2; any of ``estimators.ESTIMATORS`` that reads that run):
Spearman of the LOO estimate with the test NLL over training and its ratio to the leave-one-out truth (retraining
without every example) at the end, for the first-order form, the corrected form with the library's cap and with
each cap given, and any further forms (``--forms``, the names that ``estimators.estimate`` takes: ``second_order@2``
is the two-term series capped at 2). Prints one table (about 10 minutes on 2 cores; --quick: a reduced run, 8 + 4
retrained examples, for smoke checks only).
"""

from __future__ import annotations

import argparse

from research import experiments as E
from research.estimators import ESTIMATORS


def _caps(text: str) -> list[float]:
    try:
        caps = [float(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--caps takes numbers separated by commas, got {text!r}") from None
    if not all(c > 1.0 for c in caps):
        raise argparse.ArgumentTypeError(f"every cap must be > 1 (an amplification), got {text!r}")
    return caps


def _forms(text: str) -> list[str]:
    from sensitivity.deviations import FORMS

    forms = [f for f in text.split(",") if f]
    for f in forms:
        kind, _, cap = f.partition("@")
        if kind not in FORMS or (cap and not _caps(cap)):
            raise argparse.ArgumentTypeError(f"unknown form {f!r} (forms: {FORMS}, optionally '@<cap>')")
    return forms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", type=_caps, default="1.5,2,3,5")
    ap.add_argument("--forms", type=_forms, default="", help="further forms, e.g. second_order@2")
    ap.add_argument("--estimator", default="ivon_b2", choices=[k for k, v in ESTIMATORS.items() if v[1] == "ivon_b2"])
    ap.add_argument("--seed", type=int, default=0, help="another seed: another training subset and initialization")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    forms = E.FORMS + tuple(f"corrected@{c:g}" for c in args.caps) + tuple(args.forms)
    truth = {"n_truth": 8, "top_truth": 4} if args.quick else {}
    print("| setting | test-NLL range | " + " | ".join(f"{f} (Spearman / ratio)" for f in forms) + " |")
    print("|---|---|" + "---|" * len(forms))
    for kw, _ in E.tracking_settings(0.3 if args.quick else 1.0, 4 if args.quick else 8):
        r = E.tracking(estimators=(args.estimator,), forms=forms, seed=args.seed, **kw, **truth)
        s = r["summary"][args.estimator]
        name = f"{r['dataset']}, δ = {r['weight_decay']:g}" + (f", {r['label_noise']:.0%} flipped"
                                                                  if r["label_noise"] else "")
        cells = " | ".join(f"{s[f'spearman_{f}']:.2f} / {s[f'ratio_{f}']:.2f}" for f in forms)
        print(f"| {name} | {s['test_range']:.3f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
