"""What a run's LOO level is calibrated on, read from its config and its latest evaluation (worker.calibration
writes the metrics; docs/calibration.md measures how each mode holds)."""

from __future__ import annotations

from app.store.job_config import CalibrationConfig

DRIFT_WARN = 1.25  # a frozen scale this far from the one that would match now: the frozen LOO no longer predicts;
# a held-out NLL whose standard error passes DRIFT_WARN − 1 of it: the level is that uncertain


def _config(config: dict | None) -> CalibrationConfig:
    raw = (config or {}).get("calibration") if isinstance(config, dict) else None
    try:
        return CalibrationConfig.model_validate(raw or {})
    except ValueError:  # a Tracker run's free-form config
        return CalibrationConfig()


def calibration_summary(config: dict | None, metrics: dict | None, n_examples: int | None = None) -> dict:
    """The calibration's state at an evaluation: source, mode, held-out examples, scale, drift, and one line."""
    cfg, m = _config(config), metrics or {}
    out = {"source": cfg.source, "mode": cfg.mode, "calibrated": "calibration_scale" in m,
           "examples": int(m["calibration_examples"]) if "calibration_examples" in m else None,
           "heldout_nll": m.get("calibration_nll"), "heldout_nll_se": m.get("calibration_nll_se"),
           "scale": m.get("calibration_scale"), "fit": m.get("calibration_fit"),
           "fitted_step": int(m["calibration_step"]) if "calibration_step" in m else None,
           "loo_raw": m.get("loo_raw"), "drift": None, "warning": False, "reached": None}
    if cfg.scale is not None and out["calibrated"]:
        out.update(source="fixed", mode="fixed")
        out["line"] = (f"LOO calibrated by a fixed scale {cfg.scale:.3g} on σ² (calibration.scale, e.g. another "
                       f"run's): uncalibrated it would read {m.get('loo_raw', float('nan')):.4g}; how a scale carries "
                       "between runs: docs/calibration.md.")
        return out
    if not out["calibrated"]:
        given = isinstance(config, dict) and isinstance(config.get("calibration"), dict)
        why = ("calibration.source is none" if cfg.source == "none" else
               "no evaluation yet" if not m else
               "none configured: a Tracker run without calibration, or a run from before it" if not given else
               f"its held-out split would be fewer than calibration.min_examples ({cfg.min_examples})")
        out["line"] = (f"LOO uncalibrated ({why}): its level follows IVON's hess_init and the run's length, so "
                       "compare it between evaluations, not with a test loss (docs/calibration.md).")
        return out
    held = (f"{out['examples']:,} training examples held out of training" if cfg.source == "split"
            else f"{out['examples']:,} held-out examples (the test split, or the Tracker's)")
    nll = f"held-out NLL {out['heldout_nll']:.4g}" + (f" ± {out['heldout_nll_se']:.2g}" if out["heldout_nll_se"]
                                                      else "")
    share = (out["heldout_nll_se"] or 0.0) / out["heldout_nll"] if out["heldout_nll"] else 0.0
    small = (f" With {out['examples']:,} held-out examples the level itself is uncertain by ±{share:.0%}: raise "
             "calibration.fraction or max_examples." if share > DRIFT_WARN - 1 else "")
    out["reached"] = m.get("calibration_reached") != 0.0  # absent (older runs): not known to have failed
    if cfg.mode == "refit" and not out["reached"]:
        out["warning"] = True
        low = (out["fit"] or 0.0) < 1.0
        why = ("even at the smallest scale the LOO is above it: the training loss at the mean already exceeds the "
               "held-out NLL (early in training, or a model that has not fit its labels yet), so the LOO reads about "
               "the training loss and the per-example scores are near zero at this evaluation" if low else
               "even at the largest scale the LOO stays below it")
        out["line"] = (f"LOO calibration on {held} could not reach the {nll}: {why}; the scale in use is "
                       f"{out['scale']:.3g} (docs/calibration.md).{small}")
        return out
    if cfg.mode == "refit" or out["fit"] is None:
        out["warning"] = bool(small)
        out["line"] = (f"LOO calibrated on {held} ({nll}), its scale on σ² ({out['scale']:.3g}) refitted at every "
                       "evaluation: its mean is the held-out NLL's; the per-example values are at that level "
                       f"(docs/calibration.md).{small}")
        return out
    out["drift"] = out["fit"] / out["scale"] if out["scale"] else None
    drift = out["drift"]
    out["warning"] = drift is not None and not (1 / DRIFT_WARN <= drift <= DRIFT_WARN) or bool(small)
    since = f" up to step {out['fitted_step']}" if out["fitted_step"] is not None else ""
    held_level = ", with σ²'s level held" if cfg.mode == "frozen_variance" else ""
    verdict = ("beyond ±25%: the frozen LOO no longer predicts the held-out level" if out["warning"]
               else "within ±25%")
    out["line"] = (f"LOO calibrated on {held}{since}, then frozen{held_level} (scale {out['scale']:.3g} on σ²); "
                   f"the {nll} now asks for {out['fit']:.3g}: drift {drift:.2f}×, {verdict} (docs/calibration.md)."
                   f"{small}")
    return out
